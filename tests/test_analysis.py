"""The analysis command (diagnostics/analysis/): rules on planted problems, outputs, the CLI,
runs in progress or with diagnostics off, bad folders; and (slow) a real short training run."""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import matplotlib.image
import numpy as np
import pytest

from diagnostics.analysis.cli import run as cli
from diagnostics.analysis.console import HEALTHY_LINE
from diagnostics.analysis.errors import AnalysisError
from diagnostics.analysis.findings import FINDINGS_SCHEMA
from diagnostics.analysis.load import GradientSeries, RunData, load_run
from diagnostics.analysis.rules.common import MAX_EVIDENCE_POINTS, evidence
from diagnostics.analysis.rules.gradients import vanishing_gradients
from diagnostics.analysis.rules.loss import rolling_robust_z
from diagnostics.analysis.run import analyze
from diagnostics.analysis.thresholds import Thresholds, build_thresholds, parse_threshold
from tests.conftest import REPO
from tests.run_folder_factory import COMPONENTS, RunSpec, build_run_folder, eval_line


def findings_of(folder: Path, overrides=()) -> list:
    return analyze(folder, list(overrides)).findings


def issues_of(folder: Path, overrides=()) -> set[str]:
    return {f.issue for f in findings_of(folder, overrides)}


def assert_valid_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def assert_self_contained(html: str) -> None:
    """Nothing outside the page: every src/href is data: or a #fragment, no CSS url()."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, flags=re.IGNORECASE)
    assert all(r.startswith(("data:", "#")) for r in refs), refs
    assert "url(" not in html and "<link" not in html.lower()
    assert "<script" not in html.lower()


def assert_valid_findings(path: Path) -> list[dict]:
    findings = json.loads(path.read_text())
    jsonschema.validate(findings, FINDINGS_SCHEMA)
    return findings


# --- rules on planted problems ----------------------------------------------------------------

def test_healthy_folder_has_no_findings_and_nothing_missing(tmp_path):
    folder = build_run_folder(tmp_path / "healthy")
    analysis = analyze(folder, [])
    assert analysis.findings == []
    assert analysis.run.notes == []


PLANTED = [  # (knobs, issue, component)
    ({"dead_component": "decoder"}, "dead_component", "decoder"),
    ({"lr_too_small": True, "lr": 1e-6}, "learning_rate_too_small", "optimizer"),
    ({"vanishing_component": "graph_combiner"}, "vanishing_gradients", "graph_combiner"),
    ({"exploding_component": "decoder"}, "exploding_gradients", "decoder"),
    ({"clip_fraction": 0.3}, "frequent_clipping", "optimizer"),
    ({"loss_spike_steps": (150,)}, "loss_spikes", "optimizer"),
    ({"skipped_steps": (77,)}, "nonfinite_steps", "optimizer"),
    ({"fusion_entropy": "flat"}, "fusion_attention_flat", "fusion_cross_attention"),
    ({"fusion_entropy": "collapsed"}, "fusion_attention_collapse", "fusion_cross_attention"),
    ({"c2t_uniform": True}, "c2t_attention_uniform", "celestial_to_target_attention"),
    ({"spearman": 0.05}, "c2t_attention_unfaithful", "celestial_to_target_attention"),
    ({"effective_components": 1.2}, "mixture_collapse", "decoder"),
    ({"sigma_at_floor": 0.5}, "sigma_collapse", "decoder"),
    ({"coverage_90": 0.7}, "miscalibration", "decoder"),
    ({"coverage_90": 0.99}, "miscalibration", "decoder"),
    ({"agreement": 0.0}, "rank_disagreement", ", ".join(COMPONENTS)),
    ({"noise_scale": 5.0}, "batch_above_noise_scale", "data"),
    ({"noise_scale": 5000.0}, "batch_below_noise_scale", "data"),
    ({"data_time_fraction": 0.6}, "data_loading_bound", "data"),
    ({"memory_fraction": 0.95}, "memory_near_limit", "memory"),
    ({"memory_fraction": 0.95, "device": "cuda"}, "memory_near_limit", "memory"),
    ({"skill": -0.01}, "no_skill_over_baseline", "model"),
    ({"skill": 0.2}, "no_skill_over_baseline", "model"),
    ({"overfit": True}, "overfitting", "model"),
    ({"blank_all_rise": 0.01}, "celestial_inputs_unused", "celestial_to_target_attention"),
]


@pytest.mark.parametrize("knobs,issue,component", PLANTED,
                         ids=[f"{p[1]}-{i}" for i, p in enumerate(PLANTED)])
def test_planted_problem_is_found_with_evidence(tmp_path, knobs, issue, component):
    findings = findings_of(build_run_folder(tmp_path / "run", **knobs))
    matching = [f for f in findings if f.issue == issue and f.component == component]
    assert matching, [(f.issue, f.component) for f in findings]
    finding = matching[0]
    assert finding.evidence["steps"] and finding.evidence["values"]
    assert finding.suggestion
    dumped = json.dumps([f.to_dict() for f in findings], allow_nan=False)
    jsonschema.validate(json.loads(dumped), FINDINGS_SCHEMA)


def test_dead_component_is_told_apart_from_a_small_learning_rate(tmp_path):
    dead = findings_of(build_run_folder(tmp_path / "dead", dead_component="decoder"))
    assert {f.issue for f in dead} == {"dead_component"}
    assert dead[0].severity == "critical" and "optim.lr" not in dead[0].config_change
    slow = findings_of(build_run_folder(tmp_path / "slow", lr_too_small=True, lr=1e-6))
    assert "dead_component" not in {f.issue for f in slow}
    lr_finding = next(f for f in slow if f.issue == "learning_rate_too_small")
    assert lr_finding.config_change == {"optim.lr": 1e-5}   # 10x at most in one change
    vanishing = [f for f in slow if f.issue == "vanishing_gradients"]
    assert vanishing and all("LR is too small" in f.message for f in vanishing)


def test_weak_component_with_moving_weights_is_not_called_dead_or_lr(tmp_path):
    findings = findings_of(build_run_folder(tmp_path / "run", vanishing_component="decoder"))
    assert {f.issue for f in findings} == {"vanishing_gradients"}
    assert "Adam compensates" in findings[0].message
    assert findings[0].config_change == {"optim.lr": 0.002}


def test_frequent_clipping_suggests_a_clip_norm_above_the_current_one(tmp_path):
    findings = findings_of(build_run_folder(tmp_path / "run", clip_fraction=0.3))
    assert findings[0].issue == "frequent_clipping"
    assert findings[0].config_change == {"optim.grad_clip_norm": 1.5}
    assert findings[0].evidence["overall"] == 0.3


def test_validation_before_training_is_not_judged(tmp_path):
    folder = build_run_folder(tmp_path / "run", gradients=False, attention=False, profiles=False,
                              num_steps=40, val_interval=1000)
    untrained = eval_line(RunSpec(coverage_90=0.5, effective_components=1.0), "val", 0, True)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(untrained) + "\n")
    assert findings_of(folder) == []


def test_exploding_without_clipping_suggests_turning_clipping_on(tmp_path):
    findings = findings_of(build_run_folder(tmp_path / "run", exploding_component="decoder",
                                            grad_clip_norm=0.0))
    exploding = next(f for f in findings if f.issue == "exploding_gradients")
    assert exploding.severity == "critical"
    assert exploding.config_change == {"optim.grad_clip_norm": 1.0}
    assert all(v > 100 for v in exploding.evidence["values"])


def test_loss_spike_evidence_names_the_step(tmp_path):
    findings = findings_of(build_run_folder(tmp_path / "run", loss_spike_steps=(150,)))
    spike = next(f for f in findings if f.issue == "loss_spikes")
    assert spike.evidence["steps"] == [150]
    assert spike.evidence["z_score"][0] > Thresholds().spike_z


def test_skipped_steps_evidence_names_the_log_interval(tmp_path):
    findings = findings_of(build_run_folder(tmp_path / "run", skipped_steps=(77, 78)))
    skipped = next(f for f in findings if f.issue == "nonfinite_steps")
    assert skipped.evidence["steps"] == [80] and skipped.evidence["values"] == [2]


def test_fp16_nonfinite_steps_suggest_bf16(tmp_path):
    folder = build_run_folder(tmp_path / "run", skipped_steps=(77,), precision="fp16")
    finding = next(f for f in findings_of(folder) if f.issue == "nonfinite_steps")
    assert finding.config_change == {"train.precision": "bf16"}


def test_one_rank_run_has_no_rank_findings(tmp_path):
    folder = build_run_folder(tmp_path / "run", world_size=1, agreement=0.0, noise_scale=1.0)
    assert findings_of(folder) == []


def test_data_loading_is_judged_from_profiles_without_metrics(tmp_path):
    folder = build_run_folder(tmp_path / "run", data_time_fraction=0.6)
    (folder / "metrics.jsonl").write_text("")
    assert "data_loading_bound" in issues_of(folder)
    healthy = build_run_folder(tmp_path / "healthy", data_time_fraction=0.0)
    (healthy / "metrics.jsonl").write_text("")
    assert "data_loading_bound" not in issues_of(healthy)


def test_memory_suggestion_halves_the_batch(tmp_path):
    folder = build_run_folder(tmp_path / "run", memory_fraction=0.95, batch_size=12)
    finding = next(f for f in findings_of(folder) if f.issue == "memory_near_limit")
    assert finding.config_change == {"data.batch_size": 6}


def _series(norms: dict[str, list[float]], ratio: float = 1e-3) -> GradientSeries:
    n = len(next(iter(norms.values())))
    return GradientSeries(
        steps=np.arange(1, n + 1) * 10, total_norm=np.ones(n), clipped=np.zeros(n, bool),
        skipped=np.zeros(n, bool), lr=np.full(n, 1e-3),
        norms={c: np.array(v) for c, v in norms.items()},
        update_ratios={c: np.full(n, ratio) for c in norms}, agreement={}, noise_scale={})


def test_vanishing_must_be_sustained():
    t = Thresholds()
    blip = RunData(Path("x"), {}, gradients=_series({"decoder": [0.1, 1e-7, 0.1, 1e-7, 0.1]}))
    assert vanishing_gradients(blip, t) == []
    sustained = RunData(Path("x"), {}, gradients=_series({"decoder": [0.1, 1e-7, 1e-7, 1e-7]}))
    [finding] = vanishing_gradients(sustained, t)
    assert finding.evidence["steps"] == [20, 30, 40]


def test_rolling_robust_z_flags_only_the_spike():
    rng = np.random.default_rng(1)
    loss = -2.0 + 0.01 * rng.standard_normal(60)
    loss[40] += 0.5
    z = rolling_robust_z(loss, window=20, min_window=5)
    assert np.all(np.isnan(z[:5]))
    assert z[40] > 20 and np.nanmax(np.delete(z, 40)) < 6


def test_evidence_is_capped_and_json_safe():
    found = evidence("x", range(100), [math.nan] + [1.234567] * 99, extra=np.float32(2.5))
    assert len(found["steps"]) == MAX_EVIDENCE_POINTS and found["num_points"] == 100
    assert found["values"][0] is None and found["values"][1] == 1.235
    json.dumps(found, allow_nan=False)


# --- thresholds ---------------------------------------------------------------------------------

def test_threshold_overrides_are_parsed_and_checked():
    assert parse_threshold("vanishing=1e-6") == ("vanishing", 1e-6)
    with pytest.raises(AnalysisError, match="unknown name 'vanish'"):
        parse_threshold("vanish=1e-6")
    with pytest.raises(AnalysisError, match="not a number"):
        parse_threshold("vanishing=tiny")
    with pytest.raises(AnalysisError, match="vanishing < healthy_low"):
        build_thresholds({}, [("vanishing", 0.5)])
    with pytest.raises(AnalysisError, match="whole number"):
        build_thresholds({}, [("spike_window", 2.5)])
    assert build_thresholds({}, [("spike_window", 30.0)]).spike_window == 30


def test_run_config_thresholds_are_taken_over_and_cli_wins():
    config = {"diagnostics": {"vanishing_threshold": 1e-7, "exploding_threshold": 50.0}}
    t = build_thresholds(config, [])
    assert (t.vanishing, t.exploding) == (1e-7, 50.0)
    assert build_thresholds(config, [("exploding", 20.0)]).exploding == 20.0


@pytest.mark.slow
def test_cli_threshold_override_changes_the_verdict(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run", coverage_90=0.8, gradients=False, attention=False,
                              profiles=False)
    assert issues_of(folder) == {"miscalibration"}
    assert issues_of(folder, [("coverage_90_low", 0.75)]) == set()
    assert cli(["--log_dir", str(folder), "--threshold", "coverage_90_low=0.75"]) == 0
    assert HEALTHY_LINE in capsys.readouterr().out


# --- outputs and the console ------------------------------------------------------------------

def test_healthy_run_outputs_and_console(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run")
    assert cli(["--log_dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert HEALTHY_LINE in out
    assert "fusion_cross_attention:\n  Mean norm:" in out and "[ok] Healthy gradient flow" in out
    assert "[ok] No exploding gradients" in out
    assert "Top celestial (Asset_A): Moon (0.300)" in out
    occlusion = out.index("Celestial bodies by occlusion: validation NLL rise in nats")
    assert occlusion < out.index("by C->T attention weight")
    assert re.search(r"\n  target +#1 +#2 .*\n  Asset_A +Moon \+0\.0300 +Sun \+0\.0058", out)
    analysis = folder / "analysis"
    with open(analysis / "gradient_norms.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "total_norm", *COMPONENTS]
    assert [int(r[0]) for r in rows[1:]] == list(range(20, 201, 20))
    assert all(float(v) > 0 for r in rows[1:] for v in r[1:])
    for png in ("gradient_flow.png", "fusion_attention_entropy.png", "c2t_attention_heatmap.png",
                "training_curves.png", "skill.png", "occlusion_ranking.png"):
        assert_valid_png(analysis / png)
    assert assert_valid_findings(analysis / "recommendations.json") == []
    html = (analysis / "report.html").read_text()
    assert_self_contained(html)
    assert html.count("data:image/png;base64,") == 6
    assert "Summary" in html and "throughput" in html and "memory per rank" in html
    assert "<td>world size</td><td>2</td>" in html and "<td>device</td><td>cpu (x86_64)" in html
    # The verdict comes first, on the console and in the report.
    assert out.index("Verdict:") < out.index("Gradient flow")
    assert "Verdict: good: the model beats the naive baselines on test, weights of step 200" in out
    assert ("skill vs random walk (EWMA volatility): the model beats the random walk (EWMA "
            "volatility): its NLL is 0.2000 nats lower on test, weights of step 200 (95% interval: "
            "0.1700 to 0.2300 nats lower;") in out
    assert "celestial inputs: the model relies on the celestial inputs" in out
    assert "a retrained ablation (see README, Experiments)" in out
    assert "overfitting: not seen" in out
    assert html.index("<h2>Verdict</h2>") < html.index("<h2>Summary</h2>")


def test_sick_run_console_and_recommendations(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run", exploding_component="decoder", coverage_90=0.7)
    out_dir = tmp_path / "elsewhere"
    assert cli(["--log_dir", str(folder), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert HEALTHY_LINE not in out
    assert "[!] CRITICAL decoder: exploding_gradients" in out
    assert "Verdict: broken: training itself went wrong (exploding_gradients)" in out
    assert "[!] Exploding gradients (above 100)" in out
    assert "config: optim.lr: 0.0005" in out
    findings = assert_valid_findings(out_dir / "recommendations.json")
    assert [f["issue"] for f in findings][:1] == ["exploding_gradients"]   # most severe first
    assert {f["issue"] for f in findings} == {"exploding_gradients", "miscalibration"}
    assert not (folder / "analysis").exists()
    assert_self_contained((out_dir / "report.html").read_text())


@pytest.mark.slow
def test_diagnostics_off_says_what_is_missing_and_analyses_the_rest(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run", gradients=False, attention=False, profiles=False,
                              coverage_90=0.7)
    assert cli(["--log_dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "gradients/: none (diagnostics.enable_gradient_diagnostics is off)" in out
    assert "attention/: none (diagnostics.enable_attention_logging is off)" in out
    assert "components/: none (diagnostics.enable_component_profiling is off)" in out
    assert "miscalibration" in out
    written = sorted(p.name for p in (folder / "analysis").iterdir())
    assert written == ["recommendations.json", "report.html", "skill.png", "training_curves.png"]
    assert_self_contained((folder / "analysis" / "report.html").read_text())


# --- runs in progress -------------------------------------------------------------------------

def test_half_written_last_metrics_line_is_tolerated(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 210, "ti')
    analysis = analyze(folder, [])
    assert analysis.run.train[-1]["step"] == 200
    assert any("half-written last line" in n for n in analysis.run.notes)


@pytest.mark.slow
def test_a_line_cut_by_a_crash_is_skipped_with_a_note(tmp_path, capsys):
    """A crash cut line 4 short and the resumed run appended line 5 to it: both are lost to
    JSON, the rest of the run is analysed rather than the whole run refused."""
    folder = build_run_folder(tmp_path / "run")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:20] + lines.pop(4)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert cli(["--log_dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl: skipped 1 line(s) that are not valid JSON" in out and "line 4" in out
    assert len(load_run(folder).train) > 0


def test_history_caught_mid_rewrite_falls_back_to_step_files(tmp_path):
    folder = build_run_folder(tmp_path / "run")
    history = folder / "gradients" / "history.json"
    history.write_text(history.read_text()[:100])
    run = load_run(folder)
    assert list(run.gradients.steps) == list(range(20, 201, 20))
    assert any("history.json: unreadable" in n for n in run.notes)


def test_history_ahead_of_step_files_is_used(tmp_path):
    """A run in progress: history.json may hold records whose step files are gone or late."""
    folder = build_run_folder(tmp_path / "run")
    for path in sorted((folder / "gradients").glob("gradients_step_*.json"))[5:]:
        path.unlink()
    run = load_run(folder)
    assert list(run.gradients.steps) == list(range(20, 201, 20))
    assert run.gradients.global_batch == 128


@pytest.mark.parametrize("empty_metrics", [False, True])
def test_run_without_steps_is_refused_and_nothing_written(tmp_path, capsys, empty_metrics):
    """What a refused start leaves (a config, an empty metrics.jsonl) is not a healthy run."""
    folder = tmp_path / "young"
    folder.mkdir()
    (folder / "config.yaml").write_text("optim:\n  lr: 0.001\n")
    if empty_metrics:
        (folder / "metrics.jsonl").write_text("")
    err = _error_of(capsys, [str(folder)])
    assert "no steps logged yet" in err and str(folder) in err
    assert not (folder / "analysis").exists()
    assert HEALTHY_LINE not in capsys.readouterr().out


def test_log_dir_is_accepted_as_a_positional_argument(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run", gradients=False, attention=False, profiles=False)
    assert cli([str(folder)]) == 0
    assert f"Analysis of {folder}" in capsys.readouterr().out
    assert (folder / "analysis" / "report.html").is_file()


def test_metrics_without_config_is_analysed(tmp_path):
    folder = build_run_folder(tmp_path / "run", coverage_90=0.7)
    (folder / "config.yaml").unlink()
    run = load_run(folder)
    assert any("config.yaml: missing" in n for n in run.notes)
    assert "miscalibration" in issues_of(folder)


def test_resumed_run_keeps_the_later_line_of_a_step(tmp_path):
    folder = build_run_folder(tmp_path / "run", gradients=False, attention=False, profiles=False)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    again = json.loads(next(line for line in lines if '"step": 100' in line and '"train"' in line))
    again["loss"] = -9.0
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n")
    run = load_run(folder)
    assert [line["loss"] for line in run.train if line["step"] == 100] == [-9.0]


# --- bad input: one line, exit status 2 ---------------------------------------------------------

def _error_of(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_not_a_run_folder(tmp_path, capsys):
    build_run_folder(tmp_path / "logs" / "exp1", gradients=False, attention=False, profiles=False)
    err = _error_of(capsys, ["--log_dir", str(tmp_path / "logs")])
    assert "is not a run folder" in err and "exp1" in err
    assert "no such folder" in _error_of(capsys, ["--log_dir", str(tmp_path / "missing")])


@pytest.mark.parametrize("relative,damage", [
    ("gradients/gradients_step_000040.json", "truncate"),
    ("gradients/gradients_step_000040.json", "drop_norm"),
    ("gradients/history.json", "drop_steps"),
    ("attention/attention_step_000100.json", "truncate"),
    ("attention/attribution_step_000050.json", "drop_spearman"),
    ("components/profile_step_000100.json", "drop_memory"),
    ("config.yaml", "yaml"),
    ("metrics.jsonl", "schema"),
])
def test_invalid_file_is_named(tmp_path, capsys, relative, damage):
    folder = build_run_folder(tmp_path / "run")
    path = folder / relative
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "yaml":
        path.write_text("model: [unclosed\n")
    elif damage == "schema":
        path.write_text(text.replace('"loss": ', '"loss": "high", "x": ', 1))
    else:
        doc = json.loads(text)
        {"drop_norm": lambda d: d["components"]["decoder"].pop("norm"),
         "drop_steps": lambda d: d.pop("steps"),
         "drop_spearman": lambda d: d.pop("spearman"),
         "drop_memory": lambda d: d.pop("memory")}[damage](doc)
        path.write_text(json.dumps(doc))
    err = _error_of(capsys, ["--log_dir", str(folder)])
    assert str(path) in err


def test_unreadable_file_is_named(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run")
    path = folder / "attention" / "attention_step_000050.json"
    path.unlink()
    path.mkdir()   # unreadable as a file, whoever runs the test (root ignores chmod)
    assert str(path) in _error_of(capsys, ["--log_dir", str(folder)])


@pytest.mark.slow
def test_entry_point_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "launch/analyze.py", "--log_dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "is not a run folder" in result.stderr


def test_list_thresholds(capsys):
    assert cli(["--list_thresholds"]) == 0
    assert "vanishing=1e-05" in capsys.readouterr().out


# --- compare ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_overlays_runs_and_shows_every_runs_panels(tmp_path, capsys):
    a = build_run_folder(tmp_path / "a")
    b = build_run_folder(tmp_path / "b", exploding_component="decoder", lr=3e-3)
    c = build_run_folder(tmp_path / "c", gradients=False, attention=False, profiles=False)
    assert cli(["--compare", str(a), str(b), str(c)]) == 0
    out = capsys.readouterr().out
    assert str(a) in out and str(b) in out and str(c) in out
    compare = a / "analysis" / "compare"
    for png in ("compare_curves.png", "compare_gradient_norms.png", "a/training_curves.png",
                "b/gradient_flow.png", "c/skill.png"):
        assert_valid_png(compare / png)
    html = (compare / "report.html").read_text()
    assert_self_contained(html)
    per_run = {"a": 6, "b": 6, "c": 2}      # each run's own panels, not only the first's
    assert html.count("data:image/png;base64,") == 2 + sum(per_run.values())
    assert all(f"<h2>{name}</h2>" in html for name in per_run)
    # config differences: the learning rate and the diagnostics switches, nothing else
    assert re.search(r"\n  optim\.lr +0\.001 +0\.003 +0\.001\n", out)
    assert "diagnostics.enable_gradient_diagnostics" in out and "model.dropout" not in out
    assert "<td>optim.lr</td><td>0.001</td><td>0.003</td>" in html


@pytest.mark.slow
def test_compare_says_which_run_is_better_on_shared_test_windows(tmp_path, capsys):
    """Both runs wrote test_windows.csv for the same windows: the paired interval decides."""
    a = build_run_folder(tmp_path / "a", test_windows=400, gradients=False, attention=False,
                         profiles=False)
    b = build_run_folder(tmp_path / "b", test_windows=400, window_seed=1, test_skill_shift=-0.1,
                         gradients=False, attention=False, profiles=False, lr=3e-3)
    near = build_run_folder(tmp_path / "near", test_windows=400, window_seed=2,
                            test_skill_shift=-0.002, gradients=False, attention=False,
                            profiles=False)
    assert cli(["--compare", str(a), str(b), str(near)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "is better on test" in x).strip()
    assert line.startswith("b is better on test: b's NLL (test, weights of step 200) is 0.1000 "
                           "nats lower than a's (test, weights of step 200); paired 95% interval "
                           "of b - a on the shared windows [-")
    assert line.endswith(", shown")
    low, high = map(float, re.search(r"windows \[(\S+), (\S+)\]", line).groups())
    assert low < -0.1 < high < 0     # b's test NLL is 0.1 lower by construction
    assert "neither near nor a is shown to be better on test" in out
    html = (a / "analysis" / "compare" / "report.html").read_text()
    assert "Which run is better on test" in html and "b is better on test" in html


@pytest.mark.slow
def test_compare_without_shared_windows_says_why_no_interval(tmp_path, capsys):
    a = build_run_folder(tmp_path / "a", test_windows=100, gradients=False, attention=False,
                         profiles=False)
    b = build_run_folder(tmp_path / "b", test_windows=100, first_window_day=5, gradients=False,
                         attention=False, profiles=False)
    c = build_run_folder(tmp_path / "c", gradients=False, attention=False, profiles=False)
    assert cli(["--compare", str(a), str(b), str(c)]) == 0
    out = capsys.readouterr().out
    assert ("no paired interval: the runs' test windows differ (100 and 100 windows, 0 "
            "shared)") in out
    assert "no paired interval: c has no test_windows.csv" in out
    assert "has the lower test NLL, not shown to be better" in out
    assert "none: the configs are identical" in out


def test_overfitting_advice_never_says_train_longer(tmp_path):
    """An overfitting run with too-wide intervals: miscalibration must not contradict it."""
    findings = findings_of(build_run_folder(tmp_path / "run", overfit=True, coverage_90=0.99))
    by_issue = {f.issue: f for f in findings}
    assert {"overfitting", "miscalibration"} <= set(by_issue)
    for finding in findings:
        assert "train longer" not in finding.suggestion.lower().replace("do not train longer", "")
        assert "train.epochs" not in finding.config_change
    overfit = by_issue["overfitting"]
    assert overfit.evidence["best_step"] == 50 and overfit.evidence["steps"] == [50, 100, 150, 200]
    assert overfit.config_change["model.dropout"] > build_config_dropout(tmp_path / "run")
    assert "model.dropout" not in by_issue["miscalibration"].config_change


def build_config_dropout(folder) -> float:
    import yaml
    return yaml.safe_load((folder / "config.yaml").read_text()).get("model", {}).get("dropout", 0.0)


@pytest.mark.slow
def test_no_skill_is_an_error_and_reads_the_test_line_first(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run", skill=0.05)
    finding = [f for f in findings_of(folder) if f.issue == "no_skill_over_baseline"][0]
    assert finding.severity == "error"
    assert finding.evidence["source"] == "test"
    assert finding.evidence["per_baseline"]["ewma"]["interval_95"] == [0.02, 0.08]
    assert cli(["--log_dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert ("the model loses to the random walk (EWMA volatility): its NLL is 0.0500 nats "
            "higher") in out
    assert ("Verdict: not better than a naive baseline: on test, weights of step 200 the model "
            "loses to the random walk (EWMA volatility)") in out
    assert "[!] 1 critical/error finding(s): no_skill_over_baseline" in out


@pytest.mark.slow
def test_runs_without_baseline_scores_say_so(tmp_path, capsys):
    """Runs written before the baselines were scored: no guess, no skill finding."""
    folder = build_run_folder(tmp_path / "run")
    keep = {"kind", "step", "time", "epoch", "nll", "mae", "coverage_50", "coverage_90", "rw_nll",
            "effective_components", "sigma_at_floor", "num_windows", "best"}
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    old = [{k: v for k, v in line.items() if line["kind"] not in ("val", "test") or k in keep}
           for line in lines]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in old))
    for path in (folder / "attention").glob("attribution_step_*.json"):
        record = json.loads(path.read_text())
        record.pop("blank_all")
        path.write_text(json.dumps(record))
    issues = {f.issue for f in findings_of(folder)}
    assert not issues & {"no_skill_over_baseline", "celestial_inputs_unused"}
    assert cli(["--log_dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "skill: not scored" in out and "celestial inputs: not measured" in out
    assert "Verdict: not judged: no baseline skill was scored for this run" in out


def test_restored_best_line_does_not_hide_the_last_validation(tmp_path):
    """After early stopping the best weights are validated again at the last step: that line
    must not replace the real last validation (it would hide the rise that stopped the run)."""
    folder = build_run_folder(tmp_path / "run", overfit=True)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    best = json.loads([line for line in lines if '"kind": "val"' in line][0])
    best.update(step=200, restored_best=True)
    test_at = next(i for i, line in enumerate(lines) if '"kind": "test"' in line)
    lines.insert(test_at, json.dumps(best))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(folder)
    assert [v["step"] for v in run.val] == [50, 100, 150, 200]
    assert run.val[-1]["nll"] > run.val[0]["nll"] and run.restored[0]["nll"] == run.val[0]["nll"]
    overfit = [f for f in findings_of(folder) if f.issue == "overfitting"][0]
    assert overfit.evidence["steps"] == [50, 100, 150, 200]


# --- overfitting, or early stopping that worked -----------------------------------------------

QUICKSTART_LIKE = {"num_steps": 700, "overfit": True, "overfit_best": 6, "gradients": False,
                   "attention": False, "profiles": False}


@pytest.mark.slow
def test_early_stopping_that_kept_the_best_weights_is_not_overfitting(tmp_path, capsys):
    """Best at step 300 of 700, best weights restored before the test: the rise after the best is
    the stop working, an info finding, not an overfitting warning."""
    folder = build_run_folder(tmp_path / "run", early_stopped=True, **QUICKSTART_LIKE)
    by_issue = {f.issue: f for f in findings_of(folder)}
    assert "overfitting" not in by_issue
    worked = by_issue["early_stopping_worked"]
    assert worked.severity == "info" and worked.config_change == {}
    assert worked.evidence["best_step"] == 300 and worked.evidence["kept_weights_step"] == 300
    assert cli([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "overfitting: no: early stopping kept the weights of step 300" in out
    assert HEALTHY_LINE in out


def test_early_stopping_worked_also_for_runs_before_weights_step(tmp_path):
    """Older runs: no weights_step; the restored-best line says the best weights were kept."""
    folder = build_run_folder(tmp_path / "run", early_stopped=True, weights_step=False,
                              **QUICKSTART_LIKE)
    assert "weights_step" not in load_run(folder).test[-1]
    assert {"early_stopping_worked"} <= issues_of(folder) and "overfitting" not in issues_of(folder)


@pytest.mark.parametrize("knobs,reason", [
    ({"early_stopped": True, "num_steps": 250, "overfit_best": 1},
     "the best validation is validation 1 (step 50): the model overfits almost at once"),
    ({"early_stopped": False}, "the kept weights (step 700) are past the best (step 300)"),
    ({"early_stopped": True, "test_skill_shift": 0.3},
     "the test skill over the best baseline is 0.3000 nats worse than the best validation's"),
])
def test_overfitting_warns_where_it_matters(tmp_path, knobs, reason):
    folder = build_run_folder(tmp_path / "run", **{**QUICKSTART_LIKE, **knobs})
    by_issue = {f.issue: f for f in findings_of(folder)}
    assert "early_stopping_worked" not in by_issue
    assert by_issue["overfitting"].severity == "warning"
    assert reason in by_issue["overfitting"].message


def test_thresholds_of_early_overfitting_and_the_test_gap_are_used(tmp_path):
    folder = build_run_folder(tmp_path / "run", early_stopped=True, test_skill_shift=0.3,
                              **QUICKSTART_LIKE)
    assert "overfitting" in issues_of(folder)
    assert "early_stopping_worked" in issues_of(folder, [("overfit_test_gap", 0.5)])
    assert "overfitting" in issues_of(folder, [("overfit_test_gap", 0.5),
                                               ("overfit_early_best", 6)])


# --- one source of calibration: the kept weights -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("tested", [True, False])
def test_calibration_judges_the_kept_weights_not_the_last_validation(tmp_path, capsys, tested):
    """The last validation (weights discarded by early stopping) covers 80%, the kept weights
    88%: no miscalibration finding, and every part of the report says 88%."""
    folder = build_run_folder(tmp_path / "run", early_stopped=True, coverage_90=0.88,
                              last_val_coverage_90=0.80, **QUICKSTART_LIKE)
    if not tested:      # a run not tested yet: judged on its best validation
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if '"kind": "test"' not in line and "restored" not in line]
        (folder / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert load_run(folder).val[-1]["coverage_90"] == 0.80
    assert "miscalibration" not in issues_of(folder)
    assert cli([str(folder)]) == 0
    out = capsys.readouterr().out
    source = "test, weights of step 300" if tested else "best validation, weights of step 300"
    assert f"calibration ({source}): calibrated: the 90% interval covers 88.0%" in out
    assert "80.0%" not in out and "overconfident" not in out
    html = (folder / "analysis" / "report.html").read_text()
    assert f"90% coverage ({source})" in html and "0.880" in html


def test_miscalibration_of_the_kept_weights_is_found(tmp_path):
    """The other way round: the last validation looked fine, the kept weights do not."""
    folder = build_run_folder(tmp_path / "run", early_stopped=True, coverage_90=0.80,
                              last_val_coverage_90=0.90, **QUICKSTART_LIKE)
    finding = next(f for f in findings_of(folder) if f.issue == "miscalibration")
    assert "overconfident" in finding.message and "test, weights of step 300" in finding.message
    assert finding.evidence["weights_step"] == 300


# --- the verdict's words ------------------------------------------------------------------------

def _edit_test_line(folder: Path, **changes) -> None:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if line["kind"] == "test":
            line.update(changes)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.slow
def test_skill_not_shown_by_the_line_is_not_called_a_win(tmp_path, capsys):
    """The line's own `_shown`/`_reason` (too few independent blocks) wins over the interval."""
    folder = build_run_folder(tmp_path / "run", gradients=False, attention=False, profiles=False)
    reason = "only 5 independent blocks of windows (8 needed)"
    _edit_test_line(folder, skill_ewma_shown=False, skill_ewma_reason=reason,
                    skill_shown=False, skill_reason=reason)
    assert "no_skill_over_baseline" in issues_of(folder)
    assert cli([str(folder)]) == 0
    out = capsys.readouterr().out
    assert ("Verdict: not better than a naive baseline: on test, weights of step 200 the model is "
            "not shown to beat the random walk (EWMA volatility)") in out
    assert f"; not shown: {reason}" in out


@pytest.mark.slow
@pytest.mark.parametrize("judged", [True, False])
def test_blanking_bodies_is_worded_as_reliance_not_help(tmp_path, capsys, judged):
    """With the line's own _shown/_reason, and without (runs before they were written)."""
    for name, rise in (("used", 0.3), ("unused", 0.01)):
        folder = build_run_folder(tmp_path / name, blank_all_rise=rise, gradients=False,
                                  profiles=False, judged=judged)
        assert cli([str(folder)]) == 0
        out = capsys.readouterr().out
        relies = ("the model relies on the celestial inputs: blanking every body changes the NLL "
                  f"by {rise:+.4f} nats")
        assert (relies if name == "used" else "not shown to rely on the celestial inputs") in out
        assert ("not shown: the interval includes 0" in out) == (judged and name == "unused")
        assert "inputs help" not in out and "a retrained ablation (see README, Experiments)" in out


# --- calibration per horizon step -------------------------------------------------------------

HORIZON = (0.848, 0.87, 0.88, 0.89, 0.90, 0.90, 0.91, 0.92)   # pooled 0.8898: inside the band


@pytest.mark.slow
def test_calibration_per_horizon_names_the_worst_steps(tmp_path, capsys):
    """Pooled coverage passes while step 1 covers 84.8% [84.1%, 85.5%]: the verdict and the
    finding name step 1 with its interval, and pit_histogram.png is drawn."""
    folder = build_run_folder(tmp_path / "run", coverage_90=float(np.mean(HORIZON)),
                              horizon_coverage_90=HORIZON, gradients=False, profiles=False)
    finding = next(f for f in findings_of(folder) if f.issue == "miscalibration")
    assert "step 1 (90% interval covers 84.8% [84.1%, 85.5%])" in finding.message
    assert finding.evidence["steps"] == list(range(1, 9))
    assert finding.config_change["model.dropout"] > 0.2
    assert cli([str(folder)]) == 0
    out = capsys.readouterr().out
    assert ("calibration (test, weights of step 200): overconfident (intervals too narrow) at "
            "horizon step 1 (90% interval covers 84.8% [84.1%, 85.5%])") in out
    assert "pooled over the 8 horizon steps" in out and "step 2 (" not in out
    assert_valid_png(folder / "analysis" / "pit_histogram.png")
    html = (folder / "analysis" / "report.html").read_text()
    assert html.index("Calibration per horizon step") < html.index("<h2>Summary</h2>")


@pytest.mark.slow
def test_calibrated_steps_name_the_farthest_one_and_no_finding(tmp_path, capsys):
    steps = (0.88, 0.89, 0.90, 0.91)
    folder = build_run_folder(tmp_path / "run", horizon_coverage_90=steps, gradients=False,
                              attention=False, profiles=False)
    assert "miscalibration" not in issues_of(folder)
    assert cli([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "calibrated: the 90% interval covers 90.0%" in out
    assert "farthest from 90%: step 1 (90% interval covers 88.0% [87.3%, 88.7%])" in out


@pytest.mark.slow
def test_runs_without_per_step_coverage_fall_back_to_pooled_with_a_note(tmp_path, capsys):
    folder = build_run_folder(tmp_path / "run", coverage_90=0.80, gradients=False,
                              attention=False, profiles=False)
    assert "miscalibration" in issues_of(folder)
    assert cli([str(folder)]) == 0
    out = capsys.readouterr().out
    assert ("overconfident (intervals too narrow): the 90% interval covers 80.0% and the 50% "
            "interval 50.0% of outcomes, pooled over the horizon (this run has no per-step "
            "coverage)") in out
    assert not (folder / "analysis" / "pit_histogram.png").exists()
