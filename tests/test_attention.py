"""Attention backends: what each module runs, and the features that need a particular one
(Smooth Diffusion's double backward, SSA's processor) switching or refusing with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from tiny_flow_two_call import tiny_flux
from tiny_pipelines import tiny_sd, tiny_sd3

from diffguide.attention import (
    attention_backends,
    attention_modules,
    backend_of,
    restore_attention,
    snapshot_attention,
    use_twice_differentiable_attention,
)
from diffguide.callbacks import SmoothVariation
from diffguide.callbacks.base import TrainContext
from diffguide.callbacks.ssa import SubsampledAttention, SubsampledAttnProcessor


@pytest.fixture
def registry():
    """Restores the process-wide active dispatch backend that diffusers' setters change."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def _unet2d() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip


def _set_processors(model: torch.nn.Module, make) -> list:
    """A fresh ``make()`` on every attention module (UNet2DModel has no set_attn_processor)."""
    processors = []
    for _, module in attention_modules(model):
        processors.append(make())
        module.set_processor(processors[-1])
    return processors


def _processors(model: torch.nn.Module) -> list:
    return [module.processor for _, module in attention_modules(model)]


def _double_backward(model, x: torch.Tensor, forward) -> None:
    """A gradient of a gradient through ``model`` (what Smooth Diffusion's penalty takes)."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(forward(model, x).square().sum(), x, create_graph=True)
    grad.square().sum().backward()


def _unet_forward(model, x):
    return model(x, torch.tensor([10])).sample


class _Custom:
    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def test_backend_of_names_each_processor_kind():
    unet = tiny_sd().unet
    count = sum(attention_backends(unet).values())
    assert attention_backends(unet) == {"sdpa": count} and count > 0
    for processor, name in [
        (AttnProcessor(), "plain"),
        (XFormersAttnProcessor(), "xformers"),
        (SlicedAttnProcessor(slice_size=1), "sliced"),
        (_Custom(), "custom:_Custom"),
    ]:
        unet.set_attn_processor(processor)
        assert attention_backends(unet) == {name: count}


def test_dispatch_backends_are_read_from_the_processor_or_the_active_registry(registry):
    transformer = tiny_flux().transformer
    count = sum(attention_backends(transformer).values())
    assert attention_backends(transformer) == {"sdpa": count}
    with attention_backend("_native_math"):  # processors that name no backend follow the registry
        assert attention_backends(transformer) == {"_native_math": count}
    transformer.set_attention_backend("_native_math")
    assert {backend_of(module) for _, module in attention_modules(transformer)} == {"_native_math"}


def test_set_attention_backend_leaves_a_unets_processors_but_moves_every_other_model(registry):
    """The diffusers behaviour diffguide.attention's docstring warns about (0.42.1)."""
    unet, transformer = tiny_sd().unet, tiny_flux().transformer
    unet.set_attention_backend("_native_math")
    assert set(attention_backends(unet)) == {"sdpa"}  # AttnProcessor2_0 has no _attention_backend
    assert set(attention_backends(transformer)) == {"_native_math"}  # the registry moved
    unet.reset_attention_backend()
    assert set(attention_backends(transformer)) == {"_native_math"}  # and reset does not move it back


def test_twice_differentiable_attention_replaces_xformers_with_plain_attention():
    unet = _unet2d()
    _set_processors(unet, XFormersAttnProcessor)
    count = sum(attention_backends(unet).values())
    assert use_twice_differentiable_attention(unet) == {"xformers": count}
    assert attention_backends(unet) == {"plain": count}
    _double_backward(unet, torch.randn(2, 1, 8, 8), _unet_forward)


def test_twice_differentiable_attention_moves_dispatch_models_to_the_math_kernel(registry):
    pipe = tiny_flux()
    transformer = pipe.transformer.float()
    hidden = torch.randn(1, 4, transformer.config.in_channels)
    kwargs = {
        "encoder_hidden_states": torch.randn(1, 3, transformer.config.joint_attention_dim),
        "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(4, 3),
        "txt_ids": torch.zeros(3, 3),
    }

    def forward(model, x):
        return model(hidden_states=x, **kwargs).sample

    with pytest.raises(RuntimeError, match="not implemented"):  # torch's fused CPU attention
        _double_backward(transformer, hidden, forward)
    transformer.zero_grad()
    count = sum(attention_backends(transformer).values())
    assert use_twice_differentiable_attention(transformer) == {"sdpa": count}
    assert attention_backends(transformer) == {"_native_math": count}
    _double_backward(transformer, hidden, forward)


def test_twice_differentiable_attention_refuses_joint_attention_before_switching_anything():
    transformer = tiny_sd3().transformer
    before = attention_backends(transformer)
    with pytest.raises(ValueError, match="JointAttnProcessor2_0.*no twice-differentiable equivalent"):
        use_twice_differentiable_attention(transformer)
    assert attention_backends(transformer) == before


def test_smooth_variation_warns_only_when_it_replaces_a_backend_the_user_chose_and_puts_it_back():
    unet = _unet2d()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmoothVariation().setup(unet, None)  # SDPA -> plain: the documented default, no warning
    originals = _set_processors(unet, XFormersAttnProcessor)
    callback = SmoothVariation()
    with pytest.warns(UserWarning, match="from xformers to a twice-differentiable"):
        callback.setup(unet, None)
    assert set(attention_backends(unet)) == {"plain"}
    callback.on_train_end(TrainContext(model=unet))
    assert _processors(unet) == originals  # the user's xformers again for sampling


def test_ssa_keeps_xformers_for_dense_attention_and_subsamples_with_sdpa():
    unet = _unet2d()
    originals = _set_processors(unet, XFormersAttnProcessor)
    callback = SubsampledAttention(ratio=0.5, dense_fraction=0.0)
    callback.setup(unet, None)
    processors = _processors(unet)
    assert all(isinstance(p, SubsampledAttnProcessor) for p in processors)
    assert [p.dense_processor for p in processors] == originals
    unet.train()
    _unet_forward(unet, torch.randn(2, 1, 8, 8)).square().mean().backward()  # sparse path: SDPA, no xformers
    callback.on_train_end(TrainContext(model=unet))
    assert _processors(unet) == originals


@pytest.mark.parametrize(
    "make, processor_name",
    [
        (lambda: _sliced(_unet2d()), "SlicedAttnProcessor"),
        (lambda: tiny_flux().transformer, "FluxAttnProcessor"),
        (lambda: tiny_sd3().transformer, "JointAttnProcessor2_0"),
    ],
)
def test_ssa_refuses_a_processor_it_does_not_reproduce_naming_it(make, processor_name):
    model = make()
    before = _processors(model)
    with pytest.raises(ValueError, match=f"runs {processor_name}.*leave SSA out"):
        SubsampledAttention(ratio=0.5).setup(model, None)
    assert _processors(model) == before


def _sliced(unet: UNet2DModel) -> UNet2DModel:
    _set_processors(unet, lambda: SlicedAttnProcessor(slice_size=1))
    return unet


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
def test_ssa_still_takes_sdpa_and_plain_processors(processor):
    unet = _unet2d()
    _set_processors(unet, processor)
    SubsampledAttention(ratio=0.5).setup(unet, None)
    assert all(isinstance(p, SubsampledAttnProcessor) for p in _processors(unet))


def test_restore_attention_puts_back_processors_dispatch_backends_and_the_registry(registry):
    unet, transformer = _unet2d(), tiny_flux().transformer
    unet_snapshot, transformer_snapshot = snapshot_attention(unet), snapshot_attention(transformer)
    before = _processors(unet)
    use_twice_differentiable_attention(unet)
    transformer.set_attention_backend("_native_math")
    restore_attention(unet_snapshot)
    restore_attention(transformer_snapshot)
    assert _processors(unet) == before
    assert attention_backends(transformer) == {"sdpa": sum(attention_backends(transformer).values())}
