"""Smooth Diffusion's step-wise variation regularization (Guo, Xu, Wang, Yang, Zhang, Li &
Shi, "Smooth Diffusion: Crafting Smooth Latent Spaces in Diffusion Models", CVPR 2024,
arXiv 2312.04410).

With ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` and the model's prediction of the clean
image ``x0_hat(x_t, t)`` (for an epsilon model ``(x_t - sqrt(1 - abar) eps_theta) / sqrt(abar)``;
for a v model ``sqrt(abar) x_t - sqrt(1 - abar) v_theta``), draw per sample

    n ~ N(0, I) / sqrt(C H W) * sqrt(1 - abar),   g = d <x0_hat, n> / d eps,   v = ||g||,

move a running target ``a <- a + 0.01 (mean(v) - a)`` (starting at 0, part of the training
state) and add ``lambda * mean((v - a)^2)`` to the denoising loss (lambda = 1 in the paper),
against the target just moved, as the authors' ``step_regularize`` does (the batch mean's
0.01 share in ``a`` carries its gradient there too).
``g = J^T n`` with ``J = d x0_hat / d eps``: the penalty asks a small step of the input noise to
move the output image by a steady amount, which is what makes interpolations smooth.

``min_alpha_bar`` (ours) leaves out of the penalty the timesteps whose ``abar`` is below it. An
epsilon model's ``x0_hat`` divides by ``sqrt(abar)``, so ``v`` grows without bound as ``abar -> 0``:
on the digits model's cosine schedule (``abar(999) = 2.4e-9``) ``v`` is 0.5 at t = 950, 6 at
t = 995 and 800 at t = 999, and those few timesteps then make the whole penalty. SD 1.5's
schedule, the paper's, ends at ``abar = 0.0047`` (``SD15_MIN_ALPHA_BAR``); the digits trainer
uses that floor so the penalty sees the signal levels the paper's did.

The gradient w.r.t. ``eps`` needs a second backward through the network
(``create_graph=True``); torch's fused attention kernels and xformers have no double backward,
so :func:`diffguide.attention.use_twice_differentiable_attention` switches a model's attention to
one that has (or refuses a processor it cannot replace).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .guidance.base import per_sample
from .prediction import to_denoised

PREDICTION_TYPES = ("epsilon", "v_prediction")

#: alpha_bar at SD 1.5's last training timestep (scaled-linear betas 0.00085..0.012, T = 1000)
SD15_MIN_ALPHA_BAR = 0.0047


def predicted_x0(
    output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """The clean image a model output implies at ``x_t`` with signal level ``abar`` (B,)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return to_denoised(output, x_t, abar.sqrt(), (1 - abar).sqrt(), prediction_type)


def training_alphas_cumprod(scheduler) -> torch.Tensor:
    """``abar`` by timestep of a DDPM-family scheduler (DDPM, DDIM, ...), for the penalty; a
    ValueError naming the scheduler otherwise (SPD has one ``abar`` per frequency, flow
    schedulers none, so ``x0_hat``'s scalar form does not apply)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, torch.Tensor) or "beta_schedule" not in scheduler.config:
        raise ValueError(
            f"Smooth Diffusion's penalty needs a DDPM-type schedule (one alpha_bar per timestep); "
            f"{type(scheduler).__name__} has none: fine-tune a DDPM/DDIM-trained model"
        )
    return alphas_cumprod


def variation_norms(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> torch.Tensor:
    """``v = ||d <x0_hat, n> / d eps||`` per sample (B,), differentiable (for the penalty).

    ``denoise(x_t, t)`` is the model's raw output (epsilon or v); ``alphas_cumprod`` the
    training schedule's ``abar`` indexed by timestep. ``create_graph=False`` only measures.
    """
    abar = alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype)
    noise = noise.detach().requires_grad_(True)
    x_t = per_sample(abar, x0).sqrt() * x0 + per_sample(1 - abar, x0).sqrt() * noise
    x0_hat = predicted_x0(denoise(x_t, timesteps), x_t, abar, prediction_type)
    elements = x0[0].numel()
    probe = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    probe = probe / elements**0.5 * per_sample(1 - abar, x0).sqrt()
    (gradient,) = torch.autograd.grad((x0_hat * probe).sum(), noise, create_graph=create_graph)
    return gradient.flatten(1).norm(dim=1)


def spread_statistics(norms: torch.Tensor) -> dict[str, float]:
    """How far ``v`` strays from one constant, for a (timesteps, samples) table of ``v``.

    ``mean``; ``std`` (the regularizer's own penalty at ``a = mean`` is ``std**2``);
    ``within_std``, the root mean of each timestep's variance over samples (what a small move
    of the noise does at one noise level); ``between_std``, the spread of the per-timestep
    means. ``std**2 = within_std**2 + between_std**2``. The ``*_cv`` are each over ``mean``
    (a model can shrink every ``v`` alike, which lowers the penalty but not the spread).
    """
    if norms.ndim != 2 or norms.shape[1] < 2:
        raise ValueError(f"need a (timesteps, samples >= 2) table of v, got shape {tuple(norms.shape)}")
    norms = norms.double()
    mean = norms.mean()
    std = norms.std(unbiased=False)
    within = norms.var(dim=1, unbiased=False).mean().sqrt()
    between = norms.mean(dim=1).std(unbiased=False)
    stats = {
        "mean": mean, "std": std, "within_std": within, "between_std": between,
        "cv": std / mean, "within_cv": within / mean, "between_cv": between / mean,
    }  # fmt: skip
    return {name: float(value) for name, value in stats.items()}


def variation_table(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> torch.Tensor:
    """``v`` for every image of ``x0`` at every one of ``timesteps``: a (len(timesteps), B) table.

    Each timestep draws its own noise and probe from ``seed``, the same for every model, so two
    models are measured on the same held-out draws (for :func:`spread_statistics`).
    """
    rows = []
    for index, timestep in enumerate(timesteps.tolist()):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        t = torch.full((len(x0),), int(timestep), dtype=torch.long, device=x0.device)
        norms = variation_norms(
            denoise, x0, noise, t, alphas_cumprod, prediction_type, generator, create_graph=False
        )
        rows.append(norms.detach())
    return torch.stack(rows)


class VariationRegularizer:
    """The regularizer with its running target ``a``: a loss term for any training loop.

    ``loss(...)`` moves ``a`` towards ``mean(v)`` by ``decay`` and returns
    ``weight * mean((v - a)^2)`` against the moved ``a`` (the authors' order);
    ``state_dict`` / ``load_state_dict`` carry ``a`` through checkpoints. Samples whose
    ``abar`` is below ``min_alpha_bar`` are left out (0, the paper: none are). Subclasses
    change only :meth:`penalty`, the step from the kept ``v`` to the unweighted penalty.
    """

    def __init__(self, weight: float = 1.0, decay: float = 0.01, min_alpha_bar: float = 0.0):
        if weight < 0 or not 0 < decay <= 1 or not 0 <= min_alpha_bar < 1:
            raise ValueError(
                "need weight >= 0, 0 < decay <= 1 and 0 <= min_alpha_bar < 1, got "
                f"weight={weight}, decay={decay}, min_alpha_bar={min_alpha_bar}"
            )
        self.weight = weight
        self.decay = decay
        self.min_alpha_bar = min_alpha_bar
        self.target = 0.0

    def update_target(self, norms: torch.Tensor) -> float:
        """``a <- a + decay (mean(v) - a)``; returns the new ``a``."""
        self.target += self.decay * (float(norms.detach().mean()) - self.target)
        return self.target

    def loss(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The weighted penalty for this batch (0 without any network call when weight is 0)."""
        if self.weight == 0:
            return torch.zeros((), device=x0.device)
        kept = alphas_cumprod.to(timesteps.device)[timesteps] >= self.min_alpha_bar
        if not kept.any():
            return torch.zeros((), device=x0.device)
        norms = variation_norms(denoise, x0, noise, timesteps, alphas_cumprod, prediction_type, generator)
        # the rest are computed (the conditioning is not ours to slice) but unused
        return self.weight * self.penalty(norms[kept], timesteps[kept])

    def penalty(self, norms: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``mean((v - a)^2)`` against the moved target, updating ``a``."""
        target = self.target + self.decay * (norms.mean() - self.target)  # the authors' order, with gradient
        self.target = float(target.detach())
        return ((norms - target) ** 2).mean()

    def state_dict(self) -> dict:
        return {
            "target": self.target,
            "weight": self.weight,
            "decay": self.decay,
            "min_alpha_bar": self.min_alpha_bar,
        }

    def load_state_dict(self, state: dict) -> None:
        self.target = float(state["target"])
        self.weight = float(state.get("weight", self.weight))
        self.decay = float(state.get("decay", self.decay))
        self.min_alpha_bar = float(state.get("min_alpha_bar", self.min_alpha_bar))


class BandedVariationRegularizer(VariationRegularizer):
    """Ours, not the paper's: one running target per band of timesteps.

    ``bands`` equal bands split ``[0, num_train_timesteps)``; band ``b`` keeps its own
    ``a_b <- a_b + decay (mean(v in b) - a_b)`` and each sample is penalised against its band's
    moved target. ``v`` grows with t, so the paper's single ``a`` spends most of the penalty
    flattening ``v`` across noise levels (docs/smooth.md); banded targets leave only the spread
    among noises at one level. ``bands=1`` is the paper's regularizer.
    """

    def __init__(self, bands: int = 10, num_train_timesteps: int = 1000, **kwargs):
        super().__init__(**kwargs)
        if bands < 1 or num_train_timesteps < bands:
            raise ValueError(f"need 1 <= bands <= num_train_timesteps, got {bands} and {num_train_timesteps}")
        self.bands = bands
        self.num_train_timesteps = num_train_timesteps
        self.targets = [0.0] * bands

    def penalty(self, norms: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``mean((v - a_band)^2)`` against each band's moved target, updating the bands seen."""
        band = (timesteps * self.bands // self.num_train_timesteps).clamp(max=self.bands - 1)
        moved = torch.tensor(self.targets, dtype=norms.dtype, device=norms.device)[band]
        for b in band.unique().tolist():
            in_band = band == b
            target = self.targets[b] + self.decay * (norms[in_band].mean() - self.targets[b])
            moved = torch.where(in_band, target, moved)
            self.targets[b] = float(target.detach())
        self.target = sum(self.targets) / self.bands
        return ((norms - moved) ** 2).mean()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "targets": list(self.targets), "bands": self.bands}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.targets = [float(value) for value in state["targets"]]
        self.bands = int(state.get("bands", len(self.targets)))


# -- Smooth-LoRA: a LoRA on the UNet's attention projections, saved in diffusers' format ----------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: what a Smooth fine-tune may train: LoRA on the attention projections (the paper's), LoRA on
#: those and on every ResNet 3x3 convolution, or every weight of the network
CAPACITIES = {
    "attention": LORA_TARGETS,
    "attention+conv": (*LORA_TARGETS, "conv1", "conv2"),
    "full": None,
}
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(
    unet: torch.nn.Module, rank: int = 8, targets: tuple[str, ...] = LORA_TARGETS
) -> torch.nn.Module:
    """Freeze ``unet`` and inject a trainable LoRA of ``rank`` (alpha = rank, so scale 1) into
    the modules named ``targets`` (the paper: all attention projections, rank 8)."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        inject_adapter_in_model(config, unet)
    except ValueError as err:
        raise ValueError(f"no LoRA target ({', '.join(targets)}) in {type(unet).__name__}: {err}") from None
    return unet


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``unet`` under diffusers' key names (``unet.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return {
        f"unet.{key}": value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(unet).items()
    }


def save_lora(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors``, readable by ``pipe.load_lora_weights``
    on SD-type pipelines and by :meth:`DigitsPipeline.load_lora_weights`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(unet), str(folder / LORA_FILE), metadata={"format": "pt"})
    return folder / LORA_FILE


def load_lora_into(unet: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Inject and load a LoRA saved by :func:`save_lora` into a plain ``unet`` (rank read from
    the file)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    path = path / LORA_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        weights = load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a safetensors LoRA file: {err}") from None
    weights = {key.removeprefix("unet."): value for key, value in weights.items()}
    ranks = {value.shape[0] for key, value in weights.items() if key.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{path} holds no LoRA weights of one rank (found ranks {sorted(ranks)})")
    targets = sorted({key.split(".lora_A")[0].split(".")[-1] for key in weights if "lora_A" in key})
    targets = tuple("to_out.0" if t == "0" else t for t in targets)
    add_lora(unet, ranks.pop(), targets)
    set_peft_model_state_dict(unet, weights)
    return unet


def remove_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Take every injected LoRA out of ``unet``, restoring the base layers."""
    from peft.tuners.lora import LoraModel  # noqa: F401  (makes sure peft's LoRA layers are known)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    return unet
