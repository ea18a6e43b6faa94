"""Killed processes and foreign checkpoints with real processes (gloo ranks under torchrun).

- a rank SIGKILLed at a random step under `torchrun --max-restarts`: the restarted group resumes
  from the newest checkpoint and ends with the parameters of an uninterrupted run, also when the
  run was started with `--resume <folder>` and that folder has been pruned since;
- a process killed during a save (at the sharded write, the manifest or the rename; sync and
  async): the previous checkpoint stays usable, resume picks it, the next start removes the
  half-written folder;
- an explicit `--resume` of a checkpoint of another model config stops every rank with the
  same one-line error, exit status 2, and leaves the checkpoint as it was.
The kills use the test hook CELESTIAL_FAULT (trainer/faults.py).
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import REPO
from tests.test_checkpoint import IDENTITY
from tests.test_distributed import finish, launch, model_file, train_args
from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager
from trainer.resume import find_resumable

pytestmark = pytest.mark.slow
STEPS, INTERVAL = 12, 4        # checkpoints at 4, 8, 12


def run_args(csv, root, name, **extra) -> list[str]:
    return train_args(csv, root, name, train__max_steps=STEPS, checkpoint__interval=INTERVAL,
                      train__log_interval=1, train__validate_at_start=False, **extra)


@pytest.fixture(scope="module")
def reference(short_csv, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run with the checkpoint schedule every test here uses."""
    root = tmp_path_factory.mktemp("reference")
    code, out = finish(launch(run_args(short_csv, root, "ref"), ranks=2), timeout=300)
    assert code == 0, out[-3000:]
    return root


def assert_same_final_model(root: Path, name: str, reference: Path) -> None:
    ours, theirs = model_file(root, name), model_file(reference, "ref")
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def _log(root: Path, name: str) -> str:
    return (root / "logs" / name / "training_full.log").read_text()


# ---------------------------------------------------------------- killed worker (point 1)
def test_rank_killed_at_a_random_step_resumes_newest_and_matches(short_csv, tmp_path, reference):
    kill_step = random.Random(1).randrange(INTERVAL + 1, STEPS)
    proc = launch(run_args(short_csv, tmp_path, "killed"), ranks=2, max_restarts=1,
                  env={"CELESTIAL_FAULT": f"kill:step:{kill_step}@1"})
    code, out = finish(proc, timeout=400)
    assert code == 0, out[-4000:]
    newest = kill_step - 1 - (kill_step - 1) % INTERVAL
    assert f"checkpoint_step_{newest:06d} at step {newest}" in _log(tmp_path, "killed"), kill_step
    assert_same_final_model(tmp_path, "killed", reference)


def test_restart_of_a_run_started_from_a_folder_resumes_newest(short_csv, tmp_path, reference):
    """Started with --resume checkpoint_step_000004 and keep_last=1: by the kill the start folder
    is pruned; the restarted workers take checkpoint_step_000008 instead of refusing the pruned
    start folder (exit 2)."""
    first = launch(run_args(short_csv, tmp_path, "chain"), ranks=2,
                   env={"CELESTIAL_FAULT": "kill:step:6@1"})
    assert finish(first, timeout=300)[0] != 0
    start = tmp_path / "checkpoints" / "chain" / "checkpoint_step_000004"
    kill_step = random.Random(2).randrange(2 * INTERVAL + 1, STEPS)
    args = (run_args(short_csv, tmp_path, "chain", checkpoint__keep_last=1)
            + ["--resume", str(start)])
    code, out = finish(launch(args, ranks=2, max_restarts=1,
                              env={"CELESTIAL_FAULT": f"kill:step:{kill_step}@1"}), timeout=400)
    assert code == 0, out[-4000:]
    log = _log(tmp_path, "chain")
    assert "checkpoint_step_000008 at step 8" in log and not start.exists()
    assert_same_final_model(tmp_path, "chain", reference)


# ---------------------------------------------------------- killed during a save (point 2)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("point", ["dcp_write", "manifest", "rename"])
def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, point, async_save):
    code = (f"from tests.dist_workers import save_checkpoints_until_killed; "
            f"save_checkpoints_until_killed({str(tmp_path)!r}, {async_save})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CELESTIAL_FAULT": f"kill:{point}:4@0"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["checkpoint_step_000002", "checkpoint_step_000004.tmp"]
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    previous = find_resumable(manager, "auto", IDENTITY)
    assert previous == tmp_path / "checkpoint_step_000002"
    state = {"w": torch.zeros(1000)}
    dcp.load(state, checkpoint_id=str(previous))
    assert torch.equal(state["w"], torch.full((1000,), 2.0))
    manager.remove_stale_writes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_000002"]


def test_rank_killed_in_an_async_write_on_two_ranks_then_resume(short_csv, tmp_path):
    """End to end: rank 1 dies as the step-8 async save starts; the next start removes the
    half-written folder (logged) and resumes from step 4."""
    args = run_args(short_csv, tmp_path, "asave", checkpoint__async_save=True)
    first = launch(args, ranks=2, env={"CELESTIAL_FAULT": "kill:dcp_write:8@1"})
    assert finish(first, timeout=300)[0] != 0
    folder = tmp_path / "checkpoints" / "asave"
    assert (folder / "checkpoint_step_000008.tmp").is_dir()
    code, out = finish(launch(args + ["--resume", "auto"], ranks=2), timeout=300)
    assert code == 0, out[-3000:]
    log = _log(tmp_path, "asave")
    assert "checkpoint_step_000008.tmp: left by a save that did not finish" in log
    assert "checkpoint_step_000004 at step 4" in log and "finished at step 12" in log
    assert not list(folder.glob("*.tmp"))


# --------------------------------------------------- foreign checkpoint on every rank (point 3)
def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_foreign_checkpoint_is_refused_on_every_rank(short_csv, tmp_path, reference):
    foreign = reference / "checkpoints" / "ref" / "checkpoint_step_000008"
    before = _digest(foreign)
    args = run_args(short_csv, tmp_path, "other", model__d_model=16) + ["--resume", str(foreign)]
    code, out = finish(launch(args, ranks=2), timeout=300)
    expected = (f"error: --resume {foreign}: another model config (model.d_model: checkpoint 32, "
                f"this run 16)")
    assert [line for line in out.splitlines() if line.startswith("error:")] == [expected] * 2, \
        out[-3000:]
    assert code != 0 and "exitcode  : 2" in out         # torchrun reports its workers' 2
    # Only torchrun's own traceback: no frame of the project's code (the venv may live in REPO).
    project_frames = [f'File "{REPO}/{package}/' for package in ("trainer", "series", "model",
                                                                  "launch", "diagnostics")]
    assert out.count("Traceback") == 1 and not any(frame in out for frame in project_frames)
    assert _digest(foreign) == before
    assert not (tmp_path / "checkpoints" / "other").exists()


def test_changed_optim_on_resume_is_applied_and_logged(short_csv, tmp_path, reference, caplog):
    from tests.conftest import small_config
    from trainer import distributed
    from trainer.build import build_trainer
    checkpoint = reference / "checkpoints" / "ref" / "checkpoint_step_000008"
    config = small_config(short_csv, tmp_path, "lr", train__max_steps=STEPS,
                          train__resume=str(checkpoint), optim__lr=1e-4)
    trainer = build_trainer(config, distributed.init_distributed("cpu"))
    assert "optim.lr changed on resume (checkpoint 0.0005, this run 0.0001): applied" in caplog.text
    multiplier = trainer.train_step.scheduler.lr_lambdas[0](trainer.train_step.scheduler.last_epoch)
    assert trainer.train_step.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * multiplier)
    shutil.rmtree(tmp_path / "logs", ignore_errors=True)
