"""Dropout with a cheaper mask on CPU.

nn.Dropout draws one Bernoulli sample per element with a scalar loop; on a 2-core CPU that was
the largest cost of the production step outside the matrix products (21 ms of 163, fp32,
benchmarks/profile_step.py). Here each 64-bit draw of torch's generator gives four 16-bit
uniforms, and an element is kept when its uniform is below round((1 - p) * 65536): p is exact
to 1/65536, and the kept values are scaled by the inverse of that kept fraction, so the
expectation is exact. On other devices, and when p is 0 or the module is evaluating, this is
nn.functional.dropout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def cpu_keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """(keep mask, scale of the kept values) from torch's default CPU generator."""
    num_elements = math.prod(shape)
    words = torch.randint(-2**63, 2**63 - 1, ((num_elements + 3) // 4,), dtype=torch.int64)
    threshold = round((1 - p) * _LEVELS)
    uniforms = words.view(torch.int16)[:num_elements].view(shape)      # in [-32768, 32767]
    return uniforms < threshold - _LEVELS // 2, _LEVELS / threshold


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep, scale = cpu_keep_mask(x.shape, self.p)
        return x * keep.to(x.dtype).mul_(scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
