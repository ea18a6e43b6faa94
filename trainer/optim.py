"""AdamW with decoupled weight decay, linear warmup then cosine decay."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1          # final LR = lr * min_lr_ratio
    grad_clip_norm: float = 1.0        # 0 disables clipping (the norm is still measured)
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"optim.grad_clip_norm must be >= 0, got {self.grad_clip_norm}")


def _decays(name: str, param: nn.Parameter) -> bool:
    """Matrices decay; biases, norms and 1-D embeddings do not."""
    return param.ndim >= 2 and "norm" not in name


def build_optimizer(model: nn.Module, config: OptimConfig,
                    device: torch.device) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if _decays(n, p)],
               "weight_decay": config.weight_decay},
              {"params": [p for n, p in params if not _decays(n, p)], "weight_decay": 0.0}]
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             fused=impl == "fused" or None, foreach=impl == "foreach" or None)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then cosine from 1 to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """The schedule as an object: LambdaLR checkpoints its attributes, and a resumed run whose
    length changed can set `total_steps`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup_steps, max(0, self.total_steps - 1))
        return lr_multiplier(step, warmup, self.total_steps, self.min_lr_ratio)


def build_scheduler(optimizer, config: OptimConfig, total_steps: int):
    schedule = WarmupCosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def set_total_steps(scheduler, total_steps: int) -> None:
    for schedule in scheduler.lr_lambdas:
        schedule.total_steps = total_steps


def apply_optim_settings(optimizer, scheduler, config: OptimConfig) -> None:
    """Put the run's `optim.*` into an optimizer and schedule restored from a checkpoint (which
    carry the values they were saved with). Group order is build_optimizer's: decay, no decay."""
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(config.betas), config.eps
        group["initial_lr"] = config.lr
        # loading a state dict restored the saved groups' implementation flags too
        group["fused"] = optimizer.defaults["fused"]
        group["foreach"] = optimizer.defaults["foreach"]
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for schedule in scheduler.lr_lambdas:
        schedule.warmup_steps, schedule.min_lr_ratio = config.warmup_steps, config.min_lr_ratio
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = config.lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
