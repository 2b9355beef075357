"""Speed and agreement of our Frechet distance against the scipy.linalg.sqrtm form.

    python evals/frechet_speed.py --dim 2048 --repeats 3

Covariances are built from random features (4,096 samples of dimension ``--dim``, a random
mixing so the spectrum is not flat). Both forms run in one process on the same matrices;
the table reports the median wall time of each and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_result, write_section  # noqa: E402

from diffguide.metrics import frechet_distance, gaussian_stats  # noqa: E402


def sqrtm_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The form pytorch-fid and torch-fidelity use (scipy's sqrtm of S1 S2)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    times, value = [], 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)), value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
    stats1 = gaussian_stats(rng.normal(size=(args.samples, args.dim)) @ mixing)
    stats2 = gaussian_stats(rng.normal(0.1, 1.1, size=(args.samples, args.dim)) @ mixing)
    ours_s, ours = median_seconds(lambda: frechet_distance(*stats1, *stats2), args.repeats)
    ref_s, ref = median_seconds(lambda: sqrtm_frechet_distance(*stats1, *stats2), args.repeats)
    record = {
        "dim": args.dim,
        "ours_seconds": ours_s,
        "sqrtm_seconds": ref_s,
        "speedup": ref_s / ours_s,
        "ours_fd": ours,
        "sqrtm_fd": ref,
        "relative_difference": abs(ours - ref) / abs(ref),
        "machine": machine(),
    }
    write_result("frechet_speed", record)
    command = "python evals/frechet_speed.py " + " ".join(sys.argv[1:])
    table = markdown_table(
        ["d", "ours (eigh, symmetric form)", "scipy sqrtm", "speed-up", "relative difference"],
        [
            [
                args.dim,
                f"{ours_s:.2f} s",
                f"{ref_s:.2f} s",
                f"{ref_s / ours_s:.1f}x",
                f"{record['relative_difference']:.1e}",
            ]
        ],
    )
    write_section(
        "frechet_speed",
        f"### Frechet distance: eigh form vs scipy sqrtm\n\nMedian of {args.repeats} runs each, same matrices. "
        f"`{command.strip()}` ({machine()})\n\n{table}",
    )
    print(record)


if __name__ == "__main__":
    main()
