"""Which diffusers pipelines diffguide serves, how each does CFG, and why the others are refused.

Read from diffusers 0.42.1's source (shared/PIPELINES.md has the line numbers). A pipeline class is
looked up by name along its MRO, so subclasses (drop-in pipelines, fine-tune wrappers) inherit
their parent's entry. Anything not listed is refused: an adapter never runs a pipeline it cannot
read.

Kinds:

- ``"batched"``: one denoiser call per step on ``[uncond, cond]`` rows (``order="cond_first"``
  for DiT's ``[cond, uncond]``);
- ``"two_call"``: a conditional and an unconditional call per step, told apart by diffusers'
  ``cache_context`` names or, where a pipeline sets none, by call order (the first call at a
  timestep is the conditional one);
- ``"refused"``: with the reason and what to do instead.

Where the CFG scale lives (``scale``): ``"attr:NAME"`` reads ``pipe.NAME`` (set before the loop),
``"call:NAME"`` the ``NAME`` argument of the pipeline call (a local of ``__call__`` such as Flux's
``true_cfg_scale``). ``scale_offset=1`` marks ``c + w (c - u)`` pipelines (Cosmos, Kandinsky 3),
which are CFG at scale ``w + 1``; a rule sees that effective scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..versions import diffusers_at_least

KINDS = ("batched", "two_call", "refused")


@dataclass(frozen=True)
class PipelineSupport:
    """How one pipeline class does classifier-free guidance, as diffguide reads it."""

    kind: str
    #: ``"attr:NAME"`` or ``"call:NAME"``: where the CFG scale lives, per denoiser component
    scale: dict[str, str] = field(default_factory=lambda: {"*": "attr:_guidance_scale"})
    #: batched row order: ``"uncond_first"`` (SD, SDXL, ...) or ``"cond_first"`` (DiT)
    order: str = "uncond_first"
    #: the pipeline combines ``c + w (c - u)``: the effective CFG scale is ``w + scale_offset``
    scale_offset: float = 0.0
    #: true CFG runs only with a negative prompt (Flux, Qwen-Image, HunyuanVideo), else it is off
    needs_negative: bool = False
    #: the scale at which the pipeline's CFG is on: ``scale > min_scale``
    min_scale: float = 1.0
    #: the pipeline negates the model output before the scheduler (Lumina2): x0 rules flip it
    negated_output: bool = False
    #: the denoiser input carries reference-image tokens after the generated ones (Qwen-Image
    #: Edit), counted by ``img_shapes[0][0]``: rules see the generated tokens only
    reference_tokens: bool = False
    #: the scheduler's sigmas are EDM sigmas and the denoiser sees ``(x0 + sigma noise) / (1 + sigma)``
    #: (Cosmos 2 preconditions its input with ``c_in = 1 / (1 + sigma)``)
    edm_sigmas: bool = False
    #: call arguments the adapter cannot serve, with the reason (refused at call time)
    refused_arguments: dict[str, str] = field(default_factory=dict)
    #: x0-space rules refused, with the reason (the pipeline preconditions the output itself)
    x0_refused: str = ""
    #: denoiser arguments without a batch dimension (never row-sliced)
    unbatched: tuple[str, ...] = ()
    #: what else a reader should know (renormalisation, truncation, ...): kept working as is
    quirks: tuple[str, ...] = ()
    #: refused: why, and what to do instead
    reason: str = ""
    #: ``(version, why)``: served only from that diffusers release on (older ones are refused)
    min_diffusers: tuple[str, str] | None = None

    def scale_source(self, component: str) -> str:
        return self.scale.get(component, self.scale.get("*", "attr:_guidance_scale"))


def _batched(**kwargs) -> PipelineSupport:
    return PipelineSupport(kind="batched", **kwargs)


def _two_call(**kwargs) -> PipelineSupport:
    return PipelineSupport(kind="two_call", **kwargs)


def _refused(reason: str) -> PipelineSupport:
    return PipelineSupport(kind="refused", reason=reason)


_TRUE_CFG = {"*": "call:true_cfg_scale"}
_TRUE_CFG_QUIRK = (
    "true CFG only with true_cfg_scale > 1 and a negative prompt; guidance_scale is the distilled embedding's"
)
_FLUX_IDS = ("img_ids", "txt_ids")  # (tokens, 3) position ids shared by every sample

#: the support table; keys are diffusers pipeline class names
PIPELINES: dict[str, PipelineSupport] = {
    # --- batched [uncond, cond] ------------------------------------------------------------------
    "StableDiffusionPipeline": _batched(quirks=("guidance_rescale applied to the rule's result",)),
    "StableDiffusionImg2ImgPipeline": _batched(),
    "StableDiffusionXLPipeline": _batched(quirks=("guidance_rescale applied to the rule's result",)),
    "StableDiffusionXLImg2ImgPipeline": _batched(),
    "StableDiffusion3Pipeline": _batched(quirks=("skip-layer guidance refused at call time",)),
    "StableDiffusion3Img2ImgPipeline": _batched(),
    "ClassConditionalPipeline": _batched(),  # DigitsPipeline, ClassConditionalTransformerPipeline
    "PixArtAlphaPipeline": _batched(scale={"*": "call:guidance_scale"}, quirks=("learned sigma kept",)),
    "PixArtSigmaPipeline": _batched(scale={"*": "call:guidance_scale"}, quirks=("learned sigma kept",)),
    "SanaPipeline": _batched(quirks=("timestep x timestep_scale: sigma read from the scheduler",)),
    "AuraFlowPipeline": _batched(
        quirks=("transformer gets t/1000: sigma read from the scheduler",),
        min_diffusers=(
            "0.41",
            "before it AuraFlow sets no scheduler begin index, so the noise level read from the scheduler "
            "is off by a step",
        ),
    ),
    "HunyuanDiTPipeline": _batched(quirks=("learned sigma kept", "guidance_rescale applied")),
    "LTXPipeline": _batched(quirks=("guidance_rescale applied",)),
    "MochiPipeline": _batched(quirks=("inverted sigmas: reverse-flow prediction",)),
    "KandinskyV22Pipeline": _batched(quirks=("learned variance kept",)),
    "Kandinsky3Pipeline": _batched(scale_offset=1.0, quirks=("(w+1) c - w u: a rule sees scale w+1",)),
    "AllegroPipeline": _batched(),
    # --- batched [cond, uncond] ------------------------------------------------------------------
    "DiTPipeline": _batched(order="cond_first", scale={"*": "call:guidance_scale"}),
    # --- two calls per step, cache_context names -------------------------------------------------
    "FluxPipeline": _two_call(
        scale=_TRUE_CFG, needs_negative=True, unbatched=_FLUX_IDS, quirks=(_TRUE_CFG_QUIRK,)
    ),
    "FluxImg2ImgPipeline": _two_call(
        scale=_TRUE_CFG, needs_negative=True, unbatched=_FLUX_IDS, quirks=(_TRUE_CFG_QUIRK,)
    ),
    "Flux2KleinPipeline": _two_call(
        scale={"*": "call:guidance_scale"},
        unbatched=_FLUX_IDS,
        refused_arguments={
            "image": "adds reference-image tokens to each call, which diffguide does not yet separate from the "
            "generated ones: call it without image=, or without diffguide"
        },
    ),
    "QwenImagePipeline": _two_call(
        scale=_TRUE_CFG,
        needs_negative=True,
        quirks=("per-token renormalisation to ‖c‖ applied by the pipeline on the rule's result",),
    ),
    "QwenImageEditPipeline": _two_call(
        scale=_TRUE_CFG,
        needs_negative=True,
        reference_tokens=True,
        quirks=("image tokens concatenated and sliced off by the pipeline", "per-token renormalisation"),
    ),
    "QwenImageEditPlusPipeline": _two_call(
        scale=_TRUE_CFG,
        needs_negative=True,
        reference_tokens=True,
        quirks=("image tokens concatenated and sliced off by the pipeline", "per-token renormalisation"),
    ),
    "HunyuanVideoPipeline": _two_call(scale=_TRUE_CFG, needs_negative=True, quirks=(_TRUE_CFG_QUIRK,)),
    "CogView4Pipeline": _two_call(),
    "WanPipeline": _two_call(
        scale={"transformer": "attr:_guidance_scale", "transformer_2": "attr:_guidance_scale_2"},
        quirks=("Wan 2.2: one rule state across both experts, each with its own scale",),
    ),
    "WanImageToVideoPipeline": _two_call(
        scale={"transformer": "attr:_guidance_scale", "transformer_2": "attr:_guidance_scale_2"},
    ),
    # --- two calls per step, no context: call order ----------------------------------------------
    "ChromaPipeline": _two_call(),
    "Lumina2Pipeline": _two_call(
        negated_output=True,
        quirks=("renormalisation to ‖c‖ and cfg_trunc_ratio kept", "output negated before the scheduler"),
    ),
    "Kandinsky5T2VPipeline": _two_call(),
    "Kandinsky5T2IPipeline": _two_call(),
    "Cosmos2TextToImagePipeline": _two_call(
        scale_offset=1.0,
        edm_sigmas=True,
        x0_refused="its transformer output is EDM-preconditioned inside the pipeline (x0 = c_skip x + c_out F)",
        quirks=(
            "c + w (c - u) on x0: a rule sees scale w+1; the affine x0 map commutes with it",
            "EDM sigmas: noise level sigma, input (x0 + sigma noise) / (1 + sigma)",
        ),
    ),
    # --- refused ---------------------------------------------------------------------------------
    "FluxKontextPipeline": _refused(
        "its two calls carry the reference image's tokens, which the pipeline slices off between the "
        "calls; not yet verified by diffguide's tests: use FluxPipeline or FluxImg2ImgPipeline"
    ),
    "Flux2Pipeline": _refused(
        "Flux.2 [dev] is guidance-distilled and has no negative prompt, so there is no CFG to guide; "
        "use Flux2KleinPipeline (base) for CFG"
    ),
    "LTX2Pipeline": _refused(
        "its denoiser returns two outputs (video, audio) and guides in x0 space with extra STG calls; "
        "a one-output rule cannot serve it: call the pipeline without diffguide"
    ),
    "ZImagePipeline": _refused(
        "its denoiser takes lists of per-sample tensors and renormalises with truncation; diffguide "
        "slices batch tensors only: call the pipeline without diffguide"
    ),
    "HiDreamImagePipeline": _refused(
        "its llama3 embeddings are batched on dim 1, which row slicing would miss; call the pipeline "
        "without diffguide"
    ),
    "LuminaPipeline": _refused(
        "Lumina-Next guides the first 3 latent channels only; a rule cannot reproduce that split: use "
        "Lumina2Pipeline"
    ),
    "CosmosTextToWorldPipeline": _refused(
        "Cosmos 1.0 converts both predictions to x0 through its EDM scheduler before combining; not yet "
        "served: use Cosmos2TextToImagePipeline"
    ),
    "Kandinsky6TI2VAPipeline": _refused(
        "its denoiser returns (video, audio) tuples combined separately, which a one-output rule cannot "
        "serve: call the pipeline without diffguide"
    ),
    "SanaSprintPipeline": _refused("Sana-Sprint is guidance-distilled (no CFG): there is nothing to guide"),
    "HunyuanVideo15Pipeline": _refused(
        "it guides through its own guider component: use pipe.guider = dg.as_guider(rule, scheduler=pipe) instead of dg.apply"
    ),
    "HunyuanImagePipeline": _refused(
        "it guides through its own guider components: use pipe.guider = dg.as_guider(rule, scheduler=pipe) instead of dg.apply"
    ),
}


def support_for(pipe) -> tuple[str, PipelineSupport]:
    """``(class name, entry)`` of the nearest class of ``pipe`` in the table; raises ``TypeError``
    with the reason and the fix where diffguide cannot serve it."""
    for cls in type(pipe).__mro__:
        entry = PIPELINES.get(cls.__name__)
        if entry is None:
            continue
        if entry.kind == "refused":
            raise TypeError(f"{type(pipe).__name__} is not supported: {entry.reason}")
        if entry.min_diffusers is not None and not diffusers_at_least(entry.min_diffusers[0]):
            version, why = entry.min_diffusers
            raise TypeError(
                f"{type(pipe).__name__} needs diffusers>={version} with diffguide ({why}); "
                f"upgrade with: pip install -U 'diffusers>={version}'"
            )
        return cls.__name__, entry
    if hasattr(pipe, "blocks") and hasattr(pipe, "update_components"):
        raise TypeError(
            f"{type(pipe).__name__} is a modular pipeline: attach the rule as its guider with "
            "pipe.update_components(guider=dg.as_guider(rule, scheduler=pipe))"
        )
    served = sorted(name for name, entry in PIPELINES.items() if entry.kind != "refused")
    raise TypeError(
        f"{type(pipe).__name__} is not supported: diffguide serves pipelines whose CFG it has read "
        f"({', '.join(served)}, and their subclasses)"
    )
