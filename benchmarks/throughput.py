"""Throughput of one training step: samples/s, peak RSS, FLOPs per sample, share of matmul peak.

    python benchmarks/throughput.py                                # production config, batch 12
    python benchmarks/throughput.py --optimizer fused foreach for_loop --compile --json
    python benchmarks/throughput.py --config configs/quickstart_cpu.yaml --batch-size 64

What is timed is the trainer's own step, the `TrainStep` of trainer.build.build_train_step
(forward, backward, clipping, AdamW, LR schedule), on synthetic batches of the real shapes:
warm-up steps first, then several timed rounds (median and range reported). Data loading is not
included (ddp_scaling.py times whole training runs, data included).

Each (optimizer, compile) setting runs in fresh subprocesses (several, taken in turn: this
shared VM's speed varies by 10-20% between processes and over tens of seconds), so its peak
RSS (the kernel's high-water mark VmHWM; see `peak_rss_mb` for why not ru_maxrss) is that of
training alone: Python, torch, model, optimizer state and activations. The input layout (which
columns belong to which body) comes from the real dataset, read once by this parent process;
the peak of that read is reported separately, since a real run pays it too, before its first
step.

FLOPs per sample: torch.utils.flop_counter over forward and backward (matrix products and
convolutions; elementwise work and the optimizer are not counted). The matmul peak is this
machine's own: the best of several large matrix products (fp32 on CPU, the training precision
on CUDA) with the same number of threads as the timed steps.

Every benchmark here records how busy the machine was: numbers taken while other processes
compete for the cores are wrong, and are flagged as such.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch

from benchmarks import harness
from trainer.precision import cpu_has_native_bf16

# The targets on a 2-core CPU: the production config at batch 12 (aim 200 samples/s),
# the quickstart config at batch 64.
TARGET_SAMPLES_PER_S, TARGET_PEAK_RSS_MB = 150.0, 1000.0
QUICKSTART_TARGET_SAMPLES_PER_S = 1500.0
# Longest a matrix-product peak probe may take on a CPU (it shrinks the product to fit).
MATMUL_PROBE_BUDGET_S = 10.0


# --------------------------------------------------------------------------- the machine
def peak_rss_mb() -> float:
    """This process's resident-set high-water mark, VmHWM. Not getrusage's ru_maxrss: on Linux
    a child inherits the parent's resident set at fork into it, even across exec, so a child
    of a large parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def matmul_peak_gflops(size: int, repeats: int, device: torch.device,
                       dtype: torch.dtype = torch.float32,
                       budget_s: float = MATMUL_PROBE_BUDGET_S) -> tuple[float, int]:
    """(GFLOP/s, size): the best-of-`repeats` rate of one square matrix product. On a CPU the
    product is shrunk below `size` where a `size`^2 one would take the probe past `budget_s`
    (bf16 emulated without bf16 instructions runs at about 1 GFLOP/s: 4096^2 takes minutes)."""
    if device.type == "cpu":
        size = affordable_size(size, repeats, dtype, budget_s)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)                                # warm-up (and library set-up)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9, size


def affordable_size(size: int, repeats: int, dtype: torch.dtype, budget_s: float) -> int:
    """The largest size up to `size` (a multiple of 64, at least 128) whose `repeats` + 1 products
    fit in `budget_s`, judged from the rate of one 128^2 product."""
    small = 128
    a = torch.randn(small, small, dtype=dtype)
    torch.mm(a, a)
    started = time.perf_counter()
    torch.mm(a, a)
    rate = 2 * small**3 / max(time.perf_counter() - started, 1e-9)
    largest = (budget_s * rate / (2 * (repeats + 1))) ** (1 / 3)
    return max(small, min(size, int(largest) // 64 * 64))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the step being timed
def input_spec(config):
    """The real input layout of the config's dataset (generated on first use)."""
    from series.dataset import ensure_dataset, prepare
    ensure_dataset(config.data)
    return prepare(config.data, config.model.seq_len, config.model.pred_len).spec


def synthetic_batches(config, spec, device: torch.device, count: int = 4, seed: int = 0):
    """Batches of the real shapes: unit-variance features (as after scaling) and targets that
    walk with the data's own 1-step change scale."""
    from series.dataset import Batch
    g = torch.Generator().manual_seed(seed)
    B, S, P = config.data.batch_size, config.model.seq_len, config.model.pred_len
    F, T = spec.num_features, len(spec.targets)
    step_T = torch.tensor(spec.change_scale[0])
    batches = []
    for _ in range(count):
        wave_BXF = torch.randn(B, S + P, F, generator=g)
        target_BXT = (torch.randn(B, S + P, T, generator=g) * step_T).cumsum(1)
        parts = (wave_BXF[:, :S], target_BXT[:, :S], wave_BXF[:, S:], target_BXT[:, S:])
        batches.append(Batch(*(p.contiguous() for p in parts)).to(device))
    return batches


class TimedStep:
    """The run's training step (`trainer.build.build_train_step`: model, optimizer, schedule
    and precision) with no data, logs, checkpoints or observers, driven as `Trainer.take_step`
    drives it, minus logging."""

    def __init__(self, config, spec, device: torch.device) -> None:
        from trainer.build import build_train_step
        from trainer.distributed import DistEnv
        from trainer.loop import IntervalMeter
        self.step = build_train_step(config, spec, DistEnv(0, 0, 1, device, None), total=10**6)
        self.meter, self.num_taken = IntervalMeter(device), 0
        self.clip_norm = config.optim.grad_clip_norm

    def run(self, batches, num_steps: int) -> None:
        from trainer.observer import StepContext
        for i in range(num_steps):
            self.num_taken += 1
            ctx = StepContext(step=self.num_taken, epoch=0, clip_norm=self.clip_norm,
                              lr=self.step.scheduler.get_last_lr()[0])
            loss, part_flags = self.step([batches[i % len(batches)]], ctx)
            self.meter.add(loss, ctx.grad_norm, ctx.found_inf, ctx.clip_norm, part_flags)
        _sync(self.step.device)
        self.meter.reset()


def time_rounds(timed: TimedStep, batches, steps: int, rounds: int) -> list[float]:
    """Seconds per step of each round."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        timed.run(batches, steps)
        times.append((time.perf_counter() - started) / steps)
    return times


def break_the_compiler() -> None:
    """Make inductor fail as a broken toolchain would, to exercise the eager fallback of
    `train.compile` (trainer.build.maybe_compile) on any device."""
    compile_fx = importlib.import_module("torch._inductor.compile_fx")

    def failing_compile_fx(*args, **kwargs):
        raise RuntimeError("compiler failure forced by the benchmark (--force-compile-failure)")
    compile_fx.compile_fx = failing_compile_fx


def compile_outcome() -> dict:
    """What torch.compile did in this process: graphs compiled, graph breaks, failures."""
    from torch._dynamo.utils import counters
    graphs = counters["stats"].get("unique_graphs", 0)
    failures = counters["aot_autograd"].get("not_ok", 0)
    status = "compiled" if graphs and not failures else "partly compiled" if graphs else \
        "fell back to eager"
    return {"status": status, "graphs": graphs, "failed_graphs": failures,
            "graph_breaks": sum(counters["graph_break"].values())}


def measure_here(job: dict) -> dict:
    """Build the step, warm up, time rounds; runs inside the fresh child process."""
    from model import InputSpec
    from trainer.distributed import pick_device
    config = harness.load_config(job["config"], job["overrides"])
    device = pick_device(job["device"], 0)
    if job.get("force_compile_failure"):
        break_the_compiler()
    timed = TimedStep(config, InputSpec.from_dict(job["spec"]), device)
    step = timed.step
    batches = synthetic_batches(config, step.model.spec, device)
    rss_built_mb = psutil.Process().memory_info().rss / 2**20
    started = time.perf_counter()
    timed.run(batches, 1)                         # includes any compilation
    first_step_s = time.perf_counter() - started
    timed.run(batches, max(0, job["warmup"] - 1))
    step_times = time_rounds(timed, batches, job["steps"], job["rounds"])
    result = {"optimizer": config.optim.implementation,
              "fused": bool(step.optimizer.defaults.get("fused")),
              "foreach": bool(step.optimizer.defaults.get("foreach")),
              "compile": config.train.compile, "device": str(device),
              "precision": str(step.autocast_dtype or torch.float32).replace("torch.", ""),
              "batch_size": config.data.batch_size, "torch_threads": torch.get_num_threads(),
              "warmup": job["warmup"], "steps": job["steps"],
              "first_step_s": first_step_s, "step_time_s": step_times,
              "samples_per_s": [config.data.batch_size / t for t in step_times],
              "rss_after_build_mb": rss_built_mb,
              "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    if config.train.compile:
        result["compile_outcome"] = compile_outcome()
    return result


def measure_in_subprocess(job: dict, env: dict | None = None, timeout: int = 3600) -> dict:
    """`measure_here` in a fresh Python process (its own peak RSS, its own compile caches)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"],
                          input=json.dumps(job), capture_output=True, text=True, cwd=harness.REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize_times(result: dict) -> dict:
    rates = result["samples_per_s"]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "step_ms": 1e3 * statistics.median(result["step_time_s"])}


def measure_settings(jobs: list[dict], repeats: int) -> list[dict]:
    """Each job in `repeats` fresh processes, in turn (A B C A B C ...), so that a slow spell
    of the machine, or a lucky or unlucky process, does not favour one setting."""
    results: list[list[dict]] = [[] for _ in jobs]
    for _ in range(repeats):
        for job, done in zip(jobs, results):
            done.append(measure_in_subprocess(job))
    return [merge_processes(done) for done in results]


def merge_processes(results: list[dict]) -> dict:
    """One setting over several processes: rounds pooled, memory at its highest."""
    merged = dict(results[0])
    for key in ("samples_per_s", "step_time_s"):
        merged[key] = [x for r in results for x in r[key]]
    for key in ("peak_rss_mb", "rss_after_build_mb", "first_step_s"):
        merged[key] = max(r[key] for r in results)
    merged["processes"] = len(results)
    merged["process_medians"] = [statistics.median(r["samples_per_s"]) for r in results]
    merged["summary"] = summarize_times(merged)
    return merged


# ----------------------------------------------------------------------------- the script
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(harness.PRODUCTION),
                   help="YAML config (default: production)")
    p.add_argument("--batch-size", type=int, default=12, help="samples per step (default 12)")
    p.add_argument("--optimizer", nargs="+", default=["fused"],
                   choices=["fused", "foreach", "for_loop"], help="AdamW implementation(s)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (train.compile)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    p.add_argument("--repeats", type=int, default=2,
                   help="fresh processes per setting, taken in turn (rounds are pooled)")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--matmul-repeats", type=int, default=5)
    harness.add_common_options(p)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, f"data.batch_size={args.batch_size}"]


def model_facts(config, spec) -> dict:
    """Parameters, input width and FLOPs per sample (counted here, not in the timed child)."""
    from diagnostics.profiling import count_flops_per_sample
    from model import CelestialPGAT
    model = CelestialPGAT(config.model, spec)
    flops = count_flops_per_sample(model, spec.num_features, len(spec.targets),
                                   torch.device("cpu"), batch=config.data.batch_size)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "num_features": spec.num_features, "num_bodies": len(spec.bodies),
            "num_targets": len(spec.targets), "flops_per_sample": flops}


def settings(args: argparse.Namespace) -> list[tuple[str, bool]]:
    return [(opt, compiled) for compiled in ([False, True] if args.compile else [False])
            for opt in args.optimizer]


def run_benchmark(args: argparse.Namespace) -> dict:
    witness = harness.CpuWitness()
    overrides = base_overrides(args)
    config = harness.load_config(args.config, overrides)
    spec = input_spec(config)
    data_peak_mb = peak_rss_mb()
    facts = model_facts(config, spec)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, size = matmul_peak_gflops(args.matmul_size, args.matmul_repeats, device, dtype)
    # On a CPU also the bf16 peak, in the same run: which one training approaches depends on
    # the precision (trainer/precision.py picks bf16 only where its products are faster).
    # Only where the CPU has bf16 instructions: elsewhere bf16 is emulated and never chosen.
    bf16_peak, bf16_size = (
        matmul_peak_gflops(args.matmul_size, args.matmul_repeats, device, torch.bfloat16)
        if device.type == "cpu" and cpu_has_native_bf16() else (None, None))
    jobs = [{"config": args.config, "device": device.type, "spec": spec.to_dict(),
             "overrides": overrides + [f"optim.implementation={optimizer}",
                                       f"train.compile={str(compiled).lower()}"],
             "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds}
            for optimizer, compiled in settings(args)]
    runs = measure_settings(jobs, args.repeats)
    for run in runs:
        achieved_gflops = facts["flops_per_sample"] * run["summary"]["median"] / 1e9
        run["matmul_peak_fraction"] = achieved_gflops / peak
        if bf16_peak:
            run["bf16_matmul_peak_fraction"] = achieved_gflops / bf16_peak
    return {"benchmark": "throughput", "config": str(args.config), "batch_size": args.batch_size,
            "overrides": overrides, "machine": harness.machine_info(),
            "model": facts, "matmul_peak_gflops": peak, "matmul_size": size,
            "bf16_matmul_peak_gflops": bf16_peak, "bf16_matmul_size": bf16_size,
            "matmul_dtype": str(dtype).replace("torch.", ""),
            "data_preparation_peak_rss_mb": data_peak_mb, "runs": runs,
            "load": witness.report()}


def format_report(r: dict) -> str:
    m, f = r["machine"], r["model"]
    lines = [
        f"Training-step throughput: {Path(r['config']).name}, batch {r['batch_size']}",
        (f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
         f"torch {m['torch']}; {m['date']}"),
        (f"model: {f['parameters']:,} parameters; F={f['num_features']} feature columns, "
         f"{f['num_bodies']} bodies, {f['num_targets']} targets"),
        (f"FLOPs per sample (forward+backward, torch.utils.flop_counter): "
         f"{f['flops_per_sample'] / 1e9:.3f} GFLOP"),
        (f"matmul peak of this machine ({r['matmul_dtype']} {r['matmul_size']}^2, best of "
         f"several): {r['matmul_peak_gflops']:.1f} GFLOP/s"
         + (f"; bfloat16 ({r['bf16_matmul_size']}^2): {r['bf16_matmul_peak_gflops']:.1f} GFLOP/s"
            if r.get("bf16_matmul_peak_gflops") else
            "; bfloat16: not measured (no bf16 instructions: emulated, never chosen)")),
        "",
        (f"{'optimizer':<10} {'compile':<8} {'threads':>7} {'samples/s (median [min-max])':>30} "
         f"{'step ms':>8} {'peak RSS MB':>12} {'of matmul peak':>15}  per-process medians"),
    ]
    for run in r["runs"]:
        lines += run_rows(run)
    lines += [
        "",
        (f"samples/s: {r['runs'][0]['processes']} fresh process(es) per setting, taken in turn, "
         f"each {r['runs'][0]['warmup']} warm-up steps then rounds of {r['runs'][0]['steps']} "
         "timed steps; median and range over all rounds."),
        ("peak RSS: VmHWM of a fresh process that only builds the model and takes the steps "
         "(synthetic batches, no dataset), the highest over the processes;"),
        (f"reading the dataset for its layout peaked at {r['data_preparation_peak_rss_mb']:.0f} "
         "MB RSS in the parent process (a real run pays that before training)."),
        (f"targets (2 cores): production batch 12 >= {TARGET_SAMPLES_PER_S:.0f} "
         f"samples/s in <= {TARGET_PEAK_RSS_MB / 1000:.1f} GB peak RSS; quickstart batch 64 >= "
         f"{QUICKSTART_TARGET_SAMPLES_PER_S:,.0f} samples/s"),
        harness.describe_load(r["load"]),
    ]
    return "\n".join(lines)


def run_rows(run: dict) -> list[str]:
    s = run["summary"]
    rate = f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"
    rows = [(f"{run['optimizer']:<10} {run['compile']!s:<8} {run['torch_threads']:>7} "
             f"{rate:>30} {s['step_ms']:>8.1f} {run['peak_rss_mb']:>12.0f} "
             f"{100 * run['matmul_peak_fraction']:>14.1f}%  "
             + " ".join(f"{m:.1f}" for m in run["process_medians"]))]
    if "bf16_matmul_peak_fraction" in run:
        share = 100 * run["bf16_matmul_peak_fraction"]
        rows.append(f"    of the bfloat16 matmul peak: {share:.1f}%")
    if "compile_outcome" in run:
        c = run["compile_outcome"]
        rows.append(f"    torch.compile: {c['status']} ({c['graphs']} graph(s), "
                    f"{c['graph_breaks']} graph break(s)); first step {run['first_step_s']:.1f} s")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_here(json.load(sys.stdin))))
        return
    result = run_benchmark(args)
    harness.print_result(result, args.json, format_report)


if __name__ == "__main__":
    main()
