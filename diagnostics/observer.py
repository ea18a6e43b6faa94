"""The one small interface through which diagnostics watch the training step.

The trainer asks each observer `is_active(step)` once per step (an integer test). Only active
observers are called, and attention tensors are requested from the model only if one of them
`needs_attention`: with every diagnostic off, the step does no extra work and no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from model import CelestialPGAT
    from model.config import InputSpec
    from trainer.run_log import RunLog


@dataclass
class RunContext:
    """What observers may read about the run (fixed for its duration)."""

    config: Any                      # trainer.config.Config
    model: "CelestialPGAT"           # the unwrapped model
    train_model: torch.nn.Module     # what the step calls (DDP wrapper or the model)
    optimizer: torch.optim.Optimizer
    spec: "InputSpec"
    log_dir: Path
    run_log: "RunLog"
    device: torch.device
    world_size: int
    local_batch_size: int            # samples per rank per optimizer step (x accumulation)
    is_main: bool


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

    def on_start(self, run: RunContext) -> None: ...

    def is_active(self, step: int) -> bool:
        return False

    def before_forward(self, ctx: StepContext) -> None: ...

    def after_backward(self, ctx: StepContext) -> None: ...

    def before_optimizer_step(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...

    def on_validation(self, step: int, metrics: dict, evaluate_fn) -> None: ...

    def on_end(self, final_metrics: dict) -> None: ...


class ObserverGroup:
    """Fans hook calls out to the observers active on a step."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def on_start(self, run: RunContext) -> None:
        for o in self.observers:
            o.on_start(run)

    def active(self, step: int) -> list[Observer]:
        return [o for o in self.observers if o.is_active(step)]

    def on_validation(self, step: int, metrics: dict, evaluate_fn) -> None:
        for o in self.observers:
            o.on_validation(step, metrics, evaluate_fn)

    def on_end(self, final_metrics: dict) -> None:
        for o in self.observers:
            o.on_end(final_metrics)
