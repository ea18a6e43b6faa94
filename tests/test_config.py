"""The config tree: YAML, overrides, the card's flags, and errors that name the key."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO
from trainer.cli import overrides_from, parse_args
from trainer.config import Config, load_config, parse_override
from trainer.errors import UserError


@pytest.mark.parametrize("name", ["quickstart_cpu", "celestial_diagnostic_minimal",
                                  "celestial_enhanced_pgat_production"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(config, Config)


def test_production_config_has_the_design_dimensions():
    m = load_config(REPO / "configs/celestial_enhanced_pgat_production.yaml").model
    assert (m.seq_len, m.pred_len, m.d_model, m.num_heads, m.fusion_heads, m.num_mixtures) == \
        (96, 24, 416, 8, 4, 5)


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.01}, "train": {"epochs": 2}}))
    config = load_config(path, [parse_override("optim.lr=3e-4"), ("train.epochs", 5)])
    assert config.optim.lr == pytest.approx(3e-4) and config.train.epochs == 5
    assert config.model.d_model == 416      # untouched defaults stay


def test_card_flags_map_to_keys():
    args = parse_args(["--config", "x.yaml", "--experiment_name", "e1", "--log_interval", "10",
                       "--checkpoint_interval", "500", "--max_steps", "7", "--epochs", "3",
                       "--enable_gradient_diagnostics", "--enable_attention_logging",
                       "--enable_component_profiling", "--gradient_log_interval", "50",
                       "--attention_log_interval", "100",
                       "--set", "optim.lr=3e-4", "data.batch_size=8"])
    config = load_config(None, overrides_from(args))
    assert config.train.experiment_name == "e1" and config.train.log_interval == 10
    assert config.checkpoint.interval == 500 and config.train.max_steps == 7
    assert config.train.epochs == 3 and config.optim.lr == pytest.approx(3e-4)
    d = config.diagnostics
    assert d.enable_gradient_diagnostics and d.enable_attention_logging
    assert d.enable_component_profiling
    assert (d.gradient_log_interval, d.attention_log_interval) == (50, 100)
    assert config.data.batch_size == 8


@pytest.mark.parametrize("override, message", [
    ("model.d_modell=3", "unknown config key model.d_modell"),
    ("optimizer.lr=1", "unknown config key optimizer"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("train.progress_bar=yes please", "train.progress_bar: expected true or false"),
    ("model.d_model=100", "model.d_model (100) must be divisible by model.num_heads"),
    ("model.seq_len=8", "model.seq_len (8) is shorter than the largest patch"),
    ("model.dropout=1.5", "model.dropout must lie in [0, 1)"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("data.source=csv", "data.path is required"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1"),
    ("diagnostics.gradient_log_interval=0", "diagnostics.gradient_log_interval must be >= 1"),
    ("data.builtin.start_date=1950-13-01", "data.builtin.start_date"),
    ("train.experiment_name=a/b", "train.experiment_name must be a plain folder name"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(None, [parse_override(override)])
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    with pytest.raises(UserError, match="model: expected a mapping"):
        load_config(section)


def test_override_syntax_error():
    with pytest.raises(UserError, match="expected key=value"):
        parse_override("optim.lr")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, [("optim.lr", 0.123)])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
