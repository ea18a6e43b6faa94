"""Occlusion attribution: per body and target, ranked, and compared with the C->T map."""
from __future__ import annotations

import pytest

from diagnostics.attribution import occlusion_record, spearman
from model import InputSpec


def test_spearman_extremes():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None


def test_occlusion_record_from_an_evaluator():
    spec = InputSpec(bodies=["Sun", "Moon", "Mars"], targets=["A", "B"], feature_names=list("abcdef"),
                     body_columns=[[0, 1], [2, 3], [4, 5]], change_scale=[[1.0, 1.0]])
    # Blanking Moon (columns 2-3) hurts target A most; Mars hurts B most.
    rise = {(2, 3): [0.5, 0.01], (4, 5): [0.02, 0.3], (0, 1): [0.0, 0.0]}

    def evaluate(split, max_batches=None, blank_columns=None, with_c2t=False):
        base = [1.0, 2.0]
        nll = base if blank_columns is None else [b + r for b, r in zip(base, rise[tuple(blank_columns)])]
        out = {"nll_per_target": nll, "num_windows": 64}
        if with_c2t:
            out["c2t_map"] = [[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]
        return out
    record = occlusion_record(evaluate, spec, max_batches=2)
    assert record["ranking"] == {"A": ["Moon", "Mars", "Sun"], "B": ["Mars", "Moon", "Sun"]}
    assert record["occlusion"]["A"]["Moon"] == pytest.approx(0.5)
    assert record["c2t_ranking"]["A"][0] == "Moon"
    assert record["spearman"]["A"] == pytest.approx(1.0)
