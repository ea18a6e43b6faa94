"""Rules on gradient norms and update sizes: vanishing, exploding, clipped, a learning rate too
small."""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import GradientSeries, RunData, column, finite_median
from diagnostics.analysis.rules.common import (
    clipping_off,
    evidence,
    late_slice,
    learning_rate,
    longest_run,
    nice,
    number,
    span,
    stabilize,
    sustained_records,
)
from diagnostics.analysis.thresholds import Thresholds


def _tiny_updates(g: GradientSeries, t: Thresholds) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, median update ratio) when, late in training, every component has a nonzero
    gradient yet the median component moves less than small_update_ratio per step."""
    late = late_slice(len(g.steps), t)
    live = [c for c in g.components if np.nanmax(g.norms[c], initial=0) > 0]
    if not live or len(g.steps[late]) < 2:
        return None
    if not all(np.all(g.norms[c][late] > 0) for c in live):
        return None
    ratios = np.vstack([g.update_ratios.get(c, np.full(len(g.steps), np.nan)) for c in live])
    medians = np.array([finite_median(ratios[:, i]) for i in range(len(g.steps))])[late]
    if not np.all(medians < t.small_update_ratio):
        return None
    return g.steps[late], medians


def _suggested_lr(run: RunData, g: GradientSeries, median_ratio: float,
                  t: Thresholds) -> float | None:
    lr = learning_rate(run) or finite_median(g.lr)
    if not lr or not math.isfinite(lr) or not median_ratio > 0:
        return None
    return nice(lr * min(10.0, max(2.0, t.target_update_ratio / median_ratio)))   # 10x at most


def learning_rate_too_small(run: RunData, t: Thresholds) -> list[Finding]:
    g = run.gradients
    tiny = _tiny_updates(g, t) if g is not None else None
    if tiny is None:
        return []
    steps, medians = tiny
    new_lr = _suggested_lr(run, g, finite_median(medians), t)
    return [Finding(
        component="optimizer", issue="learning_rate_too_small", severity="warning",
        message=f"Every component has a nonzero gradient, yet the median update-to-weight ratio "
                f"is {finite_median(medians):.2g} per step ({span(steps)}), far below the usual "
                f"{t.target_update_ratio:g}: the weights barely move.",
        evidence=evidence("median update ratio over components", steps, medians,
                           threshold=t.small_update_ratio, lr=learning_rate(run)),
        suggestion=f"Raise the learning rate: optim.lr: {new_lr}." if new_lr else
                   "Raise the learning rate (optim.lr).",
        config_change={"optim.lr": new_lr} if new_lr else {})]


def _dead_component(comp: str, g: GradientSeries, idx: np.ndarray, t: Thresholds) -> Finding:
    steps = g.steps[idx]
    ratios = g.update_ratios.get(comp, np.full(len(g.steps), np.nan))[idx]
    return Finding(
        component=comp, issue="dead_component", severity="critical",
        message=f"{comp} gets no gradient: norm {np.nanmax(g.norms[comp][idx]):.3g} and its "
                f"weights do not move (update ratio <= {t.dead_update_ratio:g}) for {len(idx)} "
                f"records, {span(steps)}. It is unused, frozen or cut off from the loss.",
        evidence=evidence("gradient norm", steps, g.norms[comp][idx], threshold=t.vanishing,
                           max_update_ratio=max(ratios[np.isfinite(ratios)], default=None)),
        suggestion=f"Check that {comp} takes part in the forward pass and the loss (a detach, "
                   "a branch switched off in the config, requires_grad False). Raising the "
                   "learning rate will not help: there is no gradient to scale.")


def _vanishing_component(comp: str, g: GradientSeries, idx: np.ndarray, run: RunData,
                         t: Thresholds) -> Finding:
    steps = g.steps[idx]
    ratio = finite_median(g.update_ratios[comp][idx]) if comp in g.update_ratios else math.nan
    tiny = _tiny_updates(g, t)
    if tiny is not None:
        new_lr = _suggested_lr(run, g, finite_median(tiny[1]), t)
        cause = ("The whole model updates too slowly (see learning_rate_too_small): the LR is "
                 "too small.")
    else:
        lr = learning_rate(run)
        new_lr = nice(lr * 2) if lr else None
        cause = (f"Its weights still move (median update ratio {ratio:.2g}), so Adam compensates; "
                 "the gradient reaching it is weak compared to the rest of the model.")
    change = {"optim.lr": new_lr} if new_lr else {}
    return Finding(
        component=comp, issue="vanishing_gradients", severity="warning",
        message=f"{comp}: gradient norm below {t.vanishing:g} for {len(idx)} consecutive records, "
                f"{span(steps)}. {cause}",
        evidence=evidence("gradient norm", steps, g.norms[comp][idx], threshold=t.vanishing,
                           median_update_ratio=ratio),
        suggestion=(f"Raise the learning rate: optim.lr: {new_lr}" if new_lr else
                    "Raise the learning rate (optim.lr)") +
                   f"; and check the scale of {comp}'s inputs and initialisation.",
        config_change=change)


def vanishing_gradients(run: RunData, t: Thresholds) -> list[Finding]:
    """Sustained norms below `vanishing`: a dead component (no gradient at all, weights still)
    told apart from a weak one and from a learning rate that is too small."""
    g = run.gradients
    if g is None:
        return []
    findings = []
    for comp, norms in g.norms.items():
        idx = longest_run(norms < t.vanishing)
        if len(idx) < sustained_records(len(norms), t):
            continue
        ratios = g.update_ratios.get(comp, np.full(len(norms), np.nan))[idx]
        known = ratios[np.isfinite(ratios)]
        dead = np.all(norms[idx] == 0) or (known.size > 0 and known.max() <= t.dead_update_ratio)
        findings.append(_dead_component(comp, g, idx, t) if dead
                        else _vanishing_component(comp, g, idx, run, t))
    return findings


def _exploding_finding(comp: str, steps, values, sustained: bool, run: RunData,
                       t: Thresholds) -> Finding:
    action, change = stabilize(run)
    return Finding(
        component=comp, issue="exploding_gradients",
        severity="critical" if sustained else "warning",
        message=f"{comp}: gradient norm above {t.exploding:g} at {len(steps)} logged step(s), "
                f"up to {np.max(values):.3g}" + (" (sustained)." if sustained else "."),
        evidence=evidence("gradient norm", steps, values, threshold=t.exploding),
        suggestion=action, config_change=change)


def exploding_gradients(run: RunData, t: Thresholds) -> list[Finding]:
    g = run.gradients
    if g is None:
        return []
    findings = []
    for comp, norms in g.norms.items():
        mask = norms > t.exploding
        if mask.any():
            sustained = len(longest_run(mask)) >= sustained_records(len(norms), t)
            findings.append(_exploding_finding(comp, g.steps[mask], norms[mask], sustained, run, t))
    total_mask = g.total_norm > t.exploding
    if not findings and total_mask.any():
        sustained = len(longest_run(total_mask)) >= sustained_records(len(g.steps), t)
        findings.append(_exploding_finding("model (total norm)", g.steps[total_mask],
                                           g.total_norm[total_mask], sustained, run, t))
    return findings


def frequent_clipping(run: RunData, t: Thresholds) -> list[Finding]:
    """Clipping acting on more than clip_fraction of the steps (metrics.jsonl, else records)."""
    clip = number(run, "optim.grad_clip_norm")
    if clipping_off(run):
        return []
    if run.train:
        steps, fractions = column(run.train, "clip_fraction")
        _, norms = column(run.train, "grad_norm")
    elif run.gradients is not None:
        g = run.gradients
        steps, fractions, norms = g.steps, g.clipped.astype(float), g.total_norm
    else:
        return []
    overall = float(np.nanmean(fractions)) if np.isfinite(fractions).any() else math.nan
    if not overall > t.clip_fraction:
        return []
    p90 = float(np.nanpercentile(norms, 90)) if np.isfinite(norms).any() else math.nan
    high = fractions > t.clip_fraction
    new_clip = nice(max(p90, 1.5 * clip)) if math.isfinite(p90) and clip else None
    change = {"optim.grad_clip_norm": new_clip} if new_clip else {}
    return [Finding(
        component="optimizer", issue="frequent_clipping", severity="warning",
        message=f"Gradient clipping acted on {overall:.0%} of the steps (limit "
                f"{t.clip_fraction:.0%}) at optim.grad_clip_norm = {clip} (median gradient norm "
                f"{finite_median(norms):.3g}): it rescales many updates, like a smaller, "
                "noisier LR.",
        evidence=evidence("clip_fraction", steps[high], fractions[high], overall=overall,
                           clip_norm=clip, median_grad_norm=finite_median(norms)),
        suggestion=(f"Raise the clip norm to about the 90th percentile of the norms "
                    f"(optim.grad_clip_norm: {new_clip}) so it only catches outliers; if the "
                    "norms keep growing, lower optim.lr instead.") if change else
                   "Raise optim.grad_clip_norm.",
        config_change=change)]
