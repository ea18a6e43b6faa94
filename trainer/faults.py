"""Fault injection for the reliability tests: one hook the trainer calls at named points.

`CELESTIAL_FAULT="name:arg[:arg...][@rank],..."` names the faults of a run, e.g.
`CELESTIAL_FAULT="hang:5@1"` (rank 1 stops participating before step 5) or
`CELESTIAL_FAULT="delay:resume:10,nan_grad:3:decoder"`. Without `@rank` a fault applies to every
rank; STEP is `N`, `N-M` or `N-` (from N on). Faults known here:

- `delay:PHASE:SECONDS`: sleep at the start of a phase: data_preparation, model_build, resume,
  validation, checkpoint_save
- `hold:PHASE:PATH`: hold at the start of a phase until the file PATH exists, logging each stop
  or save request the process has received (a test signals a run inside a phase and knows each
  signal was handled before it sends the next or lets the phase go on)
- `hang:STEP`: sleep forever before optimizer step STEP (a rank that stops participating)
- `nan_input:STEP`: a NaN in the first micro-batch's inputs at step STEP
- `nan_loss:STEP`: a NaN loss at step STEP
- `nan_grad:STEP:COMPONENT`: NaN gradients for one model component at step STEP (before DDP's
  all-reduce)
- `kill:POINT:STEP`: SIGKILL at POINT of step STEP, first attempt only (a worker torchrun
  restarts runs clean): `step` (after the step, before its checkpoint), or a stage of the step's
  save: `dcp_write` (before the sharded write), `manifest` (shards written), `rename` (manifest
  written)

The product calls `hook(point, step)` at the points of POINTS, and once `hook("model_built",
model=model)`: the NaN faults act through the model's own PyTorch hooks, so the training step
has no branch for them. `from_environment()` reads the variable when a run is built; unset, the
hook is `no_faults`, which does nothing and installs nothing on the model.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ENV_VAR = "CELESTIAL_FAULT"
DELAY_PHASES = ("data_preparation", "model_build", "resume", "validation", "checkpoint_save")
KILL_POINTS = ("dcp_write", "manifest", "rename")
POINTS = (*DELAY_PHASES, "model_built", "before_step", "after_step", *KILL_POINTS)

# hook(point, step=0, model=None): called by the product at each point of POINTS
FaultHook = Callable[..., None]


@dataclass(frozen=True)
class Fault:
    name: str
    args: tuple[str, ...]
    rank: int | None          # None: every rank


def parse(text: str) -> list[Fault]:
    """`name:arg:...[@rank]` entries separated by commas (see the module docstring)."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        body, _, rank = entry.partition("@")
        name, *args = body.split(":")
        faults.append(Fault(name, tuple(args), int(rank) if rank else None))
    return faults


def no_faults(point: str, step: int = 0, model: torch.nn.Module | None = None) -> None:
    """The hook of a run without faults: nothing happens at any point."""


def from_text(text: str) -> FaultHook:
    """The hook for the faults `text` names (`no_faults` for none)."""
    faults = parse(text)
    return FaultPlan(faults) if faults else no_faults


def from_environment() -> FaultHook:
    return from_text(os.environ.get(ENV_VAR, ""))


def _request_name(request: tuple[int | None, bool]) -> str:
    """(stop signal, save requested) -> the name of the newest: SIGTERM, SIGUSR2 (save now)."""
    stop_signal, save_now = request
    return "SIGUSR2" if save_now else signal.Signals(stop_signal).name


def _steps_match(steps: str, step: int) -> bool:
    """STEP is `N`, `N-M` (N to M) or `N-` (N on)."""
    first, dash, last = steps.partition("-")
    if not dash:
        return step == int(first)
    return int(first) <= step and (not last or step <= int(last))


class FaultPlan:
    """The faults of one run, fired at the points the product reaches."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.step = 0          # the optimizer step being taken; 0 outside a training step
        self.inputs_corrupted_at = self.gradients_poisoned_at = 0

    def __call__(self, point: str, step: int = 0, model: torch.nn.Module | None = None) -> None:
        if point in DELAY_PHASES:
            self.delay(point)
            self.hold(point)
        elif point == "model_built":
            self.attach(model)
        elif point == "before_step":
            self.hang(step)
            self.step = step
        elif point == "after_step":
            self.step = 0
            self.kill("step", step)
        elif point in KILL_POINTS:
            self.kill(point, step)

    def mine(self, name: str) -> list[Fault]:
        from trainer import distributed  # late: faults stays importable on its own
        rank = distributed.rank()
        return [f for f in self.faults if f.name == name and f.rank in (None, rank)]

    def at_step(self, name: str, step: int) -> Fault | None:
        """The fault `name` of this rank that fires at `step` (its first argument), if any."""
        return next((f for f in self.mine(name) if _steps_match(f.args[0], step)), None)

    def delay(self, phase: str) -> None:
        """`delay:PHASE:SECONDS`: sleep at the start of `phase` (a window to send a signal)."""
        for fault in self.mine("delay"):
            if fault.args[0] == phase:
                log.warning("fault injection: delaying %s by %s s", phase, fault.args[1])
                time.sleep(float(fault.args[1]))

    def hold(self, phase: str) -> None:
        """`hold:PHASE:PATH`: wait at the start of `phase` until PATH exists; each stop signal
        and save request received so far is logged once, as the handlers recorded it."""
        from trainer.preemption import process_requests  # late: only when a hold is asked for
        for fault in self.mine("hold"):
            if fault.args[0] != phase:
                continue
            release, requests, logged = Path(fault.args[1]), process_requests(), (None, False)
            log.warning("fault injection: holding %s until %s exists", phase, release)
            while not release.exists():
                seen = (requests.stop_signal, requests.save_now)
                if seen != logged:
                    log.warning("fault injection: %s received during %s", _request_name(seen),
                                phase)
                    logged = seen
                time.sleep(0.02)

    def hang(self, step: int) -> None:
        """`hang:STEP`: stop participating before `step`, for good (as a deadlocked rank)."""
        if self.at_step("hang", step):
            log.warning("fault injection: this rank hangs before step %d", step)
            while True:
                time.sleep(3600)

    def kill(self, point: str, step: int) -> None:
        """`kill:POINT:STEP`: SIGKILL this process at `point` of `step`, first attempt only."""
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        for fault in self.mine("kill"):
            if fault.args[0] == point and _steps_match(fault.args[1], step):
                os.kill(os.getpid(), signal.SIGKILL)

    def attach(self, model: torch.nn.Module) -> None:
        """The NaN faults of this rank, as hooks on the model that act within their steps."""
        if self.mine("nan_input"):
            model.register_forward_pre_hook(self.corrupt_inputs)
        if self.mine("nan_loss"):
            model.register_forward_hook(self.corrupt_loss)
        for fault in self.mine("nan_grad"):
            for _, param in model.component_parameters()[fault.args[1]]:
                param.register_hook(partial(self.poison_gradient, fault))

    def corrupt_inputs(self, model: torch.nn.Module, args: tuple) -> None:
        """`nan_input:STEP`: a NaN in the first micro-batch's look-back features (in place)."""
        step = self.step
        if step and step != self.inputs_corrupted_at and self.at_step("nan_input", step):
            self.inputs_corrupted_at = step
            log.warning("fault injection: NaN input at step %d", step)
            args[0].view(-1)[0] = math.nan

    def corrupt_loss(self, model: torch.nn.Module, args: tuple, out) -> None:
        """`nan_loss:STEP`: this rank's loss becomes NaN (through the output's auxiliary loss,
        which every micro-batch's loss adds)."""
        if self.step and self.at_step("nan_loss", self.step):
            log.warning("fault injection: NaN loss at step %d", self.step)
            out.aux_loss = out.aux_loss * math.nan

    def poison_gradient(self, fault: Fault, grad: torch.Tensor) -> torch.Tensor | None:
        """`nan_grad:STEP:COMPONENT`: the component's gradients become NaN as backward computes
        them, before DDP all-reduces them."""
        if not (self.step and _steps_match(fault.args[0], self.step)):
            return None
        if self.gradients_poisoned_at != self.step:
            self.gradients_poisoned_at = self.step
            log.warning("fault injection: NaN gradients in %s at step %d", fault.args[1],
                        self.step)
        return torch.full_like(grad, math.nan)
