"""Stop signals at awkward moments and hung ranks.

A signal during data preparation, model build or resume exits 75 with no new checkpoint; one
during validation or a checkpoint save finishes that and checkpoints once; two in a row still
give one checkpoint; the last signal decides the requeue (USR1 then TERM: none). A rank that
stops participating makes the others fail within train.collective_timeout_s with one line.
Slow phases and the hang come from trainer/faults.py (CELESTIAL_FAULT)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests import dist_workers
from tests.conftest import REPO, as_cli_args, small_overrides
from tests.dist_workers import free_port
from tests.processes import train_command, wait_until
from trainer import distributed, faults
from trainer.checkpoint.manager import verify
from trainer.preemption import StopRequests


def test_the_last_stop_signal_decides_the_requeue():
    requests = StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)      # scancel after the time-limit warning
        assert requests.stop_signal == signal.SIGTERM and requests.cancel and not requests.requeue
        os.kill(os.getpid(), signal.SIGUSR1)
        assert requests.requeue and not requests.cancel
    finally:
        requests.uninstall()
    assert requests.stop_signal is None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_fault_spec_is_parsed_once_into_per_rank_entries():
    parsed = faults.parse("hang:5@1, delay:resume:2.5,nan_loss:3-")
    assert parsed == [faults.Fault("hang", ("5",), 1),
                      faults.Fault("delay", ("resume", "2.5"), None),
                      faults.Fault("nan_loss", ("3-",), None)]
    plan = faults.from_text("nan_loss:3-5,hang:2@1")
    flags = [bool(plan.at_step("nan_loss", s)) for s in (2, 3, 5, 6)]
    assert flags == [False, True, True, False]
    assert plan.at_step("hang", 2) is None          # rank 1 only; this process is rank 0
    assert faults.from_text("") is faults.no_faults


def test_without_faults_the_model_gets_no_hooks():
    """Off, the hook does nothing: no PyTorch hook on the model or its parameters."""
    from tests.test_model import make_model
    model = make_model()
    faults.from_text("")("model_built", model=model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(p._backward_hooks for p in model.parameters())
    faults.from_text("nan_loss:3,nan_input:2")("model_built", model=model)
    assert model._forward_pre_hooks and model._forward_hooks


# ------------------------------------------------------------------ runs of the CLI
def _args(csv, root, name, **extra) -> list[str]:
    return as_cli_args(small_overrides(csv, root, name) +
                       [(k.replace("__", "."), v) for k, v in extra.items()])


def _fake_slurm(tmp_path: Path) -> dict:
    """SLURM_JOB_ID and an `scontrol` that records its calls: shows whether a requeue happened."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol_calls'}\n")
    script.chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}


class _Console:
    """A process's console output, read as it comes (with the time each line arrived): the log
    file gets the lines of data preparation, model build and resume only once the run folder
    is opened, after those phases, so a wait on the file would signal too late."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, text: str, timeout: float = 120) -> float:
        """When the first line holding `text` arrived."""
        return wait_until(lambda: self.arrival(text), f"{text!r} on the console",
                          timeout=timeout, alive=self.reading, output=self.text, interval=0.05)

    def arrival(self, text: str) -> float | None:
        return next((at for at, line in list(self.lines) if text in line), None)

    def reading(self) -> bool:
        """Whether more lines may come: the process runs, or its last lines are still read."""
        return self.proc.poll() is None or self.reader.is_alive()

    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))


def _start(args, fault: str = "", ranks: int = 0, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(train_command(args, ranks), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CELESTIAL_FAULT": fault,
                                 **(env or {})})
    proc.console, proc.fault = _Console(proc), fault
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    proc.console.reader.join(timeout=30)
    return proc.returncode, proc.console.text()


def _held(phase: str, tmp_path: Path) -> str:
    """The fault that holds `phase` until _signal_during lets it go on."""
    return f"hold:{phase}:{tmp_path / 'release'}"


def _signal_during(proc, phase: str, *signals, target=None, holders: int = 1) -> tuple[int, str]:
    """Send `signals` (to `target`, default the process) while `phase` is held (`_held`, in
    `holders` processes), each once the one before it was handled, then let the phase go on."""
    console = proc.console
    wait_until(lambda: console.text().count(f"fault injection: holding {phase}") >= holders,
               f"{holders} process(es) holding {phase}", timeout=120, alive=console.reading,
               output=console.text)
    for sig in signals:
        _signal_and_wait(proc, target or proc, sig, phase)
    release = Path(proc.fault.rpartition(":")[2])
    release.touch()
    try:
        return _finish(proc)
    finally:
        release.unlink()        # the next run's phase is held again


def _signal_and_wait(proc, target, sig: signal.Signals, phase: str) -> None:
    """Send `sig` to `target` (proc or one of its workers); return once the held phase has
    logged it handled, or proc has ended (as after a second Ctrl-C)."""
    handled = f"fault injection: {sig.name} received during {phase}"
    before = proc.console.text().count(handled)
    target.send_signal(sig)
    wait_until(lambda: proc.console.text().count(handled) > before or proc.poll() is not None,
               f"{handled!r} on the console", timeout=120, output=proc.console.text)


def _checkpoints(root: Path, name: str) -> list[str]:
    folder = root / "checkpoints" / name
    found = sorted(p.name for p in folder.glob("checkpoint_step_*")) if folder.is_dir() else []
    assert all(verify(folder / f) is None for f in found), found      # complete, no .tmp left
    return found


@pytest.mark.slow
@pytest.mark.parametrize("phase, sig", [("data_preparation", signal.SIGUSR1),
                                        ("model_build", signal.SIGTERM)])
def test_signal_before_training_exits_75_without_checkpoint(short_csv, tmp_path, phase, sig):
    name = f"early_{phase}"
    proc = _start(_args(short_csv, tmp_path, name, train__max_steps=50), _held(phase, tmp_path),
                  env=_fake_slurm(tmp_path))
    code, out = _signal_during(proc, phase, sig)
    assert code == 75, out[-3000:]
    assert "before any training step: exiting without a new checkpoint" in out
    assert _checkpoints(tmp_path, name) == [] and "Traceback" not in out
    requeued = (tmp_path / "scontrol_calls").is_file()
    assert requeued == (sig == signal.SIGUSR1), out[-2000:]


@pytest.mark.slow
def test_signals_at_awkward_moments_leave_one_checkpoint_each_and_resume(short_csv, tmp_path):
    """One run, stopped three times and resumed: during a validation (-> one checkpoint at that
    step), during the resume (-> no new one), USR1 then TERM during a checkpoint save (-> still
    one checkpoint, no requeue); then it finishes."""
    log = tmp_path / "logs" / "awk" / "training_full.log"
    common = {"train__max_steps": 7, "train__eval_interval": 3,
              "train__validate_at_start": False, "checkpoint__interval": 5}
    proc = _start(_args(short_csv, tmp_path, "awk", **common), _held("validation", tmp_path))
    code, out = _signal_during(proc, "validation", signal.SIGTERM)
    assert code == 75 and _checkpoints(tmp_path, "awk") == ["checkpoint_step_000003"], out[-3000:]

    resume = _args(short_csv, tmp_path, "awk", **common) + ["--resume", "auto"]
    code, out = _signal_during(_start(resume, _held("resume", tmp_path)), "resume",
                               signal.SIGTERM)
    assert code == 75 and "before any training step" in out, out[-3000:]
    assert _checkpoints(tmp_path, "awk") == ["checkpoint_step_000003"]

    slurm = _fake_slurm(tmp_path)
    proc = _start(resume, _held("checkpoint_save", tmp_path), env=slurm)
    code, out = _signal_during(proc, "checkpoint_save", signal.SIGUSR1, signal.SIGTERM)
    assert code == 75 and "stop requested (signal) at step 5" in out, out[-3000:]
    assert _checkpoints(tmp_path, "awk") == ["checkpoint_step_000003", "checkpoint_step_000005"]
    assert not (tmp_path / "scontrol_calls").exists() and "stopped on SIGTERM" in out

    code, out = _finish(_start(resume))
    assert code == 0 and "resumed from" in out and "at step 5" in out, out[-3000:]
    assert "finished at step 7" in log.read_text()


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_75_and_a_second_one_stops_at_once(short_csv, tmp_path):
    """Ctrl-C during a save is a stop request like SIGTERM: the checkpoint completes and the run
    exits 75, with no write failure ("make room", exit 74) and no KeyboardInterrupt traceback."""
    args = _args(short_csv, tmp_path, "ctrl_c", train__max_steps=50, checkpoint__interval=4,
                 train__validate_at_start=False)
    code, out = _signal_during(_start(args, _held("checkpoint_save", tmp_path)),
                               "checkpoint_save", signal.SIGINT)
    assert code == 75 and "stopped on SIGINT" in out, out[-3000:]
    assert "make room" not in out and "Traceback" not in out
    assert _checkpoints(tmp_path, "ctrl_c") == ["checkpoint_step_000004"]

    resume = args + ["--resume", "auto"]
    proc = _start(resume, _held("checkpoint_save", tmp_path))
    code, out = _signal_during(proc, "checkpoint_save", signal.SIGINT, signal.SIGINT)
    assert code == 130 and out.strip().splitlines()[-1].startswith("error: interrupted twice")
    assert "Traceback" not in out and "make room" not in out, out[-3000:]
    assert _checkpoints(tmp_path, "ctrl_c")[0] == "checkpoint_step_000004"


@pytest.mark.slow
def test_two_signals_to_one_rank_during_a_save_on_two_ranks(short_csv, tmp_path):
    """torchrun, 2 gloo ranks: USR1 then TERM to rank 1 while the step-4 checkpoint is being
    saved -> both ranks stop after it with status 75, one checkpoint, no requeue."""
    args = _args(short_csv, tmp_path, "pair", train__max_steps=50, checkpoint__interval=4,
                 train__validate_at_start=False, train__log_interval=2)
    proc = _start(args, _held("checkpoint_save", tmp_path), ranks=2, env=_fake_slurm(tmp_path))
    log = tmp_path / "logs" / "pair" / "training_full.log"
    proc.console.wait_for("fault injection: holding checkpoint_save")
    workers = [c for c in psutil.Process(proc.pid).children()
               if "train.py" in " ".join(c.cmdline())]
    code, out = _signal_during(proc, "checkpoint_save", signal.SIGUSR1, signal.SIGTERM,
                               target=workers[-1], holders=2)
    assert code != 0 and out.count("exitcode  : 75") >= 1, out[-3000:]
    assert "stop requested (signal) at step 4" in log.read_text()
    assert _checkpoints(tmp_path, "pair") == ["checkpoint_step_000004"]
    assert not (tmp_path / "scontrol_calls").exists()


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_within_the_timeout(short_csv, tmp_path):
    """Rank 1 stops participating before step 3 (sleeps for ever). Rank 0 must end through
    train.collective_timeout_s (10 s here, read back from every process group) with one line
    naming the timeout and what to do, exit status 1, no traceback. Two real ranks started as
    torchrun would (RANK etc.)."""
    args = _args(short_csv, tmp_path, "hang", train__max_steps=20, train__collective_timeout_s=10,
                 train__validate_at_start=False, train__log_interval=1)
    port, procs = free_port(), []
    for rank in range(2):
        procs.append(_start(args, "hang:3@1", env={
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}))
    try:
        procs[1].console.wait_for("this rank hangs before step 3")
        code, out = _finish(procs[0], timeout=120)
        assert procs[1].poll() is None          # the hung rank is still hanging
    finally:
        procs[1].kill()
        _finish(procs[1])
    assert code == 1, out[-3000:]
    assert ("collective timeout (train.collective_timeout_s): 10 s on every process group"
            in out), out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in out, out[-3000:]
    assert "train.collective_timeout_s=10 s" in error[0]
    assert "raise train.collective_timeout_s" in error[0]


def report_group_timeouts(rank, world_size, port, out_dir):
    dist_workers.join_group(rank, world_size, port)      # timeout_s=60
    distributed.enable_async_checkpoint_group()
    (Path(out_dir) / f"timeouts{rank}.json").write_text(json.dumps(distributed.group_timeouts()))
    distributed.destroy()


@pytest.mark.slow
def test_every_process_group_gets_the_collective_timeout(tmp_path):
    """The async-checkpoint group included: a group created without a timeout would get
    torch's 30-minute default."""
    dist_workers.spawn(report_group_timeouts, 2, str(tmp_path), timeout_s=120)
    for rank in range(2):
        timeouts = json.loads((tmp_path / f"timeouts{rank}.json").read_text())
        assert timeouts == {"default": 60.0, "checkpoint": 60.0}
