"""Fault injection for the reliability tests, read from one environment variable.

`CELESTIAL_FAULT="name:arg[:arg...][@rank],..."` names the faults of a run, e.g.
`CELESTIAL_FAULT="hang:5@1"` (rank 1 stops participating before step 5) or
`CELESTIAL_FAULT="delay:resume:10,nan_grad:3:decoder"`. Without `@rank` a fault applies to every
rank; STEP is `N`, `N-M` or `N-` (from N on). Faults known here:

- `delay:PHASE:SECONDS`: sleep at the start of a phase: data_preparation, model_build, resume,
  validation, checkpoint_save
- `hang:STEP`: sleep forever before optimizer step STEP (a rank that stops participating)
- `nan_input:STEP`: a NaN in the first micro-batch's inputs at step STEP
- `nan_loss:STEP`: a NaN loss at step STEP
- `nan_grad:STEP:COMPONENT`: NaN gradients for one model component at step STEP (before DDP's
  all-reduce)
- `kill:POINT:STEP`: SIGKILL at POINT of step STEP, first attempt only (a worker torchrun
  restarts runs clean): `step` (after the step, before its checkpoint), or a stage of the step's
  save: `dcp_write` (before the sharded write), `manifest` (shards written), `rename` (manifest
  written)

The variable is parsed once, at import. Unset, `ACTIVE` is False and every hook returns at once,
so the training step pays one attribute test.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
ENV_VAR = "CELESTIAL_FAULT"


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


_faults: list[Fault] = []
ACTIVE = False


def load(text: str | None = None) -> None:
    """(Re)read the faults from `text`, or from the environment variable."""
    global _faults, ACTIVE
    _faults = parse(os.environ.get(ENV_VAR, "") if text is None else text)
    ACTIVE = bool(_faults)


def _mine(name: str) -> list[Fault]:
    from trainer import distributed  # late: faults stays importable on its own
    if not ACTIVE:
        return []
    rank = distributed.rank()
    return [f for f in _faults if f.name == name and f.rank in (None, rank)]


def _steps_match(steps: str, step: int) -> bool:
    """STEP is `N`, `N-M` (N to M) or `N-` (N on)."""
    first, dash, last = steps.partition("-")
    if not dash:
        return step == int(first)
    return int(first) <= step and (not last or step <= int(last))


def at_step(name: str, step: int) -> Fault | None:
    """The fault `name` of this rank that fires at `step` (its first argument), if any."""
    for fault in _mine(name):
        if _steps_match(fault.args[0], step):
            return fault
    return None


def delay(phase: str) -> None:
    """`delay:PHASE:SECONDS`: sleep at the start of `phase` (a window to send a signal into)."""
    for fault in _mine("delay"):
        if fault.args[0] == phase:
            log.warning("fault injection: delaying %s by %s s", phase, fault.args[1])
            time.sleep(float(fault.args[1]))


def hang(step: int) -> None:
    """`hang:STEP`: stop participating before `step`, for good (as a deadlocked rank does)."""
    if at_step("hang", step):
        log.warning("fault injection: this rank hangs before step %d", step)
        while True:
            time.sleep(3600)


def corrupt_inputs(batch, step: int) -> None:
    """`nan_input:STEP`: a NaN in the batch's look-back features (in place)."""
    if at_step("nan_input", step):
        log.warning("fault injection: NaN input at step %d", step)
        batch.wave.view(-1)[0] = math.nan


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """`nan_loss:STEP`: this rank's loss becomes NaN."""
    if at_step("nan_loss", step):
        log.warning("fault injection: NaN loss at step %d", step)
        return loss * math.nan
    return loss


def poison_gradients(model, step: int) -> list:
    """`nan_grad:STEP:COMPONENT`: hooks that turn the component's parameter gradients into NaN
    as backward computes them, before DDP all-reduces them. Remove the handles after backward."""
    fault = at_step("nan_grad", step)
    if fault is None:
        return []
    log.warning("fault injection: NaN gradients in %s at step %d", fault.args[1], step)
    params = [p for _, p in model.component_parameters()[fault.args[1]]]
    return [p.register_hook(lambda grad: torch.full_like(grad, math.nan)) for p in params]


def kill(point: str, step: int) -> None:
    """`kill:POINT:STEP`: SIGKILL this process at `point` of `step`, on the first attempt only."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    for fault in _mine("kill"):
        if fault.args[0] == point and _steps_match(fault.args[1], step):
            os.kill(os.getpid(), signal.SIGKILL)


load()
