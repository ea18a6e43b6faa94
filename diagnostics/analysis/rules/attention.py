"""Rules on attention: the fusion gate's entropy and the celestial-to-target attention."""
from __future__ import annotations

import math

import numpy as np

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import RunData, finite_median
from diagnostics.analysis.rules.common import (
    after_training_started,
    evidence,
    fmt3,
    late_slice,
    nice,
    number,
    span,
)
from diagnostics.analysis.thresholds import Thresholds


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
                f"{spread:.2g}) over {span(steps)}: the fusion is not learning which temporal "
                "tokens matter" + (" (it is close to uniform)." if entropy.mean() > 0.95 else "."),
        evidence=evidence("fusion normalized entropy", steps, entropy,
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
    dropout = number(run, "model.dropout")
    change = {"model.dropout": nice(min(0.5, dropout + 0.1))} if dropout is not None else {}
    return [Finding(
        component="fusion_cross_attention", issue="fusion_attention_collapse", severity="warning",
        message=f"At step {last['step']} fusion attention has collapsed onto a few tokens "
                f"(normalised entropy {fmt3(overall)}; heads below {t.entropy_collapse:g}: "
                f"{sorted(heads) or 'none'}).",
        evidence=evidence("fusion normalized entropy", steps, entropy,
                           collapsed_heads=heads, threshold=t.entropy_collapse),
        suggestion="Regularise the fusion: raise model.dropout" +
                   (f" to {change['model.dropout']}" if change else "") +
                   ", or lower optim.lr if the collapse came suddenly.",
        config_change=change)]


def _late_records(records: list[dict], t: Thresholds) -> list[dict]:
    return records[late_slice(len(records), t)] if records else []


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
        evidence=evidence("c2t normalized entropy", [step] * len(uniform),
                           list(uniform.values()), targets=list(uniform),
                           threshold=t.c2t_uniform),
        suggestion="Train longer and check the gradient flow into celestial_to_target_attention; "
                   "compare with the occlusion record (attention/attribution_step_*.json): if "
                   "blanking a body hurts while attention stays uniform, the model gets its "
                   "signal elsewhere.")]


def c2t_attention_unfaithful(run: RunData, t: Thresholds) -> list[Finding]:
    """The C->T ranking of bodies unlike the occlusion ranking (median Spearman over the late
    attribution records: one record's occlusion is noisy)."""
    late = _late_records(after_training_started(run.attribution), t)
    if not late:
        return []
    spearman = {tg: finite_median([r["spearman"].get(tg) if r["spearman"].get(tg) is not None
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
                f"Spearman below {t.min_spearman:g}, {span([r['step'] for r in late])}): "
                "the attention weights are not a faithful account of what the model uses.",
        evidence=evidence("spearman(c2t, occlusion), median", [last["step"]] * len(low),
                           list(low.values()), targets=list(low), rankings=tops,
                           threshold=t.min_spearman),
        suggestion="Rank bodies by the occlusion record (attention/attribution_step_*.json), "
                   "not by the C->T map, for these targets.")]
