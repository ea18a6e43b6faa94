"""Builds the observers the diagnostics config turns on (none: the loop does no extra work)."""
from __future__ import annotations

from diagnostics.attention import AttentionObserver
from diagnostics.attribution import AttributionObserver
from diagnostics.config import DiagnosticsConfig
from diagnostics.gradients import GradientObserver
from diagnostics.observer import Observer
from diagnostics.profiling import ProfileObserver


def build_observers(config: DiagnosticsConfig, checkpoint_interval: int) -> list[Observer]:
    observers: list[Observer] = []
    if config.enable_gradient_diagnostics:
        observers.append(GradientObserver(config))
    if config.enable_attention_logging:
        observers.append(AttentionObserver(config))
        if config.attribution_at_validation:
            observers.append(AttributionObserver(config))
    if config.enable_component_profiling:
        observers.append(ProfileObserver(config, config.profile_interval or checkpoint_interval))
    return observers
