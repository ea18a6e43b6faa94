"""Planted truth, the other way: on the built-in data with every driver's strength set to 0
there is nothing in the celestial inputs to find. The analysis must say so:
`celestial_inputs_unused`, and `no_skill_over_baseline` since nothing but the target history
(a random walk) is left to forecast from. Both come from the test split's line (its skill and
its all-bodies-blanked rise), so the occlusion at each validation, which costs more than the
validation itself, is off; the attention records are kept for the attention rules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diagnostics.analysis.run import analyze
from series.builtin import BuiltinDataConfig
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def no_driver_config(tmp_path):
    drivers = [{"target": d.target, "body": d.body, "feature": d.feature, "lag": d.lag,
                "strength": 0.0} for d in BuiltinDataConfig().drivers]
    config = yaml.safe_load(Path("configs/quickstart_cpu.yaml").read_text())
    config["data"]["builtin"] = {"start_date": "1980-01-01", "end_date": "2025-12-31",
                                 "drivers": drivers}
    config["data"]["path"] = str(tmp_path / "no_drivers.csv")
    path = tmp_path / "no_drivers.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_without_drivers_the_analysis_finds_no_skill_and_unused_inputs(tmp_path):
    result = run_cli(["--config", str(no_driver_config(tmp_path)), "--experiment_name", "zero",
                      "--enable_attention_logging",
                      "--set", f"train.log_root={tmp_path}/logs",
                      f"checkpoint.root={tmp_path}/checkpoints",
                      "diagnostics.attribution_at_validation=false",
                      "train.progress_bar=false"],
                     timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log_dir = tmp_path / "logs" / "zero"
    test = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()
            if '"kind": "test"' in line][-1]
    issues = {f.issue for f in analyze(log_dir, []).findings}
    assert "celestial_inputs_unused" in issues, test["blank_all_rise_low"]
    assert "no_skill_over_baseline" in issues, (test["skill"], test["skill_high"])
