"""The optimizer's parameter groups and the learning-rate schedule as actually applied."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.optim import OptimConfig, build_optimizer, build_scheduler, lr_multiplier


def test_lr_follows_warmup_then_cosine():
    config = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    total = 110
    scheduler = build_scheduler(optimizer, config, total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-4)                 # (0 + 1) / 10 of the peak
    assert seen[9] == pytest.approx(1e-3)                 # end of warmup
    assert all(a < b for a, b in zip(seen[:10], seen[1:10]))
    assert all(a >= b for a, b in zip(seen[10:], seen[11:]))
    mid = 10 + 50
    expected_mid = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert seen[mid] == pytest.approx(expected_mid)
    assert seen[-1] == pytest.approx(1e-3 * lr_multiplier(total - 1, 10, total, 0.1))
    assert lr_multiplier(total, 10, total, 0.1) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_fused_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.ndim for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3
    assert optimizer.defaults["fused"]


def test_foreach_implementation_can_be_chosen():
    optimizer = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(implementation="foreach"),
                                torch.device("cpu"))
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
