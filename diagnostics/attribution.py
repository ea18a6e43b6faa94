"""Occlusion attribution at validation: does the model use the bodies its C->T attention names?

For every body, its columns are blanked (set to the training mean, i.e. 0 after scaling) in
the look-back and the horizon, and the rise of validation NLL per target is measured on up to
`attribution_max_samples` validation windows. Each target's bodies are ranked by that rise
and compared with the C->T map on the same windows (Spearman rank correlation).
"""
from __future__ import annotations

import math
import time

import torch

from diagnostics.records import step_file, write_json
from trainer.diagnostics_config import DiagnosticsConfig
from trainer.evaluate import celestial_effect
from trainer.observer import Observer, RunContext


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation of two equally long lists (ties broken by order)."""
    if len(a) < 2:
        return None
    rank_a = torch.tensor(a).argsort().argsort().double()
    rank_b = torch.tensor(b).argsort().argsort().double()
    ra, rb = rank_a - rank_a.mean(), rank_b - rank_b.mean()
    denom = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denom if denom > 0 else None


def ranked(scores: dict[str, float]) -> list[str]:
    return [name for name, _ in sorted(scores.items(), key=lambda kv: -kv[1])]


def occlusion_record(evaluate_fn, spec, max_batches: int, pred_len: int, stride: int) -> dict:
    """Per target: baseline NLL, NLL rise per blanked body, C->T weights on the same windows;
    and the NLL rise with every body blanked at once, with its 95% interval (`blank_all`)."""
    base = evaluate_fn("val", max_batches=max_batches, with_c2t=True, with_series=True)
    effect = celestial_effect(evaluate_fn, "val", spec, pred_len, stride, base=base,
                              max_batches=max_batches)
    targets, bodies = spec.targets, spec.bodies
    occlusion = {t: {} for t in targets}
    for body, columns in zip(bodies, spec.body_columns):
        blanked = evaluate_fn("val", max_batches=max_batches, blank_columns=columns)
        for i, t in enumerate(targets):
            occlusion[t][body] = blanked["nll_per_target"][i] - base["nll_per_target"][i]
    c2t = {t: dict(zip(bodies, row)) for t, row in zip(targets, base["c2t_map"])}
    return {"num_windows": base["num_windows"],
            "baseline_nll": dict(zip(targets, base["nll_per_target"])),
            "occlusion": occlusion, "ranking": {t: ranked(occlusion[t]) for t in targets},
            "c2t_weights": c2t, "c2t_ranking": {t: ranked(c2t[t]) for t in targets},
            "spearman": {t: spearman([c2t[t][b] for b in bodies], [occlusion[t][b] for b in bodies])
                         for t in targets},
            "blank_all": {"rise": effect["blank_all_rise"], "low": effect["blank_all_rise_low"],
                          "high": effect["blank_all_rise_high"],
                          "per_target": dict(zip(targets, effect["blank_all_rise_per_target"]))}}


def counting_passes(evaluate_fn, advance):
    """`evaluate_fn` calling `advance()` after each pass over the split."""
    def evaluate(split, **kwargs):
        metrics = evaluate_fn(split, **kwargs)
        advance()
        return metrics
    return evaluate


class AttributionObserver(Observer):
    communicates = True      # its occlusion evaluations all-reduce the metrics

    def __init__(self, config: DiagnosticsConfig) -> None:
        self.config = config

    def on_start(self, run: RunContext) -> None:
        self.run = run
        per_rank = self.config.attribution_max_samples / run.world_size
        self.max_batches = max(1, math.ceil(per_rank / run.config.data.eval_batch_size))

    def on_validation(self, step: int, metrics: dict, evaluate_fn) -> None:
        config, bodies = self.run.config, self.run.spec.bodies
        passes = len(bodies) + 2        # unblanked, all bodies blanked, each body blanked
        with self.run.run_log.phase(f"attribution at step {step} (occlusion of {len(bodies)} "
                                    f"bodies, up to {self.max_batches} batches per rank each)",
                                    passes, unit="pass") as bar:
            record = occlusion_record(counting_passes(evaluate_fn, bar.update), self.run.spec,
                                      self.max_batches, config.model.pred_len,
                                      config.data.window_stride)
        if not self.run.is_main:
            return
        record = {"step": step, "epoch": metrics.get("epoch", 0), "timestamp": time.time(),
                  **record}
        write_json(step_file(self.run.log_dir / "attention", "attribution", step), record)
        self.run.run_log.scalars("attribution", step, {
            **{f"spearman/{t}": r for t, r in record["spearman"].items() if r is not None},
            "blank_all_rise": record["blank_all"]["rise"]})
