"""The rules: each a small pure function (RunData, Thresholds) -> list[Finding], one module per
topic (gradients, loss, attention, mixture, scale, resources, forecast).

A rule whose records are missing (a diagnostic turned off, a run too young) finds nothing;
`load.RunData.notes` already says what is missing. Suggestions quote the run's own config
values and propose changes with the project's dotted config keys.
"""
from __future__ import annotations

from diagnostics.analysis.findings import Finding, by_severity
from diagnostics.analysis.load import RunData
from diagnostics.analysis.rules import (
    attention,
    forecast,
    gradients,
    loss,
    mixture,
    resources,
    scale,
)
from diagnostics.analysis.thresholds import Thresholds

RULES = (gradients.vanishing_gradients, gradients.learning_rate_too_small,
         gradients.exploding_gradients, gradients.frequent_clipping,
         loss.loss_spikes, loss.nonfinite_steps,
         attention.fusion_entropy_flat, attention.fusion_entropy_collapse,
         attention.c2t_attention_uniform, attention.c2t_attention_unfaithful,
         mixture.mixture_collapse, mixture.sigma_collapse, mixture.miscalibration,
         scale.rank_disagreement, scale.batch_vs_noise_scale,
         resources.data_loading_bound, resources.memory_near_limit,
         *forecast.RULES)


def run_rules(run: RunData, t: Thresholds) -> list[Finding]:
    """Every rule's findings, most severe first."""
    return by_severity([finding for rule in RULES for finding in rule(run, t)])
