"""Eager against torch.compile: training-step throughput on this device, and the fallback.

    python benchmarks/compile_speedup.py                       # production config, batch 12
    python benchmarks/compile_speedup.py --force-compile-failure --json

Both settings time the step of throughput.py (the trainer's `TrainStep` on synthetic batches of the
real shapes), each in a fresh process. `train.compile: true` goes through the trainer's own
`maybe_compile`, which falls back to eager execution with a warning when compilation fails.
The first step (tracing and code generation when compiling) is reported apart and is never in
the timed rounds. `--force-compile-failure` makes inductor fail, as a broken compiler toolchain
would: the compiled setting then runs eager, says so, and no speedup is claimed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness
from benchmarks.throughput import input_spec, measure_settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(harness.PRODUCTION),
                   help="YAML config (default: production)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--optimizer", default="fused", choices=["fused", "foreach", "for_loop"])
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per setting, taken in turn (rounds are pooled)")
    p.add_argument("--force-compile-failure", action="store_true",
                   help="make the compiler fail, to exercise the eager fallback")
    harness.add_common_options(p)
    return p.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    witness = harness.CpuWitness()
    overrides = [*args.overrides, f"data.batch_size={args.batch_size}",
                 f"optim.implementation={args.optimizer}"]
    spec = input_spec(harness.load_config(args.config, overrides))
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    jobs = [{"config": args.config, "device": device, "spec": spec.to_dict(),
             "overrides": overrides + [f"train.compile={str(compiled).lower()}"],
             "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
             "force_compile_failure": compiled and args.force_compile_failure}
            for compiled in (False, True)]
    runs = dict(zip(("eager", "compiled"), measure_settings(jobs, args.repeats)))
    outcome = runs["compiled"]["compile_outcome"]
    ratio = runs["compiled"]["summary"]["median"] / runs["eager"]["summary"]["median"]
    return {"benchmark": "compile_speedup", "config": str(args.config),
            "batch_size": args.batch_size, "device": device, "overrides": overrides,
            "machine": harness.machine_info(), "eager": runs["eager"], "compiled": runs["compiled"],
            "compile_outcome": outcome,
            "speedup": ratio if outcome["status"] != "fell back to eager" else None,
            "throughput_ratio": ratio, "load": witness.report()}


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [(f"torch.compile speedup: {Path(r['config']).name}, batch {r['batch_size']}, "
              f"device {r['device']}"),
             f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; {m['date']}", ""]
    for name in ("eager", "compiled"):
        run, s = r[name], r[name]["summary"]
        lines.append(f"{name:<9} {s['median']:8.1f} samples/s [{s['min']:.1f}-{s['max']:.1f}], "
                     f"step {s['step_ms']:.1f} ms, first step {run['first_step_s']:.1f} s "
                     f"(slowest process), peak RSS {run['peak_rss_mb']:.0f} MB")
    c = r["compile_outcome"]
    lines.append(f"torch.compile: {c['status']} ({c['graphs']} graph(s), {c['failed_graphs']} "
                 f"failed, {c['graph_breaks']} graph break(s))")
    if r["speedup"] is None:
        lines.append(f"speedup: none claimed: compilation failed and training fell back to eager "
                     f"(throughput ratio {r['throughput_ratio']:.2f}, eager against eager)")
    else:
        lines.append(f"speedup: {r['speedup']:.2f}x (compiled / eager samples/s, medians)")
    lines.append(harness.describe_load(r["load"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_benchmark(args)
    harness.print_result(result, args.json, format_report)


if __name__ == "__main__":
    main()
