"""The diagnostics plug-in: the observers the `diagnostics:` config section turns on (none: the
loop does no extra work). `build_observers` is registered in the `celestial.observers`
entry-point group (pyproject.toml), so every run of an installed project gets them
(trainer/plugins.py)."""
from __future__ import annotations

from diagnostics.attention import AttentionObserver
from diagnostics.attribution import AttributionObserver
from diagnostics.gradients import GradientObserver
from diagnostics.profiling import ProfileObserver
from trainer.config import Config
from trainer.observer import Observer


def build_observers(config: Config) -> list[Observer]:
    """An `ObserverFactory` (trainer.observer): the run's config -> its observers."""
    d = config.diagnostics
    observers: list[Observer] = []
    if d.enable_gradient_diagnostics:
        observers.append(GradientObserver(d))
    if d.enable_attention_logging:
        observers.append(AttentionObserver(d))
        if d.attribution_at_validation:
            observers.append(AttributionObserver(d))
    if d.enable_component_profiling:
        observers.append(ProfileObserver(d, d.profile_interval or config.checkpoint.interval))
    return observers

