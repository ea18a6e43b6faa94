"""Occlusion attribution: per body and target, ranked, and compared with the C->T map."""
from __future__ import annotations

import numpy as np
import pytest

from diagnostics.attribution import occlusion_record, spearman
from model import InputSpec


def test_spearman_extremes():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None


def test_occlusion_record_from_an_evaluator():
    spec = InputSpec(bodies=["Sun", "Moon", "Mars"], targets=["A", "B"],
                     feature_names=list("abcdef"), body_columns=[[0, 1], [2, 3], [4, 5]],
                     change_scale=[[1.0, 1.0]])
    # Blanking Moon (columns 2-3) hurts target A most; Mars hurts B most.
    rise = {(2, 3): [0.5, 0.01], (4, 5): [0.02, 0.3], (0, 1): [0.0, 0.0],
            (0, 1, 2, 3, 4, 5): [0.6, 0.4]}
    wobble = 0.01 * np.sin(np.arange(64))      # per-window noise around each mean

    def evaluate(split, max_batches=None, blank_columns=None, with_c2t=False, with_series=False):
        base = [1.0, 2.0]
        if blank_columns is None:
            nll = base
        else:
            nll = [b + r for b, r in zip(base, rise[tuple(blank_columns)])]
        out = {"nll_per_target": nll, "num_windows": 64}
        if with_c2t:
            out["c2t_map"] = [[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]
        if with_series:
            out["series"] = {"model": np.mean(nll) + wobble}
        return out
    record = occlusion_record(evaluate, spec, max_batches=2, pred_len=1, stride=1)
    assert record["ranking"] == {"A": ["Moon", "Mars", "Sun"], "B": ["Mars", "Moon", "Sun"]}
    assert record["occlusion"]["A"]["Moon"] == pytest.approx(0.5)
    assert record["c2t_ranking"]["A"][0] == "Moon"
    assert record["spearman"]["A"] == pytest.approx(1.0)
    blank_all = record["blank_all"]
    assert blank_all["rise"] == pytest.approx(0.5)
    assert blank_all["low"] == pytest.approx(0.5) and blank_all["high"] == pytest.approx(0.5)
    assert blank_all["per_target"] == pytest.approx({"A": 0.6, "B": 0.4})
