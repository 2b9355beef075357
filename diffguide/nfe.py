"""Counting network evaluations (NFE) of a denoiser.

One NFE is one sample passed through the network once: a CFG step on a batch of B samples
runs the network on 2B rows and so costs 2 NFE per sample. ``count_nfe`` counts rows seen by
the module's forward, so it stays correct when a guidance rule evaluates only part of the
batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class NFECount:
    """Rows and calls seen by a module's forward while counting."""

    rows: int = 0
    calls: int = 0

    def per_sample(self, num_samples: int) -> float:
        """Network evaluations per generated sample."""
        return self.rows / num_samples


@contextmanager
def count_nfe(module: torch.nn.Module) -> Iterator[NFECount]:
    """Count the batch rows that go through ``module.forward`` inside the ``with`` block."""
    count = NFECount()

    def pre_hook(_module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        count.rows += int(sample.shape[0])
        count.calls += 1

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()
