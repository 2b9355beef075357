"""The frontier eval's peer wrappers (evals/frontier.py): diffusers' FasterCache and FirstBlockCache
on a tiny two-block DiT, counted and removed as the benchmark assumes."""

import sys
from pathlib import Path

import torch
from test_cache_composition import tiny_dit

import diffguide as dg
from diffguide.adapters.caches import caches_on
from diffguide.generation import generate_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
import frontier  # noqa: E402

LABELS = torch.tensor([1, 2, 3, 4])
CALL = {"guidance_scale": 3.0, "num_inference_steps": 4}


def test_faster_cache_peer_counts_the_skipped_unconditional_halves_per_batch_and_leaves_no_hook():
    pipe = tiny_dit()
    plain = generate_samples(pipe, LABELS, batch_size=2, **CALL)
    nfe: list[int] = []
    with frontier.FasterCacheUncondSkip(1).attached(pipe, nfe):  # every call evaluates both halves
        assert torch.equal(generate_samples(pipe, LABELS, batch_size=2, **CALL), plain)
    assert nfe == [8, 8, 8, 8]
    nfe = []
    # flow timesteps 1000, 750, 500, 250: inside (-1, 641) are calls 2 and 3; call 3 is not a
    # multiple of 2, so its unconditional half is skipped, in each of the two batches alike
    with frontier.FasterCacheUncondSkip(2).attached(pipe, nfe):
        skipped = generate_samples(pipe, LABELS, batch_size=2, **CALL)
    assert nfe == [7, 7, 7, 7] and not torch.equal(skipped, plain)
    assert caches_on(pipe.denoiser) == []
    assert torch.equal(generate_samples(pipe, LABELS, batch_size=2, **CALL), plain)


def test_first_block_cache_composition_counts_blocks_run_and_leaves_no_hook():
    pipe = tiny_dit()
    with dg.guided(pipe, dg.CFG()):
        plain = generate_samples(pipe, LABELS, batch_size=4, **CALL)
    never = frontier.FirstBlockCacheWith(0.0, dg.CFG())  # threshold 0: never skips
    counts: dict = {}
    with never.attached(pipe, counts), dg.guided(pipe, never.rule):
        assert torch.equal(generate_samples(pipe, LABELS, batch_size=4, **CALL), plain)
    assert counts["block_fraction"] == 1.0 and counts["calls"] == 4
    with frontier.FirstBlockCacheWith(1e9, dg.CFG()).attached(pipe, counts), dg.guided(pipe, dg.CFG()):
        generate_samples(pipe, LABELS, batch_size=4, **CALL)
    # the first call runs both blocks; every later one only the first of the two
    assert counts["block_fraction"] == (2 + 3 * 1) / (4 * 2)
    assert caches_on(pipe.denoiser) == []
