"""trainer/run_log.py: the one JSON encoding of non-finite floats, and its readers."""
from __future__ import annotations

import json
import math

from diagnostics.analysis.load import column
from trainer.run_log import RunLog, json_safe


def test_non_finite_values_are_written_as_null_in_strict_json(tmp_path):
    log = RunLog(tmp_path, total_steps=1, start_step=0, tensorboard=False, progress_bar=False)
    log.record("train", 1, {"loss": math.inf, "grad_norm": -math.inf, "lr": math.nan,
                            "per_target": [1.0, math.nan], "ok": 2.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    parsed = json.loads(line, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(token)))
    assert parsed["loss"] is None and parsed["grad_norm"] is None and parsed["lr"] is None
    assert parsed["per_target"] == [1.0, None] and parsed["ok"] == 2.5


def test_json_safe_is_recursive_and_leaves_other_values_alone():
    assert json_safe({"a": (1, math.inf), "b": {"c": math.nan}, "d": "x", "e": True}) == \
        {"a": [1, None], "b": {"c": None}, "d": "x", "e": True}


def test_readers_map_null_to_nan_and_an_older_files_huge_values_to_infinities():
    lines = [{"step": 1, "loss": None}, {"step": 2, "loss": 1e308}, {"step": 3, "loss": -1e308},
             {"step": 4, "loss": 0.5}]
    steps, values = column(lines, "loss")
    assert list(steps) == [1, 2, 3, 4]
    assert math.isnan(values[0]) and values[1] == math.inf and values[2] == -math.inf
    assert values[3] == 0.5
