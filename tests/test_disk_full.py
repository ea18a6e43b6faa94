"""A full disk: logs, records and checkpoints written to a real, small tmpfs (needs root and
mount; skipped cleanly otherwise). Every rank stops with one line (exit 74), the newest complete
checkpoint stays intact, no partial folder is left, and the run resumes once there is room."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import as_cli_args, run_cli, small_overrides
from tests.dist_workers import spawn
from trainer.checkpoint.manager import verify
from trainer.errors import EXIT_WRITE_FAILED, WriteFailed
from trainer.run_log import (
    RunLog,
    clear_write_failure,
    stop_if_any_rank_failed_to_write,
    write_failure,
)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str):
    """A tmpfs of `size` at `where`; `resize(new)` makes room later, as a user would."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a size-limited tmpfs needs root and mount")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          check=False, capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(where)], check=True)
    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> None:
    """Leave no byte free on the filesystem that holds `folder`."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


# --- records: the failed write is held, not raised, until the ranks agree ---------------------

def test_full_disk_while_writing_records_and_metrics_is_held_then_raised(tmp_path):
    from diagnostics.records import write_json
    with small_filesystem(tmp_path / "fs", "64k"):
        log_dir = tmp_path / "fs" / "run"
        log_dir.mkdir()
        run_log = RunLog(log_dir, total_steps=10, start_step=0, tensorboard=False,
                         progress_bar=False)
        clear_write_failure()
        fill(log_dir)
        record = log_dir / "gradients" / "gradients_step_000010.json"
        write_json(record, {"step": 10, "values": list(range(2000))})   # must not raise
        assert "No space left on device" in write_failure()
        assert "gradients_step_000010" in write_failure()
        assert not list(log_dir.glob("gradients/.*tmp*"))           # no half-written temporary
        run_log.record("train", 10, {"loss": 1.0})                   # held too, not raised
        with pytest.raises(WriteFailed, match="No space left on device.*--resume auto"):
            stop_if_any_rank_failed_to_write()
        run_log.close()
        clear_write_failure()


# --- logs: one rank, a real run on a full disk -------------------------------------------------

@pytest.mark.slow
def test_full_disk_while_logging_stops_cleanly_and_resumes(short_csv, tmp_path):
    """The log folder is a 16 KiB filesystem: metrics.jsonl or training_full.log fills it
    within the 12 steps (TensorBoard off: the project's own writes are under test here)."""
    with small_filesystem(tmp_path / "fs", "16k") as resize:
        args = as_cli_args(small_overrides(short_csv, tmp_path, "full") + [
            ("train.log_root", str(tmp_path / "fs" / "logs")), ("train.max_steps", 12),
            ("train.log_interval", 1), ("checkpoint.interval", 2), ("train.resume", "auto"),
            ("diagnostics.tensorboard", False)])
        first = run_cli(args, timeout=600)
        assert first.returncode == EXIT_WRITE_FAILED, first.stderr[-2000:]
        assert "Traceback" not in first.stderr and "Logging error" not in first.stderr
        error = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "No space left on device" in error[0], first.stderr[-2000:]
        assert "--resume auto" in error[0]
        checkpoints = sorted((tmp_path / "checkpoints" / "full").glob("checkpoint_step_*"))
        assert checkpoints and all(verify(c) is None for c in checkpoints)

        resize("8m")        # room again: the same command continues the run
        second = run_cli(args, timeout=600)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "resumed from" in second.stderr
        lines = (tmp_path / "fs" / "logs" / "full" / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)       # no glued or partial line
        assert json.loads(lines[-1])["kind"] == "test"


# --- a checkpoint: two gloo ranks, the disk fills during the second save -----------------------

def cli_rank(rank, world_size, port, argv, out_dir, manifest_fails=False):
    """Run the trainer's entry point on this rank; keep its status and what it printed.
    manifest_fails: rank 0's manifest write hits a full disk (a fault hook)."""
    import errno

    import torch

    from trainer import cli
    from trainer.checkpoint import manager
    if manifest_fails and rank == 0:
        def full_disk(folder, step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "manifest.json"))
        manager.write_manifest = full_disk
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.run(argv)
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps({"status": status, "stderr": stderr.getvalue()}))


def run_two_ranks(argv: list[str], out: Path, manifest_fails: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    spawn(cli_rank, 2, argv, str(out), manifest_fails, timeout_s=400)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_stops_every_rank_and_resumes(short_csv, tmp_path):
    # A checkpoint of this model is about 1.7 MB, best_model.pth 0.35 MB: the save at step 2
    # fits in 3 MB, the one at step 4 cannot.
    root = tmp_path / "fs"
    with small_filesystem(root, "3m") as resize:
        argv = as_cli_args(small_overrides(short_csv, tmp_path, "ckfull") + [
            ("checkpoint.root", str(root)), ("checkpoint.interval", 2), ("checkpoint.keep_last", 1),
            ("train.max_steps", 4), ("train.log_interval", 2), ("train.resume", "auto")])
        results = run_two_ranks(argv, tmp_path / "out")
        for result in results:
            assert result["status"] == EXIT_WRITE_FAILED, result["stderr"][-2000:]
            errors = [ln for ln in result["stderr"].splitlines() if ln.startswith("error: ")]
            assert len(errors) == 1, result["stderr"][-2000:]
            assert "cannot write checkpoint" in errors[0]
            free = re.search(r"\((\d+\.\d) MiB free on the filesystem", errors[0])
            assert free and float(free.group(1)) < 0.5, errors[0]
            assert "checkpoint_step_000002 is intact" in errors[0]
            assert "Traceback" not in result["stderr"]
        folder = root / "ckfull"
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint_step_000002"]
        assert verify(folder / "checkpoint_step_000002") is None
        log = (tmp_path / "logs" / "ckfull" / "training_full.log").read_text()
        assert "error: cannot write checkpoint" in log

        resize("16m")
        results = run_two_ranks(argv, tmp_path / "out")
        assert [r["status"] for r in results] == [0, 0], results[0]["stderr"][-2000:]
        assert "resumed from" in results[0]["stderr"] and "step 2" in results[0]["stderr"]
        assert verify(folder / "checkpoint_step_000004") is None


@pytest.mark.slow
def test_rank_0_failing_to_write_the_manifest_stops_both_ranks_at_once(short_csv, tmp_path):
    """Only rank 0 writes manifest.json: unless the ranks agree on its failure, the other rank
    waits in the next collective until the timeout. Both stop within seconds, with the same
    line."""
    argv = as_cli_args(small_overrides(short_csv, tmp_path, "manifest") + [
        ("checkpoint.interval", 1), ("train.max_steps", 2), ("train.validate_at_start", False),
        ("train.collective_timeout_s", 120)])
    results = run_two_ranks(argv, tmp_path / "out", manifest_fails=True)
    # A rank left waiting in a collective would fail with the timeout's own error line.
    assert not any("did not complete within train.collective_timeout_s" in r["stderr"]
                   for r in results), results[1]["stderr"]
    lines = [[ln for ln in r["stderr"].splitlines() if ln.startswith("error: ")] for r in results]
    assert [r["status"] for r in results] == [EXIT_WRITE_FAILED] * 2, results[1]["stderr"][-2000:]
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert "rank 0: No space left on device" in lines[0][0] and "manifest.json" in lines[0][0]
    folder = tmp_path / "checkpoints" / "manifest"     # removed on exit when left empty
    assert not folder.exists() or not list(folder.iterdir())            # no .tmp left


# --- a read-only file system: said so, not "make room" ------------------------------------------

@contextlib.contextmanager
def read_only_filesystem(where: Path):
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only tmpfs needs root and mount")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(where)],
                          check=False, capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_checkpoint_folder_is_refused_before_anything_is_written(short_csv, tmp_path):
    """Refused at the start, saying read-only: not met at the first save, after training, and
    reported as a full disk ("make room")."""
    from tests.test_fuzz_inputs import run_refused
    with read_only_filesystem(tmp_path / "ro") as ro:
        overrides = small_overrides(short_csv, tmp_path, "ro") + [
            ("checkpoint.root", str(ro / "checkpoints")), ("train.max_steps", 2)]
        error = run_refused(as_cli_args(overrides), tmp_path)
    assert "read-only file system" in error and str(ro / "checkpoints" / "ro") in error, error


def test_a_save_on_a_read_only_file_system_says_read_only_not_make_room(tmp_path):
    from tests.test_checkpoint_hostile import empty_state
    from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager
    with read_only_filesystem(tmp_path / "ro") as ro:
        manager = CheckpointManager(CheckpointConfig(), ro / "exp")
        with pytest.raises(WriteFailed) as err:
            manager.save(1, empty_state(), {"config.yaml": "a: 1\n"})
    assert "read-only" in str(err.value) and "make room" not in str(err.value), err.value
