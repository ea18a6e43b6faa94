"""One optimizer step (`TrainStep`): forward and backward over the micro-batches, the
all-reduced gradient clipped and checked, the optimizer stepped unless it is non-finite."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from trainer.nonfinite import FiniteCheck
from trainer.observer import ObserverGroup, StepContext

NO_OBSERVERS = ObserverGroup([])


class TrainStep:
    """One optimizer step: forward/backward over the micro-batches, clip, and step (skipped if
    non-finite). Built from the config in trainer.build; the benchmarks time it on its own."""

    def __init__(self, *, model, train_model: torch.nn.Module, optimizer, scheduler, scaler,
                 device: torch.device, world_size: int, autocast_dtype,
                 cuda_graphs: bool = False) -> None:
        self.model, self.train_model = model, train_model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.device, self.world_size, self.autocast_dtype = device, world_size, autocast_dtype
        # Compiled with CUDA graphs (train.compile_mode): each forward starts a new generation,
        # so the previous step's graph outputs may be overwritten once backward has used them.
        self.cuda_graphs = cuda_graphs
        self.finite_check = FiniteCheck(model)
        self.fused_optimizer = bool(optimizer.defaults.get("fused"))

    def __call__(self, micro_batches, ctx: StepContext,
                 observers: ObserverGroup = NO_OBSERVERS) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss and the step's non-finite flags (on the device: no sync)."""
        observers.before_forward(ctx)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            syncing = i == len(micro_batches) - 1
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with self._no_sync_unless(syncing), self.autocast():
                out = self.train_model(batch.wave, batch.target, batch.future_wave,
                                       return_attention=observers.needs_attention)
                loss = out.loss(batch.future_target) / len(micro_batches)
            self.scaler.scale(self.finite_check.guard_loss(loss, batch)).backward()
            loss_sum += loss.detach()
            observers.collect(ctx, out)
        self.scaler.unscale_(self.optimizer)
        observers.after_backward(ctx)
        max_norm = ctx.clip_norm if ctx.clip_norm > 0 else math.inf
        ctx.grad_norm, part_flags = self.finite_check.clip(max_norm)
        ctx.found_inf = (~torch.isfinite(ctx.grad_norm)).float()
        observers.before_optimizer_step(ctx)
        self._optimizer_step(ctx.found_inf)
        return loss_sum, part_flags

    def _optimizer_step(self, found_inf: torch.Tensor) -> None:
        """Step unless the (all-reduced, so rank-wide) gradient is non-finite. Fused AdamW skips
        on the device from `found_inf`, with no host sync; other optimizers must read it."""
        if self.fused_optimizer:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found_inf
            self.optimizer.step()
        elif found_inf.item() == 0:
            self.optimizer.step()
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _no_sync_unless(self, syncing: bool):
        if syncing or self.world_size == 1:
            return nullcontext()
        return self.train_model.no_sync()

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
