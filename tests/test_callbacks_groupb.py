"""PS-KD, ELR, SSA and the Monge gap on the callback protocol: each claim checked against an
independent computation, and each callback driven through a tiny plain loop."""

from __future__ import annotations

import copy
import math

import numpy as np
import ot
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from diffguide.callbacks.base import CallbackRunner
from diffguide.callbacks.elr import ELR
from diffguide.callbacks.monge_gap import MongeGap, entropic_ot_lower_value, monge_gap
from diffguide.callbacks.pskd import PSKD, pskd_alpha, pskd_loss
from diffguide.callbacks.ssa import (
    SubsampledAttention,
    SubsampledAttnProcessor,
    attend_to_subset,
    keep_mask_from_index,
    sample_key_subset,
    subsampled_attention,
)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def classification_data(n: int = 6, dim: int = 4, classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=generator)
    y = torch.arange(n) % classes
    return x, y


# ---------------------------------------------------------------- PS-KD


def test_pskd_alpha_grows_linearly_to_alpha_T():
    assert [pskd_alpha(t, 4, 0.8) for t in (1, 2, 3, 4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    with pytest.raises(ValueError):
        pskd_alpha(0, 4)


def run_pskd_epochs(callback: PSKD, model, x, y, orders, check=None, lr=0.5):
    """A plain loop over ``orders`` (one index order per epoch, batches of 2)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    runner = CallbackRunner([callback], model, optimizer, total_steps=len(orders) * len(orders[0]) // 2)
    runner.train_begin()
    for epoch, order in enumerate(orders):
        runner.epoch_begin(epoch)
        for start in range(0, len(order), 2):
            index = torch.tensor(order[start : start + 2])
            ctx = runner.step_begin({"x": x[index], "label": y[index], "index": index})
            ctx.outputs = model(x[index])
            loss = runner.total_loss(torch.zeros(()))
            if check is not None:
                check(epoch, index, ctx.outputs.detach().numpy(), ctx.logs)
            loss.backward()
            runner.optimizer_step()
        runner.epoch_end()
    runner.train_end()
    return runner


def test_pskd_targets_follow_update_rule_over_three_epochs():
    x, y = classification_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    total_epochs, alpha_T = 3, 0.8
    orders = [[0, 1, 2, 3, 4, 5], [4, 2, 0, 5, 3, 1], [1, 3, 5, 0, 2, 4]]  # shuffled between epochs
    previous: dict[int, np.ndarray] = {}
    current: dict[int, np.ndarray] = {}
    seen_epochs = []

    def check(epoch, index, logits, logs):
        nonlocal previous, current
        if epoch not in seen_epochs:
            seen_epochs.append(epoch)
            previous, current = current, {}
        alpha = alpha_T * (epoch + 1) / total_epochs  # hand-computed: 0.2667, 0.5333, 0.8
        expected = []
        for row, i in enumerate(index.tolist()):
            onehot = np.eye(3)[y[i]]
            target = onehot if epoch == 0 else (1 - alpha) * onehot + alpha * previous[i]
            expected.append(-(target * np.log(np_softmax(logits[row]))).sum())
            current[i] = np_softmax(logits[row])
        assert logs["pskd"] == pytest.approx(np.mean(expected), rel=1e-5)

    callback = PSKD(num_samples=6, total_epochs=total_epochs, alpha_T=alpha_T)
    run_pskd_epochs(callback, model, x, y, orders, check)
    assert callback.epoch == 3
    # the buffer now holds the third epoch's predictions, row by dataset index
    np.testing.assert_allclose(callback.past.numpy(), np.stack([current[i] for i in range(6)]), rtol=1e-5)
    assert callback.has_past.all()


def test_pskd_correction_mode_adds_up_to_the_pskd_loss_with_a_hard_ce_task_loss():
    x, y = classification_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    callback = PSKD(num_samples=6, total_epochs=2, replaces_task_loss=False)
    run_pskd_epochs(callback, model, x, y, [list(range(6))])  # one epoch fills the buffer
    logits = model(x[:2])
    ctx_batch = {"x": x[:2], "label": y[:2], "index": torch.arange(2)}
    past = callback.past[:2].clone()
    runner = CallbackRunner([callback], model, None)
    ctx = runner.step_begin(ctx_batch)
    ctx.outputs = logits
    total = runner.total_loss(torch.nn.functional.cross_entropy(logits, y[:2]))
    assert float(total.detach()) == pytest.approx(
        float(pskd_loss(logits, y[:2], past, callback.alpha).detach()), rel=1e-6
    )


def test_pskd_warns_when_the_task_loss_it_replaces_is_not_zero():
    x, y = classification_data()
    model = torch.nn.Linear(4, 3)
    runner = CallbackRunner([PSKD(num_samples=6, total_epochs=2)], model, None)
    ctx = runner.step_begin({"x": x[:2], "label": y[:2], "index": torch.arange(2)})
    ctx.outputs = model(x[:2])
    with pytest.warns(UserWarning, match="replaces the task loss"):
        runner.total_loss(torch.nn.functional.cross_entropy(ctx.outputs, y[:2]))


def test_pskd_buffers_round_trip_through_state_dict():
    x, y = classification_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    callback = PSKD(num_samples=6, total_epochs=3)
    run_pskd_epochs(callback, model, x, y, [list(range(6)), [5, 4, 3, 2, 1, 0]])
    # tuple batches (x, y, index) use the default readers too
    restored = PSKD(num_samples=6, total_epochs=3)
    restored.load_state_dict(copy.deepcopy(callback.state_dict()))
    assert restored.epoch == 2 and restored.alpha == pytest.approx(0.8)
    for name in ("past", "has_past", "current", "has_current"):
        assert torch.equal(getattr(restored, name), getattr(callback, name))
    losses = []
    for cb in (callback, restored):
        ctx = CallbackRunner([cb], model, None).step_begin((x[:2], y[:2], torch.arange(2)))
        ctx.outputs = model(x[:2])
        losses.append(float(cb.loss_terms(ctx)["pskd"].detach()))
    assert losses[0] == losses[1]


# ---------------------------------------------------------------- ELR


def test_elr_targets_follow_the_momentum_update_and_the_loss_equals_the_formula():
    x, y = classification_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    beta, lam = 0.7, 3.0
    callback = ELR(num_samples=6, beta=beta, weight=lam)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    runner = CallbackRunner([callback], model, optimizer, total_steps=6)
    reference = np.zeros((6, 3))
    runner.train_begin()
    for order in ([0, 1, 2, 3, 4, 5], [3, 0, 5, 1, 4, 2]):
        runner.epoch_begin()
        for start in (0, 2, 4):
            index = torch.tensor(order[start : start + 2])
            ctx = runner.step_begin({"x": x[index], "label": y[index], "index": index})
            ctx.outputs = model(x[index])
            loss = runner.total_loss(torch.nn.functional.cross_entropy(ctx.outputs, y[index]))
            # independent recomputation: clamp, renormalize for the target, unnormalized in the penalty
            p = np.clip(np_softmax(ctx.outputs.detach().numpy().astype(np.float64)), 1e-4, 1 - 1e-4)
            rows = index.numpy()
            reference[rows] = beta * reference[rows] + (1 - beta) * p / p.sum(-1, keepdims=True)
            expected = lam * np.mean(np.log(1 - (p * reference[rows]).sum(-1)))
            assert ctx.logs["elr"] == pytest.approx(expected, rel=1e-5)
            loss.backward()
            runner.optimizer_step()
        runner.epoch_end()
    runner.train_end()
    np.testing.assert_allclose(callback.targets.numpy(), reference, rtol=1e-5)


def test_elr_penalty_pulls_predictions_towards_the_targets():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    callback = ELR(num_samples=4, num_classes=3)
    callback.targets = torch.softmax(torch.randn(4, 3), -1) * 0.9
    ctx = CallbackRunner([callback], torch.nn.Linear(1, 1), None).step_begin({"index": torch.arange(4)})
    ctx.outputs = logits
    callback.loss_terms(ctx)["elr"].backward()
    # a gradient step raises <p_i, t_i> for every sample
    targets = callback.targets
    before = (torch.softmax(logits, -1) * targets).sum(-1)
    after = (torch.softmax(logits - 0.1 * logits.grad, -1) * targets).sum(-1)
    assert (after > before).all()


def test_elr_targets_round_trip_through_state_dict():
    callback = ELR(num_samples=5)
    ctx = CallbackRunner([callback], torch.nn.Linear(1, 1), None).step_begin(
        (None, None, torch.tensor([0, 3]))
    )
    ctx.outputs = torch.randn(2, 4)
    first = callback.loss_terms(ctx)["elr"]
    restored = ELR(num_samples=5)
    restored.load_state_dict(copy.deepcopy(callback.state_dict()))
    assert torch.equal(restored.targets, callback.targets) and restored.num_classes == 4
    assert float(restored.loss_terms(ctx)["elr"]) == pytest.approx(float(callback.loss_terms(ctx)["elr"]))
    assert float(first) != 0.0


# ---------------------------------------------------------------- SSA


def attention_3d() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4)


def attention_4d() -> Attention:
    """Configured like UNet2DModel's mid-block attention (group norm, residual, 4-D input)."""
    torch.manual_seed(0)
    return Attention(
        query_dim=8,
        heads=2,
        dim_head=4,
        norm_num_groups=4,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )


def test_ssa_attention_only_sees_the_sampled_subset():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    index = sample_key_subset(2, 1, 6, ratio=0.5, generator=torch.Generator().manual_seed(1))
    assert index.shape == (2, 1, 3)
    keep = keep_mask_from_index(index, 6)
    out = subsampled_attention(q, k, v, keep)
    # the gathered version (what the processor runs) is the same function
    torch.testing.assert_close(attend_to_subset(q, k, v, index), out)
    for b in range(2):
        dropped = next(j for j in range(6) if not keep[b, 0, 0, j])
        kept = int(index[b, 0, 0])
        for position, should_change in ((dropped, False), (kept, True)):
            k2, v2 = k.clone(), v.clone()
            k2[b, :, position] += 3.0
            v2[b, :, position] += 3.0
            changed = subsampled_attention(q, k2, v2, keep)
            assert torch.equal(changed[1 - b], out[1 - b])
            assert (not torch.allclose(changed[b], out[b])) == should_change


def test_ssa_processor_ignores_tokens_outside_the_subset():
    attn = attention_3d().train()
    hidden = torch.randn(1, 6, 8)
    processor = SubsampledAttnProcessor(ratio=0.5, generator=torch.Generator().manual_seed(3))
    state = processor.generator.get_state()
    kept = set(sample_key_subset(1, 1, 6, 0.5, processor.generator)[0, 0].tolist())
    dropped = next(j for j in range(6) if j not in kept)
    outputs = []
    for h in (hidden, hidden.clone().index_add_(1, torch.tensor([dropped]), torch.ones(1, 1, 8))):
        processor.generator.set_state(state)
        outputs.append(processor(attn, h))
    others = [j for j in range(6) if j != dropped]
    # only the changed token's own row (its query) moves: no other query attended to it
    torch.testing.assert_close(outputs[0][:, others], outputs[1][:, others])


@pytest.mark.parametrize("make, shape", [(attention_3d, (2, 5, 8)), (attention_4d, (2, 8, 3, 3))])
def test_ssa_at_ratio_one_equals_diffusers_attention(make, shape):
    attn = make().train()
    hidden = torch.randn(*shape)
    processor = SubsampledAttnProcessor(ratio=1.0, generator=torch.Generator().manual_seed(0))
    ours = processor(attn, hidden)  # training mode with grad: the subsampled path
    for reference in (AttnProcessor(), AttnProcessor2_0()):
        torch.testing.assert_close(ours, reference(attn, hidden), rtol=1e-5, atol=1e-6)


def test_ssa_is_dense_in_eval_mode_and_without_grad():
    attn = attention_4d()
    hidden = torch.randn(2, 8, 3, 3)
    dense = AttnProcessor()(attn, hidden)
    processor = SubsampledAttnProcessor(ratio=0.25, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(processor(attn.train(), hidden), dense)
    with torch.no_grad():
        torch.testing.assert_close(processor(attn, hidden), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(processor(attn.eval(), hidden), dense, rtol=1e-5, atol=1e-6)


class TwoAttentionBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([Attention(query_dim=8, heads=2, dim_head=4) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize(
    "dense_fraction, expected_dense_steps",
    [(0.3, [7, 8, 9]), (0.7, [3, 4, 5, 6, 7, 8, 9])],  # 1 - 0.7 = 0.30000000000000004 in floats
)
def test_ssa_switches_to_dense_for_the_final_phase_and_restores_processors(
    dense_fraction, expected_dense_steps
):
    model = TwoAttentionBlocks()
    originals = [block.processor for block in model.blocks]
    callback = SubsampledAttention(ratio=0.25, dense_fraction=dense_fraction, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    runner = CallbackRunner([callback], model, optimizer, total_steps=10)
    assert all(isinstance(block.processor, SubsampledAttnProcessor) for block in model.blocks)
    x = torch.randn(2, 6, 8)
    dense_steps = []
    runner.train_begin()
    for _ in range(10):
        ctx = runner.step_begin(x)
        ctx.outputs = model(x)
        if callback.dense_phase:
            dense_steps.append(ctx.step)
            # dense phase: the training forward is the original dense model's
            reference = copy.deepcopy(model)
            for block, original in zip(reference.blocks, originals, strict=True):
                block.set_processor(original)
            torch.testing.assert_close(ctx.outputs, reference(x))
        runner.total_loss(ctx.outputs.square().mean()).backward()
        runner.optimizer_step()
    runner.train_end()
    assert dense_steps == expected_dense_steps
    assert [block.processor for block in model.blocks] == originals


def test_ssa_generator_and_phase_round_trip_through_state_dict():
    model = TwoAttentionBlocks().train()
    callback = SubsampledAttention(ratio=0.5, seed=4)
    callback.setup(model, None)
    x = torch.randn(2, 6, 8)
    model(x)
    state = copy.deepcopy(callback.state_dict())
    first = model(x)
    other = SubsampledAttention(ratio=0.5, seed=99)
    other.load_state_dict(state)
    reference = torch.Generator().set_state(state["generator"])
    assert torch.equal(
        sample_key_subset(2, 1, 6, 0.5, other.generator), sample_key_subset(2, 1, 6, 0.5, reference)
    )
    callback.load_state_dict(state)
    torch.testing.assert_close(model(x), first)  # same generator state: same subsets
    callback.load_state_dict({**state, "dense_phase": True})
    assert all(processor.dense for processor in callback.processors)


def test_ssa_drives_a_unet2d_mid_block_through_the_runner():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    callback = SubsampledAttention(ratio=0.5, dense_fraction=0.5)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.01)
    runner = CallbackRunner([callback], unet, optimizer, total_steps=2)
    assert len(callback.processors) == 1  # the mid-block attention
    runner.train_begin()
    for _ in range(2):
        ctx = runner.step_begin(torch.randn(2, 1, 8, 8))
        ctx.outputs = unet(ctx.batch, torch.tensor([10, 500])).sample
        runner.total_loss(ctx.outputs.square().mean()).backward()
        runner.optimizer_step()
    runner.train_end()
    assert isinstance(unet.mid_block.attentions[0].processor, AttnProcessor2_0)


# ---------------------------------------------------------------- Monge gap


def uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def exact_ot_cost(x: torch.Tensor, y: torch.Tensor) -> float:
    cost = torch.cdist(x.double(), y.double()) ** 2
    return float(ot.emd2(uniform(len(x)), uniform(len(y)), cost))


def double_centred_spread(cost: np.ndarray) -> float:
    n, m = cost.shape
    centring_rows, centring_cols = np.eye(n) - 1.0 / n, np.eye(m) - 1.0 / m
    return float(np.abs(centring_rows @ cost @ centring_cols).mean())


def test_monge_gap_is_nonnegative_and_bracketed_by_exact_ot_on_random_maps():
    torch.manual_seed(0)
    x = torch.randn(24, 3)
    maps = {
        "linear": x @ torch.randn(3, 3),
        "shuffle": x[torch.randperm(24)],
        "noise": x + 0.5 * torch.randn(24, 3),
        "mlp": torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))(x).detach(),
    }
    for name, mapped in maps.items():
        gap = float(monge_gap(x, mapped))
        displacement = float(((x - mapped) ** 2).sum(-1).mean())
        epsilon = 0.01 * double_centred_spread((torch.cdist(x, mapped) ** 2).numpy())
        unregularized = displacement - exact_ot_cost(x, mapped)
        # gap - (disp - W_0) = W_0 - W_eps, which lies in [0, eps log n] (module docstring)
        assert unregularized - 1e-5 <= gap <= unregularized + epsilon * math.log(24) + 1e-5, name
        assert gap > 0.05, name


def test_monge_gap_is_near_zero_for_optimal_maps():
    torch.manual_seed(0)
    x = torch.randn(24, 2)
    epsilon = 0.02
    identity = float(monge_gap(x, x.clone(), epsilon=epsilon))
    translation = float(monge_gap(x, x + torch.tensor([3.0, -1.0]), epsilon=epsilon))
    # For an optimal map W_0 = displacement, so 0 <= M <= eps log n, the exact worst case (reached
    # only when all points coincide). A translation adds a constant plus separable terms to the
    # cost, which the potentials absorb, so its gap equals the identity's.
    bound = epsilon * math.log(24)
    assert 0.0 <= identity <= bound
    assert translation == pytest.approx(identity, abs=1e-8)
    # With the default eps (1% of the double-centred cost's mean magnitude, under 0.13 here) on
    # 8-D samples whose nearest neighbours are >= 1.39 apart, the entropic plan puts under
    # exp(-10.5) of its mass off the identity coupling, so M is far below the worst case
    spread = torch.randn(24, 8)
    identity = float(monge_gap(spread, spread.clone()))
    assert 0.0 <= identity < 1e-6


def test_monge_gap_default_epsilon_does_not_depend_on_a_translation():
    # mean(C) grows by |b|^2 under a translation by b; the default eps must not, or the gap of
    # this optimal map would grow with |b| (0.021 -> 29.7 at |b| = 20 with eps = 0.01 mean(C))
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    identity = float(monge_gap(x, x.clone()))
    for shift in (torch.tensor([3.0, -1.0]), torch.tensor([20.0, 0.0])):
        assert float(monge_gap(x, x + shift)) == pytest.approx(identity, abs=1e-6)
    assert 0.0 <= identity <= 0.01 * double_centred_spread((torch.cdist(x, x) ** 2).numpy()) * math.log(64)


def test_monge_gap_entropic_value_matches_an_independent_primal_sinkhorn():
    torch.manual_seed(1)
    x, y = torch.randn(10, 2).double(), torch.randn(10, 2).double()
    cost = torch.cdist(x, y) ** 2
    epsilon = 0.5  # large enough for both Sinkhorns to converge to machine precision here
    # plain-numpy Sinkhorn, primal objective <P, C> - eps (H(P) - log n)
    kernel = np.exp(-cost.numpy() / epsilon)
    u, v = np.ones(10), np.ones(10)
    for _ in range(2000):
        u = (1 / 10) / (kernel @ v)
        v = (1 / 10) / (kernel.T @ u)
    plan = u[:, None] * kernel * v[None, :]
    primal = (plan * cost.numpy()).sum() - epsilon * (-(plan * np.log(plan)).sum() - math.log(10))
    assert np.abs(plan.sum(1) - 0.1).max() < 1e-12
    value = float(entropic_ot_lower_value(cost, epsilon, max_iter=2000, tol=1e-13))
    assert value == pytest.approx(primal, abs=1e-10)


def test_monge_gap_stays_nonnegative_when_sinkhorn_stops_early():
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    converged = float(monge_gap(x, x + 1.0, epsilon=0.05))
    for max_iter in (1, 3):
        early = float(monge_gap(x, x + 1.0, epsilon=0.05, max_iter=max_iter))
        # the dual at any potentials lower-bounds W_eps, so stopping early can only raise M
        assert early >= converged - 1e-7 and early >= 0.0


def test_monge_gap_gradient_reaches_the_map_parameters_and_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(12, 2, dtype=torch.float64)
    layer = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.8], [-0.5, 1.2]]))  # not symmetric: not an OT map
    gap = monge_gap(x, layer(x), epsilon=0.05, max_iter=3000, tol=1e-12)
    gap.backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad is not None
    direction = torch.randn(2, 2, dtype=torch.float64)
    step = 1e-5
    values = []
    for sign in (1.0, -1.0):
        weight = layer.weight.detach() + sign * step * direction
        values.append(
            float(monge_gap(x, x @ weight.T + layer.bias.detach(), epsilon=0.05, max_iter=3000, tol=1e-12))
        )
    numeric = (values[0] - values[1]) / (2 * step)
    assert float((layer.weight.grad * direction).sum()) == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_monge_gap_callback_drives_a_plain_loop_and_lowers_the_gap():
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.5], [-1.5, 1.0]]))  # a rotation-scaling: far from optimal
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    runner = CallbackRunner([MongeGap(weight=1.0)], layer, optimizer, total_steps=5)
    gaps = []
    runner.train_begin()
    for _ in range(5):
        ctx = runner.step_begin({"x": x})
        ctx.outputs = layer(x)
        runner.total_loss(torch.zeros(())).backward()
        gaps.append(ctx.logs["monge_gap"])
        runner.optimizer_step()
    runner.train_end()
    assert all(g >= 0 for g in gaps) and gaps[-1] < gaps[0]


def test_batch_readers_accept_any_mapping():
    from collections import UserDict

    from diffguide.callbacks.monge_gap import default_source
    from diffguide.callbacks.pskd import default_indices, default_labels

    batch = UserDict({"x": torch.ones(2, 3), "labels": torch.tensor([1, 2]), "index": torch.tensor([5, 6])})
    assert default_indices(batch).tolist() == [5, 6]
    assert default_labels(batch).tolist() == [1, 2]
    assert torch.equal(default_source(batch), torch.ones(2, 3))
