"""Attention statistics: entropies and maps from known weights."""
from __future__ import annotations

import math

import pytest
import torch

from diagnostics.attention import attention_sums, summarize

TARGETS, BODIES = ["A", "B"], ["Sun", "Moon", "Mars"]


def attention(fusion, c2t, gates):
    return {"fusion": fusion, "c2t": c2t, "graph_gates": gates}


def test_uniform_fusion_has_normalized_entropy_one_and_one_hot_zero():
    B, H, L = 3, 2, 10
    uniform = torch.full((B, H, L), 1.0 / L)
    one_hot = torch.zeros(B, H, L)
    one_hot[..., 4] = 1.0
    c2t = torch.full((B, 5, 2, 4, 3), 1.0 / 3)
    gates = torch.full((B, 3), 1.0 / 3)
    for fusion, expected in ((uniform, 1.0), (one_hot, 0.0)):
        sums, layout = attention_sums([attention(fusion, c2t, gates)])
        summary = summarize(sums, layout, TARGETS, BODIES, top_k=2)
        assert summary["fusion"]["normalized_entropy"] == pytest.approx(expected, abs=1e-6)
        assert summary["fusion"]["entropy"] == pytest.approx(expected * math.log(L), abs=1e-5)
        assert summary["num_samples"] == B
    assert summary["fusion"]["token_mean_weight"][4] == pytest.approx(1.0)


def test_c2t_map_top_k_and_gates_by_name():
    B = 4
    c2t = torch.zeros(B, 5, 2, 4, 3)
    c2t[:, :, 0, :, 1] = 1.0                 # target A looks at Moon
    c2t[:, :, 1, :, :] = torch.tensor([0.2, 0.3, 0.5])
    gates = torch.tensor([[0.5, 0.3, 0.2]]).expand(B, 3)
    sums, layout = attention_sums([attention(torch.full((B, 2, 6), 1 / 6), c2t, gates)])
    summary = summarize(sums, layout, TARGETS, BODIES, top_k=2)
    assert summary["c2t"]["weights"]["A"] == pytest.approx({"Sun": 0.0, "Moon": 1.0, "Mars": 0.0})
    assert [t["body"] for t in summary["c2t"]["top_k"]["B"]] == ["Mars", "Moon"]
    assert summary["c2t"]["normalized_entropy"]["A"] == pytest.approx(0.0, abs=1e-6)
    assert summary["graph"]["gate_weights"] == pytest.approx(
        {"dynamic": 0.5, "adaptive": 0.3, "stochastic": 0.2})


def test_sums_over_micro_batches_weight_every_sample_once():
    first = attention(torch.full((1, 1, 4), 0.25), torch.full((1, 2, 2, 1, 3), 1 / 3),
                      torch.ones(1, 3) / 3)
    peaked = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]).expand(3, 1, 4)
    second = attention(peaked, torch.full((3, 2, 2, 1, 3), 1 / 3), torch.ones(3, 3) / 3)
    sums, layout = attention_sums([first, second])
    summary = summarize(sums, layout, TARGETS, BODIES, top_k=1)
    assert summary["num_samples"] == 4
    assert summary["fusion"]["token_mean_weight"][0] == pytest.approx((0.25 + 3) / 4)
