"""Each benchmark script runs end to end on a tiny model and reports numbers that parse.

Smoke tests only: they show the scripts work, not how fast anything is (benchmarks/RESULTS.md
holds the measured numbers). The runs of whole scripts are `extended` (opt-in, `-m extended`,
about 3 minutes together): run them when a benchmark or what it drives changes; their unit
tests and refusals stay in the default suite.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, small_overrides
from trainer.precision import cpu_has_native_bf16

pytestmark = pytest.mark.slow
QUICKSTART = "configs/quickstart_cpu.yaml"


def tiny(short_csv, tmp_path) -> list[str]:
    """The unit tests' small model and short dataset as `key=value` overrides (no spaces)."""
    pairs = [(k, v) for k, v in small_overrides(short_csv, tmp_path)
             if k.split(".")[0] in ("model", "data", "optim")]
    return [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
            for k, v in pairs]


def run_script(name: str, *args: str, env: dict | None = None, timeout: int = 300):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.extended
def test_throughput_reports_rate_memory_flops_and_share_of_peak(short_csv, tmp_path):
    from benchmarks.throughput import format_report
    result = run_script("throughput.py", "--config", QUICKSTART, "--batch-size", "8",
                        "--optimizer", "fused", "for_loop", "--warmup", "2", "--steps", "3",
                        "--rounds", "2", "--repeats", "2", "--matmul-size", "256",
                        "--matmul-repeats", "2",
                        "--json", "--set", *tiny(short_csv, tmp_path))
    assert result["model"]["flops_per_sample"] > 0 and result["matmul_peak_gflops"] > 0
    assert [r["optimizer"] for r in result["runs"]] == ["fused", "for_loop"]
    assert [r["fused"] for r in result["runs"]] == [True, False]
    for run in result["runs"]:
        assert run["processes"] == 2 and len(run["process_medians"]) == 2
        assert len(run["samples_per_s"]) == 4 and all(r > 0 for r in run["samples_per_s"])
        assert run["peak_rss_mb"] >= run["rss_after_build_mb"] > 50
        assert 0 < run["matmul_peak_fraction"] < 1
        if cpu_has_native_bf16():
            assert run["bf16_matmul_peak_fraction"] > 0 and result["bf16_matmul_peak_gflops"] > 0
        else:       # emulated bf16 is not probed (minutes for a 4096^2 product on some CPUs)
            assert "bf16_matmul_peak_fraction" not in run
            assert result["bf16_matmul_peak_gflops"] is None
    assert {"other_processes_cores", "quiet", "load_1m_before"} <= set(result["load"])
    report = format_report(result)
    assert "samples/s" in report and "peak RSS" in report and "of matmul peak" in report


def test_the_matmul_peak_probe_shrinks_its_product_to_its_time_budget():
    """A 4096^2 product of emulated bf16 takes minutes: the probe measures a smaller one."""
    from benchmarks.throughput import affordable_size, matmul_peak_gflops
    assert affordable_size(4096, 3, torch.float32, budget_s=1e-4) == 128
    assert affordable_size(256, 3, torch.float32, budget_s=1e4) == 256
    size = affordable_size(4096, 3, torch.float32, budget_s=0.05)
    assert 128 <= size < 4096 and size % 64 == 0
    gflops, measured = matmul_peak_gflops(4096, 2, torch.device("cpu"), budget_s=0.05)
    assert gflops > 0 and measured < 4096


@pytest.mark.extended
def test_profile_step_splits_the_whole_step_into_categories(short_csv, tmp_path):
    from benchmarks.profile_step import CATEGORIES, format_report
    result = run_script("profile_step.py", "--config", QUICKSTART, "--batch-size", "8",
                        "--precision", "fp32", "bf16", "--warmup", "1", "--steps", "2",
                        "--json", "--set", *tiny(short_csv, tmp_path))
    assert [r["precision"] for r in result["results"]] == ["fp32", "bf16"]
    for run in result["results"]:
        parts = run["ms_per_step"]
        assert set(parts) == set(CATEGORIES) and parts["matmul"] > 0
        assert sum(parts.values()) == pytest.approx(run["step_ms"], rel=0.05)
        assert run["operator_calls_per_step"] > 50 and run["top_non_matmul"]
    report = format_report(result["results"], result["machine"], QUICKSTART)
    assert "python and dispatch" in report and "operator calls per step" in report


@pytest.mark.extended
def test_compile_speedup_falls_back_and_claims_no_speedup(short_csv, tmp_path):
    result = run_script("compile_speedup.py", "--config", QUICKSTART, "--batch-size", "8",
                        "--warmup", "2", "--steps", "3", "--rounds", "1",
                        "--force-compile-failure", "--json", "--set", *tiny(short_csv, tmp_path))
    assert result["compile_outcome"]["status"] == "fell back to eager"
    assert result["speedup"] is None and result["throughput_ratio"] > 0
    assert result["compiled"]["compile"] and not result["eager"]["compile"]
    assert result["eager"]["summary"]["median"] > 0 and result["compiled"]["summary"]["median"] > 0


@pytest.mark.extended
def test_diagnostics_overhead_interleaves_and_sizes_records(short_csv, tmp_path):
    intervals = ["diagnostics.gradient_log_interval=10", "diagnostics.attention_log_interval=10",
                 "diagnostics.profile_interval=20"]
    result = run_script("diagnostics_overhead.py", "--configs", QUICKSTART, "--pairs", "2",
                        "--block", "10", "--group", "1", "--warmup", "2", "--num-batches", "4",
                        "--json",
                        "--set", *tiny(short_csv, tmp_path), *intervals)
    (config,) = result["configs"]
    assert config["observer_activations"] == {"GradientObserver": 2, "AttentionObserver": 2,
                                              "AttributionObserver": 0, "ProfileObserver": 1}
    assert math.isfinite(config["overhead"]) and len(config["group_overhead"]["all"]) == 2
    assert config["attributed_overhead"] is None      # every "on" block here ran an observer
    assert all(config["samples_per_s"][arm]["total"] > 0 for arm in ("on", "off"))
    sizes = config["record_bytes"]
    assert 0 < sizes["gradient_record"] < 100_000 and 0 < sizes["attention_record"] < 100_000
    assert sizes["profile_record"] > 0


@pytest.mark.extended
def test_ddp_scaling_times_two_ranks_and_checkpoint_blocking(short_csv, tmp_path):
    result = run_script("ddp_scaling.py", "--config", QUICKSTART, "--batch-size", "8",
                        "--ranks", "2", "--no-baseline",
                        "--steps", "6", "--log-interval", "2", "--checkpoint-interval", "2",
                        "--saves", "2", "--json", "--set", *tiny(short_csv, tmp_path))
    (run,) = result["throughput"]
    assert (run["ranks"], run["threads_per_rank"], run["global_batch"]) == (2, 1, 16)
    assert run["samples_per_s"]["median"] > 0
    assert [c["mode"] for c in result["checkpoints"]] == ["sync", "async"]
    for c in result["checkpoints"]:
        assert len(c["blocked_s"]) == 2 and all(b > 0 for b in c["blocked_s"])
        assert c["checkpoint_bytes"] > 0


def run_gpu_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHON": sys.executable, **env})


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(),
                            reason="with a GPU, gpu_check.sh runs for real")


@NO_GPU
def test_gpu_check_without_a_gpu_says_so_and_exits_77():
    proc = run_gpu_check({})
    assert proc.returncode == 77 and "no CUDA GPU" in proc.stderr


@NO_GPU
@pytest.mark.extended
def test_gpu_check_dry_run_on_cpu_prints_every_number(short_csv, tmp_path):
    proc = run_gpu_check({"GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_CONFIG": QUICKSTART,
                          "GPU_CHECK_STEPS": "20", "GPU_CHECK_PROFILE_INTERVAL": "10",
                          "GPU_CHECK_OUT": str(tmp_path / "out"), "GPU_CHECK_SET": " ".join(
                              tiny(short_csv, tmp_path) + ["train.device=cpu"])})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    for precision in ("bf16", "fp32"):
        assert f"-- {precision} on" in out
    assert out.count("samples/s") == 2 and out.count("MFU: unknown") == 2
    assert "celestial_to_target_attention" in out and "gpu_check: done" in out


def test_interval_coverage_reports_both_methods_at_every_size():
    result = run_script("interval_coverage.py", "--replications", "8", "--json")
    assert [row["windows"] for row in result["single_series"]] == [120, 400, 4000]
    for row in result["single_series"]:
        for method in ("bootstrap", "studentised_hac"):
            assert 0 <= row[method]["coverage"] <= 1
    assert [row["seeds"] for row in result["over_seeds"]] == [2, 3, 5, 10]


@pytest.mark.extended
def test_parallel_trials_runs_every_layout_through_the_experiment_runner(short_csv, tmp_path):
    from benchmarks.parallel_trials import LAYOUTS, format_report
    cores = sorted(os.sched_getaffinity(0))
    n = min(2, len(cores))
    result = run_script("parallel_trials.py", "--parallel", str(n), "--steps", "12",
                        "--log-interval", "2", "--warmup-intervals", "1", "--json",
                        "--set", *tiny(short_csv, tmp_path))
    runs = {run["layout"]: run for run in result["runs"]}
    assert [run["layout"] for run in result["runs"]] == list(LAYOUTS)
    assert [runs[x]["trials"] for x in LAYOUTS] == [1, n, n, n]
    share = len(cores) // n
    assert [runs[x]["threads_per_trial"] for x in LAYOUTS] == [share, share, share, len(cores)]
    pinned = runs["pinned"]["cores_of_each_trial"]
    assert sorted(c for each in pinned for c in each) == cores    # disjoint shares, all cores
    assert runs["alone"]["cores_of_each_trial"] == [pinned[0]]
    for layout in ("unpinned", "oversubscribed"):
        assert runs[layout]["cores_of_each_trial"] == [cores] * n
    for run in result["runs"]:
        assert len(run["samples_per_s_each"]) == run["trials"]
        assert all(rate > 0 for rate in run["samples_per_s_each"])
    summary = result["summary"]
    assert summary["verdict"] in ("PASS", "FAIL", "NOT MEASURED")
    assert set(summary["vs_n_times_alone"]) == set(LAYOUTS) - {"alone"}
    assert all(ratio > 0 for ratio in summary["vs_n_times_alone"].values())
    assert set(summary["pinned_over"]) == {"unpinned", "oversubscribed"}
    report = format_report(result)
    assert "only on an otherwise idle machine" in report and result["machine"]["cpu"] in report
    assert report.count(f"{summary['verdict']}:") == 1 and "pinned / unpinned" in report


def test_parallel_trials_counts_only_the_time_every_trial_was_training():
    from benchmarks.parallel_trials import Interval, while_all_trained
    early = [Interval(0, 1, 10), Interval(1, 2, 10), Interval(2, 3, 10)]
    late = [Interval(1, 2, 20), Interval(2, 3, 20), Interval(3, 4, 20)]
    assert while_all_trained([early, late]) == [early[1:], late[:2]]
    apart = [Interval(5, 6, 20)]
    assert while_all_trained([early, apart]) == [[], []]
    assert while_all_trained([early, []]) == [[], []]


@pytest.mark.parametrize("args, message", [
    (["--parallel", "999"], "--parallel 999: this process may use only"),
    (["--steps", "10", "--log-interval", "5", "--warmup-intervals", "2"], "leaves no interval"),
    (["--set", "model.no_such_key=1"], "model.no_such_key"),
    (["--layouts", "alone", "unpinned"], "--layouts must include alone and pinned"),
])
def test_parallel_trials_refuses_bad_options_in_one_line(tmp_path, capsys, args, message):
    from benchmarks.parallel_trials import main
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == "", captured.err
    assert captured.err.startswith("error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not out.exists()
