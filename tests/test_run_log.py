"""trainer/run_log.py: the one JSON encoding of non-finite floats, and its readers."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys

import pytest

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


class FakeTerminal(io.StringIO):
    """stderr as a terminal (isatty) whose reported size the test sets."""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


def fake_terminal(monkeypatch) -> FakeTerminal:
    """A fake terminal on stderr that reports 0x0, as a pseudo-terminal whose size was never
    set does. (Set in the test itself: pytest puts its own stderr back before each test.)"""
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
    return stream


def test_phase_logs_what_runs_and_has_its_own_bar(tmp_path, caplog):
    log = RunLog(tmp_path, total_steps=10, start_step=0, tensorboard=False, progress_bar=False)
    with caplog.at_level(logging.INFO, logger="trainer.run_log"), \
            log.phase("validation at step 5", 3) as bar:
        assert bar is not log.bar
    assert "validation at step 5: 3 batches" in caplog.text
    with caplog.at_level(logging.INFO, logger="trainer.run_log"), \
            log.phase("attribution at step 5", 1, unit="pass"):
        pass
    assert "attribution at step 5: 1 pass" in caplog.text


@pytest.mark.parametrize("columns_env", [None, "0"])
def test_bars_are_drawn_80_wide_on_a_terminal_reporting_no_size(tmp_path, monkeypatch,
                                                                  columns_env):
    terminal = fake_terminal(monkeypatch)
    if columns_env is not None:
        monkeypatch.setenv("COLUMNS", columns_env)
        monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((120, 40)))
    log = RunLog(tmp_path, total_steps=10, start_step=0, tensorboard=False, progress_bar=True)
    with log.phase("test with the weights of step 2", 4) as bar:
        bar.update(4)
        bar.refresh()
    log.advance(1, loss="0.1234")
    log.bar.refresh()
    log.close()
    drawn = re.split(r"[\r\n]", terminal.getvalue().replace("\x1b[A", ""))
    training = [line for line in drawn if "1/10" in line and "loss=0.1234" in line]
    testing = [line for line in drawn if line.startswith("test:") and "4/4" in line]
    assert training and testing, drawn
    assert {len(line) for line in training + testing} == {79}
