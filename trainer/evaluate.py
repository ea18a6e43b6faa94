"""Validation metrics, summed on every rank's shard and reduced over all ranks.

Reported: mixture NLL (scaled target units, per target too), MAE of the point forecast in
target units, empirical coverage of the central 50% and 90% intervals, the NLL of the
random-walk baseline (last value, Gaussian spread of the training split's h-step changes), the
effective number of mixture components (exp of the entropy of pi) and the pi-weighted fraction
of components whose sigma sits at its floor (sigma collapse).
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch

from model.decoder import mixture_cdf, mixture_log_likelihood, mixture_mean
from trainer import distributed

_SUM_KEYS = ("count", "nll", "mae", "coverage_50", "coverage_90", "rw_nll", "effective_components",
             "sigma_at_floor")


def _batch_sums(out, y_BPT, last_BT, change_scale_PT, target_std_T, sigma_min):
    """Per-target sums (T,) of every metric for one batch."""
    loglik_BPT = mixture_log_likelihood(out.log_pi, out.mu, out.sigma, y_BPT)
    err_BPT = (mixture_mean(out.log_pi, out.mu) - y_BPT).abs() * target_std_T
    centrality_BPT = (mixture_cdf(out.log_pi, out.mu, out.sigma, y_BPT) - 0.5).abs()
    z_BPT = (y_BPT - last_BT[:, None]) / change_scale_PT
    rw_BPT = 0.5 * z_BPT ** 2 + torch.log(change_scale_PT) + 0.5 * math.log(2 * math.pi)
    pi = out.log_pi.exp()
    entropy_BPT = -(pi * out.log_pi).sum(-1)
    floor = change_scale_PT[None, :, :, None] * sigma_min * 1.05
    at_floor_BPT = (pi * (out.sigma <= floor)).sum(-1)
    per_elem = {"count": torch.ones_like(loglik_BPT), "nll": -loglik_BPT, "mae": err_BPT,
                "coverage_50": (centrality_BPT <= 0.25).float(),
                "coverage_90": (centrality_BPT <= 0.45).float(), "rw_nll": rw_BPT,
                "effective_components": entropy_BPT.exp(), "sigma_at_floor": at_floor_BPT}
    return torch.stack([per_elem[k].sum((0, 1)) for k in _SUM_KEYS])   # (metrics, T)


@torch.no_grad()
def evaluate(model, loader, device: torch.device, target_std_T, *,
             autocast: AbstractContextManager | None = None,
             blank_columns: list[int] | None = None, max_batches: int | None = None,
             with_c2t: bool = False) -> dict:
    """Metrics over the loader's shard on this rank, reduced over all ranks.

    `blank_columns` zeroes those feature columns (occlusion); `max_batches` caps the batches
    per rank; `with_c2t` adds `c2t_map`, the (targets x bodies) C->T weights averaged over
    samples, horizon and heads. Returns overall values and `<metric>_per_target` lists.
    """
    was_training = model.training
    model.eval()
    change_scale_PT = model.decoder.change_scale_PT
    std_T = torch.as_tensor(target_std_T, dtype=torch.float32, device=device)
    sums = torch.zeros(len(_SUM_KEYS), len(std_T), dtype=torch.float64, device=device)
    c2t_sum = torch.zeros(len(std_T), len(model.spec.bodies), dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        wave, future = batch.wave, batch.future_wave
        if blank_columns:
            wave, future = wave.clone(), future.clone()
            wave[..., blank_columns] = 0.0
            future[..., blank_columns] = 0.0
        with autocast or nullcontext():
            out = model(wave, batch.target, future, return_attention=with_c2t)
        if with_c2t:
            c2t_sum += out.attention["c2t"].double().mean((1, 3)).sum(0)
        sums += _batch_sums(out, batch.future_target, batch.target[:, -1], change_scale_PT,
                            std_T, model.config.sigma_min).double()
    model.train(was_training)
    distributed.all_reduce_sum(sums)
    metrics = _as_metrics(sums.cpu(), horizon=change_scale_PT.shape[0])
    if with_c2t:
        distributed.all_reduce_sum(c2t_sum)
        metrics["c2t_map"] = (c2t_sum / max(1, metrics["num_windows"])).tolist()
    return metrics


def _as_metrics(sums, horizon: int) -> dict:
    count_T = sums[0].clamp_min(1)
    metrics = {"num_windows": int(sums[0, 0].item()) // horizon}
    for k, row in zip(_SUM_KEYS[1:], sums[1:]):
        metrics[k] = float(row.sum() / count_T.sum())
        metrics[f"{k}_per_target"] = (row / count_T).tolist()
    return metrics
