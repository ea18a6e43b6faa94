"""The celestial ablation is detected on the built-in data, whose planted drivers are celestial:
through the experiment command, a model trained on block-shuffled bodies forecasts worse on test
than the same model trained on the real bodies, and the interval excludes zero.

The setting is the cheapest found that still detects it with a wide margin at several training
and ablation seeds: a model half the quickstart's width, on half its window and horizon, 300
steps, 2 seeds, one validation (at the end) and no occlusion at it, on the whole built-in
history, whose 4,106 test windows keep the interval narrow. Fewer steps, or fewer years of data,
left a smaller difference, nearer to not being shown.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from series.dataset import ensure_dataset
from tests.conftest import REPO
from trainer.config import load_config

pytestmark = pytest.mark.slow

QUICKSTART = str(REPO / "configs/quickstart_cpu.yaml")
SMALL_AND_SHORT = {"model.d_model": 32, "model.seq_len": 48, "model.pred_len": 12,
                   "model.patch_scales": [[4, 2], [8, 4]], "model.num_time_summaries": 4,
                   "optim.lr": 0.002, "train.max_steps": 300,
                   "train.eval_interval": 10**9, "train.validate_at_start": False,
                   "train.early_stopping_patience": 0, "checkpoint.interval": 10**9,
                   "diagnostics.attribution_at_validation": False}


def ablation_experiment(tmp_path) -> dict:
    """Real against block-shuffled bodies, 2 seeds, on the whole built-in dataset (generated
    here once, before the trials start)."""
    overrides = {**SMALL_AND_SHORT, "data.path": str(tmp_path / "builtin.csv"),
                 "train.log_root": str(tmp_path / "logs"),
                 "checkpoint.root": str(tmp_path / "checkpoints")}
    ensure_dataset(load_config(QUICKSTART, list(overrides.items())).data)
    return {"name": "ablation", "base_config": QUICKSTART, "overrides": overrides,
            "control": "real",
            "variants": {"real": {}, "shuffled": {"data.celestial_ablation": "block_shuffle"}},
            "seeds": [1, 2], "score": "nll"}


def test_block_shuffled_bodies_forecast_worse_on_test_than_the_real_ones(tmp_path):
    experiment = tmp_path / "ablation.yaml"
    experiment.write_text(yaml.safe_dump(ablation_experiment(tmp_path)))
    proc = subprocess.run([sys.executable, str(REPO / "launch/experiment.py"), str(experiment),
                           "--parallel", "2"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = next(line for line in proc.stdout.splitlines() if line.startswith("shuffled "))
    assert verdict.startswith("shuffled is worse than real by ") and "nats on test" in verdict

    summary = json.loads((tmp_path / "logs/experiments/ablation/experiment.json").read_text())
    (overall,) = [c for c in summary["comparisons"]
                  if c["variant"] == "shuffled" and c["target"] == "all"]
    difference = overall["difference"]
    assert overall["split"] == "test" and overall["num_seeds"] == 2 and overall["shown"]
    assert 0 < difference["low"] <= difference["mean"] <= difference["high"], difference
    assert overall["holm_pvalue"] < 0.05
