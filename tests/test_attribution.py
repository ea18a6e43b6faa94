"""Occlusion attribution: per body and target, ranked, and compared with the C->T map."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from diagnostics.attribution import AttributionObserver, occlusion_record, spearman
from model import InputSpec
from trainer.diagnostics_config import DiagnosticsConfig
from trainer.run_log import RunLog


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


def test_attribution_says_what_runs_and_counts_its_passes(tmp_path, caplog):
    """Occlusion takes minutes on a loaded machine: the log says so and its bar counts passes."""
    spec = InputSpec(bodies=["Sun", "Moon"], targets=["A"], feature_names=list("abcd"),
                     body_columns=[[0, 1], [2, 3]], change_scale=[[1.0]])
    passes = []

    def evaluate(split, blank_columns=None, with_series=False, **kwargs):
        passes.append(blank_columns)
        out = {"nll_per_target": [1.0], "num_windows": 8, "c2t_map": [[0.5, 0.5]]}
        return {**out, "series": {"model": np.ones(8)}} if with_series else out
    run_log = RunLog(tmp_path, total_steps=10, start_step=0, tensorboard=False,
                     progress_bar=False)
    observer = AttributionObserver(DiagnosticsConfig(attribution_max_samples=64))
    config = SimpleNamespace(data=SimpleNamespace(eval_batch_size=32, window_stride=1),
                             model=SimpleNamespace(pred_len=1))
    observer.on_start(SimpleNamespace(world_size=1, config=config, spec=spec, is_main=False,
                                      run_log=run_log, log_dir=tmp_path))
    with caplog.at_level(logging.INFO, logger="trainer.run_log"):
        observer.on_validation(7, {}, evaluate)
    assert len(passes) == 4
    assert "attribution at step 7 (occlusion of 2 bodies, up to 2 batches per rank each): " \
           "4 passes" in caplog.text
