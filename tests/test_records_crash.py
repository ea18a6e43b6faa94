"""Records survive crashes: a partial last line that a crash (or a full disk) left in an
appended JSONL file is cut off when the run starts again, with a warning, so the next line is
not glued to it; the analysis reads the repaired file whole (and skips, with a note, a glued
line it is given anyway: tests/test_analysis.py)."""
from __future__ import annotations

import contextlib
import io
import json
import logging

import pytest

from diagnostics.analysis.load import load_run
from tests.conftest import as_cli_args, small_overrides
from trainer import cli
from trainer.run_log import RunLog, repair_partial_last_line

COMPLETE = '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'


def test_partial_last_line_is_cut_back_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(COMPLETE + '{"kind": "train", "st')
    with caplog.at_level(logging.WARNING):
        assert repair_partial_last_line(path) == len('{"kind": "train", "st')
    assert path.read_text() == COMPLETE
    assert "removed a partial last line" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("content", ["", COMPLETE])
def test_complete_files_are_left_alone(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    path.write_text(content)
    assert repair_partial_last_line(path) == 0
    assert path.read_text() == content


def test_a_file_with_only_a_partial_line_becomes_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "tr\x00\x00')     # a crash can also leave NUL bytes
    assert repair_partial_last_line(path) == 14
    assert path.read_bytes() == b""


def test_run_log_repairs_every_jsonl_of_the_run_before_appending(tmp_path):
    (tmp_path / "gradients").mkdir()
    for path in (tmp_path / "metrics.jsonl", tmp_path / "gradients" / "events.jsonl"):
        path.write_text(COMPLETE + '{"half')
    run_log = RunLog(tmp_path, total_steps=3, start_step=2, tensorboard=False, progress_bar=False)
    run_log.record("train", 3, {"loss": 0.5})
    run_log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "gradients" / "events.jsonl").read_text() == COMPLETE


@pytest.mark.slow
def test_resume_after_a_crash_mid_line_keeps_every_record(short_csv, tmp_path):
    """Train 2 steps, 'crash' in the middle of a metrics line, resume to step 4: the analysis
    reads every line (before the fix the next line was glued to the partial one)."""
    overrides = small_overrides(short_csv, tmp_path, "crash") + [
        ("train.log_interval", 1), ("checkpoint.interval", 2), ("train.resume", "auto")]

    def run(steps: int) -> int:
        return cli.run(as_cli_args(overrides + [("train.max_steps", steps)]))

    with contextlib.redirect_stderr(io.StringIO()):
        assert run(2) == 0
    log_dir = tmp_path / "logs" / "crash"
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "time": 17')      # the crash
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert run(4) == 0
    assert "removed a partial last line" in stderr.getvalue()
    assert "removed a partial last line" in (log_dir / "training_full.log").read_text()
    run_data = load_run(log_dir)
    assert [line["step"] for line in run_data.train] == [1, 2, 3, 4]
    assert not any("not valid JSON" in note or "half-written" in note for note in run_data.notes)
