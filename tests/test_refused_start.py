"""A refused start creates nothing: every input check, the checkpoint to resume from included,
comes before the run folder is opened, so the log root (and the checkpoint root) stay exactly
as they were, byte for byte."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from tests.conftest import as_cli_args, small_overrides
from trainer import cli


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under `root`, by relative path."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def refused(overrides, root: Path, flags: list[str] = ()) -> str:
    """Run the trainer in this process; it must refuse with one line and status 2, leaving
    `root`'s logs/ and checkpoints/ as they were. Returns the error line."""
    before = {name: snapshot(root / name) for name in ("logs", "checkpoints")}
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.run([*flags, *as_cli_args(overrides)])
    lines = stderr.getvalue().strip().splitlines()
    assert status == 2 and lines[-1].startswith("error: "), stderr.getvalue()[-2000:]
    for name, files in before.items():
        assert snapshot(root / name) == files, f"{name}/ changed after: {lines[-1]}"
    return lines[-1]


@pytest.fixture(scope="module")
def finished_run(short_csv, tmp_path_factory) -> Path:
    """A short run `done` with its log folder and one checkpoint (step 4)."""
    root = tmp_path_factory.mktemp("finished")
    overrides = small_overrides(short_csv, root, "done") + [
        ("train.max_steps", 4), ("train.log_interval", 2), ("checkpoint.interval", 4)]
    with contextlib.redirect_stderr(io.StringIO()):
        assert cli.run(as_cli_args(overrides)) == 0
    return root


@pytest.fixture
def root(finished_run, tmp_path) -> Path:
    """A copy of the finished run's logs/ and checkpoints/, for one test to try to spoil."""
    for name in ("logs", "checkpoints"):
        shutil.copytree(finished_run / name, tmp_path / name)
    return tmp_path


def test_refused_resume_of_a_missing_folder_writes_nothing(short_csv, root):
    overrides = small_overrides(short_csv, root, "new") + [("train.resume", str(root / "nope"))]
    assert "nope: not a folder" in refused(overrides, root)


def test_refused_resume_of_a_foreign_model_writes_nothing(short_csv, root):
    checkpoint = root / "checkpoints" / "done" / "checkpoint_step_000004"
    overrides = small_overrides(short_csv, root, "new") + [
        ("train.resume", str(checkpoint)), ("model.d_model", 64), ("model.num_heads", 8)]
    assert "another model config (model.d_model" in refused(overrides, root)


def test_refused_resume_auto_leaves_the_runs_own_log_folder_as_it_was(short_csv, root):
    """The experiment's log folder exists from its first run: a refused --resume auto must not
    rewrite its config.yaml, append to metrics.jsonl or start a TensorBoard file."""
    metadata = root / "checkpoints" / "done" / "checkpoint_step_000004" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-8])
    overrides = small_overrides(short_csv, root, "done") + [("train.resume", "auto")]
    assert "none of the 1 checkpoint(s)" in refused(overrides, root)


def test_restarting_an_experiment_with_checkpoints_writes_nothing(short_csv, root):
    assert "already has checkpoints" in refused(small_overrides(short_csv, root, "done"), root)


def test_refused_data_writes_nothing(root):
    overrides = small_overrides(root / "missing.csv", root, "new") + [("data.source", "csv")]
    assert "missing.csv" in refused(overrides, root)


def test_resume_from_a_log_folder_names_the_checkpoint_to_use(short_csv, finished_run, root):
    """The checkpoint folder comes from the log folder's config.yaml (its checkpoint.root)."""
    overrides = small_overrides(short_csv, root, "new")
    error = refused(overrides, root, ["--resume", str(root / "logs" / "done")])
    newest = finished_run / "checkpoints" / "done" / "checkpoint_step_000004"
    assert "this is a log folder, not a checkpoint" in error and str(newest) in error


def test_resume_from_an_experiments_checkpoint_folder_names_its_newest(short_csv, root):
    overrides = small_overrides(short_csv, root, "new")
    error = refused(overrides, root, ["--resume", str(root / "checkpoints" / "done")])
    assert "not a checkpoint" in error and "checkpoint_step_000004" in error


def test_refused_start_with_no_log_root_creates_none(short_csv, tmp_path):
    overrides = small_overrides(short_csv, tmp_path, "new") + [
        ("train.resume", str(tmp_path / "nope"))]
    refused(overrides, tmp_path)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()
