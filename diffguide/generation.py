"""Generating many samples reproducibly: one seed per sample index.

Sample ``i`` is drawn from its own generator seeded ``seed + i``, so the images do not depend
on the batch size or on how the indices are split across processes: a sharded run merges to
exactly the result of one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def generate_samples(
    pipe,
    class_labels: Sequence[int] | torch.Tensor,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = False,
    indices: Sequence[int] | None = None,
    **pipe_kwargs,
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for ``class_labels``; sample ``i`` uses seed ``seed + i``.

    ``indices`` selects which sample indices to generate (a shard); by default all of them.
    Extra keyword arguments go to the pipeline call (``guidance_scale``,
    ``num_inference_steps``, ...).
    """
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = list(range(len(labels))) if indices is None else list(indices)
    batches = []
    for start in tqdm(range(0, len(chosen), batch_size), desc="generating", disable=not progress):
        batch = chosen[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + i) for i in batch]
        output = pipe(labels[batch].tolist(), generator=generators, output_type="pt", **pipe_kwargs)
        batches.append(output.images.cpu())
    return torch.cat(batches) if batches else torch.empty(0)
