"""SSA: stochastically subsampled self-attention (Hussain, Zaki & Subramanian, "The Information
Pathways Hypothesis: Transformers are Dynamic Self-Ensembles", KDD 2023, arXiv 2306.01705).

During training each self-attention layer attends, on every forward pass, to a random subset
``S`` of the key/value positions:

    Attn_S(Q, K, V)_q = sum_{j in S} softmax_{j in S}(<Q_q, K_j> * scale) V_j

i.e. the scores of keys outside ``S`` are set to ``-inf`` before the softmax
(:func:`subsampled_attention`). Each pass thus trains one sparse sub-network ("information
pathway"); the dense model is the ensemble of all of them. Training ends with a short dense
phase (the last ``dense_fraction`` of the optimizer steps) so the model adapts to full attention,
and inference is always dense.

What is sampled here: ``ceil(ratio * N)`` of the ``N`` key positions, uniformly without
replacement, independently for every sample, layer and forward pass, and shared by all queries
and (by default) all heads of the layer; ``per_head=True`` draws a subset per head instead. The
processor gathers the kept keys before attention (:func:`attend_to_subset`), so attention
costs ``ratio`` of the dense compute and memory; it is the same function as the masked
:func:`subsampled_attention`. This is the paper's *unstructured* sampling as we read it; the
paper's locally-biased variant for ordered inputs (images, text) is not implemented.

:class:`SubsampledAttnProcessor` is a ``diffusers`` attention processor for
``diffusers.models.attention_processor.Attention`` (the 4-D ``(B, C, H, W)`` path of UNet
mid-block attention and the 3-D ``(B, N, C)`` path); cross-attention falls back to the layer's
original processor, as do eval mode and ``torch.no_grad()``. :class:`SubsampledAttention` swaps it
into every attention module, whose processors must be ``AttnProcessor``, ``AttnProcessor2_0`` or
``XFormersAttnProcessor`` (the dense path keeps the original, so an xformers model stays on
xformers there; a model with any other processor or a dispatch backend is refused, naming it),
and restores the originals at ``on_train_end``.

Not compatible with gradient checkpointing: the recomputed forward would draw another subset
(a warning is raised when the model reports ``is_gradient_checkpointing``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..attention import SSA_REPRODUCES, attention_modules, backend_of
from .base import Callback, TrainContext


def num_kept(num_keys: int, ratio: float) -> int:
    """``ceil(ratio * num_keys)``, at least 1 (a query needs a key to attend to)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    # the small slack keeps e.g. 0.3 * 10 from rounding up to 4
    return max(1, min(num_keys, math.ceil(ratio * num_keys - 1e-9)))


def sample_key_subset(
    batch_size: int,
    num_heads: int,
    num_keys: int,
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices ``(batch_size, num_heads, ceil(ratio * num_keys))`` of kept keys: a uniform random
    subset without replacement per (sample, head), drawn on the generator's device (CPU by default)."""
    kept = num_kept(num_keys, ratio)
    device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch_size, num_heads, num_keys, generator=generator, device=device)
    return noise.argsort(dim=-1)[..., :kept]


def keep_mask_from_index(index: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean keep mask ``(B, heads, 1, num_keys)`` (broadcast over queries) from kept indices."""
    mask = torch.zeros(*index.shape[:-1], num_keys, dtype=torch.bool, device=index.device)
    return mask.scatter(-1, index, True)[..., None, :]


def subsampled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention where keys outside ``keep_mask`` get score ``-inf`` before the softmax.

    ``q``: ``(..., Nq, D)``; ``k``, ``v``: ``(..., Nk, D)``; ``keep_mask``: bool, broadcastable to
    ``(..., Nq, Nk)``, with at least one kept key per query. ``scale`` defaults to ``D ** -0.5``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attend_to_subset(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`subsampled_attention` computed on the gathered subset (cost ``~ len(S) / Nk``).

    ``q``, ``k``, ``v``: ``(B, H, N, D)``; ``index``: ``(B, H or 1, kept)`` kept key positions;
    ``attn_mask``: optional additive or boolean mask ``(B, H, Nq or 1, Nk)``, gathered alike.
    """
    batch, heads, _, dim = k.shape
    index = index.expand(batch, heads, index.shape[-1])
    gather = index[..., None].expand(-1, -1, -1, dim)
    k, v = k.gather(2, gather), v.gather(2, gather)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, heads, -1, -1)
        attn_mask = attn_mask.gather(-1, index[:, :, None, :].expand(-1, -1, attn_mask.shape[2], -1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class SubsampledAttnProcessor:
    """A ``diffusers`` attention processor running SSA in training and ``dense_processor``
    otherwise (eval mode, no-grad, cross-attention, or ``dense = True``).

    Args:
        ratio: fraction of key positions kept per forward pass.
        per_head: draw a subset per head instead of one per sample shared by the heads.
        generator: RNG for the subsets (``None``: torch's global CPU RNG).
        dense_processor: the processor for dense attention (default ``AttnProcessor2_0()``).
    """

    def __init__(
        self,
        ratio: float = 0.25,
        per_head: bool = False,
        generator: torch.Generator | None = None,
        dense_processor=None,
    ):
        num_kept(1, ratio)  # validates ratio
        self.ratio = float(ratio)
        self.per_head = per_head
        self.generator = generator
        self.dense_processor = dense_processor if dense_processor is not None else AttnProcessor2_0()
        self.dense = False

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            self.dense
            or encoder_hidden_states is not None
            or not attn.training
            or not torch.is_grad_enabled()
        ):
            return self.dense_processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        # the steps of diffusers' AttnProcessor2_0, with the key subset in the middle
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        index = sample_key_subset(
            batch_size, attn.heads if self.per_head else 1, key.shape[2], self.ratio, self.generator
        )
        hidden_states = attend_to_subset(
            query, key, value, index.to(key.device), scale=attn.scale, attn_mask=attention_mask
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SubsampledAttention(Callback):
    """SSA for every diffusers ``Attention`` of the model, then a dense phase.

    Args:
        ratio: fraction of key positions kept per forward pass (0.25: 4x less attention compute).
        dense_fraction: the last ``dense_fraction * total_steps`` optimizer steps use dense
            attention (needs the runner's ``total_steps``; 0 disables the dense phase).
        per_head: one subset per head instead of one shared by the heads.
        seed: seed of the subsets' generator (carried in ``state_dict``).
    """

    def __init__(
        self, ratio: float = 0.25, dense_fraction: float = 0.1, per_head: bool = False, seed: int = 0
    ):
        num_kept(1, ratio)
        if not 0.0 <= dense_fraction <= 1.0:
            raise ValueError(f"dense_fraction must be in [0, 1], got {dense_fraction}")
        self.ratio = float(ratio)
        self.dense_fraction = float(dense_fraction)
        self.per_head = per_head
        self.generator = torch.Generator().manual_seed(seed)
        self.dense_phase = False
        self.processors: list[SubsampledAttnProcessor] = []
        self._originals: list[tuple[Attention, object]] = []
        self._model: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, optimizer) -> None:
        self._model = model
        modules = list(attention_modules(model))
        unsupported = [
            (name, module)
            for name, module in modules
            if type(module.processor).__name__ not in SSA_REPRODUCES
        ]
        if unsupported:
            name, module = unsupported[0]
            raise ValueError(
                f"SubsampledAttention cannot subsample {name!r}: it runs {type(module.processor).__name__} "
                f"({backend_of(module)}; {len(unsupported)} of {len(modules)} modules alike) and SSA reproduces "
                "only AttnProcessor / AttnProcessor2_0 / XFormersAttnProcessor (UNet-style attention), "
                "and subsampling part of a model would train a different method; leave SSA out for this model"
            )
        if not modules:
            raise ValueError("SubsampledAttention found no diffusers attention module in the model")
        for _, module in modules:
            # the dense path keeps the layer's own processor (xformers stays xformers); the
            # subsampled path runs SDPA on the kept keys
            processor = SubsampledAttnProcessor(self.ratio, self.per_head, self.generator, module.processor)
            processor.dense = self.dense_phase
            self._originals.append((module, module.processor))
            self.processors.append(processor)
            module.set_processor(processor)

    def _set_dense(self, dense: bool) -> None:
        self.dense_phase = dense
        for processor in self.processors:
            processor.dense = dense

    def on_train_begin(self, ctx: TrainContext) -> None:
        if self.dense_fraction > 0 and ctx.total_steps is None:
            raise ValueError("SubsampledAttention's dense phase needs the runner's total_steps")
        if getattr(self._model, "is_gradient_checkpointing", False):
            warnings.warn(
                "SubsampledAttention with gradient checkpointing: the recomputed forward draws another "
                "key subset, so the gradients do not match the forward pass",
                stacklevel=2,
            )
        self.on_step_begin(ctx)

    def on_step_begin(self, ctx: TrainContext) -> None:
        if self.dense_phase or ctx.total_steps is None or self.dense_fraction == 0:
            return
        # integer start: (1 - 0.7) * 10 is 3.0000000000000004 in floats
        if ctx.step >= ctx.total_steps - round(self.dense_fraction * ctx.total_steps):
            self._set_dense(True)

    def on_train_end(self, ctx: TrainContext) -> None:
        for module, original in self._originals:
            module.set_processor(original)
        self._originals.clear()
        self.processors.clear()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "dense_phase": self.dense_phase}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._set_dense(bool(state["dense_phase"]))
