"""The hook protocol through which plug-ins (the `diagnostics` package) watch the training step.

The trainer owns this protocol; plug-ins implement `Observer` and the entry point hands them to
the trainer (launch/train.py). The loop talks to one `ObserverGroup`, which owns every hook
call: it picks the observers active on a step (an integer test each), calls them, and asks the
model for attention only if an active one `needs_attention`. With no observer active the step
does no extra work and no host sync.

Ranks must call the same collectives in the same order, so `is_active(step)` depends on the step
alone: every rank runs the same observers on the same steps (the group compares their schedules
at the start and switches off any that differ). An observer that raises is reported and switched
off on every rank at the same step (one small all-reduce on the CPU control group after a step
on which observers ran), and the run goes on. Observers whose hooks run collectives declare
`communicates = True`: such an observer must raise, if at all, on every rank alike or after its
last collective, since one rank leaving a collective half-way would leave the others waiting in
it before any agreement; when one raises, the log says so, so that a hang that follows is
explained.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch._dynamo.eval_frame import OptimizedModule

from trainer import distributed

if TYPE_CHECKING:
    from model import CelestialPGAT
    from model.config import InputSpec
    from trainer.config import Config
    from trainer.run_log import RunLog

log = logging.getLogger(__name__)
MID_COLLECTIVE = (" (it runs collectives: if it raised between two of them on this rank only, "
                  "the other ranks wait in the next one until the collective timeout)")
ACTIVITY_CHECK_STEPS = 10_000   # steps over which the ranks compare the observers' schedules
# Exit status of a run an observer stopped at a validation (a search pruned the trial): no
# checkpoint, no test; the run is not to be resumed.
EXIT_PRUNED = 76


@dataclass(kw_only=True)
class RunContext:
    """What observers may read about the run (fixed for its duration)."""

    config: Config
    model: CelestialPGAT           # the unwrapped model
    train_model: torch.nn.Module     # what the step calls (DDP wrapper or the model)
    optimizer: torch.optim.Optimizer
    spec: InputSpec
    log_dir: Path
    run_log: RunLog
    device: torch.device
    world_size: int
    local_batch_size: int            # samples per rank per optimizer step (x accumulation)
    is_main: bool

    @property
    def compiled(self) -> bool:
        """Whether the step runs a torch.compile'd model: False when `train.compile` is off and
        also when compiling failed and the run went on with the eager model."""
        return any(isinstance(m, OptimizedModule) for m in self.train_model.modules())


@dataclass
class StepContext:
    """One optimizer step as observers see it."""

    step: int                        # the optimizer step being taken (1-based)
    epoch: int
    attention: list[dict] = field(default_factory=list)  # one dict per micro-batch, if requested
    grad_norm: torch.Tensor | None = None   # global L2 norm before clipping (all ranks agree)
    clip_norm: float = 0.0
    lr: float = 0.0
    found_inf: torch.Tensor | None = None   # 1.0 if the step was skipped as non-finite
    step_time_s: float = 0.0
    data_time_s: float = 0.0


class Observer:
    """Base observer: every hook is a no-op."""

    needs_attention = False
    communicates = False    # True if a hook runs collectives (see the module docstring)

    def on_start(self, run: RunContext) -> None: ...

    def is_active(self, step: int) -> bool:
        return False

    def before_forward(self, ctx: StepContext) -> None: ...

    def after_backward(self, ctx: StepContext) -> None: ...

    def before_optimizer_step(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...

    def on_validation(self, step: int, metrics: dict, evaluate_fn) -> None: ...

    def asks_to_stop(self) -> bool:
        """Asked after each validation: True stops the run there, as pruned (EXIT_PRUNED)."""
        return False

    def on_end(self, final_metrics: dict) -> None: ...


ObserverFactory = Callable[["Config"], "list[Observer]"]   # the config -> the observers it turns on


class ObserverGroup:
    """Every hook call of the loop goes through here (see the module docstring)."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = list(observers)
        self.active: list[Observer] = []
        self.failed_here: set[int] = set()    # indices in self.observers of those that raised

    @property
    def needs_attention(self) -> bool:
        """Whether an observer active on this step reads the attention weights."""
        return any(o.needs_attention for o in self.active)

    def on_start(self, run: RunContext) -> None:
        self._call_all(self.observers, "on_start", run)
        self.agree_on_failures("the start")
        self._switch_off_unaligned_schedules()

    def start_step(self, step: int) -> None:
        self.active = [o for o in self.observers if o.is_active(step)]

    def before_forward(self, ctx: StepContext) -> None:
        self._call_all(self.active, "before_forward", ctx)

    def collect(self, ctx: StepContext, out) -> None:
        """Keep what the active observers read from a micro-batch's forward (attention)."""
        if self.needs_attention:
            ctx.attention.append(out.attention)

    def after_backward(self, ctx: StepContext) -> None:
        self._call_all(self.active, "after_backward", ctx)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        self._call_all(self.active, "before_optimizer_step", ctx)

    def after_step(self, ctx: StepContext) -> None:
        """The step's last hook; then the ranks agree on failures (only if observers ran)."""
        ran = bool(self.active)
        self._call_all(self.active, "after_step", ctx)
        self.active = []
        if ran:
            self.agree_on_failures(f"step {ctx.step}")

    def on_validation(self, step: int, metrics: dict, evaluate_fn) -> bool:
        """Every observer sees the validation; returns whether one of them, on any rank, asks
        the run to stop (agreed by all ranks)."""
        self._call_all(self.observers, "on_validation", step, metrics, evaluate_fn)
        self.agree_on_failures(f"the validation at step {step}")
        if not self.observers:
            return False
        return distributed.agree_any([any(self._asks_to_stop(o) for o in self.observers)])[0]

    def _asks_to_stop(self, observer: Observer) -> bool:
        try:
            return bool(observer.asks_to_stop())
        except Exception:
            log.warning("observer %s raised in asks_to_stop: the run goes on",
                        type(observer).__name__, exc_info=True)
            return False

    def on_end(self, final_metrics: dict) -> None:
        self._call_all(self.observers, "on_end", final_metrics)
        self.agree_on_failures("the end")

    def _call_all(self, observers: list[Observer], hook: str, *args) -> None:
        for observer in observers:
            index = self.observers.index(observer)
            if index in self.failed_here:
                continue      # it raised earlier in this step: not called again before agreeing
            try:
                getattr(observer, hook)(*args)
            except Exception:
                self.failed_here.add(index)
                log.warning("observer %s raised in %s on rank %d: it is switched off on every "
                            "rank; training goes on%s", type(observer).__name__, hook,
                            distributed.rank(), MID_COLLECTIVE if observer.communicates else "",
                            exc_info=True)

    def agree_on_failures(self, when: str) -> None:
        """Every rank switches off each observer that raised on any rank (one all-reduce)."""
        if not self.observers:
            return
        failed = set().union(*distributed.agree_on_failure(self.failed_here or None))
        if failed:
            self._switch_off([o for i, o in enumerate(self.observers) if i in failed],
                             f"raised on some rank before {when}")
        self.failed_here = set()

    def _switch_off_unaligned_schedules(self) -> None:
        """An observer active on different steps on different ranks would leave ranks waiting
        in its collectives or in the failure agreement: the ranks compare schedules (over the
        first ACTIVITY_CHECK_STEPS steps) and switch such observers off."""
        if not self.observers:
            return
        horizon = range(1, ACTIVITY_CHECK_STEPS + 1)
        schedules = [(type(o).__name__, [s for s in horizon if o.is_active(s)])
                     for o in self.observers]
        by_rank = distributed.all_gather_object(schedules)
        assert all(len(theirs) == len(schedules) for theirs in by_rank), "observer lists differ"
        unaligned = [o for i, o in enumerate(self.observers)
                     if any(theirs[i] != schedules[i] for theirs in by_rank)]
        self._switch_off(unaligned, "is active on different steps on different ranks")

    def _switch_off(self, observers: list[Observer], why: str) -> None:
        for observer in observers:
            if distributed.is_main():
                log.error("observer %s %s: switched off on every rank", type(observer).__name__,
                          why)
            self.observers.remove(observer)
