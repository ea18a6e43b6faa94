"""The rules: each a small pure function (RunData, Thresholds) -> list[Finding].

A rule whose records are missing (a diagnostic turned off, a run too young) finds nothing;
`load.RunData.notes` already says what is missing. Suggestions quote the run's own config
values and propose changes with the project's dotted config keys.
"""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.findings import Finding, by_severity
from diagnostics.analysis.forecast_rules import RULES as FORECAST_RULES
from diagnostics.analysis.load import GradientSeries, RunData, column
from diagnostics.analysis.thresholds import Thresholds
from diagnostics.analysis.verdict import overfitting

MAX_EVIDENCE_POINTS = 20


# --- small helpers ------------------------------------------------------------------------------

def _jsonable(value):
    """Plain JSON values: numpy scalars unwrapped, floats to 4 significant digits, nan -> null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    return value


def _evidence(metric: str, steps, values, **context) -> dict:
    """Evidence with at most MAX_EVIDENCE_POINTS points (the first and last halves)."""
    steps, values = list(steps), list(values)
    if len(steps) > MAX_EVIDENCE_POINTS:
        half = MAX_EVIDENCE_POINTS // 2
        context["num_points"] = len(steps)
        steps, values = steps[:half] + steps[-half:], values[:half] + values[-half:]
    return _jsonable({"metric": metric, "steps": steps, "values": values, **context})


def _median(values) -> float:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else math.nan


def _longest_run(mask: np.ndarray) -> np.ndarray:
    """Indices of the longest run of consecutive True entries (empty if none)."""
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate([*mask, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    return np.arange(best_start, best_start + best_len)


def _sustained(num_records: int, t: Thresholds) -> int:
    """Consecutive records that make a trend: sustained_records, fewer on a short run, >= 2."""
    return max(2, min(t.sustained_records, num_records))


def _late(num_records: int, t: Thresholds) -> slice:
    """The last late_fraction of the records (at least one)."""
    return slice(min(num_records - 1, int(num_records * (1 - t.late_fraction))), num_records)


def _nice(x: float) -> float:
    """A value to type into a config: two significant digits."""
    return float(f"{x:.2g}")


def _power_of_two(x: float) -> int:
    return int(2 ** round(math.log2(max(1.0, x))))


def _fmt3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _span(steps) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _number(run: RunData, dotted: str):
    return run.config_number(dotted)


def _lr(run: RunData) -> float | None:
    return _number(run, "optim.lr")


def _clipping_off(run: RunData) -> bool:
    return run.config_value("optim.grad_clip_norm") == 0


def _stabilize(run: RunData) -> tuple[str, dict]:
    """The usual cure for an unstable run: clipping on if it is off, else half the LR."""
    if _clipping_off(run):
        return ("Turn gradient clipping on (optim.grad_clip_norm is 0).",
                {"optim.grad_clip_norm": 1.0})
    lr = _lr(run)
    if lr is None:
        return "Lower the learning rate (optim.lr) or lengthen optim.warmup_steps.", {}
    action = (f"Halve the learning rate (optim.lr: {_nice(lr / 2)}), or lengthen the warmup "
              "(optim.warmup_steps).")
    return action, {"optim.lr": _nice(lr / 2)}


# --- gradients ------------------------------------------------------------------------------------

def _tiny_updates(g: GradientSeries, t: Thresholds) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, median update ratio) when, late in training, every component has a nonzero
    gradient yet the median component moves less than small_update_ratio per step."""
    late = _late(len(g.steps), t)
    live = [c for c in g.components if np.nanmax(g.norms[c], initial=0) > 0]
    if not live or len(g.steps[late]) < 2:
        return None
    if not all(np.all(g.norms[c][late] > 0) for c in live):
        return None
    ratios = np.vstack([g.update_ratios.get(c, np.full(len(g.steps), np.nan)) for c in live])
    medians = np.array([_median(ratios[:, i]) for i in range(len(g.steps))])[late]
    if not np.all(medians < t.small_update_ratio):
        return None
    return g.steps[late], medians


def _suggested_lr(run: RunData, g: GradientSeries, median_ratio: float,
                  t: Thresholds) -> float | None:
    lr = _lr(run) or _median(g.lr)
    if not lr or not math.isfinite(lr) or not median_ratio > 0:
        return None
    return _nice(lr * min(10.0, max(2.0, t.target_update_ratio / median_ratio)))   # 10x at most


def learning_rate_too_small(run: RunData, t: Thresholds) -> list[Finding]:
    g = run.gradients
    tiny = _tiny_updates(g, t) if g is not None else None
    if tiny is None:
        return []
    steps, medians = tiny
    new_lr = _suggested_lr(run, g, _median(medians), t)
    return [Finding(
        component="optimizer", issue="learning_rate_too_small", severity="warning",
        message=f"Every component has a nonzero gradient, yet the median update-to-weight ratio "
                f"is {_median(medians):.2g} per step ({_span(steps)}), far below the usual "
                f"{t.target_update_ratio:g}: the weights barely move.",
        evidence=_evidence("median update ratio over components", steps, medians,
                           threshold=t.small_update_ratio, lr=_lr(run)),
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
                f"records, {_span(steps)}. It is unused, frozen or cut off from the loss.",
        evidence=_evidence("gradient norm", steps, g.norms[comp][idx], threshold=t.vanishing,
                           max_update_ratio=max(ratios[np.isfinite(ratios)], default=None)),
        suggestion=f"Check that {comp} takes part in the forward pass and the loss (a detach, "
                   "a branch switched off in the config, requires_grad False). Raising the "
                   "learning rate will not help: there is no gradient to scale.")


def _vanishing_component(comp: str, g: GradientSeries, idx: np.ndarray, run: RunData,
                         t: Thresholds) -> Finding:
    steps = g.steps[idx]
    ratio = _median(g.update_ratios[comp][idx]) if comp in g.update_ratios else math.nan
    tiny = _tiny_updates(g, t)
    if tiny is not None:
        new_lr = _suggested_lr(run, g, _median(tiny[1]), t)
        cause = ("The whole model updates too slowly (see learning_rate_too_small): the LR is "
                 "too small.")
    else:
        lr = _lr(run)
        new_lr = _nice(lr * 2) if lr else None
        cause = (f"Its weights still move (median update ratio {ratio:.2g}), so Adam compensates; "
                 "the gradient reaching it is weak compared to the rest of the model.")
    change = {"optim.lr": new_lr} if new_lr else {}
    return Finding(
        component=comp, issue="vanishing_gradients", severity="warning",
        message=f"{comp}: gradient norm below {t.vanishing:g} for {len(idx)} consecutive records, "
                f"{_span(steps)}. {cause}",
        evidence=_evidence("gradient norm", steps, g.norms[comp][idx], threshold=t.vanishing,
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
        idx = _longest_run(norms < t.vanishing)
        if len(idx) < _sustained(len(norms), t):
            continue
        ratios = g.update_ratios.get(comp, np.full(len(norms), np.nan))[idx]
        known = ratios[np.isfinite(ratios)]
        dead = np.all(norms[idx] == 0) or (known.size > 0 and known.max() <= t.dead_update_ratio)
        findings.append(_dead_component(comp, g, idx, t) if dead
                        else _vanishing_component(comp, g, idx, run, t))
    return findings


def _exploding_finding(comp: str, steps, values, sustained: bool, run: RunData,
                       t: Thresholds) -> Finding:
    action, change = _stabilize(run)
    return Finding(
        component=comp, issue="exploding_gradients",
        severity="critical" if sustained else "warning",
        message=f"{comp}: gradient norm above {t.exploding:g} at {len(steps)} logged step(s), "
                f"up to {np.max(values):.3g}" + (" (sustained)." if sustained else "."),
        evidence=_evidence("gradient norm", steps, values, threshold=t.exploding),
        suggestion=action, config_change=change)


def exploding_gradients(run: RunData, t: Thresholds) -> list[Finding]:
    g = run.gradients
    if g is None:
        return []
    findings = []
    for comp, norms in g.norms.items():
        mask = norms > t.exploding
        if mask.any():
            sustained = len(_longest_run(mask)) >= _sustained(len(norms), t)
            findings.append(_exploding_finding(comp, g.steps[mask], norms[mask], sustained, run, t))
    total_mask = g.total_norm > t.exploding
    if not findings and total_mask.any():
        sustained = len(_longest_run(total_mask)) >= _sustained(len(g.steps), t)
        findings.append(_exploding_finding("model (total norm)", g.steps[total_mask],
                                           g.total_norm[total_mask], sustained, run, t))
    return findings


def frequent_clipping(run: RunData, t: Thresholds) -> list[Finding]:
    """Clipping acting on more than clip_fraction of the steps (metrics.jsonl, else records)."""
    clip = _number(run, "optim.grad_clip_norm")
    if _clipping_off(run):
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
    new_clip = _nice(max(p90, 1.5 * clip)) if math.isfinite(p90) and clip else None
    change = {"optim.grad_clip_norm": new_clip} if new_clip else {}
    return [Finding(
        component="optimizer", issue="frequent_clipping", severity="warning",
        message=f"Gradient clipping acted on {overall:.0%} of the steps (limit "
                f"{t.clip_fraction:.0%}) at optim.grad_clip_norm = {clip} (median gradient norm "
                f"{_median(norms):.3g}): it rescales many updates, like a smaller, noisier LR.",
        evidence=_evidence("clip_fraction", steps[high], fractions[high], overall=overall,
                           clip_norm=clip, median_grad_norm=_median(norms)),
        suggestion=(f"Raise the clip norm to about the 90th percentile of the norms "
                    f"(optim.grad_clip_norm: {new_clip}) so it only catches outliers; if the "
                    "norms keep growing, lower optim.lr instead.") if change else
                   "Raise optim.grad_clip_norm.",
        config_change=change)]


# --- loss --------------------------------------------------------------------------------------

def rolling_robust_z(values: np.ndarray, window: int, min_window: int) -> np.ndarray:
    """Each value's z-score against the median and MAD of the `window` values before it
    (nan where fewer than min_window finite values precede it)."""
    z = np.full(len(values), np.nan)
    for i in range(len(values)):
        past = values[max(0, i - window):i]
        past = past[np.isfinite(past)]
        if len(past) < min_window or not np.isfinite(values[i]):
            continue
        median = np.median(past)
        scale = max(1.4826 * np.median(np.abs(past - median)), 1e-3 * max(1.0, abs(median)))
        z[i] = (values[i] - median) / scale
    return z


def loss_spikes(run: RunData, t: Thresholds) -> list[Finding]:
    if not run.train:
        return []
    steps, loss = column(run.train, "loss")
    z = rolling_robust_z(loss, t.spike_window, t.spike_min_window)
    spikes = np.flatnonzero(z > t.spike_z)
    if not spikes.size:
        return []
    action, change = _stabilize(run)
    return [Finding(
        component="optimizer", issue="loss_spikes",
        severity="critical" if len(spikes) >= 3 else "warning",
        message=f"Training loss spiked {len(spikes)} time(s) (robust z-score above {t.spike_z:g} "
                f"against the previous {t.spike_window} log intervals), first at step "
                f"{steps[spikes[0]]}.",
        evidence=_evidence("train loss", steps[spikes], loss[spikes], z_score=z[spikes]),
        suggestion=action, config_change=change)]


def _skipped(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(steps, skipped count) of the log intervals with skipped steps; from the gradient
    records (one step each) when metrics.jsonl has no training lines."""
    if run.train:
        steps, counts = column(run.train, "skipped_steps")
        return steps[counts > 0], counts[counts > 0]
    g = run.gradients
    if g is None:
        return np.array([], dtype=int), np.array([])
    return g.steps[g.skipped], np.ones(int(g.skipped.sum()))


def nonfinite_steps(run: RunData, t: Thresholds) -> list[Finding]:
    """Optimizer steps skipped for a non-finite loss or gradient."""
    steps, counts = _skipped(run)
    if not len(steps):
        return []
    total = int(counts.sum())
    last_step = run.train[-1]["step"] if run.train else int(run.gradients.steps[-1])
    if run.config_value("train.precision") == "fp16":
        action = "Train in bf16 (train.precision: bf16): fp16 overflows where bf16 does not."
        change = {"train.precision": "bf16"}
    else:
        action, change = _stabilize(run)
    return [Finding(
        component="optimizer", issue="nonfinite_steps",
        severity="critical" if total > 0.01 * max(1, last_step) else "warning",
        message=f"{total} optimizer step(s) were skipped for a non-finite loss or gradient, "
                f"first in the interval ending at step {steps[0]}.",
        evidence=_evidence("skipped steps per log interval", steps, counts),
        suggestion=action, config_change=change)]


# --- attention -----------------------------------------------------------------------------------

def _fusion_entropy(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in run.attention], dtype=int)
    values = np.array([np.nan if r["fusion"]["normalized_entropy"] is None
                       else r["fusion"]["normalized_entropy"] for r in run.attention], dtype=float)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def fusion_entropy_flat(run: RunData, t: Thresholds) -> list[Finding]:
    steps, entropy = _fusion_entropy(run)
    if len(entropy) < t.entropy_min_records:
        return []
    spread = float(entropy.max() - entropy.min())
    if spread >= t.entropy_flat_range:
        return []
    return [Finding(
        component="fusion_cross_attention", issue="fusion_attention_flat", severity="warning",
        message=f"Fusion attention entropy stayed at {entropy.mean():.3f} (normalised, range "
                f"{spread:.2g}) over {_span(steps)}: the fusion is not learning which temporal "
                "tokens matter" + (" (it is close to uniform)." if entropy.mean() > 0.95 else "."),
        evidence=_evidence("fusion normalized entropy", steps, entropy,
                           flat_range=t.entropy_flat_range),
        suggestion="Check the gradient flow into fusion_cross_attention (gradient_flow.png); if "
                   "it is healthy, train longer before judging the fusion.")]


def fusion_entropy_collapse(run: RunData, t: Thresholds) -> list[Finding]:
    if not run.attention:
        return []
    last = run.attention[-1]
    overall = last["fusion"]["normalized_entropy"]
    heads = {i: h for i, h in enumerate(last["fusion"]["head_normalized_entropy"])
             if h is not None and h < t.entropy_collapse}
    if not heads and not (overall is not None and overall < t.entropy_collapse):
        return []
    steps, entropy = _fusion_entropy(run)
    dropout = _number(run, "model.dropout")
    change = {"model.dropout": _nice(min(0.5, dropout + 0.1))} if dropout is not None else {}
    return [Finding(
        component="fusion_cross_attention", issue="fusion_attention_collapse", severity="warning",
        message=f"At step {last['step']} fusion attention has collapsed onto a few tokens "
                f"(normalised entropy {_fmt3(overall)}; heads below {t.entropy_collapse:g}: "
                f"{sorted(heads) or 'none'}).",
        evidence=_evidence("fusion normalized entropy", steps, entropy,
                           collapsed_heads=heads, threshold=t.entropy_collapse),
        suggestion="Regularise the fusion: raise model.dropout" +
                   (f" to {change['model.dropout']}" if change else "") +
                   ", or lower optim.lr if the collapse came suddenly.",
        config_change=change)]


def _late_records(records: list[dict], t: Thresholds) -> list[dict]:
    return records[_late(len(records), t)] if records else []


def c2t_attention_uniform(run: RunData, t: Thresholds) -> list[Finding]:
    """C->T attention spread evenly over the bodies in every late attention record."""
    if len(run.attention) < 2:
        return []
    late = _late_records(run.attention, t)
    uniform = {}
    for target, entropy in late[-1]["c2t"]["normalized_entropy"].items():
        series = [r["c2t"]["normalized_entropy"].get(target) for r in late]
        if all(e is not None and e >= t.c2t_uniform for e in series):
            uniform[target] = entropy
    if not uniform:
        return []
    step = late[-1]["step"]
    return [Finding(
        component="celestial_to_target_attention", issue="c2t_attention_uniform",
        severity="warning",
        message=f"Up to step {step} the C->T attention of {', '.join(uniform)} is spread almost "
                f"evenly over the {len(late[-1]['c2t']['bodies'])} bodies (normalised entropy "
                f">= {t.c2t_uniform:g} since step {late[0]['step']}): it does not single out the "
                "bodies that drive them.",
        evidence=_evidence("c2t normalized entropy", [step] * len(uniform),
                           list(uniform.values()), targets=list(uniform),
                           threshold=t.c2t_uniform),
        suggestion="Train longer and check the gradient flow into celestial_to_target_attention; "
                   "compare with the occlusion record (attention/attribution_step_*.json): if "
                   "blanking a body hurts while attention stays uniform, the model gets its "
                   "signal elsewhere.")]


def c2t_attention_unfaithful(run: RunData, t: Thresholds) -> list[Finding]:
    """The C->T ranking of bodies unlike the occlusion ranking (median Spearman over the late
    attribution records: one record's occlusion is noisy)."""
    late = _late_records(_after_training_started(run.attribution), t)
    if not late:
        return []
    spearman = {tg: _median([r["spearman"].get(tg) if r["spearman"].get(tg) is not None
                             else math.nan for r in late]) for tg in late[-1]["spearman"]}
    low = {tg: r for tg, r in spearman.items() if r < t.min_spearman}
    if not low:
        return []
    last = late[-1]
    tops = {tg: {"c2t_top3": last["c2t_ranking"].get(tg, [])[:3],
                 "occlusion_top3": last["ranking"].get(tg, [])[:3]} for tg in low}
    return [Finding(
        component="celestial_to_target_attention", issue="c2t_attention_unfaithful",
        severity="warning",
        message=f"The C->T map ranks bodies unlike occlusion for {', '.join(low)} (median "
                f"Spearman below {t.min_spearman:g}, {_span([r['step'] for r in late])}): "
                "the attention weights are not a faithful account of what the model uses.",
        evidence=_evidence("spearman(c2t, occlusion), median", [last["step"]] * len(low),
                           list(low.values()), targets=list(low), rankings=tops,
                           threshold=t.min_spearman),
        suggestion="Rank bodies by the occlusion record (attention/attribution_step_*.json), "
                   "not by the C->T map, for these targets.")]


# --- the mixture decoder and calibration (validation) ------------------------------------------

def _after_training_started(records: list[dict]) -> list[dict]:
    """Records of a trained model: a validation at step 0 judges the initialisation."""
    return [r for r in records if r["step"] > 0]


def _latest(run: RunData, key: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(steps, values, latest finite value) of a validation metric after step 0."""
    steps, values = column(_after_training_started(run.val), key)
    finite = values[np.isfinite(values)]
    return steps, values, float(finite[-1]) if finite.size else math.nan


def mixture_collapse(run: RunData, t: Thresholds) -> list[Finding]:
    num_mixtures = _number(run, "model.num_mixtures")
    if not run.val or num_mixtures == 1:
        return []
    steps, values, latest = _latest(run, "effective_components")
    if not latest < t.effective_components:
        return []
    low = values < t.effective_components
    change = {"model.num_mixtures": 2} if num_mixtures and num_mixtures > 2 else {}
    return [Finding(
        component="decoder", issue="mixture_collapse", severity="warning",
        message=f"The mixture decoder uses {latest:.2f} effective components of "
                f"{num_mixtures or '?'} (below {t.effective_components:g}) on validation: it has "
                "collapsed to about one Gaussian.",
        evidence=_evidence("effective_components", steps[low], values[low],
                           threshold=t.effective_components),
        suggestion="The extra components add nothing: use fewer (model.num_mixtures: 2), or if "
                   "the errors are heavy-tailed lower optim.lr so components are not abandoned "
                   "early.", config_change=change)]


def sigma_collapse(run: RunData, t: Thresholds) -> list[Finding]:
    if not run.val:
        return []
    steps, values, latest = _latest(run, "sigma_at_floor")
    if not latest > t.sigma_at_floor:
        return []
    sigma_min = _number(run, "model.sigma_min")
    change = {"model.sigma_min": _nice(sigma_min * 10)} if sigma_min else {}
    high = values > t.sigma_at_floor
    return [Finding(
        component="decoder", issue="sigma_collapse", severity="warning",
        message=f"{latest:.0%} of the mixture weight sits on scales at the floor model.sigma_min "
                f"({sigma_min}) on validation: the decoder is collapsing its sigmas "
                "(overconfident).",
        evidence=_evidence("sigma_at_floor", steps[high], values[high], threshold=t.sigma_at_floor),
        suggestion="Raise the floor of the mixture scales" +
                   (f": model.sigma_min: {change['model.sigma_min']}" if change else
                    " (model.sigma_min)") + "; more model.dropout also helps.",
        config_change=change)]


def miscalibration(run: RunData, t: Thresholds) -> list[Finding]:
    """90% intervals covering outside [coverage_90_low, coverage_90_high] on validation."""
    if not run.val:
        return []
    steps, values, latest = _latest(run, "coverage_90")
    if not math.isfinite(latest) or t.coverage_90_low <= latest <= t.coverage_90_high:
        return []
    over = latest < t.coverage_90_low
    dropout = _number(run, "model.dropout")
    overfits = overfitting(run, t) is not None
    if overfits and not over:
        change = {}     # the overfitting finding's remedy comes first
    elif dropout is not None:
        new = min(0.5, dropout + 0.1) if over else max(0.0, dropout - 0.1)
        change = {"model.dropout": _nice(new)}
    else:
        change = {}
    per_target = run.val[-1].get("coverage_90_per_target")
    return [Finding(
        component="decoder", issue="miscalibration", severity="warning",
        message=f"90% prediction intervals cover {latest:.1%} of validation outcomes (wanted "
                f"{t.coverage_90_low:.0%}-{t.coverage_90_high:.0%}): the model is "
                + ("overconfident (intervals too narrow)." if over else
                   "underconfident (intervals too wide)."),
        evidence=_evidence("coverage_90", steps, values, latest_per_target=per_target,
                           wanted=[t.coverage_90_low, t.coverage_90_high]),
        suggestion=_calibration_advice(over, overfits),
        config_change=change)]


def _calibration_advice(overconfident: bool, overfits: bool) -> str:
    if overconfident:
        return ("Usually overfitting: raise model.dropout, stop earlier "
                "(train.early_stopping_patience), or raise model.sigma_min if sigma_at_floor "
                "is high.")
    if overfits:
        return ("This run also overfits (see overfitting): remedy that first, and do not train "
                "longer; recheck the coverage of the best-validation model afterwards.")
    return "Train longer (train.epochs) or regularise less (lower model.dropout)."


# --- ranks ---------------------------------------------------------------------------------------

def _late_medians(series: dict[str, np.ndarray], num_records: int,
                  t: Thresholds) -> dict[str, float]:
    late = _late(num_records, t)
    medians = {c: _median(v[late]) for c, v in series.items()}
    return {c: m for c, m in medians.items() if math.isfinite(m)}


def _noise_scale(g: GradientSeries, t: Thresholds) -> float:
    """The late median noise scale, median over components (positive estimates only)."""
    medians = _late_medians({c: np.where(v > 0, v, np.nan) for c, v in g.noise_scale.items()},
                            len(g.steps), t)
    return _median(list(medians.values()))


def _global_batch(run: RunData) -> int | None:
    g = run.gradients
    if g is not None and g.global_batch:
        return g.global_batch
    batch, accum = _number(run, "data.batch_size"), _number(run, "train.grad_accum_steps") or 1
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
    batch = _number(run, "data.batch_size")
    noisy = math.isfinite(expected) and expected < 2 * t.min_agreement
    late = _late(len(g.steps), t)
    change = {"data.batch_size": batch * 2} if noisy and batch else {}
    return [Finding(
        component=", ".join(low), issue="rank_disagreement", severity="warning",
        message=f"Ranks' local gradients barely agree on {len(low)} component(s) (mean pairwise "
                f"cosine below {t.min_agreement:g}, late median "
                f"{min(low.values()):.3g}..{max(low.values()):.3g}).",
        evidence=_evidence("agreement (median over the low components)", g.steps[late],
                           [_median([g.agreement[c][i] for c in low])
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
    per_rank = batch // max(1, (g.world_size or 1) * (_number(run, "train.grad_accum_steps") or 1))
    new = _power_of_two(min(8 * per_rank, max(per_rank / 8, per_rank * noise / batch)))
    small = ratio < 1
    late = _late(len(g.steps), t)
    return [Finding(
        component="data", issue="batch_below_noise_scale" if small else "batch_above_noise_scale",
        severity="info" if small else "warning",
        message=f"The global batch ({batch}) is {1 / ratio if small else ratio:.0f}x "
                f"{'smaller' if small else 'larger'} than the gradient noise scale (~{noise:.0f}): "
                + ("steps are dominated by gradient noise; a larger batch would need fewer steps "
                   "for the same loss." if small else
                   "samples beyond the noise scale barely improve each step: compute is wasted."),
        evidence=_evidence("noise scale (late median over components)", g.steps[late],
                           [_median([v[i] for v in g.noise_scale.values()])
                            for i in range(len(g.steps))][late], global_batch=batch),
        suggestion=f"Set the per-rank batch near the noise scale: data.batch_size: {new}"
                   + (" (and scale optim.lr with it)." if small else "."),
        config_change={"data.batch_size": new})]


# --- throughput and memory --------------------------------------------------------------------

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
    late = _late(len(steps), t)
    fraction = _median(fractions[late])
    if not fraction > t.data_time_fraction:
        return []
    new = max(2, 2 * (_number(run, "data.num_workers") or 0))
    return [Finding(
        component="data", issue="data_loading_bound", severity="warning",
        message=f"Waiting for data takes {fraction:.0%} of the step time late in training "
                f"(limit {t.data_time_fraction:.0%}): the input pipeline limits throughput.",
        evidence=_evidence("data_time_s / step_time_s", steps[late], fractions[late],
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
    batch = _number(run, "data.batch_size")
    change = {"data.batch_size": max(1, batch // 2)} if batch else {}
    worst = max(near, key=lambda n: n[1] / n[2])
    return [Finding(
        component="memory", issue="memory_near_limit", severity="warning",
        message=f"At step {last['step']} {worst[0]} uses {worst[1]:.0f} of {worst[2]:.0f} MiB "
                f"({worst[1] / worst[2]:.0%}, limit {t.memory_fraction:.0%}): close to running "
                "out of memory.",
        evidence=_evidence("memory used / total (MiB)", [last["step"]] * len(near),
                           [n[1] for n in near], who=[n[0] for n in near],
                           total_mb=[n[2] for n in near]),
        suggestion="Reduce the batch" + (f": data.batch_size: {change['data.batch_size']}"
                                         if change else " (data.batch_size)") +
                   " (keep the global batch with train.grad_accum_steps if it matters).",
        config_change=change)]


RULES = (vanishing_gradients, learning_rate_too_small, exploding_gradients, frequent_clipping,
         loss_spikes, nonfinite_steps, fusion_entropy_flat, fusion_entropy_collapse,
         c2t_attention_uniform, c2t_attention_unfaithful, mixture_collapse, sigma_collapse,
         miscalibration, rank_disagreement, batch_vs_noise_scale, data_loading_bound,
         memory_near_limit, *FORECAST_RULES)


def run_rules(run: RunData, t: Thresholds) -> list[Finding]:
    """Every rule's findings, most severe first."""
    return by_severity([finding for rule in RULES for finding in rule(run, t)])
