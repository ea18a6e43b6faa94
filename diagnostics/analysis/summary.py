"""Numbers that summarise a run, shared by the console, the report and gradient_norms.csv."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diagnostics.analysis.kept import best_validation, kept_line
from diagnostics.analysis.load import GradientSeries, RunData, column, finite_median
from diagnostics.analysis.thresholds import Thresholds


@dataclass
class ComponentStats:
    name: str
    mean_norm: float
    max_norm: float
    mean_verdict: str
    max_verdict: str


def mean_verdict(norms: np.ndarray, t: Thresholds) -> str:
    finite = norms[np.isfinite(norms)]
    if not finite.size:
        return "[!] No finite gradient norm"
    mean = finite.mean()
    if np.all(finite == 0):
        return "[!] Dead: zero gradient"
    if mean < t.vanishing:
        return f"[!] Vanishing gradients (below {t.vanishing:g})"
    if mean < t.healthy_low:
        return f"[~] Weak gradient flow (below {t.healthy_low:g}, above {t.vanishing:g})"
    if mean <= t.healthy_high:
        return "[ok] Healthy gradient flow"
    if mean <= t.exploding:
        return f"[~] Strong gradient flow (above {t.healthy_high:g})"
    return f"[!] Exploding gradients (above {t.exploding:g})"


def max_verdict(norms: np.ndarray, t: Thresholds) -> str:
    if np.any(~np.isfinite(norms)):
        return "[!] Non-finite gradient norms"
    if np.max(norms, initial=0) > t.exploding:
        return f"[!] Exploding gradients (above {t.exploding:g})"
    return "[ok] No exploding gradients"


def component_stats(g: GradientSeries, t: Thresholds) -> list[ComponentStats]:
    stats = []
    for name, norms in g.norms.items():
        finite = norms[np.isfinite(norms)]
        stats.append(ComponentStats(
            name=name, mean_norm=float(finite.mean()) if finite.size else math.nan,
            max_norm=float(finite.max()) if finite.size else math.nan,
            mean_verdict=mean_verdict(norms, t), max_verdict=max_verdict(norms, t)))
    return stats


def top_bodies(run: RunData) -> tuple[int, dict[str, list[tuple[str, float]]]] | None:
    """(step, target -> [(body, weight), ...]) from the latest attention record's top-K."""
    if not run.attention:
        return None
    last = run.attention[-1]
    return last["step"], {target: [(entry["body"], entry["weight"]) for entry in entries]
                          for target, entries in last["c2t"]["top_k"].items()}


@dataclass
class OcclusionRanking:
    """Bodies per target by the validation NLL rise when each is blanked (what the model uses),
    from the newest attribution record."""
    step: int
    num_windows: int
    per_target: dict[str, list[tuple[str, float]]]   # target -> [(body, rise in nats)], by rise

    @property
    def title(self) -> str:
        return (f"Celestial bodies by occlusion: validation NLL rise in nats when the body is "
                f"blanked (weights of step {self.step}, {self.num_windows} windows)")

    def table(self, top: int = 5) -> tuple[list[str], list[list[str]]]:
        """(header, rows): one row per target, its `top` bodies with their rise."""
        header = ["target", *(f"#{i + 1}" for i in range(top))]
        rows = [[target, *(f"{body} {rise:+.4f}" for body, rise in bodies[:top])]
                for target, bodies in self.per_target.items()]
        return header, rows


def occlusion_ranking(run: RunData) -> OcclusionRanking | None:
    if not run.attribution:
        return None
    last = run.attribution[-1]
    per_target = {target: sorted(((body, float(rise)) for body, rise in scores.items()
                                  if rise is not None), key=lambda br: -br[1])
                  for target, scores in last["occlusion"].items()}
    return OcclusionRanking(last["step"], last["num_windows"], per_target)


def _fmt(value, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _world_size(run: RunData) -> int | None:
    """From the train lines, else the diagnostics records."""
    for source in (run.train, run.profiles, run.attention):
        if source and isinstance(source[-1].get("world_size"), int):
            return source[-1]["world_size"]
    return run.gradients.world_size if run.gradients is not None else None


def _device(run: RunData) -> str:
    """From the train lines, else the newest profile, else a device the config names."""
    if run.train and isinstance(run.train[-1].get("device"), str):
        return run.train[-1]["device"]
    if run.profiles:
        return f"{run.profiles[-1]['device']} ({run.profiles[-1]['device_name']})"
    configured = run.config_value("train.device")
    return configured if configured in ("cpu", "cuda") else "unknown"


def _progress_rows(run: RunData) -> list[tuple[str, str]]:
    last = run.train[-1] if run.train else {}
    planned = run.config_value("train.max_steps") or "as many as train.epochs take"
    world_size = _world_size(run)
    settings = (f"{run.config_value('optim.lr', 'n/a')} / "
                f"{run.config_value('data.batch_size', 'n/a')} per rank")
    return [("steps", f"{last.get('step', 'none logged')} (planned: {planned})"),
            ("epoch", _fmt(last.get("epoch"), "d") if last else "n/a"),
            ("world size", str(world_size) if world_size else "unknown"),
            ("device", _device(run)),
            ("optim.lr / data.batch_size", settings)]


def _throughput_rows(run: RunData) -> list[tuple[str, str]]:
    if not run.train:
        return [("throughput", "n/a (no training lines)")]
    rows = [(label, _fmt(finite_median(column(run.train, key)[1]), spec)) for label, key, spec in (
        ("throughput (samples/s, median)", "samples_per_s", ".1f"),
        ("step time (s, median)", "step_time_s", ".4f"),
        ("data time (s, median)", "data_time_s", ".4f"))]
    _, memory = column(run.train, "memory_mb")
    peak = float(memory[np.isfinite(memory)].max()) if np.isfinite(memory).any() else None
    return rows + [("memory (MiB, peak in metrics.jsonl)", _fmt(peak, ".0f"))]


def _rank_memory(rank: dict) -> str:
    if rank.get("nvml_total_mb"):
        return f"{_fmt(rank.get('nvml_used_mb'), '.0f')}/{rank['nvml_total_mb']:.0f} MiB GPU"
    return f"{_fmt(rank['rss_mb'], '.0f')} MiB RSS"


def _profile_rows(run: RunData) -> list[tuple[str, str]]:
    if not run.profiles:
        return []
    last = run.profiles[-1]
    memory = ", ".join(f"rank {r['rank']}: {_rank_memory(r)}" for r in last["memory"]["per_rank"])
    return [("parameters", f"{last['parameters']['total']:,}"),
            (f"memory per rank (profile, step {last['step']})", memory),
            ("MFU", _fmt(last.get("mfu"), ".1%"))]


def _baselines(line: dict) -> str:
    return f"random walk {_fmt(line.get('rw_nll'))}, EWMA random walk {_fmt(line.get('ewma_nll'))}"


def _result_rows(run: RunData) -> list[tuple[str, str]]:
    """Best validation, then the kept weights' line (the one the verdict reads)."""
    rows = []
    best = best_validation(run)
    if best is not None:
        rows.append(("best validation NLL",
                     f"{best['nll']:.4f} at step {best['step']} ({_baselines(best)})"))
    kept = kept_line(run)
    if kept is not None:
        if kept.split == "test":
            rows.append((f"test NLL ({kept.label})",
                         f"{_fmt(kept.line.get('nll'))} ({_baselines(kept.line)})"))
        rows.append((f"90% coverage ({kept.label})", _fmt(kept.line.get("coverage_90"), ".3f")))
    return rows


def run_summary(run: RunData) -> list[tuple[str, str]]:
    """(label, value) rows: progress, throughput, memory, results."""
    return [("run", str(run.log_dir)), *_progress_rows(run), *_throughput_rows(run),
            *_profile_rows(run), *_result_rows(run)]


def write_gradient_csv(g: GradientSeries, path: Path) -> None:
    """One row per logged step: step, total_norm, then one column per component."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "total_norm", *g.components])
        for i, step in enumerate(g.steps):
            values = [g.total_norm[i], *(g.norms[c][i] for c in g.components)]
            writer.writerow([int(step), *("" if not np.isfinite(v) else repr(float(v))
                                          for v in values)])
