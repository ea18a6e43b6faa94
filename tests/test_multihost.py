"""Training across hosts for real: two hosts made of network namespaces (tests/netns.py), one
`torchrun` agent on each, c10d rendezvous, gloo over the hosts' own addresses, checkpoints on
the shared file system.

- Several hosts: a 2-host run equals a 2-rank run on one host, and the analysis reads it.
- A host lost and regained (`--nnodes=1:2`): the survivor goes on at world size 1 from the newest
  checkpoint; the host comes back and the group grows to 2 at the next restart; the run keeps
  its length, LR schedule and place in the data.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from series.dataset import WindowDataset, prepare
from tests import netns
from tests.conftest import REPO, as_cli_args, small_overrides
from tests.processes import TRAIN_SCRIPT, running, torchrun_command, train_command, wait_until
from trainer.checkpoint.model_file import load_consolidated
from trainer.config import load_config
from trainer.optim import lr_multiplier

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(netns.unavailable() is not None,
                                 reason=netns.unavailable() or "")]

CONFIG = "configs/quickstart_cpu.yaml"
RDZV_PORT = 29400       # every host has its own ports: no clash with other tests
# Elastic timings for a loaded 2-core machine: a lost host is declared dead after 3 missed 1 s
# heartbeats; a group below its maximum size forms 5 s after its minimum joined.
ELASTIC_RDZV = "join_timeout=120,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"


def run_overrides(csv: Path, root: Path, max_steps: int, **extra) -> list[tuple[str, object]]:
    settings = {"train.max_steps": max_steps, "train.epochs": 20, "train.log_interval": 1,
                "checkpoint.interval": 20, "train.eval_interval": 0,
                "train.early_stopping_patience": 0, **extra}
    return small_overrides(csv, root, "run") + list(settings.items())


def train_args(overrides: list[tuple[str, object]]) -> list[str]:
    return ["--config", str(REPO / CONFIG), *as_cli_args(overrides), "--resume", "auto"]


def train_argv(overrides: list[tuple[str, object]]) -> list[str]:
    """What follows an agent's node options: the training script and its arguments."""
    return [str(TRAIN_SCRIPT), *train_args(overrides)]


def start_agent(host: netns.Host, rendezvous_host: netns.Host, nnodes: str, argv: list[str],
                out: Path, rdzv_conf: str = "", **env: str) -> subprocess.Popen:
    """One `torchrun` agent on `host`: its own address for the workers' store (--local_addr),
    `is_host` on the host that owns the rendezvous address, gloo on the host's interface."""
    is_host = int(host is rendezvous_host)
    command = torchrun_command(
        f"--nnodes={nnodes}", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_id=multihost",
        f"--rdzv_endpoint={rendezvous_host.address}:{RDZV_PORT}", f"--local_addr={host.address}",
        f"--rdzv_conf=is_host={is_host}" + (f",{rdzv_conf}" if rdzv_conf else ""),
        "--monitor-interval=0.5", *argv)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": host.ifname,
                "PYTHONPATH": str(REPO), **env}
    with open(out, "a") as log:
        return host.popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def wait_for(path: Path, pattern: str, after: int = 0, timeout: float = 180,
             watch: tuple[subprocess.Popen, ...] = ()) -> re.Match:
    """The first match of `pattern` in `path` past character `after`, polling; fails early when
    a watched process has exited."""
    def text() -> str:
        return path.read_text(errors="replace") if path.exists() else ""
    return wait_until(lambda: re.compile(pattern).search(text(), after), f"{pattern!r} in {path}",
                      timeout=timeout, alive=running(*watch), output=text, interval=0.2)


def finish(*agents: subprocess.Popen, outputs: tuple[Path, ...], timeout: float = 240) -> None:
    for agent, out in zip(agents, outputs):
        code = agent.wait(timeout=timeout)
        assert code == 0, f"{out}: exit {code}\n{out.read_text()[-4000:]}"


def final_weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    return load_consolidated(checkpoints / "final_model.pth")["model"]   # weights only


def train_records(log_dir: Path) -> dict[int, dict]:
    """The run's path through training: per step the last `train` record (steps redone after a
    restart replace those of the attempt that died)."""
    records = {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            records[record["step"]] = record
    return records


# ----------------------------------------------------------------------------- several hosts

def test_two_hosts_train_like_two_ranks_on_one_host(short_csv, tmp_path):
    multi, single = tmp_path / "hosts", tmp_path / "one_host"
    diagnostics = {"diagnostics.enable_gradient_diagnostics": True,
                   "diagnostics.gradient_log_interval": 20}
    with netns.hosts(2) as (a, b):
        argv = train_argv(run_overrides(short_csv, multi, 40, **diagnostics))
        agent_b = start_agent(b, a, "2", argv, tmp_path / "b.out")
        agent_a = start_agent(a, a, "2", argv, tmp_path / "a.out")
        finish(agent_a, agent_b, outputs=(tmp_path / "a.out", tmp_path / "b.out"))
    standalone = subprocess.run(
        train_command(train_args(run_overrides(short_csv, single, 40, **diagnostics)), ranks=2),
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240, check=False)
    assert standalone.returncode == 0, standalone.stderr[-4000:]

    log_text = (multi / "logs/run/training_full.log").read_text()
    assert "device cpu x 2 rank(s), backend gloo" in log_text
    last = multi / "checkpoints/run/checkpoint_step_000040"
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt"} <= \
        {p.name for p in last.iterdir()}                      # one rank on each host wrote
    assert json.loads((last / "manifest.json").read_text())["world_size"] == 2
    two_hosts, one_host = final_weights(multi / "checkpoints/run"), final_weights(
        single / "checkpoints/run")
    assert two_hosts.keys() == one_host.keys()
    for name in two_hosts:
        torch.testing.assert_close(two_hosts[name], one_host[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")

    analysis = subprocess.run([sys.executable, "launch/analyze.py", "--log_dir",
                               str(multi / "logs/run")], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert (multi / "logs/run/analysis/report.html").is_file()
    assert (multi / "logs/run/analysis/gradient_norms.csv").is_file()


# ----------------------------------------------------------------- a host lost and regained

def pause_workers(agent: subprocess.Popen, sig: int) -> None:
    """SIGSTOP / SIGCONT the training processes under `agent` (not the agent itself)."""
    for process in psutil.Process(agent.pid).children(recursive=True):
        if "torch.distributed.run" not in " ".join(process.cmdline()):
            process.send_signal(sig)


def newest_checkpoint_step(checkpoints: Path) -> int:
    steps = [int(p.name.rsplit("_", 1)[1]) for p in checkpoints.glob("checkpoint_step_*")
             if p.is_dir() and not p.name.endswith(".tmp")]
    return max(steps)


def num_train_windows(overrides: list[tuple[str, object]]) -> int:
    config = load_config(str(REPO / CONFIG), overrides)
    prepared = prepare(config.data, config.model.seq_len, config.model.pred_len)
    return len(WindowDataset(prepared, "train", config.model.seq_len, config.model.pred_len,
                             config.data.window_stride))


@dataclass
class Membership:
    lost_at: int            # the step the survivor resumed from at world size 1
    newest_at_loss: int     # the newest checkpoint when the host was lost
    regained_at: int        # the step all resumed from at world size 2
    timings: dict[str, float]


def lose_and_regain(a: netns.Host, b: netns.Host, argv: list[str], folder: Path) -> Membership:
    """Start agents on `b` and `a` (`a` owns the rendezvous), SIGKILL host `b` after the
    checkpoint at step 20, start its agent again 10 steps after the survivor resumed, and wait
    for the run's end."""
    log, a_out, b_out = folder / "logs/run/training_full.log", folder / "a.out", folder / "b.out"
    # A store per rendezvous round: with torchrun's shared store a host that joins later waits
    # forever for the round's MASTER_ADDR (the store's owner publishes it only once).
    elastic = {"rdzv_conf": ELASTIC_RDZV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    started, timings = time.monotonic(), {}
    start_agent(b, a, "1:2", argv, b_out, **elastic)
    agent_a = start_agent(a, a, "1:2", argv, a_out, **elastic)
    wait_for(log, r"checkpoint_step_000020\n", watch=(agent_a,))
    assert "device cpu x 2 rank(s)" in log.read_text()

    mark, lost = len(log.read_text()), time.monotonic()
    b.kill()                                       # agent and worker, as a host that dies
    newest = newest_checkpoint_step(folder / "checkpoints/run")   # none completes without b
    shrunk = wait_for(log, r"world size 2 -> 1: resuming from \S+ at step (\d+)", mark,
                      watch=(agent_a,))
    timings["lost -> training at 1"] = time.monotonic() - lost
    wait_for(log, rf"step {int(shrunk[1]) + 10}/", shrunk.end(), watch=(agent_a,))
    # Hold the survivor still while the host comes back, so that a fast machine cannot end the
    # run first; torchrun's SIGTERM waits for it.
    pause_workers(agent_a, signal.SIGSTOP)
    mark_a, back = len(a_out.read_text()), time.monotonic()
    agent_b = start_agent(b, a, "1:2", argv, b_out, **elastic)
    wait_for(a_out, r"closing signal SIGTERM", mark_a, watch=(agent_a, agent_b))
    pause_workers(agent_a, signal.SIGCONT)
    grown = wait_for(log, r"world size 1 -> 2: resuming from \S+ at step (\d+)", shrunk.end(),
                     watch=(agent_a, agent_b))
    timings["back -> training at 2"] = time.monotonic() - back
    finish(agent_a, agent_b, outputs=(a_out, b_out))
    timings["whole run"] = time.monotonic() - started
    return Membership(int(shrunk[1]), newest, int(grown[1]), timings)


def test_host_lost_and_regained_keeps_the_run_on_its_course(short_csv, tmp_path):
    overrides = run_overrides(short_csv, tmp_path, 80)
    with netns.hosts(2) as (a, b):
        change = lose_and_regain(a, b, ["--max-restarts=3", *train_argv(overrides)], tmp_path)
    print("elastic timings (s):", {k: round(v, 1) for k, v in change.timings.items()})

    text = (tmp_path / "logs/run/training_full.log").read_text()
    assert change.lost_at == change.newest_at_loss          # the newest checkpoint, none older
    assert f"stop requested (signal) at step {change.regained_at}" in text   # torchrun's SIGTERM
    assert re.search(rf"saved checkpoint \S+checkpoint_step_{change.regained_at:06d}", text)
    assert "finished at step 80 (completed)" in text
    records = train_records(tmp_path / "logs/run")
    config = load_config(str(REPO / CONFIG), overrides)
    assert_planned_course(records, change, config, 80)
    assert_data_position_kept(text, records, config.data.batch_size,
                              num_train_windows(overrides))


def assert_planned_course(records: dict[int, dict], change: Membership, config,
                          num_steps: int) -> None:
    """Every planned step once, at the world size of its time, with the LR of the schedule
    planned at the start."""
    assert sorted(records) == list(range(1, num_steps + 1))
    sizes = {step: r["world_size"] for step, r in records.items()}
    assert all(size == (1 if change.lost_at < step <= change.regained_at else 2)
               for step, size in sizes.items()), sizes
    for step, record in records.items():
        expected = config.optim.lr * lr_multiplier(step, config.optim.warmup_steps, num_steps,
                                                   config.optim.min_lr_ratio)
        assert record["lr"] == pytest.approx(expected, rel=1e-6), step


def assert_data_position_kept(log_text: str, records: dict[int, dict], batch_size: int,
                              num_windows: int) -> None:
    """The trainer's data-position rule (series/dataset.py, ResumableDistributedSampler): an epoch
    is one permutation, `position` samples of it consumed by all ranks together, kept across a
    change of world size. So along the run's path, each epoch's samples add up to the position
    every resume reports, and an epoch ends only with less than one global batch left (the
    drop_last tail): no sample twice, none skipped."""
    consumed: dict[int, int] = {}
    position_after: dict[int, tuple[int, int]] = {}
    last_batch: dict[int, int] = {}
    for step in sorted(records):
        epoch, size = records[step]["epoch"], records[step]["world_size"]
        consumed[epoch] = consumed.get(epoch, 0) + batch_size * size
        position_after[step] = (epoch, consumed[epoch])
        last_batch[epoch] = batch_size * size
    for epoch, samples in consumed.items():
        if epoch < max(consumed):                          # completed epochs
            assert 0 <= num_windows - samples < last_batch[epoch], (epoch, samples, num_windows)
    resumes = re.findall(r"resumed from \S+ at step (\d+) \(epoch (\d+), (\d+) samples into it",
                         log_text)
    assert len(resumes) >= 2
    for step, epoch, position in resumes:
        assert position_after[int(step)] == (int(epoch), int(position)), (step, epoch, position)
