"""celestial-experiment end to end: real trainings of a tiny config (2 variants x 2 seeds, a few
steps, 2 at a time), a variant whose trials fail, the report, and a rerun that skips finished
trials and resumes an unfinished one from its checkpoint."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, small_overrides

pytestmark = pytest.mark.slow


def run_experiment(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch/experiment.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


def test_an_ablation_experiment_runs_reports_and_resumes(short_csv, tmp_path):
    overrides = dict(small_overrides(short_csv, tmp_path))
    for key in ("train.experiment_name", "train.progress_bar"):
        overrides.pop(key)
    overrides.update({"train.max_steps": 6, "train.eval_interval": 3, "checkpoint.interval": 3})
    experiment = tmp_path / "ablation.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "tiny", "base_config": str(REPO / "configs/quickstart_cpu.yaml"),
        "overrides": overrides, "control": "real",
        "variants": {"real": {}, "shuffled": {"data.celestial_ablation": "block_shuffle"},
                     "too_big": {"data.batch_size": 100000}},
        "seeds": [1, 2]}))
    first = run_experiment([str(experiment), "--parallel", "2"], tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr     # the too_big trials failed
    lines = first.stdout.splitlines()
    verdict = lines[lines.index(next(x for x in lines if x.startswith("shuffled "))):]
    assert "on test" in verdict[0] and ("better" in verdict[0] or "worse" in verdict[0]
                                        or "no difference shown" in verdict[0])
    assert any(x.startswith("missing trials (2 of 6): tiny__too_big__s1 (error: ") for x in verdict)

    folder = tmp_path / "logs" / "experiments" / "tiny"
    rows = {r["trial"]: r for r in csv.DictReader((folder / "results.csv").read_text()
                                                 .splitlines())}
    assert [rows[f"tiny__{v}__s{s}"]["status"] for s in (1, 2) for v in ("real", "shuffled")] \
        == ["finished"] * 4
    assert rows["tiny__too_big__s2"]["status"] == "failed"
    assert "train.grad_accum_steps" in rows["tiny__too_big__s2"]["reason"]
    for name in ("tiny__real__s1", "tiny__shuffled__s2"):
        run = tmp_path / "logs" / name
        assert rows[name]["run_folder"] == str(run) and (run / "test_windows.csv").is_file()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["train"]["seed"] == int(name[-1])
    summary = json.loads((folder / "experiment.json").read_text())
    overall = next(c for c in summary["comparisons"]
                   if c["variant"] == "shuffled" and c["target"] == "all")
    assert overall["num_seeds"] == 2 and overall["difference"]["low"] <= \
        overall["difference"]["mean"] <= overall["difference"]["high"]
    assert "data:image/png" in (folder / "report.html").read_text()

    # An unfinished trial (its test line gone) resumes from its checkpoint; finished ones skip.
    metrics = tmp_path / "logs" / "tiny__shuffled__s1" / "metrics.jsonl"
    metrics.write_text("".join(x + "\n" for x in metrics.read_text().splitlines()
                               if json.loads(x)["kind"] != "test"))
    second = run_experiment([str(experiment), "--parallel", "2"], tmp_path)
    assert "tiny__real__s1: finished before, skipped" in second.stdout
    assert "tiny__shuffled__s1: resuming" in second.stdout
    trial_log = (folder / "trials" / "tiny__shuffled__s1.log").read_text()
    assert "resumed from" in trial_log
    assert json.loads((folder / "trials" / "tiny__shuffled__s1.json").read_text())["status"] \
        == "finished"
