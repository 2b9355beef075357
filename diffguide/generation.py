"""Generating many samples reproducibly: one seed per sample index.

Sample ``i`` is drawn from its own generator seeded ``seed + i``, so the images do not depend
on the batch size or on how the indices are split across processes: a sharded run merges to
exactly the result of one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .guidance import CFG, GuidanceRule
from .hooks import guided, stats


def generate_samples(
    pipe,
    class_labels: Sequence[int] | torch.Tensor,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = False,
    indices: Sequence[int] | None = None,
    guidance: GuidanceRule | None = None,
    nfe_per_sample: list[int] | None = None,
    **pipe_kwargs,
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for ``class_labels``; sample ``i`` uses seed ``seed + i``.

    ``indices`` selects which sample indices to generate (a shard); by default all of them.
    ``guidance`` attaches a rule for the run (plain CFG otherwise); when ``nfe_per_sample`` is
    a list, the network evaluations of each sample are appended to it. Extra keyword
    arguments go to the pipeline call (``guidance_scale``, ``num_inference_steps``, ...).
    """
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = list(range(len(labels))) if indices is None else list(indices)
    batches = []
    rule = guidance if guidance is not None else (CFG() if nfe_per_sample is not None else None)
    with guided(pipe, rule) if rule is not None else nullcontext():
        for start in tqdm(range(0, len(chosen), batch_size), desc="generating", disable=not progress):
            batch = chosen[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + i) for i in batch]
            output = pipe(labels[batch].tolist(), generator=generators, output_type="pt", **pipe_kwargs)
            batches.append(output.images.cpu())
            if nfe_per_sample is not None:
                nfe_per_sample.extend(stats(pipe)["nfe_per_sample"])
    return torch.cat(batches) if batches else torch.empty(0)


def generate_to_folder(
    pipe,
    class_labels: Sequence[int] | torch.Tensor,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = False,
    guidance: GuidanceRule | None = None,
    **pipe_kwargs,
) -> list[Path]:
    """Write sample ``i`` to ``out_dir/{i:06d}_{label}.png``, sharded over accelerate processes.

    Run under ``accelerate launch --multi_gpu --num_processes K`` (CPU machines too), each
    process takes its share of the indices (``PartialState.split_between_processes``); one
    seed per index makes the merged folder identical to a single-process run. ``guidance``
    attaches a rule for the run. Returns the files this process wrote.
    """
    from accelerate import PartialState

    from .images import to_pil

    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Without CUDA, torchrun-launched processes only join up through accelerate's CPU (gloo) path.
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.split_between_processes(list(range(len(labels)))) as shard:
        images = generate_samples(
            pipe, labels, seed, batch_size, progress and state.is_main_process, shard, guidance, **pipe_kwargs
        )
        written = []
        for index, image in zip(shard, images, strict=True):
            path = out_dir / f"{index:06d}_{int(labels[index])}.png"
            to_pil(image).save(path)
            written.append(path)
    state.wait_for_everyone()
    return written
