"""The analysis plots (matplotlib, Agg backend: no display needed). Each function writes one PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # before pyplot is imported: no display needed
import matplotlib.pyplot as plt
import numpy as np

from diagnostics.analysis.calibration import NOMINAL_90, Calibration, pit_counts
from diagnostics.analysis.kept import kept_line
from diagnostics.analysis.load import GradientSeries, RunData, column
from diagnostics.analysis.thresholds import Thresholds

DPI = 100


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")   # keeps legends below the axes
    plt.close(fig)
    return path


def _float(value) -> float:
    return np.nan if value is None else value


def _legend(axis) -> None:
    """A legend below the axes, where it hides no data; only where something is labelled (a run
    without validation has no curve)."""
    handles = axis.get_legend_handles_labels()[0]
    if handles:
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15),
                    ncol=min(3, len(handles)), frameon=False)


def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def gradient_flow(g: GradientSeries, t: Thresholds, path: Path) -> Path:
    """Per-component gradient norms over steps, log scale, the healthy band shaded."""
    floor = t.vanishing / 100   # zero or missing norms are drawn here, on the log axis
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.axhspan(t.healthy_low, t.healthy_high, color="tab:green", alpha=0.12,
               label=f"healthy {t.healthy_low:g}..{t.healthy_high:g}")
    ax.axhline(t.vanishing, color="tab:blue", ls="--", lw=1, label=f"vanishing < {t.vanishing:g}")
    ax.axhline(t.exploding, color="tab:red", ls="--", lw=1, label=f"exploding > {t.exploding:g}")
    drawn_at_floor = False
    for color, (name, norms) in zip(_colors(len(g.norms)), g.norms.items()):
        positive = np.isfinite(norms) & (norms > 0)
        drawn_at_floor |= not positive.all()
        ax.plot(g.steps, np.where(positive, norms, floor), marker=".", color=color, label=name)
    if drawn_at_floor:
        ax.axhline(floor, color="gray", ls=":", lw=1, label="zero or missing norm")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient flow per component")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, path)


def fusion_attention_entropy(attention: list[dict], t: Thresholds, path: Path) -> Path:
    """Normalised fusion entropy (overall and per head) over steps; the last token weights."""
    steps = [r["step"] for r in attention]
    fusion = [r["fusion"] for r in attention]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    heads = np.array([[_float(v) for v in f["head_normalized_entropy"]] for f in fusion])
    for h in range(heads.shape[1] if heads.ndim == 2 else 0):
        ax.plot(steps, heads[:, h], lw=0.8, alpha=0.6, label=f"head {h}")
    ax.plot(steps, [_float(f["normalized_entropy"]) for f in fusion], marker="o", color="black",
            lw=2, label="all heads")
    ax.axhline(t.entropy_collapse, color="tab:red", ls="--", lw=1, label="collapse")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("entropy / log(num_tokens)  (1 = uniform)")
    ax.set_title("Fusion attention entropy")
    ax.legend(fontsize=8)
    last = fusion[-1]
    weights = [_float(w) for w in last["token_mean_weight"]]
    bx.bar(range(len(weights)), weights, width=1.0, color="tab:gray")
    for color, (group, (start, end)) in zip(_colors(len(last["token_groups"])),
                                            last["token_groups"].items()):
        bx.axvspan(start - 0.5, end - 0.5, color=color, alpha=0.15, label=group)
    bx.axhline(1 / max(1, len(weights)), color="black", ls=":", lw=1, label="uniform")
    bx.set_xlabel("temporal token")
    bx.set_ylabel("mean attention weight")
    bx.set_title(f"Fusion token weights at step {steps[-1]}")
    bx.legend(fontsize=8)
    return _save(fig, path)


def c2t_heatmap(record: dict, path: Path) -> Path:
    """The C->T map of one attention record: targets x bodies, by name."""
    targets, bodies = record["c2t"]["targets"], record["c2t"]["bodies"]
    weights = np.array([[np.nan if record["c2t"]["weights"].get(tg, {}).get(b) is None
                         else record["c2t"]["weights"][tg][b] for b in bodies] for tg in targets])
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(bodies)), 1.2 + 0.6 * len(targets)))
    image = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(bodies)), bodies, rotation=45, ha="right")
    ax.set_yticks(range(len(targets)), targets)
    for i in range(len(targets)):
        for j in range(len(bodies)):
            if np.isfinite(weights[i, j]):
                ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if weights[i, j] < np.nanmean(weights) else "black")
    fig.colorbar(image, ax=ax, label="mean attention weight")
    ax.set_title(f"C->T attention at step {record['step']} (uniform = {1 / len(bodies):.3f})")
    return _save(fig, path)


_BASELINE_CURVES = (("rw_nll", "random walk", "gray"),
                    ("ewma_nll", "EWMA random walk", "tab:orange"))


def _test_point(run: RunData) -> tuple[int, str] | None:
    """(x, label) of the test: drawn at the step of the weights it scored."""
    kept = kept_line(run)
    if kept is None or kept.split != "test":
        return None
    return kept.weights_step, f"test, weights of step {kept.weights_step}"


def _skill_panel(ax, run: RunData) -> None:
    test = _test_point(run)
    for lines, label, style in ((run.val, "validation", "o"), (run.test[-1:], "test", "*")):
        lines = [v for v in lines if v.get("skill") is not None and v.get("skill_low") is not None]
        if not lines:
            continue
        steps = [v["step"] for v in lines] if style == "o" else [test[0]]
        skill = np.array([v["skill"] for v in lines])
        err = [skill - [v["skill_low"] for v in lines], [v["skill_high"] for v in lines] - skill]
        name = label if style == "o" else test[1]
        ax.errorbar(steps, skill, yerr=err, fmt=style, ms=9 if style == "*" else 5, capsize=3,
                    label=f"{name} (vs {lines[-1].get('best_baseline')})")
    ax.axhline(0, color="black", lw=1)
    ax.set_title("Skill over the best baseline, 95% interval (below 0: model better)")
    ax.set_xlabel("optimizer step (of the weights scored)")
    ax.set_ylabel("model NLL - baseline NLL (nats)")
    _legend(ax)


def _blank_all_panel(bx, run: RunData) -> None:
    rises = [(f"val {r['step']}", r["blank_all"]) for r in run.attribution if r.get("blank_all")]
    test = _test_point(run)
    if test and run.test[-1].get("blank_all_rise") is not None:
        t = run.test[-1]
        rises.append((test[1], {"rise": t["blank_all_rise"], "low": t.get("blank_all_rise_low"),
                                "high": t.get("blank_all_rise_high")}))
    if rises:
        rise = np.array([_float(r["rise"]) for _, r in rises])
        err = [rise - [_float(r["low"]) for _, r in rises],
               [_float(r["high"]) for _, r in rises] - rise]
        bx.errorbar(range(len(rises)), rise, yerr=err, fmt="o", capsize=3)
        bx.set_xticks(range(len(rises)), [name for name, _ in rises], rotation=45, fontsize=7)
    bx.axhline(0, color="black", lw=1)
    bx.set_xlabel("split and step of the weights scored")
    bx.set_ylabel("NLL rise, all bodies blanked (nats)")
    bx.set_title("Reliance on the celestial inputs (above 0: the model relies on them)")


def skill_curve(run: RunData, path: Path) -> Path:
    """Skill against the best baseline (model NLL - baseline NLL, below 0 = better) with its 95%
    interval at each validation and at test; the all-bodies-blanked NLL rise beside it."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    _skill_panel(ax, run)
    _blank_all_panel(bx, run)
    return _save(fig, path)


def _nll_panel(bx, run: RunData) -> None:
    if run.val:
        bx.plot(*column(run.val, "nll"), marker="o", color="tab:blue", label="model (validation)")
    for key, label, color in _BASELINE_CURVES:
        if run.val and any(line.get(key) is not None for line in run.val):
            bx.plot(*column(run.val, key), ls="--", color=color, label=f"{label} (validation)")
    test = _test_point(run)
    if test:
        for key, label, color in (("nll", "model", "tab:blue"), *_BASELINE_CURVES):
            if run.test[-1].get(key) is not None:
                bx.plot([test[0]], [run.test[-1][key]], marker="*", ms=13, ls="", color=color,
                        markeredgecolor="black", label=f"{label} ({test[1]})")
    bx.set_title("NLL: model and baselines (lower is better)")
    bx.set_ylabel("NLL (nats, scaled targets)")


def training_curves(run: RunData, t: Thresholds, path: Path) -> Path:
    """Training loss, validation NLL against the baselines (test drawn at the step of the weights
    it scored), and 90%/50% coverage."""
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.8))
    if run.train:
        ax.plot(*column(run.train, "loss"), color="tab:blue", label="train loss")
    ax.set_title("Training loss")
    ax.set_ylabel("NLL (nats, scaled targets)")
    _nll_panel(bx, run)
    if run.val:
        cx.plot(*column(run.val, "coverage_90"), marker="o", label="90% interval")
        cx.plot(*column(run.val, "coverage_50"), marker="s", label="50% interval")
    cx.axhspan(t.coverage_90_low, t.coverage_90_high, color="tab:green", alpha=0.12,
               label="wanted 90% coverage")
    cx.axhline(0.5, color="gray", ls=":", lw=1)
    cx.set_ylim(0, 1)
    cx.set_title("Interval coverage (validation)")
    cx.set_ylabel("fraction of outcomes inside the interval")
    for axis in (ax, bx, cx):
        axis.set_xlabel("optimizer step")
        _legend(axis)
    return _save(fig, path)


def compare_curves(runs: list[RunData], path: Path) -> Path:
    """Runs overlaid: training loss, validation NLL, total gradient norm."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for color, run in zip(_colors(len(runs)), runs):
        if run.train:
            axes[0].plot(*column(run.train, "loss"), color=color, label=run.name)
        if run.val:
            axes[1].plot(*column(run.val, "nll"), marker="o", color=color, label=run.name)
        if run.gradients is not None:
            axes[2].plot(run.gradients.steps, run.gradients.total_norm, marker=".", color=color,
                         label=run.name)
    axes[2].set_yscale("log")
    for axis, title, unit in zip(axes, ("Training loss", "Validation NLL", "Total gradient norm"),
                                 ("NLL (nats, scaled targets)", "NLL (nats, scaled targets)",
                                  "gradient L2 norm")):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(unit)
        _legend(axis)
    return _save(fig, path)


def compare_gradient_norms(runs: list[RunData], t: Thresholds, path: Path) -> Path:
    """One panel per component, the runs overlaid (log scale, healthy band shaded)."""
    names = list(dict.fromkeys(c for r in runs if r.gradients for c in r.gradients.components))
    cols = 4
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    colors = _colors(len(runs))
    for axis, name in zip(axes.flat, names):
        axis.axhspan(t.healthy_low, t.healthy_high, color="tab:green", alpha=0.12)
        for color, run in zip(colors, runs):
            norms = run.gradients.norms.get(name) if run.gradients else None
            if norms is not None:
                axis.plot(run.gradients.steps, np.where(norms > 0, norms, np.nan), color=color,
                          label=run.name)
        axis.set_yscale("log")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("optimizer step", fontsize=8)
        axis.set_ylabel("gradient L2 norm", fontsize=8)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    return _save(fig, path)


def _coverage_per_step(ax, c: Calibration) -> None:
    steps = [s.step for s in c.steps]
    coverage = np.array([s.coverage_90 for s in c.steps])
    low = np.array([_float(s.low) for s in c.steps])
    high = np.array([_float(s.high) for s in c.steps])
    ax.axhspan(c.low, c.high, color="tab:green", alpha=0.12, label="wanted 90% coverage")
    ax.axhline(NOMINAL_90, color="tab:green", ls=":", lw=1)
    errors = [np.nan_to_num(coverage - low), np.nan_to_num(high - coverage)]
    ax.errorbar(steps, coverage, yerr=errors, fmt="o-", ms=4, capsize=2, color="tab:blue",
                label="90% interval (95% CI)")
    fifty = [_float(s.coverage_50) for s in c.steps]
    ax.plot(steps, fifty, "s-", ms=3, color="tab:orange", label="50% interval")
    ax.axhline(0.5, color="tab:orange", ls=":", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("horizon step (1 = first forecast step)")
    ax.set_ylabel("fraction of outcomes inside the interval")
    ax.set_title(f"Coverage per horizon step ({c.kept.label})")
    _legend(ax)


def _pit_histograms(ax, c: Calibration) -> None:
    counts = pit_counts(c.kept.line)
    if counts is None:
        ax.set_axis_off()
        return
    num_bins = counts.shape[1]
    edges = np.linspace(0, 1, num_bins + 1)
    pooled = counts.sum(0)
    ax.bar(edges[:-1], pooled / pooled.sum() * num_bins, width=1 / num_bins, align="edge",
           color="tab:gray", alpha=0.6, edgecolor="white", label="all horizon steps")
    worst = max(c.steps, key=lambda s: abs(s.coverage_90 - NOMINAL_90))
    row = counts[c.steps.index(worst)]
    ax.stairs(row / max(row.sum(), 1) * num_bins, edges, color="tab:red", lw=2,
              label=f"horizon step {worst.step} (farthest from 90%)")
    ax.axhline(1, color="black", ls=":", lw=1, label="calibrated (uniform)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT value (forecast CDF at the outcome)")
    ax.set_ylabel("density (1 = calibrated)")
    ax.set_title("PIT histogram (U shape: overconfident; hump: underconfident)")
    _legend(ax)


def pit_histogram(c: Calibration, path: Path) -> Path:
    """Coverage per horizon step with intervals, and the PIT histogram pooled and at the step
    farthest from nominal coverage (from the kept weights' calibration_by_horizon)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    _coverage_per_step(ax, c)
    _pit_histograms(bx, c)
    return _save(fig, path)


def occlusion_plot(ranking, path: Path) -> Path:
    """One panel per target: bodies by the validation NLL rise when blanked, largest on top."""
    targets = list(ranking.per_target)
    cols = min(4, len(targets))
    rows = -(-len(targets) // cols)
    num_bodies = max(len(b) for b in ranking.per_target.values())
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 0.8 + 0.3 * num_bodies * rows),
                             squeeze=False)
    for ax, target in zip(axes.flat, targets):
        bodies = ranking.per_target[target][::-1]      # barh draws bottom-up
        rises = [rise for _, rise in bodies]
        ax.barh(range(len(bodies)), rises, color=["tab:blue" if r > 0 else "tab:gray"
                                                  for r in rises])
        ax.set_yticks(range(len(bodies)), [body for body, _ in bodies], fontsize=8)
        ax.axvline(0, color="black", lw=1)
        ax.set_xlabel("NLL rise when blanked (nats)")
        ax.set_title(target, fontsize=9)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    fig.suptitle(f"Occlusion ranking (validation, weights of step {ranking.step}, "
                 f"{ranking.num_windows} windows): higher = the model uses the body more")
    return _save(fig, path)
