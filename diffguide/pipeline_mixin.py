"""Guidance as call arguments of a diffusers pipeline: the body of the drop-in pipelines.

``pipelines/*.py`` define, e.g., ``class GuidedStableDiffusionPipeline(GuidedPipelineMixin,
StableDiffusionPipeline)``, which diffusers loads with ``custom_pipeline=``. Its ``__call__``
takes two more arguments and otherwise is the parent's:

- ``guidance``: a method name of the registry (``"cfg"``, ``"apg"``, ``"ag"``, ``"linear-ag"``,
  ``"interval"``) or a rule object; ``None`` runs the parent pipeline untouched;
- ``guidance_kwargs``: the method's parameters, e.g. ``{"eta": 0.0, "norm_threshold": 15.0}``,
  checked against the registry;
- ``guidance_preset``: a named setting of the registry (``"sdxl"``, ``"digits"``) under them;
  by default the preset of the pipeline's family where the method has one (as the CLI and the
  app do), ``"none"`` for the registry's defaults.

After a guided call, ``pipe.guidance_stats`` holds its network evaluations (``dg.stats``).
"""

from __future__ import annotations

from .guidance import GuidanceRule, make_rule
from .hooks import guided, run_call, stats


class GuidedPipelineMixin:
    """Adds ``guidance=`` and ``guidance_kwargs=`` to a pipeline's ``__call__``."""

    guidance_stats: dict | None = None

    def __call__(
        self,
        *args,
        guidance: str | GuidanceRule | None = None,
        guidance_kwargs: dict | None = None,
        guidance_preset: str | None = None,
        **kwargs,
    ):
        if guidance is None or isinstance(guidance, GuidanceRule):
            if guidance_kwargs or guidance_preset:
                raise ValueError(
                    "guidance_kwargs and guidance_preset go with a method name; pass e.g. guidance='apg'"
                )
            if guidance is None:
                return super().__call__(*args, **kwargs)
        if isinstance(guidance, GuidanceRule):
            rule = guidance
        else:
            from .compare import resolve_preset

            preset = resolve_preset(guidance, self, "auto" if guidance_preset is None else guidance_preset)
            if guidance_preset not in (None, "none") and preset is None:
                make_rule(guidance, guidance_preset)  # the registry's error: no such preset
            rule = make_rule(guidance, preset, **(guidance_kwargs or {}))
        with guided(self, rule):
            output = run_call(self, super().__call__, args, kwargs)
            self.guidance_stats = stats(self)
        return output
