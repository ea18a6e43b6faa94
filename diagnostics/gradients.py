"""Gradient diagnostics: per-component norms, update ratios, and what ranks' gradients say.

Per component (the model's components, plus `other`), after backward and DDP's all-reduce,
before clipping: the L2 norm, mean/std/max/min of per-tensor norms, parameter count, status,
and the update-to-weight ratio ||dw|| / ||w|| of the optimizer step.
With several ranks, a DDP communication hook copies each rank's LOCAL gradient (before the
all-reduce) on logging steps only. From them, per component:
- agreement: the mean pairwise cosine of ranks' gradients, from one all-reduce of the
  per-rank unit vectors u_i: |sum u_i|^2 = W + sum_{i != j} cos_ij;
- B_simple, the gradient noise scale of McCandlish et al. (2018, appendix A): with
  b = one rank's batch and B = the global batch, |G|^2 ~ (B|g_B|^2 - b|g_b|^2) / (B - b) and
  tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B); both are smoothed (EMA) before the ratio.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch

from diagnostics.records import step_file, write_json
from trainer import distributed
from trainer.diagnostics_config import DiagnosticsConfig
from trainer.observer import Observer, RunContext, StepContext

log = logging.getLogger(__name__)


def component_norm_stats(groups: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """(components, 5): L2 norm, mean, std, max, min of per-tensor norms, on the device.
    Missing gradients count as zeros."""
    rows = []
    for tensors in groups.values():
        norms = torch.stack(torch._foreach_norm([t.float() for t in tensors]))
        std = norms.std() if len(norms) > 1 else torch.zeros_like(norms[0])
        rows.append(torch.stack([norms.norm(), norms.mean(), std, norms.max(), norms.min()]))
    return torch.stack(rows)


def gradients_of(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def status_of(norm: float | None, vanishing: float, exploding: float) -> str:
    if norm is None or not math.isfinite(norm):
        return "nonfinite"
    if norm < vanishing:
        return "vanishing"
    return "exploding" if norm > exploding else "healthy"


class LocalGradientProbe:
    """Copies each rank's local gradients in DDP's comm hook while armed (logging steps)."""

    def __init__(self) -> None:
        self.armed = False
        self.local: dict[torch.nn.Parameter, torch.Tensor] = {}

    def on_bucket(self, params, grads) -> None:
        if self.armed:
            for p, g in zip(params, grads):
                self.local[p] = g.detach().clone()

    def take(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [self.local.get(p, torch.zeros_like(p)) for p in params]

    def reset(self) -> None:
        self.armed = False
        self.local.clear()


def rank_statistics(local_groups: dict[str, list[torch.Tensor]],
                    global_groups: dict[str, list[torch.Tensor]], world_size: int) -> torch.Tensor:
    """(components, 3) summed over ranks: |sum_i u_i|^2, mean_i |g_i|^2, |g_global|^2.
    Collective: every rank calls it on the same step."""
    local_sq = torch.stack([_norm_sq(ts) for ts in local_groups.values()])
    unit = torch.cat([torch.cat([t.float().flatten() for t in ts])
                      / local_sq[i].sqrt().clamp_min(1e-30)
                      for i, ts in enumerate(local_groups.values())])
    distributed.all_reduce_sum(unit)
    sizes = [sum(t.numel() for t in ts) for ts in local_groups.values()]
    unit_sum_sq = torch.stack([chunk.square().sum() for chunk in unit.split(sizes)])
    mean_local_sq = distributed.all_reduce_sum(local_sq.clone()) / world_size
    global_sq = torch.stack([_norm_sq(ts) for ts in global_groups.values()])
    return torch.stack([unit_sum_sq, mean_local_sq, global_sq], dim=1)


def _norm_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of a group of tensors taken as one vector, in fp32."""
    return torch.stack(torch._foreach_norm([t.float() for t in tensors])).square().sum()


def noise_scale_terms(small_sq: float, big_sq: float, b_small: int,
                      b_big: int) -> tuple[float, float]:
    """Unbiased estimates (|G|^2, tr Sigma) from squared gradient norms at two batch sizes."""
    true_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return true_sq, trace


class GradientObserver(Observer):
    communicates = True      # all-reduces per-rank gradient statistics

    def __init__(self, config: DiagnosticsConfig) -> None:
        self.config = config
        self.interval = config.gradient_log_interval
        self.probe: LocalGradientProbe | None = None
        self.history: dict | None = None
        self.ema: dict[str, list[float]] = {}
        self.previous_status: dict[str, str] = {}

    def on_start(self, run: RunContext) -> None:
        self.run = run
        self.groups = {name: [p for _, p in params]
                       for name, params in run.model.component_parameters().items()}
        self.folder = run.log_dir / "gradients"
        self.history = load_history(self.folder / "history.json", self.config)
        if run.world_size > 1:
            self.probe = LocalGradientProbe()
            distributed.register_local_gradient_hook(run.train_model, self.probe.on_bucket)

    def is_active(self, step: int) -> bool:
        return step % self.interval == 0

    def before_forward(self, ctx: StepContext) -> None:
        if self.probe is not None:
            self.probe.armed = True

    def after_backward(self, ctx: StepContext) -> None:
        grads = {name: gradients_of(ps) for name, ps in self.groups.items()}
        self.stats = component_norm_stats(grads)
        self.rank_stats = None
        if self.probe is not None:
            local = {name: self.probe.take(ps) for name, ps in self.groups.items()}
            self.rank_stats = rank_statistics(local, grads, self.run.world_size)
            self.probe.reset()

    def before_optimizer_step(self, ctx: StepContext) -> None:
        self.weights_before = {name: [p.detach().clone() for p in ps]
                               for name, ps in self.groups.items()}

    def after_step(self, ctx: StepContext) -> None:
        ratios = torch.stack([update_ratio(self.weights_before[name], ps)
                              for name, ps in self.groups.items()])
        self.weights_before = {}
        if not self.run.is_main:
            return
        record = self.build_record(ctx, self.stats.tolist(), ratios.tolist())
        write_json(step_file(self.folder, "gradients", ctx.step), record)
        self.append_history(record)
        write_json(self.folder / "history.json", self.history)
        self.report(record)

    def build_record(self, ctx: StepContext, stats: list, ratios: list) -> dict:
        c = self.config
        total = ctx.grad_norm.item()
        components = {}
        for (name, params), row, ratio in zip(self.groups.items(), stats, ratios):
            norm, mean, std, mx, mn = row
            components[name] = {"num_params": sum(p.numel() for p in params), "norm": norm,
                                "mean": mean, "std": std, "max": mx, "min": mn,
                                "status": status_of(norm, c.vanishing_threshold,
                                                    c.exploding_threshold),
                                "update_ratio": ratio}
        return {"step": ctx.step, "epoch": ctx.epoch, "timestamp": time.time(),
                "world_size": self.run.world_size, "total_norm": total, "clip_norm": ctx.clip_norm,
                "clipped": bool(ctx.clip_norm > 0 and math.isfinite(total)
                                and total > ctx.clip_norm),
                "skipped": bool(ctx.found_inf.item()), "lr": ctx.lr, "reduced_over_ranks": True,
                "thresholds": {"vanishing": c.vanishing_threshold,
                               "exploding": c.exploding_threshold},
                "components": components, "ranks": self.rank_record()}

    def rank_record(self) -> dict | None:
        if self.rank_stats is None:
            return None
        w, b = self.run.world_size, self.run.local_batch_size
        components = {}
        for name, (unit_sq, small_sq, big_sq) in zip(self.groups, self.rank_stats.tolist()):
            true_sq, trace = noise_scale_terms(small_sq, big_sq, b, w * b)
            smooth = self.ema.setdefault(name, [true_sq, trace])
            beta = self.config.noise_scale_smoothing
            smooth[0] = beta * smooth[0] + (1 - beta) * true_sq
            smooth[1] = beta * smooth[1] + (1 - beta) * trace
            components[name] = {"agreement": (unit_sq - w) / (w * (w - 1)),
                                "local_norm_sq_mean": small_sq, "global_norm_sq": big_sq,
                                "noise_scale": smooth[1] / smooth[0] if smooth[0] > 0 else None,
                                "noise_scale_raw": trace / true_sq if true_sq > 0 else None}
        return {"source": "each rank's local gradient before DDP's all-reduce (comm hook)",
                "local_batch": b, "global_batch": w * b, "components": components}

    def append_history(self, record: dict) -> None:
        """Append one record; every series stays aligned with `steps` (null where absent).
        Entries at or after this step (written before a resume) are dropped first."""
        h = self.history
        keep = [i for i, s in enumerate(h["steps"]) if s < record["step"]]
        for series in _all_series(h):
            series[:] = [series[i] for i in keep if i < len(series)]
        h["steps"].append(record["step"])
        h["epochs"].append(record["epoch"])
        h["total_norm"].append(record["total_norm"])
        h["clipped"].append(record["clipped"])
        h["lr"].append(record["lr"])
        h.setdefault("skipped", []).append(record["skipped"])
        ranks = (record["ranks"] or {}).get("components", {})
        for name, comp in record["components"].items():
            series = h["components"].setdefault(
                name, {"norm": [], "update_ratio": [], "status": []})
            for key in ("norm", "update_ratio", "status"):
                series[key].append(comp[key])
            h["agreement"].setdefault(name, []).append(ranks.get(name, {}).get("agreement"))
            h["noise_scale"].setdefault(name, []).append(ranks.get(name, {}).get("noise_scale"))

    def report(self, record: dict) -> None:
        """TensorBoard scalars; a warning when a component turns vanishing or exploding."""
        step = record["step"]
        scalars = {"total_norm": record["total_norm"], "clipped": float(record["clipped"])}
        scalars.update({f"norm/{n}": c["norm"] for n, c in record["components"].items()})
        scalars.update({f"update_ratio/{n}": c["update_ratio"]
                        for n, c in record["components"].items()})
        for name, comp in (record["ranks"] or {}).get("components", {}).items():
            scalars[f"agreement/{name}"] = comp["agreement"]
            if comp["noise_scale"] is not None:
                scalars[f"noise_scale/{name}"] = comp["noise_scale"]
        self.run.run_log.scalars("gradients", step, scalars)
        for name, comp in record["components"].items():
            status = comp["status"]
            if status != "healthy" and self.previous_status.get(name) != status:
                log.warning("gradient diagnostics: component %s turned %s at step %d (norm %s)",
                            name, status, step, comp["norm"])
            self.previous_status[name] = status


def update_ratio(before: list[torch.Tensor], params: list[torch.nn.Parameter]) -> torch.Tensor:
    """||w_after - w_before|| / ||w_before|| over a component."""
    after = [p.detach() for p in params]
    delta = torch._foreach_sub(after, before)
    delta_norm = torch.stack(torch._foreach_norm(delta)).norm()
    weight_norm = torch.stack(torch._foreach_norm(before)).norm()
    return delta_norm / weight_norm.clamp_min(1e-30)


def _all_series(h: dict) -> list[list]:
    series = [h["steps"], h["epochs"], h["total_norm"], h["clipped"], h["lr"],
              h.setdefault("skipped", [])]
    for comp in h["components"].values():
        series += [comp["norm"], comp["update_ratio"], comp["status"]]
    return series + list(h["agreement"].values()) + list(h["noise_scale"].values())


def empty_history(config: DiagnosticsConfig) -> dict:
    return {"steps": [], "epochs": [], "total_norm": [], "clipped": [], "lr": [], "skipped": [],
            "thresholds": {"vanishing": config.vanishing_threshold,
                           "exploding": config.exploding_threshold},
            "components": {}, "agreement": {}, "noise_scale": {}}


def load_history(path, config: DiagnosticsConfig) -> dict:
    """The history so far (a resumed run appends to it), else an empty one."""
    if not path.is_file():
        return empty_history(config)
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("gradient history %s is unreadable: starting a new one", path)
        return empty_history(config)
