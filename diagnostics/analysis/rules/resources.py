"""Rules on resources: a step bound by data loading, memory near the device's limit."""
from __future__ import annotations

import numpy as np

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import RunData, column, finite_median
from diagnostics.analysis.rules.common import evidence, late_slice, number
from diagnostics.analysis.thresholds import Thresholds


def _data_fractions(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    if run.train:
        steps, data = column(run.train, "data_time_s")
        _, step = column(run.train, "step_time_s")
    else:
        timings = [{"step": p["step"], **p["timing"]} for p in run.profiles]
        steps, data = column(timings, "data_time_ms")
        _, step = column(timings, "step_time_ms")
    with np.errstate(divide="ignore", invalid="ignore"):
        return steps, data / step


def data_loading_bound(run: RunData, t: Thresholds) -> list[Finding]:
    steps, fractions = _data_fractions(run)
    if not len(steps):
        return []
    late = late_slice(len(steps), t)
    fraction = finite_median(fractions[late])
    if not fraction > t.data_time_fraction:
        return []
    new = max(2, 2 * (number(run, "data.num_workers") or 0))
    return [Finding(
        component="data", issue="data_loading_bound", severity="warning",
        message=f"Waiting for data takes {fraction:.0%} of the step time late in training "
                f"(limit {t.data_time_fraction:.0%}): the input pipeline limits throughput.",
        evidence=evidence("data_time_s / step_time_s", steps[late], fractions[late],
                           threshold=t.data_time_fraction),
        suggestion=f"Load batches in parallel: data.num_workers: {new}.",
        config_change={"data.num_workers": new})]


def _memory_use(profile: dict) -> list[tuple[str, float, float]]:
    """(who, used MiB, limit MiB): each GPU against its NVML total; on CPU all ranks' RSS
    together against the host's memory (CPU ranks share one host)."""
    ranks = profile["memory"]["per_rank"]
    if profile["device"].startswith("cuda"):
        return [(f"rank {r['rank']}",
                 max(r.get("nvml_used_mb") or 0, r.get("cuda_reserved_peak_mb") or 0),
                 r["nvml_total_mb"]) for r in ranks if r.get("nvml_total_mb")]
    total = ranks[0].get("system_total_mb") if ranks else None
    return [("host", sum(r["rss_mb"] or 0 for r in ranks), total)] if total else []


def memory_near_limit(run: RunData, t: Thresholds) -> list[Finding]:
    if not run.profiles:
        return []
    last = run.profiles[-1]
    near = [(who, used, total) for who, used, total in _memory_use(last)
            if used > t.memory_fraction * total]
    if not near:
        return []
    batch = number(run, "data.batch_size")
    change = {"data.batch_size": max(1, batch // 2)} if batch else {}
    worst = max(near, key=lambda n: n[1] / n[2])
    return [Finding(
        component="memory", issue="memory_near_limit", severity="warning",
        message=f"At step {last['step']} {worst[0]} uses {worst[1]:.0f} of {worst[2]:.0f} MiB "
                f"({worst[1] / worst[2]:.0%}, limit {t.memory_fraction:.0%}): close to running "
                "out of memory.",
        evidence=evidence("memory used / total (MiB)", [last["step"]] * len(near),
                           [n[1] for n in near], who=[n[0] for n in near],
                           total_mb=[n[2] for n in near]),
        suggestion="Reduce the batch" + (f": data.batch_size: {change['data.batch_size']}"
                                         if change else " (data.batch_size)") +
                   " (keep the global batch with train.grad_accum_steps if it matters).",
        config_change=change)]
