"""Plug-ins register themselves: a package that provides observers names its factory in the
`celestial.observers` entry-point group of its pyproject.toml (the diagnostics package does), and
a run built without an explicit factory gets the observers of every installed plug-in. So
`build_trainer(config, env)` plugs in the same observers from a notebook, a test and the command
line, and the trainer imports none of its plug-ins."""
from __future__ import annotations

from importlib.metadata import entry_points

from trainer.config import Config
from trainer.observer import Observer, ObserverFactory

ENTRY_POINT_GROUP = "celestial.observers"
DIAGNOSTICS = "diagnostics"     # the entry point's name of the `diagnostics:` config section


def installed_factories() -> dict[str, ObserverFactory]:
    """Every registered observer factory by its entry point's name, in name order."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name)
    return {point.name: point.load() for point in found}


def installed_observers(config: Config) -> list[Observer]:
    """An `ObserverFactory`: the observers every installed plug-in builds for this config."""
    factories = installed_factories()
    if diagnostics_on(config) and DIAGNOSTICS not in factories:
        raise RuntimeError(f"diagnostics are switched on but no plug-in named {DIAGNOSTICS!r} "
                           f"is registered in the entry-point group {ENTRY_POINT_GROUP!r}: "
                           "install the project (bash launch/setup_env.sh, or pip install -e .)")
    return [observer for factory in factories.values() for observer in factory(config)]


def diagnostics_on(config: Config) -> bool:
    d = config.diagnostics
    return d.enable_gradient_diagnostics or d.enable_attention_logging \
        or d.enable_component_profiling


def plug_in(observers: ObserverFactory | None, config: Config) -> list[Observer]:
    """The observers of this run: those `observers` builds for the config if a factory was
    passed (tests and tools choose theirs), else those of the installed plug-ins."""
    return (observers or installed_observers)(config)
