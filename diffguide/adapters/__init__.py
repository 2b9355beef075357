"""Adapters between diffusers pipelines and guidance rules, one file per way a pipeline does CFG.

- ``support.py``: the table of pipeline classes, their kind, where their scale lives, quirks,
  and the reasons for refusals;
- ``core.py``: the shared session (per-call reset, the step a rule sees, x0 conversion, NFE);
- ``batched.py``: one denoiser call on ``[uncond, cond]`` (or ``[cond, uncond]``) rows;
- ``two_call.py``: a conditional and an unconditional call per step;
- ``caches.py``: which of diffusers' caching hooks compose with which rules, and the refusals;
- ``guider.py``: a rule as a diffusers guider (``dg.as_guider``), for modular pipelines;
- ``calibration.py``: LinearAG fitted on a pipeline's CFG trajectories (``dg.calibrate_linear_ag``);
- ``cutoff.py``: diffusers' CFG-cutoff callbacks as an interval on the scheduler's noise levels (``dg.cfg_cutoff``).
"""
