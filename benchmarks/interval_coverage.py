"""Coverage of the 95% skill interval on simulated null series: the studentised HAC interval of
stats/intervals.py against a percentile moving-block bootstrap, the usual alternative.

    python benchmarks/interval_coverage.py                     # 2000 replications per size
    python benchmarks/interval_coverage.py --replications 500 --json

Null series: per-window differences of overlapping 24-step windows at stride 1, each the sum of
its window's Student-t(3) innovations (heavy tails; neighbours share 23 of 24), mean 0. Coverage
is the share of replications whose interval contains 0; its Monte Carlo standard error is
sqrt(c (1 - c) / R). "Claimed" is the share called shown (stats/intervals.py) or excluding 0
(the bootstrap, which has no other test): under the null, a false claim of a difference. The seeds
rows combine 2, 3, 5 or 10 per-seed series (shared window noise, each seed's own window noise and a
seed effect of standard deviation 0, 1, 3 and 20, a quarter of the replications each) with
stats.paired_difference_over_seeds at 400 windows.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from stats.intervals import mean_interval, paired_difference_over_seeds

PRED_LEN = 24
SIZES = (120, 400, 4000)
SEED_EFFECT_SDS = (0.0, 1.0, 3.0, 20.0)


def overlapping_null(shape: tuple, num_windows: int, rng) -> np.ndarray:
    innovations = rng.standard_t(3, size=(*shape, num_windows + PRED_LEN - 1))
    cumulative = np.concatenate([np.zeros((*shape, 1)), innovations.cumsum(-1)], -1)
    return cumulative[..., PRED_LEN:] - cumulative[..., :-PRED_LEN]


def bootstrap_block_length(num_windows: int) -> int:
    """The bootstrap's block length: twice the overlap or n^(1/3), capped at a fifth of n."""
    length = max(math.ceil(2 * PRED_LEN), math.ceil(num_windows ** (1 / 3)))
    return max(1, min(length, num_windows // 5))


def bootstrap_interval(values: np.ndarray, rng, num_resamples: int = 1000) -> tuple[float, float]:
    """The percentile moving-block bootstrap (Kunsch 1989) of the mean, 1000 resamples."""
    n, block = len(values), bootstrap_block_length(len(values))
    starts = rng.integers(0, n - block + 1, size=(num_resamples, math.ceil(n / block)))
    index = (starts[:, :, None] + np.arange(block)).reshape(num_resamples, -1)[:, :n]
    low, high = np.quantile(values[index].mean(1), [0.025, 0.975])
    return float(low), float(high)


def summary(covered: list[bool], claimed: list[bool], seconds: float) -> dict:
    c = float(np.mean(covered))
    return {"coverage": round(c, 4), "mc_se": round(math.sqrt(c * (1 - c) / len(covered)), 4),
            "claimed": round(float(np.mean(claimed)), 4), "seconds": round(seconds, 1)}


def single_series(num_windows: int, replications: int, rng) -> dict:
    series = overlapping_null((replications,), num_windows, rng)
    start = time.perf_counter()
    old = [bootstrap_interval(x, rng) for x in series]
    old_s = time.perf_counter() - start
    start = time.perf_counter()
    new = [mean_interval(x, PRED_LEN) for x in series]
    new_s = time.perf_counter() - start
    return {"windows": num_windows, "replications": replications,
            "bootstrap_block_length": bootstrap_block_length(num_windows),
            "hac_block_length": new[0].block_length, "num_blocks": new[0].num_blocks,
            "bootstrap": summary([lo <= 0 <= hi for lo, hi in old],
                                 [not lo <= 0 <= hi for lo, hi in old], old_s),
            "studentised_hac": summary([r.low <= 0 <= r.high for r in new],
                                       [r.shown for r in new], new_s)}


def over_seeds(num_seeds: int, replications: int, rng, num_windows: int = 400) -> dict:
    seed_sd_R11 = np.repeat(SEED_EFFECT_SDS, math.ceil(replications / 4))[:replications, None, None]
    diffs_RSN = (overlapping_null((replications, 1), num_windows, rng)
                 + overlapping_null((replications, num_seeds), num_windows, rng)
                 + seed_sd_R11 * rng.normal(size=(replications, num_seeds, 1)))
    start = time.perf_counter()
    results = [paired_difference_over_seeds(list(d), PRED_LEN) for d in diffs_RSN]
    return {"seeds": num_seeds, "windows": num_windows, "replications": replications,
            **summary([r.low <= 0 <= r.high for r in results], [r.shown for r in results],
                      time.perf_counter() - start)}


def run_benchmark(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    return {"pred_len": PRED_LEN, "stride": 1, "level": 0.95, "seed": args.seed,
            "single_series": [single_series(n, args.replications, rng) for n in SIZES],
            "over_seeds": [over_seeds(k, args.replications, rng) for k in (2, 3, 5, 10)]}


def format_report(result: dict) -> str:
    lines = [f"95% interval of the mean on null series: overlapping {result['pred_len']}-step "
             "windows, stride 1, Student-t(3) innovations (coverage +- Monte Carlo s.e.; "
             "claimed = a difference called under the null)", "",
             f"{'windows':>8}{'reps':>6}  {'bootstrap (block length)':<38}"
             "studentised HAC (block length, blocks)"]
    for row in result["single_series"]:
        old, new = row["bootstrap"], row["studentised_hac"]
        lines.append(
            f"{row['windows']:>8}{row['replications']:>6}  "
            f"{old['coverage']:.3f} +- {old['mc_se']:.3f} ({row['bootstrap_block_length']:>2}), "
            f"claimed {old['claimed']:.3f}        "
            f"{new['coverage']:.3f} +- {new['mc_se']:.3f} ({row['hac_block_length']}, "
            f"{row['num_blocks']:>2}), claimed {new['claimed']:.3f}")
    lines += ["", "over seeds (stats.paired_difference_over_seeds, 400 windows, seed effect sd "
              + ", ".join(f"{s:g}" for s in SEED_EFFECT_SDS) + "):"]
    for row in result["over_seeds"]:
        lines.append(f"{row['seeds']:>3} seeds, {row['replications']} reps: coverage "
                     f"{row['coverage']:.3f} +- {row['mc_se']:.3f}, claimed {row['claimed']:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replications", type=int, default=2000, help="null series per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.replications < 4:
        p.error("--replications must be at least 4")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_benchmark(args)
    print(json.dumps(result, indent=1) if args.json else format_report(result))


if __name__ == "__main__":
    main()
