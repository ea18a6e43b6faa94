"""Rules about the forecasts themselves: skill over the naive baselines, overfitting (or early
stopping that worked), and whether the model relies on the celestial inputs at all. Each is
(RunData, Thresholds) -> list[Finding]."""
from __future__ import annotations

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.kept import KeptLine, trained_val
from diagnostics.analysis.load import RunData
from diagnostics.analysis.overfitting import Overfitting, overfitting
from diagnostics.analysis.thresholds import Thresholds
from diagnostics.analysis.verdict import ABLATION_POINTER, inputs_effect, scored_line, skills


def _skill_evidence(run: RunData, kept: KeptLine) -> dict:
    val = [v for v in trained_val(run) if v.get("skill") is not None]
    line = kept.line
    return {"metric": "skill (model NLL - best baseline NLL, nats)",
            "steps": [v["step"] for v in val], "values": [round(v["skill"], 4) for v in val],
            "source": kept.split, "weights_step": kept.weights_step,
            "per_baseline": {s.baseline: {
                "model_nll": round(s.model_nll, 4), "baseline_nll": round(s.baseline_nll, 4),
                "skill": round(s.skill, 4), "interval_95": [round(s.low, 4), round(s.high, 4)]}
                for s in skills(line)},
            "block_length_windows": line.get("skill_block_length")}


def no_skill_over_baseline(run: RunData, t: Thresholds) -> list[Finding]:
    """The skill interval against the best baseline does not lie below zero."""
    scored = scored_line(run)
    if scored is None:
        return []
    best = skills(scored.line)[0]
    if best.outcome == "beats":
        return []
    sentence = best.sentence(scored.label)
    return [Finding(
        component="model", issue="no_skill_over_baseline", severity="error",
        message=f"{sentence[0].upper()}{sentence[1:]}: its forecasts are not shown to be better "
                "than a naive one.",
        evidence=_skill_evidence(run, scored),
        suggestion="Do not use these forecasts as they are. Check first whether the run overfits "
                   "(see overfitting) and whether the inputs carry information "
                   "(celestial_inputs_unused); then regularise (model.dropout, "
                   "model.body_dropout, optim.weight_decay), use a smaller model (model.d_model) "
                   "or more data. Training longer does not fix this.",
        config_change={})]


def _over_evidence(over: Overfitting) -> dict:
    return {"metric": "validation nll", "steps": over.val_steps,
            "values": [round(v, 4) for v in over.val_nll], "best_step": over.best_step,
            "kept_weights_step": over.kept_step,
            "train_loss_from_best": [round(over.train_loss[0], 4), round(over.train_loss[-1], 4)]}


def _early_stopping_worked(over: Overfitting) -> Finding:
    return Finding(
        component="model", issue="early_stopping_worked", severity="info",
        message=f"Early stopping worked: the run kept the weights of step {over.best_step}, its "
                f"best validation, and the test scored them; {over.sentence()}.",
        evidence=_over_evidence(over),
        suggestion="Nothing to fix: the rise after the best validation is what early stopping "
                   "watches for. A smaller train.early_stopping_patience only saves time.",
        config_change={})


def overfitting_rule(run: RunData, t: Thresholds) -> list[Finding]:
    """Validation NLL rising after its best while the training loss falls: a warning where it
    matters, else the info that early stopping worked."""
    over = overfitting(run, t)
    if over is None:
        return []
    if over.early_stopping_worked:
        return [_early_stopping_worked(over)]
    change = {}
    dropout = run.config_number("model.dropout")
    decay = run.config_number("optim.weight_decay")
    if dropout is not None:
        change["model.dropout"] = round(min(0.5, dropout + 0.1), 2)
    if decay is not None:
        change["optim.weight_decay"] = float(f"{max(decay * 2, 0.01):.2g}")
    patience = run.config_number("train.early_stopping_patience")
    if not patience or patience > t.overfit_validations:
        change["train.early_stopping_patience"] = t.overfit_validations
    d_model = run.config_number("model.d_model")
    return [Finding(
        component="model", issue="overfitting", severity="warning",
        message=f"The model overfits: {over.sentence()}; {'; '.join(over.reasons)}.",
        evidence=_over_evidence(over),
        suggestion="Regularise more (raise model.dropout, model.body_dropout or "
                   "optim.weight_decay), stop earlier (train.early_stopping_patience; the kept "
                   "model is the best validation one), or use a smaller model"
                   + (f" (model.d_model: {int(d_model) // 2})" if d_model else "")
                   + ". Do not train longer.",
        config_change=change)]


def celestial_inputs_unused(run: RunData, t: Thresholds) -> list[Finding]:
    """Blanking every body does not raise the NLL beyond its interval: the model does not rely
    on the celestial inputs (reliance, not benefit: that needs a retrained ablation)."""
    effect = inputs_effect(run)
    if effect is None or effect.used:
        return []
    return [Finding(
        component="celestial_to_target_attention", issue="celestial_inputs_unused",
        severity="warning",
        message=f"Blanking every celestial body at once changes the NLL by {effect.rise:+.4f} "
                f"nats [{effect.low:+.4f}, {effect.high:+.4f}] ({effect.source}): the model is "
                "not shown to rely on the celestial inputs.",
        evidence={"metric": "nll rise with all bodies blanked", "steps": [effect.step], "values": [
            round(effect.rise, 4)], "interval_95": [round(effect.low, 4), round(effect.high, 4)],
            "source": effect.source},
        suggestion="Read the C->T attention map and the per-body rankings of this run as "
                   "describing the network, not the data: no body measurably informs the "
                   "forecast. Whatever skill the model has comes from the target history; "
                   f"{ABLATION_POINTER}.",
        config_change={})]


RULES = (no_skill_over_baseline, overfitting_rule, celestial_inputs_unused)
