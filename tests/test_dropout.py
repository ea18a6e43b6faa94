"""model/dropout.py: the CPU mask keeps 1 - p of the elements and the expectation exactly."""
from __future__ import annotations

import pytest
import torch

from model.dropout import Dropout, cpu_keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_the_mask_keeps_one_minus_p_and_the_scale_preserves_the_mean(p):
    keep, scale = cpu_keep_mask(torch.Size([1000, 1000]), p)
    fraction = keep.float().mean().item()
    assert fraction == pytest.approx(1 - p, abs=0.003)          # 10^6 draws: sd 0.0005
    assert abs(round((1 - p) * 65536) / 65536 - (1 - p)) < 1 / 65536
    assert scale * round((1 - p) * 65536) / 65536 == pytest.approx(1.0)


def test_training_output_and_gradient_use_the_same_mask():
    dropout = Dropout(0.2).train()
    x = torch.ones(64, 100, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], y[kept][0].item()))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad, y)


def test_evaluation_and_zero_p_are_the_identity_and_a_seed_repeats_the_mask():
    x = torch.randn(8, 16)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x
    torch.manual_seed(3)
    first = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.5).train()(x), first)


def test_bf16_inputs_stay_bf16():
    assert Dropout(0.1).train()(torch.randn(4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_probability_is_refused():
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
