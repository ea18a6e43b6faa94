"""Validation and test metrics of the model and the naive baselines, on the same windows.

Per forecaster (the model, `rw_*` and `ewma_*` baselines, see scoring/scores.py): NLL and CRPS
(scaled target units), MAE of the median (target units), coverage of the central 50% and 90%
intervals; overall and `<metric>_per_target` (and `_by_horizon`, [P][T], on request). For the
model also the effective number of mixture components (exp of the entropy of pi) and the
pi-weighted fraction of components whose sigma sits at its floor (sigma collapse).
Sums are taken on every rank's shard and reduced over all ranks. With `with_series`, per-window
scores in time order, gathered from all ranks, are returned too (`series`, for skill intervals,
occlusion and the per-window test file), with `calibration_by_horizon` (scoring/calibration.py).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from scoring.calibration import NUM_PIT_BINS, calibration_by_horizon, pit_counts
from scoring.scores import (
    BASELINES,
    PART_SCORES,
    QUANTILE_SCORES,
    SCORES,
    baseline_forecasts,
    derived_scores,
    difference_metrics,
    naive_scale,
    quantile_scores,
    scores,
)
from stats.intervals import paired_difference
from trainer import distributed

FORECASTERS = ("model", *BASELINES)
_MODEL_ONLY = ("effective_components", "sigma_at_floor")
_SERIES_KEYS = ("window", *FORECASTERS, *(f"{name}_{score}_T" for name in FORECASTERS
                                            for score in ("nll", "crps")), "coverage_90_P")
_PREFIXES = ("", *(f"{b}_" for b in BASELINES))


def sum_keys(with_quantiles: bool) -> tuple[str, ...]:
    """The per-element scores summed over an evaluation, in order; `count` first."""
    names = (*SCORES, *(QUANTILE_SCORES if with_quantiles else ()))
    return ("count", *[f"{p}{s}" for p in _PREFIXES for s in names], *_MODEL_ONLY)


def _model_extras(out, change_scale_PT, sigma_min) -> dict[str, torch.Tensor]:
    pi = out.log_pi.exp()
    floor = change_scale_PT[None, :, :, None] * sigma_min * 1.05
    return {"effective_components": (-(pi * out.log_pi).sum(-1)).exp(),
            "sigma_at_floor": (pi * (out.sigma <= floor)).sum(-1)}


def _batch_scores(out, batch, change_scale_PT, target_std_T, sigma_min,
                  target_mean_T=None) -> dict[str, torch.Tensor]:
    """Every (forecaster, score) per (B, P, T) for one batch; keys as in sum_keys (with the
    quantile scores when `target_mean_T` is given)."""
    y = batch.future_target
    naive_BT = naive_scale(batch.target)
    per_elem = {"count": torch.ones_like(y)}
    forecasts = {"": (out.log_pi.float(), out.mu.float(), out.sigma.float()),
                 **{f"{name}_": mixture for name, mixture
                    in baseline_forecasts(batch.target, change_scale_PT).items()}}
    for prefix, mixture in forecasts.items():
        found = scores(mixture, y, target_std_T, naive_BT)
        if target_mean_T is not None:
            found.update(quantile_scores(mixture, y, target_std_T, target_mean_T, naive_BT))
        per_elem.update({f"{prefix}{k}": v for k, v in found.items()})
    per_elem.update(_model_extras(out, change_scale_PT, sigma_min))
    return per_elem


def _blank(batch, columns):
    if not columns:
        return batch.wave, batch.future_wave
    wave, future = batch.wave.clone(), batch.future_wave.clone()
    wave[..., columns] = 0.0
    future[..., columns] = 0.0
    return wave, future


@torch.no_grad()
def evaluate(model, loader, device: torch.device, target_std_T, *,
             autocast: AbstractContextManager | None = None,
             blank_columns: list[int] | None = None, max_batches: int | None = None,
             with_c2t: bool = False, with_series: bool = False, per_horizon: bool = False,
             on_batch: Callable[[], object] | None = None, target_mean_T=None) -> dict:
    """Metrics over the loader's shard on this rank, reduced over all ranks.

    `blank_columns` zeroes those feature columns (occlusion); `max_batches` caps the batches
    per rank; `with_c2t` adds `c2t_map`, the (targets x bodies) C->T weights averaged over
    samples, horizon and heads; `with_series` adds `series` (see the module docstring);
    `target_mean_T` (the training means) adds the quantile scores (scoring/scores.py).
    `on_batch` is called after each batch (a progress bar's `update`).
    """
    was_training = model.training
    model.eval()
    change_scale_PT = model.decoder.change_scale_PT
    std_T = torch.as_tensor(target_std_T, dtype=torch.float32, device=device)
    P, T = change_scale_PT.shape
    keys = sum_keys(with_quantiles=target_mean_T is not None)
    mean_T = None if target_mean_T is None else torch.as_tensor(
        target_mean_T, dtype=torch.float32, device=device)
    sums = torch.zeros(len(keys), P, T, dtype=torch.float64, device=device)
    c2t_sum = torch.zeros(T, len(model.spec.bodies), dtype=torch.float64, device=device)
    pit_PB = torch.zeros(P, NUM_PIT_BINS, dtype=torch.int64, device=device)
    window_ids = iter(loader.sampler)
    series = {key: [] for key in _SERIES_KEYS}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        wave, future = _blank(batch, blank_columns)
        with autocast or nullcontext():
            out = model(wave, batch.target, future, return_attention=with_c2t)
        if with_c2t:
            c2t_sum += out.attention["c2t"].double().mean((1, 3)).sum(0)
        per_elem = _batch_scores(out, batch, change_scale_PT, std_T, model.config.sigma_min,
                                 mean_T)
        sums += torch.stack([per_elem[k].double().sum(0) for k in keys])
        pit_PB += pit_counts(per_elem["pit"])
        if with_series:
            series["window"] += [next(window_ids) for _ in range(len(batch.target))]
            _add_window_series(series, per_elem)
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(pit_PB)
    metrics = _as_metrics(keys, sums.cpu(), per_horizon)
    if with_c2t:
        distributed.all_reduce_sum(c2t_sum)
        metrics["c2t_map"] = (c2t_sum / max(1, metrics["num_windows"])).tolist()
    if with_series:
        metrics["series"] = _gathered_in_time_order(series)
        metrics["calibration_by_horizon"] = calibration_by_horizon(
            _per_step(sums[keys.index("coverage_50")], sums[0]),
            metrics["series"]["coverage_90_P"], pit_PB.cpu().tolist(), loader.dataset.stride)
    return metrics


def _per_step(sums_PT: torch.Tensor, count_PT: torch.Tensor) -> list[float]:
    return (sums_PT.sum(1) / count_PT.sum(1).clamp_min(1)).tolist()


def _add_window_series(series: dict[str, list], per_elem: dict[str, torch.Tensor]) -> None:
    """Per window of the batch: every forecaster's mean NLL (`<name>`), its NLL and CRPS per
    target over the horizon (`<name>_nll_T`, `<name>_crps_T`), and the model's share of targets
    inside its 90% interval per step (`coverage_90_P`)."""
    for name in FORECASTERS:
        prefix = "" if name == "model" else f"{name}_"
        series[name] += per_elem[f"{prefix}nll"].double().mean((1, 2)).tolist()
        for score in ("nll", "crps"):
            series[f"{name}_{score}_T"] += per_elem[f"{prefix}{score}"].double().mean(1).tolist()
    series["coverage_90_P"] += per_elem["coverage_90"].double().mean(2).tolist()


def _gathered_in_time_order(series: dict[str, list]) -> dict[str, np.ndarray]:
    """Every rank's per-window values, joined and sorted by window index (= time order)."""
    parts = distributed.all_gather_object(series)
    joined = {k: _joined([p[k] for p in parts]) for k in series}
    order = np.argsort(joined.pop("window"), kind="stable")
    return {k: v[order] for k, v in joined.items()}


def _joined(parts: list[list]) -> np.ndarray:
    filled = [np.asarray(p, dtype=np.float64) for p in parts if len(p)]
    return np.concatenate(filled) if filled else np.empty(0)


def _as_metrics(keys: tuple[str, ...], sums_MPT, per_horizon: bool) -> dict:
    count_PT = sums_MPT[0].clamp_min(1)
    metrics = {"num_windows": int(sums_MPT[0, 0, 0].item())}
    means = {"": {}, "_per_target": {}, "_by_horizon": {}}
    for k, row_PT in zip(keys[1:], sums_MPT[1:]):
        means[""][k] = float(row_PT.sum() / count_PT.sum())
        means["_per_target"][k] = (row_PT.sum(0) / count_PT.sum(0)).numpy()
        if per_horizon:
            means["_by_horizon"][k] = (row_PT / count_PT).numpy()
    for suffix, found in means.items():
        for k, value in found.items():
            if not k.endswith(PART_SCORES):
                metrics[f"{k}{suffix}"] = value if suffix == "" else value.tolist()
        for prefix in _PREFIXES if found else ():
            parts = {k[len(prefix):]: v for k, v in found.items()
                     if k.startswith(prefix) and k[len(prefix):] in (*SCORES, *QUANTILE_SCORES)}
            for k, value in derived_scores(parts).items():
                metrics[f"{prefix}{k}{suffix}"] = float(value) if suffix == "" else value.tolist()
    return metrics


def celestial_effect(evaluate_fn, split: str, spec, pred_len: int, stride: int,
                     base: dict | None = None, **kwargs) -> dict:
    """Do the celestial inputs help at all? The model's NLL rise when every body's columns are
    blanked together, per window, with its 95% interval (`blank_all_rise*`, the keys of
    `difference_metrics`)."""
    base = base or evaluate_fn(split, with_series=True, **kwargs)
    every_column = sorted(c for columns in spec.body_columns for c in columns)
    blanked = evaluate_fn(split, blank_columns=every_column, with_series=True, **kwargs)
    rise = paired_difference(blanked["series"]["model"], base["series"]["model"], pred_len, stride)
    per_target = [b - a for a, b in zip(base["nll_per_target"], blanked["nll_per_target"])]
    return {**difference_metrics("blank_all_rise", rise), "blank_all_rise_per_target": per_target}
