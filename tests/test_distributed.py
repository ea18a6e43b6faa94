"""Multi-process behaviour with real gloo process groups (2 ranks, one thread each).

DDP gradients, exact resume (mid-epoch), world-size changes, elastic restart after SIGKILL,
signal-triggered checkpoints, NaN on one rank, and damaged checkpoints on resume.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests import dist_workers
from tests.conftest import REPO, as_cli_args, small_config, small_overrides
from tests.processes import train_command, wait_for_path
from trainer import distributed
from trainer.build import build_trainer

pytestmark = pytest.mark.slow


def train_args(csv, root, name, **extra) -> list[str]:
    overrides = small_overrides(csv, root, name) + [(k.replace("__", "."), v)
                                                    for k, v in extra.items()]
    return as_cli_args(overrides)


def launch(args, ranks: int, max_restarts: int = 0, env=None) -> subprocess.Popen:
    cmd = train_command(args, ranks, [f"--max-restarts={max_restarts}"])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def train_losses(root: Path, name: str) -> dict[int, float]:
    lines = (root / "logs" / name / "metrics.jsonl").read_text().splitlines()
    return {line["step"]: line["loss"] for line in map(json.loads, lines)
            if line["kind"] == "train"}


def model_file(root: Path, name: str, which: str = "final_model.pth") -> dict:
    return torch.load(root / "checkpoints" / name / which, weights_only=True)["model"]


def test_ranks_agree_on_failures_in_rank_order(tmp_path):
    dist_workers.spawn(dist_workers.failure_agreement, 2, str(tmp_path), timeout_s=120)
    expected = [[], ["disk full"], ["rank 0", "rank 1"], ["known"]]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [expected] * 2


def test_one_process_agrees_with_itself():
    assert distributed.agree_on_failure(None) == []
    assert distributed.agree_on_failure("full") == ["full"]


def test_ddp_gradients_equal_single_process(tmp_path):
    from tests.test_model import inputs, make_model
    dist_workers.spawn(dist_workers.ddp_gradients, 2, str(tmp_path))
    torch.manual_seed(0)
    model = make_model().eval()
    torch.manual_seed(1)
    wave, target, future, y = inputs(model, batch=8)
    model(wave, target, future).loss(y).backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name], param.grad, atol=1e-6, rtol=1e-4), name


def test_exact_resume_mid_epoch_on_two_ranks(short_csv, tmp_path):
    common = {"train__max_steps": 16, "train__log_interval": 1, "checkpoint__interval": 8,
              "checkpoint__keep_last": 3}
    code, out = finish(launch(train_args(short_csv, tmp_path, "straight", **common), ranks=2))
    assert code == 0, out[-3000:]
    middle = tmp_path / "checkpoints" / "straight" / "checkpoint_step_000008"
    resumed = train_args(short_csv, tmp_path, "resumed", **common) + ["--resume", str(middle)]
    code, out = finish(launch(resumed, ranks=2))
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "samples into it" in out
    straight, after = train_losses(tmp_path, "straight"), train_losses(tmp_path, "resumed")
    assert sorted(after) == list(range(9, 17))
    for step, loss in after.items():
        assert loss == pytest.approx(straight[step], abs=1e-6), step
    a, b = model_file(tmp_path, "straight"), model_file(tmp_path, "resumed")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def _reference_state(checkpoint: Path, tmp_path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(checkpoint, tmp_path / "ref.pt")
    return torch.load(tmp_path / "ref.pt", weights_only=False)["app"]


def _assert_same_state(state: dict, reference: dict) -> None:
    for name, value in state["model"].items():
        assert torch.equal(value, reference["model"][name]), name
    for name, moments in state["optim"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            expected = reference["optimizer"]["state"][name][key]
            assert torch.equal(moments[key], expected), (name, key)


def test_world_size_two_to_one(short_csv, tmp_path):
    code, out = finish(launch(train_args(short_csv, tmp_path, "w2", train__max_steps=8,
                                         checkpoint__interval=8), ranks=2))
    assert code == 0, out[-3000:]
    checkpoint = tmp_path / "checkpoints" / "w2" / "checkpoint_step_000008"
    config = small_config(short_csv, tmp_path, "w1", train__resume=str(checkpoint))
    trainer = build_trainer(config, distributed.init_distributed("cpu"))
    _assert_same_state(dist_workers.state_of(trainer), _reference_state(checkpoint, tmp_path))
    assert trainer.train_state.step == 8 and trainer.train_state.epoch_position == 8 * 16 * 2
    # ... and training goes on from there, on one rank, to a longer configured length.
    code, out = finish(launch(train_args(short_csv, tmp_path, "w1b", train__max_steps=12)
                              + ["--resume", str(checkpoint)], ranks=0))
    assert code == 0 and max(train_losses(tmp_path, "w1b")) == 12, out[-3000:]


def test_world_size_one_to_two(short_csv, tmp_path):
    code, out = finish(launch(train_args(short_csv, tmp_path, "one", train__max_steps=8,
                                         checkpoint__interval=8), ranks=0))
    assert code == 0, out[-3000:]
    checkpoint = tmp_path / "checkpoints" / "one" / "checkpoint_step_000008"
    dist_workers.spawn(dist_workers.resume_and_report_state, 2, str(short_csv), str(tmp_path),
                       str(checkpoint))
    reference = _reference_state(checkpoint, tmp_path)
    for rank in range(2):
        state = torch.load(tmp_path / f"state_w2_r{rank}.pt", weights_only=False)
        _assert_same_state(state, reference)
        assert state["step"] == 8


def test_elastic_restart_after_sigkill(short_csv, tmp_path):
    args = train_args(short_csv, tmp_path, "elastic", train__max_steps=60, checkpoint__interval=10,
                      train__log_interval=5)
    proc = launch(args, ranks=2, max_restarts=1)
    wait_for_path(tmp_path / "checkpoints" / "elastic" / "checkpoint_step_000010", proc)
    workers = [c for c in psutil.Process(proc.pid).children()
               if "train.py" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0, out[-4000:]
    log = (tmp_path / "logs" / "elastic" / "training_full.log").read_text()
    assert "resumed from" in log and "finished at step 60" in log
    assert max(train_losses(tmp_path, "elastic")) == 60


@pytest.mark.parametrize("ranks", [0, 2])
def test_signal_checkpoints_and_exits_75(short_csv, tmp_path, ranks):
    name = f"sig{ranks}"
    proc = launch(train_args(short_csv, tmp_path, name, train__max_steps=2000,
                             checkpoint__interval=10, train__log_interval=5), ranks=ranks)
    ckpts = tmp_path / "checkpoints" / name
    wait_for_path(ckpts / "checkpoint_step_000010", proc)
    target = proc if ranks == 0 else [c for c in psutil.Process(proc.pid).children()
                                      if "train.py" in " ".join(c.cmdline())][-1]
    target.send_signal(signal.SIGUSR1)
    code, out = finish(proc)
    log = (tmp_path / "logs" / name / "training_full.log").read_text()
    assert "stop requested (signal)" in log, out[-3000:]
    stop_step = int(log.split("stop requested (signal) at step ")[1].split(":")[0])
    assert (ckpts / f"checkpoint_step_{stop_step:06d}" / "manifest.json").is_file()
    if ranks == 0:
        assert code == 75
    else:
        assert code != 0 and "exitcode  : 75" in out   # torchrun reports its workers' status


def test_nan_on_one_rank_skips_the_step_on_both(short_csv, tmp_path):
    dist_workers.spawn(dist_workers.trainer_with_poisoned_rank, 2, str(short_csv), str(tmp_path), 2)
    results = [json.loads((tmp_path / f"nan{r}.json").read_text()) for r in range(2)]
    assert [r["skipped"] for r in results] == [1, 1] and [r["step"] for r in results] == [6, 6]
    assert results[0]["param_sum"] == results[1]["param_sum"]


@pytest.fixture(scope="module")
def undamaged_run(short_csv, tmp_path_factory):
    """One 2-rank run with checkpoints at steps 5 and 10, copied by each damage case below."""
    root = tmp_path_factory.mktemp("undamaged")
    args = train_args(short_csv, root, "dmg", train__max_steps=10, checkpoint__interval=5,
                      checkpoint__keep_last=3)
    assert finish(launch(args, ranks=2))[0] == 0
    return root


@pytest.mark.parametrize("damage", ["truncated_shard", "missing_metadata", "flipped_byte"])
def test_damaged_newest_checkpoint_falls_back(short_csv, tmp_path, undamaged_run, damage):
    for folder in ("checkpoints", "logs"):
        shutil.copytree(undamaged_run / folder, tmp_path / folder)
    newest = tmp_path / "checkpoints" / "dmg" / "checkpoint_step_000010"
    shard = newest / "__1_0.distcp"
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == "missing_metadata":
        (newest / ".metadata").unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    code, out = finish(launch(train_args(short_csv, tmp_path, "dmg", train__max_steps=12,
                                         checkpoint__interval=5) + ["--resume", "auto"], ranks=2))
    assert code == 0, out[-3000:]
    assert "skipping checkpoint" in out and "checkpoint_step_000010" in out
    assert "resumed from" in out and "checkpoint_step_000005 at step 5" in out


def test_resume_auto_without_checkpoints_starts_fresh(short_csv, tmp_path):
    code, out = finish(launch(train_args(short_csv, tmp_path, "fresh", train__max_steps=2)
                              + ["--resume", "auto"], ranks=0))
    assert code == 0 and "no usable checkpoint" in out and "starting fresh" in out


@pytest.mark.parametrize("ranks", [0, 2])
def test_async_checkpoints_are_complete_and_resumable(short_csv, tmp_path, ranks):
    name = f"async{ranks}"
    args = train_args(short_csv, tmp_path, name, train__max_steps=10, checkpoint__interval=3,
                      checkpoint__keep_last=2, checkpoint__async_save=True)
    code, out = finish(launch(args, ranks=ranks))
    assert code == 0, out[-3000:]
    folders = sorted(p.name for p in (tmp_path / "checkpoints" / name).glob("checkpoint_step_*"))
    assert folders == ["checkpoint_step_000009", "checkpoint_step_000010"]
    from trainer.checkpoint.manager import verify
    assert all(verify(tmp_path / "checkpoints" / name / f) is None for f in folders)
    longer = train_args(short_csv, tmp_path, name, train__max_steps=12, checkpoint__interval=3,
                        checkpoint__async_save=True) + ["--resume", "auto"]
    code, out = finish(launch(longer, ranks=ranks))
    assert code == 0 and "checkpoint_step_000010 at step 10" in out, out[-3000:]


def test_destroying_the_group_before_ddp_never_deadlocks():
    """A DDP reducer freed after `distributed.destroy()` can deadlock in gloo's destructor (the
    GIL held while joining a worker that needs the GIL): the teardown order must prevent it."""
    dist_workers.spawn(dist_workers.teardown_cycles, 2, 40, timeout_s=60)


def test_processes_exit_cleanly_after_destroy():
    """Regression: a DDP reducer freed during interpreter shutdown made gloo abort the process
    ("terminate called without an active exception"), about 1 exit in 5; 8 pairs here."""
    code = "from tests.dist_workers import exit_like_a_trainer; exit_like_a_trainer()"
    for attempt in range(8):
        port = dist_workers.free_port()
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port), "RANK": str(rank),
                                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                       "OMP_NUM_THREADS": "1"})
                 for rank in range(2)]
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"attempt {attempt}, rank {rank}: {out[-2000:]}"


def test_attempt_prefix_only_on_the_store_torchrun_shares(monkeypatch):
    """The shared store outlives restarts, so each attempt gets a prefix; a store opened per
    rendezvous round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) gets none, since a host that joins
    an elastic run counts its restarts from 0 while the others do not."""
    store = torch.distributed.HashStore()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    distributed._store_of_this_attempt(store).set("k", "v")
    assert store.get("celestial/attempt2/k") == b"v"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert distributed._store_of_this_attempt(store) is store
