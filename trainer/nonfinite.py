"""Which part of a training step went non-finite, found with no host sync on healthy steps.

Each step leaves one small device tensor of flags, one per part: `inputs`, `loss` (this rank's),
then each model component's gradient (after DDP's all-reduce, so the same on every rank). They
come from one fused norm over the gradients (the same per-tensor norms clipping needs anyway), a
norm of the batch and a test of the loss. The trainer reads them only for steps it skipped, at
the next log step, where it reads the skip flags anyway.

A non-finite loss or input on one rank must skip the step on every rank: `guard_loss` scales the
loss by NaN then (by 1.0 otherwise: the gradient is bitwise unchanged), so the NaN reaches every
gradient and DDP's all-reduce carries it to every rank, with no extra collective.
"""
from __future__ import annotations

import math

import torch

from model import CelestialPGAT

INPUTS, LOSS = "inputs", "loss"


class FiniteCheck:
    """Clips gradients as `clip_grad_norm_` does and records which parts were non-finite."""

    def __init__(self, model: CelestialPGAT) -> None:
        groups = model.component_parameters()
        self.components = list(groups)                 # forward order (COMPONENT_NAMES)
        self.names = [INPUTS, LOSS, *self.components]
        component_of = {id(p): i for i, params in enumerate(groups.values()) for _, p in params}
        self.params = list(model.parameters())         # clip_grad_norm_'s order: same sums
        self.component_index = [component_of[id(p)] for p in self.params]
        # Made here, once: a copy to the GPU inside the step would wait for it.
        self._index = torch.tensor(self.component_index, device=self.params[0].device)
        self._bad_inputs = self._bad_loss = None

    def guard_loss(self, loss: torch.Tensor, batch) -> torch.Tensor:
        """The loss to back-propagate: NaN if this micro-batch's inputs or loss are not finite."""
        bad_inputs = ~torch.isfinite(torch.stack(torch._foreach_norm(list(batch)))).all()
        bad_loss = ~torch.isfinite(loss)
        self._bad_inputs = bad_inputs if self._bad_inputs is None else self._bad_inputs | bad_inputs
        self._bad_loss = bad_loss if self._bad_loss is None else self._bad_loss | bad_loss
        return loss * torch.where(bad_inputs | bad_loss, math.nan, 1.0)

    def clip(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip to `max_norm`; return the total norm before clipping and this step's flags."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norms_G = torch.stack(torch._foreach_norm(grads))
        total = torch.linalg.vector_norm(norms_G)
        torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, total, foreach=True)
        bad_C = torch.zeros(len(self.components), device=total.device)
        bad_G = (~torch.isfinite(norms_G)).float()
        bad_C.index_add_(0, self._index_for(grads, total.device), bad_G)
        bad_C.clamp_(max=1.0)       # counts -> flags
        flags = torch.cat([self._bad_inputs.float().view(1), self._bad_loss.float().view(1), bad_C])
        self._bad_inputs = self._bad_loss = None
        return total, flags

    def _index_for(self, grads: list, device: torch.device) -> torch.Tensor:
        """Component of each gradient in `grads`."""
        if len(grads) != len(self.params):     # a parameter without gradient: rare
            index = [c for p, c in zip(self.params, self.component_index) if p.grad is not None]
            return torch.tensor(index, device=device)
        return self._index


def describe_skip(names: list[str], flags_by_rank: list[list[float]]) -> dict:
    """What went non-finite in one skipped step, from every rank's flags (names as in
    FiniteCheck.names). `component` is the first part to go non-finite: the inputs, else the
    loss, else the gradient reached first by back-propagation (the last in forward order: a
    non-finite gradient spreads from there to everything before it)."""
    bad_ranks = {name: [r for r, flags in enumerate(flags_by_rank) if flags[i]]
                 for i, name in enumerate(names[:2])}
    components = [name for name, flag in zip(names[2:], flags_by_rank[0][2:]) if flag]
    if bad_ranks[INPUTS]:
        cause, ranks = INPUTS, bad_ranks[INPUTS]
    elif bad_ranks[LOSS]:
        cause, ranks = LOSS, bad_ranks[LOSS]
    else:
        cause, ranks = "gradient", []
    first = components[-1] if cause == "gradient" and components else cause
    return {"cause": cause, "component": first, "ranks": ranks, "nonfinite_components": components}


def skip_message(step: int, skip: dict) -> str:
    """One log line for a skipped step."""
    if skip["cause"] == "gradient":
        others = [c for c in skip["nonfinite_components"] if c != skip["component"]]
        also = f" (then also: {', '.join(reversed(others))})" if others else ""
        return (f"step {step} skipped: non-finite gradient, first in component "
                f"{skip['component']}{also}")
    ranks = ", ".join(str(r) for r in skip["ranks"])
    return f"step {step} skipped: non-finite {skip['cause']} on rank {ranks}"
