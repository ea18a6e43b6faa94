"""Experiments: the experiment file's checks, the plan, the paired comparison on fabricated
per-window scores (and its coverage in a null case), the local runner, the report and
--from-analysis. The end-to-end run with real trainings is tests/test_experiments_e2e.py."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments import cli
from experiments.compare import compare_variants, load_trial_scores, select_on_validation
from experiments.from_analysis import advice_variants
from experiments.plan import Trial, build_trials, train_command
from experiments.runner import make_slots, run_trials
from experiments.spec import load_spec
from stats.intervals import paired_difference_over_seeds
from tests.conftest import REPO
from trainer.config import load_config
from trainer.errors import UserError

TARGETS = ["Asset_A", "Asset_B"]
PRED_LEN = 4


def write_base_config(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"path": str(tmp_path / "data.csv")},
        "model": {"pred_len": PRED_LEN},
        "train": {"log_root": str(tmp_path / "logs"), "max_steps": 5},
        "checkpoint": {"root": str(tmp_path / "checkpoints")}}))
    return path


def experiment_data(tmp_path: Path, **changes) -> dict:
    data = {"name": "abl", "base_config": str(write_base_config(tmp_path)), "control": "real",
            "variants": {"real": {}, "shuffled": {"data.celestial_ablation": "block_shuffle"},
                         "wide": {"model.dropout": 0.3}},
            "seeds": [1, 2, 3], "score": "nll"}
    data.update(changes)
    return data


def write_experiment(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment_data(tmp_path, **changes)))
    return path


# --- the experiment file -------------------------------------------------------------------------

BAD = [
    ({"colour": "red"}, "unknown experiment key colour"),
    ({"seeds": "1,2"}, "seeds: expected list"),
    ({"seeds": [1, 1]}, "seeds: a seed is listed twice"),
    ({"seeds": [1.5]}, "seeds[0]"),
    ({"seeds": []}, "seeds: name at least one seed"),
    ({"score": "mae"}, "score: 'mae' is not one of"),
    ({"control": "nope"}, "control: 'nope' is not one of the variants"),
    ({"variants": {"real": {}}}, "variants: name at least two"),
    ({"variants": {"real": {}, "x": {"model.nope": 1}}},
     "variants.x: unknown config key model.nope"),
    ({"variants": {"real": {}, "x": {"optim.lr": "fast"}}}, "variants.x: optim.lr: expected float"),
    ({"variants": {"real": {}, "x": {"optim.lr": -1.0}}}, "variants.x: "),
    ({"variants": {"real": {}, "x": {"data.celestial_ablation": "hide"}}},
     "variants.x: data.celestial_ablation: 'hide' is not one of"),
    ({"variants": {"real": {}, "x": {"train.seed": 3}}}, "variants.x.train.seed: set by the"),
    ({"variants": {"real": {}, "x": {"model.seq_len": 64}}},
     "variants.x.model.seq_len: would change the test windows"),
    ({"variants": {"real": {}, "x": {"optim": {"lr": 1e-3}}}}, "variants.x.optim: give dotted"),
    ({"variants": {"real": {}, "a__b": {}}}, "variants.a__b: 'a__b' is not a plain name"),
    ({"name": "../up"}, "name: '../up' is not a plain name"),
    ({"base_config": "missing.yaml"}, "base_config: config file not found"),
    ({"overrides": {"train.max_steps": -3}}, "overrides: train.max_steps must be >= 0"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m for _, m in BAD])
def test_a_bad_experiment_file_is_one_line_naming_the_key(tmp_path, changes, message):
    with pytest.raises(UserError) as err:
        load_spec(write_experiment(tmp_path, **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_command_refuses_a_bad_file_with_exit_2_and_starts_nothing(tmp_path, capsys):
    path = write_experiment(tmp_path, variants={"real": {}, "x": {"model.nope": 1}})
    assert cli.run([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: variants.x: unknown config key model.nope") and "\n" not in err
    assert not (tmp_path / "logs").exists()


# --- the plan ------------------------------------------------------------------------------------

def test_trials_are_variant_by_seed_with_their_own_run_folders(tmp_path):
    spec = load_spec(write_experiment(tmp_path))
    trials = build_trials(spec)
    assert [t.name for t in trials[:3]] == ["abl__real__s1", "abl__shuffled__s1", "abl__wide__s1"]
    assert len({t.run_dir for t in trials}) == 9
    assert all(t.run_dir.parent == tmp_path / "logs" for t in trials)
    command = train_command(spec, trials[1])
    assert command[1:3] == [str(REPO / "launch/train.py"), "--config"]
    assert "data.celestial_ablation=block_shuffle" in command and "train.seed=1" in command
    assert "--resume" in command and command[command.index("--resume") + 1] == "auto"
    assert train_command(spec, trials[1], ranks=2)[1:5] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_a_trial_command_sets_exactly_the_trial_config(tmp_path):
    """What the command line passes through `--set` reads back as the spec's trial config."""
    from trainer.cli import overrides_from, parse_args
    spec = load_spec(write_experiment(tmp_path, variants={
        "real": {}, "x": {"model.patch_scales": [[4, 2], [8, 4]], "optim.lr": 3e-4,
                          "data.celestial_ablation": "time_shift"}}))
    trial = build_trials(spec)[1]
    args = parse_args(train_command(spec, trial)[2:])
    assert load_config(args.config, overrides_from(args)).to_dict() == {
        **spec.trial_config("x", 1).to_dict(),
        "train": {**spec.trial_config("x", 1).to_dict()["train"], "resume": "auto",
                  "progress_bar": False, "experiment_name": trial.name}}


def test_report_of_a_folder_that_is_no_experiment_is_one_line(tmp_path, capsys):
    assert cli.run(["--report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --report {tmp_path}: not an experiment folder (no experiment.yaml)"


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert cli.run([str(write_experiment(tmp_path)), "--dry-run", "--parallel", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 variants x 3 seeds = 9 trials" in out and "abl__wide__s3 [new]" in out
    assert not (tmp_path / "logs").exists()


def test_seeds_vary_training_randomness_only_not_the_data(short_csv, tmp_path):
    """Two trials of one variant with different seeds get the same data and the same validation
    and test windows in the same order (also under an ablation, which has its own fixed seed);
    only the training order differs."""
    from types import SimpleNamespace

    from tests.conftest import small_config
    from trainer.build import _prepare_loaders

    def loaders(seed: int):
        config = small_config(short_csv, tmp_path, train__seed=seed,
                              data__celestial_ablation="block_shuffle")
        return _prepare_loaders(config, SimpleNamespace(rank=0, world_size=1))

    a, b = loaders(1), loaders(2)
    assert np.array_equal(a.prepared.features_RF, b.prepared.features_RF)
    for split in ("val_loader", "test_loader"):
        assert list(getattr(a, split).sampler) == list(getattr(b, split).sampler)
    assert list(a.train_loader.sampler) != list(b.train_loader.sampler)


# --- fabricated trials ---------------------------------------------------------------------------

def ma_noise(rng, num_windows: int, scale: float) -> np.ndarray:
    """Per-window noise correlated over PRED_LEN neighbours, as overlapping windows are."""
    raw = rng.normal(0, scale, num_windows + PRED_LEN - 1)
    return np.convolve(raw, np.ones(PRED_LEN) / np.sqrt(PRED_LEN), mode="valid")


def fabricate_trial(trial: Trial, scores_NT: np.ndarray, val_nll: float,
                    origins: list[str] | None = None) -> None:
    """A finished run folder: metrics.jsonl (val and test lines), config.yaml and
    test_windows.csv in the shared format (common.md)."""
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "val", "step": 5, "nll": val_nll + 0.1, "crps": 0.5},
             {"kind": "val", "step": 5, "restored_best": True, "weights_step": 3,
              "nll": val_nll, "crps": 0.4},
             {"kind": "test", "step": 5, "weights_step": 3, "nll": float(scores_NT.mean()),
              "pred_len": PRED_LEN, "window_stride": 1, "windows_file": "test_windows.csv"}]
    (trial.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (trial.run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"pred_len": PRED_LEN}, "data": {"window_stride": 1}}))
    origins = origins or [str(np.datetime64("2020-01-01") + i) for i in range(len(scores_NT))]
    with open(trial.run_dir / "test_windows.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["window", "origin", "target", "model_nll", "random_walk_nll", "ewma_nll",
                      "model_crps", "random_walk_crps", "ewma_crps"])
        for i, row in enumerate(scores_NT):
            for target, value in [*zip(TARGETS, row), ("all", row.mean())]:
                out.writerow([i, origins[i], target, value, 0, 0, value / 3, 0, 0])


def fabricate_experiment(tmp_path: Path, effects: dict[str, float], num_windows: int = 400,
                         seed: int = 0):
    """Every trial of the spec, finished, with per-window NLL = shared window difficulty + seed
    offset + correlated noise + the variant's planted effect (on Asset_A only)."""
    spec = load_spec(write_experiment(tmp_path, seeds=[1, 2, 3, 4, 5]))
    rng = np.random.default_rng(seed)
    difficulty_N = ma_noise(rng, num_windows, 1.0)
    trials = build_trials(spec)
    for trial in trials:
        noise_NT = np.stack([ma_noise(rng, num_windows, 0.05) for _ in TARGETS], 1)
        effect_T = np.array([effects.get(trial.variant, 0.0), 0.0])
        scores = difficulty_N[:, None] + rng.normal(0, 0.01) + noise_NT + effect_T
        fabricate_trial(trial, scores, val_nll=-2 + effects.get(trial.variant, 0.0))
    return spec, trials


def test_a_planted_difference_is_shown_per_target_and_overall(tmp_path):
    """(How often a null difference is shown is tested on many simulated experiments below.)"""
    spec, trials = fabricate_experiment(tmp_path, {"shuffled": 0.08, "wide": 0.0})
    scores = [load_trial_scores(t) for t in trials]
    comparisons = {(c.variant, c.target): c for c in
                   compare_variants(scores, "real", list(spec.variants), "nll")}
    assert set(comparisons) == {(v, t) for v in ("shuffled", "wide")
                                for t in ("all", *TARGETS)}
    hit = comparisons[("shuffled", "Asset_A")]
    assert hit.shown and 0.06 < hit.difference.mean < 0.1 and hit.num_seeds == 5
    assert comparisons[("shuffled", "all")].shown
    assert abs(comparisons[("shuffled", "Asset_B")].difference.mean) < 0.02
    assert all(c.holm_pvalue >= c.difference.dm_pvalue for c in comparisons.values())
    selection = select_on_validation(scores, "nll")
    assert selection.variant in ("real", "wide") and selection.val_means["shuffled"] == -1.92


def test_trials_scored_on_other_windows_are_not_compared(tmp_path):
    spec, trials = fabricate_experiment(tmp_path, {}, num_windows=50)
    moved = trials[1]
    fabricate_trial(moved, np.zeros((50, 2)), -2.0,
                    origins=[str(np.datetime64("2021-01-01") + i) for i in range(50)])
    comparisons = compare_variants([load_trial_scores(t) for t in trials], "real",
                                   list(spec.variants), "nll")
    problem = next(c for c in comparisons if c.variant == moved.variant and c.target == "all")
    assert problem.difference is None and "not scored on the same test windows" in problem.problem


@pytest.mark.parametrize("seed_effect", [0.0, 0.02, 0.05])
def test_the_interval_covers_zero_at_its_nominal_rate_in_a_null_case(seed_effect):
    """Two variants that differ only in their label, five seeds each: per trial a seed offset
    (training randomness), shared window difficulty and overlapping-window noise. The 95%
    interval must cover 0 close to 95% of the time over many simulated experiments, whether the
    seeds or the windows dominate the variation."""
    rng = np.random.default_rng(7)
    covered = []
    for _ in range(400):
        difficulty = ma_noise(rng, 300, 1.0)
        diffs = [(difficulty + rng.normal(0, seed_effect) + ma_noise(rng, 300, 0.05))
                 - (difficulty + rng.normal(0, seed_effect) + ma_noise(rng, 300, 0.05))
                 for _ in range(5)]
        d = paired_difference_over_seeds(diffs, PRED_LEN)
        covered.append(d.low <= 0 <= d.high)
    assert 0.92 <= np.mean(covered) <= 0.98, np.mean(covered)


# --- the report ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_files_name_their_splits_and_open_in_a_browser(tmp_path, capsys):
    spec, trials = fabricate_experiment(tmp_path, {"shuffled": 0.08})
    shutil.rmtree(trials[-1].run_dir)          # one missing trial: abl__wide__s5
    folder = tmp_path / "logs" / "experiments" / "abl"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text(spec.to_yaml())
    assert cli.run(["--report", str(folder)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("shuffled is worse than real by 0.0") and "nats on test" in out[0]
    assert "weights of step 3" in out[0] and "weights of step 3; not test" in out[2]
    assert out[1].startswith("wide vs real: no difference shown on test")
    assert "selected on validation" in out[2]
    assert "missing trials (1 of 15): abl__wide__s5" in out[3]
    rows = list(csv.DictReader((folder / "results.csv").read_text().splitlines()))
    assert [r["trial"] for r in rows] == [t.name for t in trials]
    assert rows[0]["run_folder"] == str(trials[0].run_dir) and rows[0]["test_step"] == "3"
    assert rows[-1]["status"] != "finished" and rows[-1]["test_nll"] == ""
    summary = json.loads((folder / "experiment.json").read_text())
    assert summary["splits"] == {"comparisons": "test", "selection": "validation"}
    assert all(c["split"] == "test" for c in summary["comparisons"])
    html = (folder / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and html.count("data:image/png") == 2
    assert_opens_in_a_browser(folder / "report.html", tmp_path, "shuffled is worse than real")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True,
                       timeout=600)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return path


def assert_opens_in_a_browser(page: Path, tmp_path: Path, text: str) -> None:
    """Headless chromium renders the page: the DOM holds `text` and the images decoded."""
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert text in dom
    check = ("<script>document.title = [...document.images].every("
             "i => i.complete && i.naturalWidth > 0) ? 'IMAGES_OK' : 'IMAGES_BROKEN'</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", check + "</body>"))
    dom = subprocess.run([*browser, "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<title>IMAGES_OK</title>" in dom


# --- the local runner ----------------------------------------------------------------------------

FAKE_TRIAL = """
import json, os, sys, pathlib
run = pathlib.Path(sys.argv[1]); run.mkdir(parents=True, exist_ok=True)
(run / "where.json").write_text(json.dumps({"cores": sorted(os.sched_getaffinity(0)),
                                            "threads": os.environ["OMP_NUM_THREADS"]}))
if sys.argv[2] == "fail":
    print("error: variant broke"); sys.exit(2)
(run / "metrics.jsonl").write_text(json.dumps({"kind": "test", "step": 1}) + "\\n")
"""


def fake_trials(tmp_path: Path, outcomes: list[str]) -> tuple[list[Trial], dict]:
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    trials = [Trial(f"x__v{i}__s1", f"v{i}", 1, tmp_path / "logs" / f"x__v{i}__s1", ())
              for i in range(len(outcomes))]
    commands = {t.name: [sys.executable, str(script), str(t.run_dir), outcome]
                for t, outcome in zip(trials, outcomes)}
    return trials, commands


def test_slots_share_the_cores_and_gpus():
    slots = make_slots(3, [0, 1, 2, 3, 4, 5, 6], ["0", "1"])
    assert [s.cores for s in slots] == [(0, 1, 2), (3, 4), (5, 6)]
    assert [s.gpus for s in slots] == [("0",), ("1",), ("0",)]
    assert slots[1].environment(ranks=1)["OMP_NUM_THREADS"] == "2"
    assert slots[0].environment(ranks=1)["CUDA_VISIBLE_DEVICES"] == "0"


def test_trials_run_pinned_failures_are_reported_and_a_rerun_skips_finished(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    slots = make_slots(min(2, len(cores)), cores, [])
    trials, commands = fake_trials(tmp_path, ["ok", "fail", "ok"])
    folder = tmp_path / "exp"
    records = run_trials(trials, commands, folder, slots, announce=lambda _: None)
    assert [records[t.name]["status"] for t in trials] == ["finished", "failed", "finished"]
    assert records[trials[1].name]["reason"] == "error: variant broke"
    where = [json.loads((t.run_dir / "where.json").read_text()) for t in trials]
    assert {tuple(w["cores"]) for w in where} <= {s.cores for s in slots}
    assert all(w["threads"] == str(len(slots[0].cores)) for w in where)
    for t in trials:
        (t.run_dir / "where.json").unlink()
    seen = []
    again = run_trials(trials, commands, folder, slots, announce=seen.append)
    assert "x__v0__s1: finished before, skipped" in seen[0]
    assert not (trials[0].run_dir / "where.json").exists()       # not run again
    assert (trials[1].run_dir / "where.json").exists() and again[trials[1].name]["status"] == \
        "failed"
    assert json.loads((folder / "trials" / "x__v1__s1.json").read_text())["exit_status"] == 2


# --- --from-analysis -----------------------------------------------------------------------------

FINDINGS = [
    {"issue": "overfitting", "config_change": {"model.dropout": 0.3, "optim.weight_decay": 0.2}},
    {"issue": "no_skill", "config_change": {}},
    {"issue": "lookback_short", "config_change": {"model.seq_len": 512}},
    {"issue": "overfitting", "config_change": {"model.d_model": 64}},
]


def test_each_finding_with_a_config_change_becomes_a_variant():
    variants, notes = advice_variants(FINDINGS)
    assert variants == {"overfitting": FINDINGS[0]["config_change"],
                        "overfitting_2": {"model.d_model": 64}}
    assert notes == ["lookback_short: not tested, model.seq_len changes the test windows"]


def test_from_analysis_dry_run_plans_control_and_advice(tmp_path, capsys):
    run = tmp_path / "logs" / "run1"
    (run / "analysis").mkdir(parents=True)
    config = load_config(write_base_config(tmp_path), [("train.experiment_name", "run1")])
    (run / "config.yaml").write_text(config.to_yaml())
    (run / "analysis" / "recommendations.json").write_text(json.dumps(FINDINGS))
    assert cli.run(["--from-analysis", str(run), "--seeds", "4", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "advice_run1: 3 variants x 2 seeds = 6 trials, control control" in out
    assert "advice_run1__overfitting__s5 [new]" in out and "model.dropout=0.3" in out
    assert "note: lookback_short: not tested" in out
    assert not (tmp_path / "logs" / "experiments").exists()


# --- Slurm job array (the real cluster: tests/test_experiments_slurm.py) ---------------------

FAKE_SLURM = """#!/bin/sh
echo "$0 $*" >> "{calls}"
case "$0" in
  *sbatch) echo "77;cluster" ;;
  *squeue) [ -f "{queued}" ] && echo "77_0 RUNNING" ;;
esac
exit 0
"""


def fake_slurm(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    bin_dir, calls, queued = tmp_path / "bin", tmp_path / "calls.txt", tmp_path / "queued"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).write_text(FAKE_SLURM.format(calls=calls, queued=queued))
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls, queued


def test_slurm_submits_the_unfinished_trials_as_one_array(tmp_path, monkeypatch, capsys):
    calls, queued = fake_slurm(tmp_path, monkeypatch)
    spec, trials = fabricate_experiment(tmp_path, {}, num_windows=20)
    shutil.rmtree(trials[1].run_dir)
    shutil.rmtree(trials[4].run_dir)
    path = tmp_path / "experiment.yaml"
    assert cli.run([str(path), "--slurm", "--sbatch", "--partition=cpu --time=1:00:00"]) == 0
    assert "2 trial(s) submitted as Slurm job array 77 (13 finished before)" in \
        capsys.readouterr().out
    folder = tmp_path / "logs" / "experiments" / "abl"
    lines = [x.split("\t") for x in (folder / "slurm_tasks.tsv").read_text().splitlines()]
    assert [x[0] for x in lines] == [trials[1].name, trials[4].name]
    arguments = lines[0][2].split(" ")
    assert "data.celestial_ablation=block_shuffle" in arguments and "train.seed=1" in arguments
    assert f"train.log_root={tmp_path / 'logs'}" in arguments
    sbatch = calls.read_text().splitlines()[-1]
    assert "--array=0-1" in sbatch and "--partition=cpu --time=1:00:00" in sbatch
    assert sbatch.endswith("launch/slurm/experiment_array.sbatch")
    queued.touch()
    assert cli.run([str(path), "--slurm"]) == 2
    assert "Slurm job array 77 of this experiment is still in the queue" in capsys.readouterr().err


def test_slurm_refuses_an_override_with_white_space(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch)
    path = write_experiment(tmp_path, overrides={"data.date_column": "the date"})
    assert cli.run([str(path), "--slurm"]) == 2
    assert "white space" in capsys.readouterr().err


def test_a_spec_file_is_replaced_whole_for_readers_in_other_workers(tmp_path):
    """A worker that opened the file before another one rewrote it reads the whole old text
    (written in place, it would find the file truncated: a search.yaml 'missing key name')."""
    from trainer.run_log import replace_text
    path = tmp_path / "search.yaml"
    replace_text(path, "name: old\n")
    with path.open() as reader:
        replace_text(path, "name: new\n")
        assert reader.read() == "name: old\n"
    assert path.read_text() == "name: new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["search.yaml"]      # no temporary file left
