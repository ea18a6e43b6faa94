"""Validation and test metrics of the model and the naive baselines, on the same windows.

Per forecaster (the model, `rw_*` and `ewma_*` baselines, see trainer/scoring.py): NLL and CRPS
(scaled target units), MAE of the median (target units), coverage of the central 50% and 90%
intervals; overall and `<metric>_per_target` (and `_by_horizon`, [P][T], on request). For the
model also the effective number of mixture components (exp of the entropy of pi) and the
pi-weighted fraction of components whose sigma sits at its floor (sigma collapse).
Sums are taken on every rank's shard and reduced over all ranks. With `with_series`, the
per-window mean NLL of every forecaster, in time order and gathered from all ranks, is returned
too (`series`), for skill intervals and occlusion.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from stats.intervals import paired_difference
from trainer import distributed
from trainer.scoring import BASELINES, SCORES, baseline_forecasts, difference_metrics, scores

FORECASTERS = ("model", *BASELINES)
_MODEL_ONLY = ("effective_components", "sigma_at_floor")
_SUM_KEYS = ("count", *[f"{p}{s}" for p in ("", *(f"{b}_" for b in BASELINES)) for s in SCORES],
             *_MODEL_ONLY)


def _model_extras(out, change_scale_PT, sigma_min) -> dict[str, torch.Tensor]:
    pi = out.log_pi.exp()
    floor = change_scale_PT[None, :, :, None] * sigma_min * 1.05
    return {"effective_components": (-(pi * out.log_pi).sum(-1)).exp(),
            "sigma_at_floor": (pi * (out.sigma <= floor)).sum(-1)}


def _batch_scores(out, batch, change_scale_PT, target_std_T, sigma_min) -> dict[str, torch.Tensor]:
    """Every (forecaster, score) per (B, P, T) for one batch; keys as in _SUM_KEYS."""
    y = batch.future_target
    per_elem = {"count": torch.ones_like(y)}
    model = (out.log_pi.float(), out.mu.float(), out.sigma.float())
    per_elem.update(scores(model, y, target_std_T))
    for name, mixture in baseline_forecasts(batch.target, change_scale_PT).items():
        per_elem.update({f"{name}_{k}": v for k, v in scores(mixture, y, target_std_T).items()})
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
             with_c2t: bool = False, with_series: bool = False, per_horizon: bool = False) -> dict:
    """Metrics over the loader's shard on this rank, reduced over all ranks.

    `blank_columns` zeroes those feature columns (occlusion); `max_batches` caps the batches
    per rank; `with_c2t` adds `c2t_map`, the (targets x bodies) C->T weights averaged over
    samples, horizon and heads; `with_series` adds `series` (see the module docstring).
    """
    was_training = model.training
    model.eval()
    change_scale_PT = model.decoder.change_scale_PT
    std_T = torch.as_tensor(target_std_T, dtype=torch.float32, device=device)
    P, T = change_scale_PT.shape
    sums = torch.zeros(len(_SUM_KEYS), P, T, dtype=torch.float64, device=device)
    c2t_sum = torch.zeros(T, len(model.spec.bodies), dtype=torch.float64, device=device)
    window_ids = iter(loader.sampler)
    series = {"window": [], **{name: [] for name in FORECASTERS}}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        wave, future = _blank(batch, blank_columns)
        with autocast or nullcontext():
            out = model(wave, batch.target, future, return_attention=with_c2t)
        if with_c2t:
            c2t_sum += out.attention["c2t"].double().mean((1, 3)).sum(0)
        per_elem = _batch_scores(out, batch, change_scale_PT, std_T, model.config.sigma_min)
        sums += torch.stack([per_elem[k].double().sum(0) for k in _SUM_KEYS])
        if with_series:
            series["window"] += [next(window_ids) for _ in range(len(batch.target))]
            for name in FORECASTERS:
                key = "nll" if name == "model" else f"{name}_nll"
                series[name] += per_elem[key].double().mean((1, 2)).tolist()
    model.train(was_training)
    distributed.all_reduce_sum(sums)
    metrics = _as_metrics(sums.cpu(), per_horizon)
    if with_c2t:
        distributed.all_reduce_sum(c2t_sum)
        metrics["c2t_map"] = (c2t_sum / max(1, metrics["num_windows"])).tolist()
    if with_series:
        metrics["series"] = _gathered_in_time_order(series)
    return metrics


def _gathered_in_time_order(series: dict[str, list]) -> dict[str, np.ndarray]:
    """Every rank's per-window values, joined and sorted by window index (= time order)."""
    parts = distributed.all_gather_object(series)
    joined = {k: np.concatenate([np.asarray(p[k], dtype=np.float64) for p in parts])
              for k in series}
    order = np.argsort(joined.pop("window"), kind="stable")
    return {k: v[order] for k, v in joined.items()}


def _as_metrics(sums_MPT, per_horizon: bool) -> dict:
    count_PT = sums_MPT[0].clamp_min(1)
    metrics = {"num_windows": int(sums_MPT[0, 0, 0].item())}
    for k, row_PT in zip(_SUM_KEYS[1:], sums_MPT[1:]):
        metrics[k] = float(row_PT.sum() / count_PT.sum())
        metrics[f"{k}_per_target"] = (row_PT.sum(0) / count_PT.sum(0)).tolist()
        if per_horizon:
            metrics[f"{k}_by_horizon"] = (row_PT / count_PT).tolist()
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
