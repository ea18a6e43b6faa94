"""Observer plug-ins register themselves (trainer/plugins.py): a trainer built without a factory,
as in a notebook, gets the same observers as the command."""
from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from diagnostics.attention import AttentionObserver
from diagnostics.attribution import AttributionObserver
from diagnostics.gradients import GradientObserver
from diagnostics.plugin import build_observers
from diagnostics.profiling import ProfileObserver
from tests.conftest import small_config
from trainer import distributed, plugins
from trainer.build import build_parts

ALL_ON = {"diagnostics__enable_gradient_diagnostics": True,
          "diagnostics__enable_attention_logging": True,
          "diagnostics__attribution_at_validation": True,
          "diagnostics__enable_component_profiling": True}


def test_the_diagnostics_are_a_registered_plug_in():
    assert plugins.installed_factories()[plugins.DIAGNOSTICS] is build_observers


def test_a_trainer_built_without_a_factory_gets_the_diagnostics(short_csv, tmp_path):
    """What a notebook does: `build_parts(config, env)` with diagnostics switched on."""
    config = small_config(short_csv, tmp_path, **ALL_ON)
    parts = build_parts(config, distributed.init_distributed("cpu"))
    assert [type(o) for o in parts.observers.observers] == [
        GradientObserver, AttentionObserver, AttributionObserver, ProfileObserver]


def test_a_passed_factory_replaces_the_plug_ins(short_csv, tmp_path):
    config = small_config(short_csv, tmp_path, **ALL_ON)
    assert plugins.plug_in(lambda c: [], config) == []


def test_diagnostics_on_without_their_plug_in_is_a_wiring_error(short_csv, tmp_path,
                                                                monkeypatch):
    """An uninstalled project would otherwise drop the diagnostics the config asks for."""
    monkeypatch.setattr(plugins, "installed_factories", dict)
    config = small_config(short_csv, tmp_path, diagnostics__enable_gradient_diagnostics=True)
    with pytest.raises(RuntimeError, match="no plug-in named 'diagnostics' is registered"):
        plugins.plug_in(None, config)
    assert plugins.plug_in(None, small_config(short_csv, tmp_path)) == []


def test_the_training_command_is_the_trainers_cli():
    (script,) = entry_points(group="console_scripts", name="celestial-train")
    assert script.value == "trainer.cli:main"
