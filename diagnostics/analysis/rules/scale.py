"""Rules on the batch and the ranks: gradient noise scale against the batch, ranks that disagree."""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import GradientSeries, RunData, finite_median
from diagnostics.analysis.rules.common import (
    evidence,
    late_slice,
    number,
    power_of_two,
)
from diagnostics.analysis.thresholds import Thresholds


def _late_medians(series: dict[str, np.ndarray], num_records: int,
                  t: Thresholds) -> dict[str, float]:
    late = late_slice(num_records, t)
    medians = {c: finite_median(v[late]) for c, v in series.items()}
    return {c: m for c, m in medians.items() if math.isfinite(m)}


def _noise_scale(g: GradientSeries, t: Thresholds) -> float:
    """The late median noise scale, median over components (positive estimates only)."""
    medians = _late_medians({c: np.where(v > 0, v, np.nan) for c, v in g.noise_scale.items()},
                            len(g.steps), t)
    return finite_median(list(medians.values()))


def _global_batch(run: RunData) -> int | None:
    g = run.gradients
    if g is not None and g.global_batch:
        return g.global_batch
    batch, accum = number(run, "data.batch_size"), number(run, "train.grad_accum_steps") or 1
    world = g.world_size if g is not None else None
    return batch * accum * world if batch and world else None


def rank_disagreement(run: RunData, t: Thresholds) -> list[Finding]:
    """Ranks' local gradients pointing different ways (mean pairwise cosine, late median)."""
    g = run.gradients
    if g is None or not g.agreement:
        return []
    medians = _late_medians(g.agreement, len(g.steps), t)
    low = {c: m for c, m in medians.items() if m < t.min_agreement}
    if not low:
        return []
    noise, local = _noise_scale(g, t), g.local_batch
    expected = local / (local + noise) if local and math.isfinite(noise) else math.nan
    batch = number(run, "data.batch_size")
    noisy = math.isfinite(expected) and expected < 2 * t.min_agreement
    late = late_slice(len(g.steps), t)
    change = {"data.batch_size": batch * 2} if noisy and batch else {}
    return [Finding(
        component=", ".join(low), issue="rank_disagreement", severity="warning",
        message=f"Ranks' local gradients barely agree on {len(low)} component(s) (mean pairwise "
                f"cosine below {t.min_agreement:g}, late median "
                f"{min(low.values()):.3g}..{max(low.values()):.3g}).",
        evidence=evidence("agreement (median over the low components)", g.steps[late],
                           [finite_median([g.agreement[c][i] for c in low])
                            for i in range(len(g.steps))][late],
                           per_component=low, expected_from_noise_scale=expected),
        suggestion=("The noise scale explains it: each rank's batch is small against the "
                    f"gradient noise; double the per-rank batch (data.batch_size: {batch * 2})."
                    if change else
                    "The noise scale does not explain it: check that every rank samples the same "
                    "distribution (the sampler's shuffling and sharding) and that ranks run the "
                    "same model and config."),
        config_change=change)]


def batch_vs_noise_scale(run: RunData, t: Thresholds) -> list[Finding]:
    """The global batch far from the gradient noise scale B_simple (McCandlish et al. 2018)."""
    g = run.gradients
    if g is None or not g.noise_scale:
        return []
    noise, batch = _noise_scale(g, t), _global_batch(run)
    if not math.isfinite(noise) or not batch:
        return []
    ratio = batch / noise
    if 1 / t.noise_scale_ratio <= ratio <= t.noise_scale_ratio:
        return []
    per_rank = batch // max(1, (g.world_size or 1) * (number(run, "train.grad_accum_steps") or 1))
    new = power_of_two(min(8 * per_rank, max(per_rank / 8, per_rank * noise / batch)))
    small = ratio < 1
    late = late_slice(len(g.steps), t)
    return [Finding(
        component="data", issue="batch_below_noise_scale" if small else "batch_above_noise_scale",
        severity="info" if small else "warning",
        message=f"The global batch ({batch}) is {1 / ratio if small else ratio:.0f}x "
                f"{'smaller' if small else 'larger'} than the gradient noise scale (~{noise:.0f}): "
                + ("steps are dominated by gradient noise; a larger batch would need fewer steps "
                   "for the same loss." if small else
                   "samples beyond the noise scale barely improve each step: compute is wasted."),
        evidence=evidence("noise scale (late median over components)", g.steps[late],
                           [finite_median([v[i] for v in g.noise_scale.values()])
                            for i in range(len(g.steps))][late], global_batch=batch),
        suggestion=f"Set the per-rank batch near the noise scale: data.batch_size: {new}"
                   + (" (and scale optim.lr with it)." if small else "."),
        config_change={"data.batch_size": new})]
