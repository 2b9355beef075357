"""ScheduledDropPath, representational alignment, OrthoGrad / StableMax, L0 projection and the
attention-sparsity penalty: each claim checked against an independent computation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffguide.callbacks.alignment import RepresentationalAlignment, linear_cka, match_layers_by_depth
from diffguide.callbacks.base import CallbackRunner
from diffguide.callbacks.drop_path import DropPathWrapper, ScheduledDropPath, drop_probability
from diffguide.callbacks.orthograd import (
    OrthoGrad,
    OrthoGradOptimizer,
    orthogonalize_gradient,
    stablemax,
    stablemax_cross_entropy,
)
from diffguide.callbacks.sparsity import (
    AttentionSparsityPenalty,
    L0Projection,
    global_l0_masks,
    l0_mask,
    l0_project,
)


def run_steps(runner: CallbackRunner, model: nn.Module, batches, on_step=None) -> list[dict]:
    """A plain loop: forward, task loss (MSE), callbacks' terms, backward, optimizer step."""
    logs = []
    runner.train_begin()
    for x, y in batches:
        ctx = runner.step_begin((x, y))
        if on_step is not None:
            on_step(ctx)
        ctx.outputs = model(x)
        loss = runner.total_loss(nn.functional.mse_loss(ctx.outputs, y))
        loss.backward()
        runner.optimizer_step()
        logs.append(dict(ctx.logs))
    return logs


def batches(n: int, d_in: int = 4, d_out: int = 3, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)) for _ in range(n)]


# --- ScheduledDropPath ------------------------------------------------------------------------


def test_drop_probability_schedule_values():
    # p = drop_prob * min(1, step / total) * (layer + 1) / num_layers
    assert drop_probability(0, 100, 0.3, 3, 4) == 0.0
    assert drop_probability(50, 100, 0.3, 3, 4) == pytest.approx(0.15)
    assert drop_probability(50, 100, 0.3, 0, 4) == pytest.approx(0.0375)
    assert drop_probability(100, 100, 0.3, 1, 4) == pytest.approx(0.15)
    assert drop_probability(200, 100, 0.3, 3, 4) == pytest.approx(0.3)  # clamped past the end
    assert drop_probability(25, 100, 0.3, 0, 4, scale_with_depth=False) == pytest.approx(0.075)
    with pytest.raises(ValueError):
        drop_probability(1, 0, 0.3, 0, 4)


def test_drop_path_wrapper_drops_whole_samples_rescales_and_is_identity_in_eval():
    torch.manual_seed(0)
    wrapper = DropPathWrapper(nn.Identity(), drop_prob=0.5)
    x = torch.ones(64, 3, 2)
    out = wrapper(x)
    per_sample = out.reshape(64, -1)
    dropped = (per_sample == 0).all(dim=1)
    kept = (per_sample == 2.0).all(dim=1)  # 1 / (1 - 0.5)
    assert bool((dropped | kept).all())
    assert 0 < int(dropped.sum()) < 64
    wrapper.eval()
    assert torch.equal(wrapper(x), x)


class DropPath(nn.Module):
    """Stand-in for timm's DropPath: found by class name and ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


class StochasticDepth(nn.Module):
    """Stand-in for torchvision's StochasticDepth: found by class name and ``p``."""

    def __init__(self, p: float = 0.0, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return x


class Block(nn.Module):
    def __init__(self, drop: nn.Module | None):
        super().__init__()
        self.branch = nn.Linear(4, 4)
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x):
        return x + self.drop(self.branch(x))


def test_scheduled_drop_path_drives_timm_and_torchvision_style_modules():
    torch.manual_seed(0)
    model = nn.Sequential(Block(DropPath()), Block(StochasticDepth()), Block(None), nn.Linear(4, 3))
    callback = ScheduledDropPath(drop_prob=0.4, wrap=["2.branch"])
    runner = CallbackRunner([callback], model, torch.optim.SGD(model.parameters(), lr=0.01), total_steps=4)
    assert isinstance(model[2].branch, DropPathWrapper)
    seen = []

    def record(ctx):
        seen.append((ctx.step, model[0].drop.drop_prob, model[1].drop.p, model[2].branch.drop_prob))

    run_steps(runner, model, batches(4), on_step=record)
    for step, p0, p1, p2 in seen:
        assert p0 == pytest.approx(0.4 * step / 4 * 1 / 3)
        assert p1 == pytest.approx(0.4 * step / 4 * 2 / 3)
        assert p2 == pytest.approx(0.4 * step / 4 * 3 / 3)
    assert [s for s, *_ in seen] == [0, 1, 2, 3]

    # no state beyond the step counter: a resumed runner continues the same schedule
    assert callback.state_dict() == {}
    fresh = nn.Sequential(Block(DropPath()), Block(StochasticDepth()), Block(None), nn.Linear(4, 3))
    resumed = CallbackRunner([ScheduledDropPath(0.4, wrap=["2.branch"])], fresh, None, total_steps=4)
    resumed.load_state_dict(runner.state_dict())
    resumed.step_begin(None)
    assert fresh[1].drop.p == pytest.approx(0.4 * 4 / 4 * 2 / 3)

    with pytest.raises(ValueError, match="total_steps"):
        CallbackRunner([ScheduledDropPath(0.4)], model, None).step_begin(None)


# --- Representational alignment ---------------------------------------------------------------


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.mark.parametrize("n, d", [(20, 8), (6, 10)])  # feature form and Gram form
def test_cka_is_one_for_orthogonal_rotation_and_isotropic_scaling(n, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    assert float(linear_cka(x, x @ q)) == pytest.approx(1.0, abs=1e-10)
    assert float(linear_cka(x, 3.7 * x)) == pytest.approx(1.0, abs=1e-10)
    assert float(linear_cka(x, torch.randn(n, d, generator=g, dtype=torch.float64))) < 0.99


@pytest.mark.parametrize("n, dx, dy", [(30, 5, 7), (8, 12, 9), (10, 3, 40)])
def test_cka_matches_numpy(n, dx, dy):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, dx, generator=g)
    y = torch.randn(n, dy, generator=g) + x[:, :1] * 2
    assert float(linear_cka(x, y)) == pytest.approx(numpy_cka(x.numpy(), y.numpy()), rel=1e-5)
    # activations with extra dims are flattened per sample
    x4 = torch.randn(n, 2, 3, 2, generator=g)
    assert float(linear_cka(x4, y)) == pytest.approx(numpy_cka(x4.numpy(), y.numpy()), rel=1e-5)


def test_match_layers_by_relative_depth():
    assert match_layers_by_depth(3, 5) == [0, 2, 4]
    assert match_layers_by_depth(5, 3) == [0, 0, 1, 2, 2]  # round(0.5) == 0, round(1.5) == 2
    assert match_layers_by_depth(4, 4) == [0, 1, 2, 3]
    assert match_layers_by_depth(1, 6) == [0]


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_alignment_loss_is_zero_for_identical_copies():
    target = mlp(0)
    guide = copy.deepcopy(target)
    layers = ["1", "3", "4"]
    callback = RepresentationalAlignment(guide, layers, layers, alpha=1.0)
    runner = CallbackRunner([callback], target, torch.optim.SGD(target.parameters(), lr=0.0), total_steps=2)
    logs = run_steps(runner, target, batches(2))
    for log in logs:
        assert log["alignment"] == pytest.approx(0.0, abs=1e-5)


def test_alignment_gradients_flow_only_into_the_target():
    target, guide = mlp(0), mlp(1)
    guide_before = copy.deepcopy(guide.state_dict())
    target_before = copy.deepcopy(target.state_dict())
    callback = RepresentationalAlignment(guide, ["1", "3"], ["1", "2", "3"], alpha=2.0)
    assert callback.pairs == [("1", "1"), ("3", "3")]
    x, y = batches(1)[0]
    callback.setup(target, None)
    target(x)
    terms = callback.loss_terms(CallbackRunner([], target, None).step_begin((x, y)))
    # independent value: 2 * sum(1 - CKA) over the pairs, from fresh forward passes
    with torch.no_grad():
        t1, t3 = target[:2](x), target[:4](x)
        g1, g3 = guide[:2](x), guide[:4](x)
    expected = 2.0 * ((1 - numpy_cka(t1.numpy(), g1.numpy())) + (1 - numpy_cka(t3.numpy(), g3.numpy())))
    assert float(terms["alignment"].detach()) == pytest.approx(expected, rel=1e-5)
    terms["alignment"].backward()
    assert all(p.grad is None and not p.requires_grad for p in guide.parameters())
    assert target[0].weight.grad is not None and float(target[0].weight.grad.abs().sum()) > 0
    assert not guide.training

    target.zero_grad()
    runner = CallbackRunner([callback], target, torch.optim.SGD(target.parameters(), lr=0.1), total_steps=3)
    run_steps(runner, target, batches(3))
    assert all(torch.equal(guide_before[k], v) for k, v in guide.state_dict().items())
    assert any(not torch.equal(target_before[k], v) for k, v in target.state_dict().items())


def test_alignment_requires_the_target_forward_first():
    target, guide = mlp(0), mlp(1)
    callback = RepresentationalAlignment(guide, ["1"], ["1"])
    runner = CallbackRunner([callback], target, None)
    runner.step_begin(batches(1)[0])
    with pytest.raises(RuntimeError, match="forward"):
        runner.total_loss(torch.tensor(0.0))


# --- OrthoGrad and StableMax ------------------------------------------------------------------


def test_orthogonalized_gradient_is_orthogonal_to_weights_and_keeps_its_norm():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g)
    grad = torch.randn(6, 5, generator=g) + 0.8 * w  # a component along w to remove
    new = orthogonalize_gradient(w, grad)
    assert float((w * new).sum()) == pytest.approx(0.0, abs=1e-4)
    assert float(new.norm()) == pytest.approx(float(grad.norm()), rel=1e-5)
    # independent computation in numpy
    wn, gn = w.numpy().ravel().astype(np.float64), grad.numpy().ravel().astype(np.float64)
    perp = gn - (wn @ gn) / (wn @ wn) * wn
    expected = perp * np.linalg.norm(gn) / np.linalg.norm(perp)
    np.testing.assert_allclose(new.numpy().ravel(), expected, rtol=1e-4, atol=1e-6)


def test_orthograd_optimizer_wrapper_matches_the_callback_path():
    model_a, model_b = mlp(0), mlp(0)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    opt_b = OrthoGradOptimizer(torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9))
    data = batches(4)
    runner = CallbackRunner([OrthoGrad()], model_a, opt_a, total_steps=4)
    run_steps(runner, model_a, data)
    scheduler = torch.optim.lr_scheduler.StepLR(opt_b, step_size=100)  # schedulers accept the wrapper
    for x, y in data:
        opt_b.zero_grad()
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.step()
        scheduler.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    # the wrapper's state is the inner optimizer's, and round-trips
    state = opt_b.state_dict()
    model_c = copy.deepcopy(model_b)
    opt_c = OrthoGradOptimizer(torch.optim.SGD(model_c.parameters(), lr=0.1, momentum=0.9))
    opt_c.load_state_dict(state)
    for pb, pc in zip(model_b.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(opt_b.state[pb]["momentum_buffer"], opt_c.state[pc]["momentum_buffer"])


def test_orthograd_can_skip_one_dimensional_parameters():
    layer = nn.Linear(3, 2)
    layer.weight.grad = torch.randn(2, 3)
    layer.bias.grad = layer.bias.detach().clone()  # entirely along the bias: would become ~0
    bias_grad = layer.bias.grad.clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    runner = CallbackRunner([OrthoGrad(skip_1d=True)], layer, optimizer)
    runner.callbacks[0].before_optimizer_step(runner.ctx)
    assert torch.equal(layer.bias.grad, bias_grad)
    assert float((layer.weight.detach() * layer.weight.grad).sum()) == pytest.approx(0.0, abs=1e-5)


def test_stablemax_is_positive_sums_to_one_and_matches_hand_values():
    x = torch.tensor([[0.0, 1.0, -1.0], [2.0, -3.0, 0.5]])
    # s = x + 1 (x >= 0), 1 / (1 - x) (x < 0): rows [1, 2, 1/2] and [3, 1/4, 3/2]
    expected = torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.25, 1.5]])
    expected = expected / expected.sum(dim=1, keepdim=True)
    probs = stablemax(x)
    torch.testing.assert_close(probs, expected)
    assert float(probs[0, 1]) == pytest.approx(4 / 7)
    wide = torch.randn(5, 11) * 50
    p = stablemax(wide)
    assert bool((p > 0).all())
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(5))


def test_stablemax_cross_entropy_is_minus_log_stablemax():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, -3.0, 0.5]], requires_grad=True)
    targets = torch.tensor([1, 2])
    loss = stablemax_cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    expected = -(math.log(4 / 7) + math.log(1.5 / 4.75)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    none = stablemax_cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(none, -torch.log(stablemax(logits.detach()))[torch.arange(2), targets])
    loss.backward()
    assert bool(torch.isfinite(logits.grad).all())
    # huge logits and the x = 1 point where 1 / (1 - x) would blow up stay finite
    big = torch.tensor([[1e6, 1.0, -1e6]], requires_grad=True)
    stablemax_cross_entropy(big, torch.tensor([0])).backward()
    assert bool(torch.isfinite(big.grad).all())


# --- L0 projection ----------------------------------------------------------------------------


def numpy_topk_mask(w: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-np.abs(w.ravel()), kind="stable")  # ties keep index order
    mask = np.zeros(w.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(w.shape)


def test_l0_projection_keeps_exactly_the_k_largest_including_ties():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 6, generator=g)
    for k in (0, 1, 7, 29, 30):
        projected = l0_project(w, k)
        mask = numpy_topk_mask(w.numpy(), k)
        np.testing.assert_array_equal(projected.numpy(), np.where(mask, w.numpy(), 0.0))
        assert int((projected != 0).sum()) == k
    ties = torch.tensor([1.0, -1.0, 0.5, 1.0, -0.5, 1.0])
    assert l0_mask(ties, 2).tolist() == [True, True, False, False, False, False]
    assert l0_mask(ties, 5).tolist() == [True, True, True, True, False, True]
    # global scope: one top-k over the concatenation
    a, b = torch.randn(3, 4, generator=g), torch.randn(2, 5, generator=g)
    masks = global_l0_masks([a, b], 9)
    reference = numpy_topk_mask(np.concatenate([a.numpy().ravel(), b.numpy().ravel()]), 9)
    np.testing.assert_array_equal(np.concatenate([m.numpy().ravel() for m in masks]), reference)


def test_l0_projection_callback_then_freeze_keeps_zeros_at_zero():
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    callback = L0Projection(sparsity=0.75, freeze_at_step=2)
    runner = CallbackRunner([callback], model, optimizer, total_steps=6)
    assert callback.param_names == ["0.weight", "2.weight", "4.weight"]
    data = batches(6)
    run_steps(runner, model, data[:1])
    for name in callback.param_names:
        weight = model.get_parameter(name)
        assert int((weight != 0).sum()) == round(0.25 * weight.numel())
    run_steps(runner, model, data[1:2])
    assert callback.frozen
    masks = {name: mask.clone() for name, mask in callback.masks.items()}
    run_steps(runner, model, data[2:])  # momentum and weight decay keep moving the _orig tensors
    runner.train_end()
    for name, mask in masks.items():
        module_name, _, attribute = name.rpartition(".")
        weight = getattr(model.get_submodule(module_name), attribute)
        assert bool((weight[~mask] == 0).all())
        assert int((weight != 0).sum()) <= int(mask.sum())

    # state round-trip: a fresh model gets the same masks and then accepts the pruned checkpoint
    state, model_state = runner.state_dict(), model.state_dict()
    fresh = mlp(1)
    resumed = CallbackRunner([L0Projection(sparsity=0.75, freeze_at_step=2)], fresh, None)
    resumed.load_state_dict(state)
    fresh.load_state_dict(model_state)
    for net in (fresh, model):
        net(torch.randn(1, 4))  # pruning recomputes the masked weights in a forward pre-hook
    for name, mask in masks.items():
        module_name, _, attribute = name.rpartition(".")
        assert torch.equal(getattr(fresh.get_submodule(module_name), attribute + "_mask").bool(), mask)
        torch.testing.assert_close(
            getattr(fresh.get_submodule(module_name), attribute),
            getattr(model.get_submodule(module_name), attribute),
        )


def test_l0_projection_global_scope_and_freeze_at_train_end():
    model = mlp(0)
    callback = L0Projection(k=40, scope="global")
    runner = CallbackRunner([callback], model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=2)
    run_steps(runner, model, batches(2))
    total = sum(int((model.get_parameter(n) != 0).sum()) for n in callback.param_names)
    assert total == 40 and not callback.frozen
    runner.train_end()
    assert callback.frozen and hasattr(model[0], "weight_mask")


# --- Attention sparsity penalty ---------------------------------------------------------------


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(4, 8)
        self.softmax = nn.Softmax(dim=-1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (batch, tokens, 4)
        q, k = self.qk(x).chunk(2, dim=-1)
        attn = self.softmax(q @ k.transpose(-1, -2) / 2.0)
        return self.head(attn @ x).mean(dim=1)


def test_attention_sparsity_penalty_matches_the_formula():
    torch.manual_seed(0)
    model = TinyAttention()
    callback = AttentionSparsityPenalty(modules=["softmax"], weight=0.01)
    runner = CallbackRunner([callback], model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=3)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        q, k = model.qk(x).chunk(2, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).numpy().astype(np.float64)
    expected = 0.01 * float(np.mean(np.log(1.0 + a**2)))
    logs = run_steps(runner, model, [(x, torch.randn(2, 3))] * 3)
    assert logs[0]["attention_sparsity"] == pytest.approx(expected, rel=1e-5)

    maps = [torch.full((2, 4, 4), 0.25), torch.eye(4).expand(2, 4, 4)]
    by_callable = AttentionSparsityPenalty(maps=lambda ctx: maps, weight=1.0).loss_terms(None)
    expected = (math.log(1 + 0.0625) + math.log(2.0) / 4) / 2
    assert float(by_callable["attention_sparsity"]) == pytest.approx(expected, rel=1e-6)


def test_drop_path_wrappers_are_removed_at_train_end_so_the_state_dict_keys_are_unchanged():
    from diffguide.callbacks.base import CallbackRunner
    from diffguide.callbacks.drop_path import DropPathWrapper, ScheduledDropPath

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    keys = set(model.state_dict())
    runner = CallbackRunner([ScheduledDropPath(0.2, wrap=["0"])], model, None, total_steps=4)
    assert isinstance(model[0], DropPathWrapper)
    runner.train_end()
    assert not isinstance(model[0], DropPathWrapper) and set(model.state_dict()) == keys


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_alignment_and_sparsity_remove_their_forward_hooks_at_train_end():
    target, guide = mlp(0), mlp(1)
    alignment = RepresentationalAlignment(guide, ["1", "3"], ["1", "3"])
    runner = CallbackRunner([alignment], target, torch.optim.SGD(target.parameters(), lr=0.1), total_steps=2)
    assert _forward_hooks(target) == 2 and _forward_hooks(guide) == 2
    run_steps(runner, target, batches(2))
    runner.train_end()
    assert _forward_hooks(target) == 0 and _forward_hooks(guide) == 0

    model = TinyAttention()
    sparsity = AttentionSparsityPenalty(modules=["softmax"])
    runner = CallbackRunner([sparsity], model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1)
    assert _forward_hooks(model) == 1
    run_steps(runner, model, [(torch.randn(2, 5, 4), torch.randn(2, 3))])
    runner.train_end()
    assert _forward_hooks(model) == 0
