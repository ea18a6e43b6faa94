"""DDP on CPU: samples/s at 1 and 2 ranks with the same per-rank batch, and how long a
checkpoint save blocks training, synchronous against asynchronous.

    python benchmarks/ddp_scaling.py                         # production config, batch 12 per rank
    python benchmarks/ddp_scaling.py --config configs/quickstart_cpu.yaml --json

Every number comes from real training runs, `torchrun --standalone --nproc_per_node=N
launch/train.py` (gloo), read back from their metrics.jsonl: a `train` line per log interval
(samples/s over all ranks, data loading included) and a `checkpoint` line per save (blocked_s:
what CheckpointManager.save returned, the seconds training waited for it).

Threads, so that both world sizes use the same cores: N ranks get OMP_NUM_THREADS = cores / N
each (2 cores: 1 rank x 2 threads, 2 ranks x 1 thread). 1 rank x 1 thread also runs, to tell
the per-rank speed from the scaling. The first log interval (warm-up) is left out; validation
runs only at the end of each run, outside the timed intervals.

Checkpoint runs save every --checkpoint-interval (K) steps and log every K/4: besides blocked_s,
"time lost per save" is the run's extra time over what its intervals without a save take,
per save. It counts an asynchronous write's competition for the cores after the call returned.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness


def train_command(config: str, ranks: int, name: str, out: Path, steps: int, log_interval: int,
                  checkpoint_interval: int, overrides: list[str]) -> list[str]:
    """torchrun of launch/train.py; what defines the run comes last, so it wins."""
    run = [f"train.experiment_name={name}", f"train.max_steps={steps}",
           f"train.log_interval={log_interval}", f"checkpoint.interval={checkpoint_interval}",
           f"train.log_root={out / 'logs'}", f"checkpoint.root={out / 'checkpoints'}",
           "train.progress_bar=false", "train.validate_at_start=false",
           f"train.eval_interval={10**9}", "train.early_stopping_patience=0"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", str(harness.REPO / "launch" / "train.py"),
            "--config", config, "--set", *overrides, *run]


def train(args: argparse.Namespace, out: Path, name: str, ranks: int, threads: int, steps: int,
          log_interval: int, checkpoint_interval: int, extra: list[str]) -> list[dict]:
    """One training run; returns its metrics.jsonl lines."""
    cmd = train_command(args.config, ranks, name, out, steps, log_interval, checkpoint_interval,
                        [*args.overrides, *extra])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=harness.REPO, env=env, capture_output=True, text=True,
                          check=False, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = (out / "logs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def throughput_run(args, out: Path, ranks: int, threads: int, repeat: int) -> list[dict]:
    """The timed train lines of one run (the first interval, warm-up, left out)."""
    name = f"ddp_{ranks}r_{threads}t_{repeat}"
    lines = train(args, out, name, ranks, threads, args.steps, args.log_interval,
                  10**9, [f"data.batch_size={args.batch_size}"])
    return [line for line in lines if line["kind"] == "train"][1:]


def throughput_runs(args, out: Path, layouts: list[tuple[int, int]]) -> list[dict]:
    """Every layout `--repeats` times, in turn (A B C A B C ...); intervals pooled."""
    lines = {layout: [] for layout in layouts}
    medians = {layout: [] for layout in layouts}
    for repeat in range(args.repeats):
        for ranks, threads in layouts:
            timed = throughput_run(args, out, ranks, threads, repeat)
            lines[(ranks, threads)] += timed
            run_median = statistics.median(line["samples_per_s"] for line in timed)
            medians[(ranks, threads)].append(run_median)
    return [summarize_layout(args, ranks, threads, lines[(ranks, threads)],
                             medians[(ranks, threads)]) for ranks, threads in layouts]


def summarize_layout(args, ranks: int, threads: int, timed: list[dict],
                     run_medians: list[float]) -> dict:
    rates = [line["samples_per_s"] for line in timed]
    return {"ranks": ranks, "threads_per_rank": threads, "per_rank_batch": args.batch_size,
            "global_batch": args.batch_size * ranks, "intervals": len(rates),
            "samples_per_s": {"median": statistics.median(rates), "min": min(rates),
                              "max": max(rates)},
            "run_medians": run_medians,
            "step_time_ms": 1e3 * statistics.median(line["step_time_s"] for line in timed),
            "rank0_rss_mb_max": max(line["memory_mb"] for line in timed)}


def time_lost_per_save(train_lines: list[dict], save_steps: list[int], blocked: list[float],
                       log_interval: int) -> float | None:
    """Training time each save costs: the save call's blocking time (the trainer pauses its
    throughput clock for it) plus what the timed intervals took beyond the median interval
    without a save (an asynchronous write competing for the cores afterwards). A save at step k
    follows the log line of step k: (k, k+L] holds its aftermath."""
    timed = train_lines[1:]                                       # first: warm-up
    holding = {s + log_interval for s in save_steps}
    counted = [line for line in timed if line["step"] in holding]
    plain = [line["step_time_s"] for line in timed if line["step"] not in holding]
    if not counted or not plain:
        return None
    typical = statistics.median(plain)
    extra = sum((line["step_time_s"] - typical) * log_interval for line in timed) / len(counted)
    return statistics.mean(blocked) + extra


def newest_checkpoint_bytes(folder: Path) -> int:
    newest = max(folder.glob("checkpoint_step_*"), default=None)
    return sum(f.stat().st_size for f in newest.iterdir()) if newest else 0


def checkpoint_run(args, out: Path, ranks: int, threads: int, mode: str) -> dict:
    name = f"ckpt_{ranks}r_{mode}"
    K = args.checkpoint_interval
    log_interval = max(1, K // 4)
    lines = train(args, out, name, ranks, threads, K * args.saves, log_interval, K,
                  [f"data.batch_size={args.batch_size}",
                   f"checkpoint.async_save={'true' if mode == 'async' else 'false'}",
                   f"checkpoint.keep_last={args.saves}"])
    blocked = [line["blocked_s"] for line in lines if line["kind"] == "checkpoint"]
    save_steps = [line["step"] for line in lines if line["kind"] == "checkpoint"]
    train_lines = [line for line in lines if line["kind"] == "train"]
    return {"ranks": ranks, "threads_per_rank": threads, "mode": mode, "saves": len(blocked),
            "blocked_s": blocked,
            "blocked_s_median_after_first": statistics.median(blocked[1:] or blocked),
            "time_lost_per_save_s": time_lost_per_save(train_lines, save_steps, blocked,
                                                       log_interval),
            "checkpoint_bytes": newest_checkpoint_bytes(out / "checkpoints" / name)}


def run_benchmark(args: argparse.Namespace, out: Path) -> dict:
    witness = harness.CpuWitness()
    cores = os.cpu_count() or 1
    layouts = [(ranks, max(1, cores // ranks)) for ranks in args.ranks]
    if args.baseline and (1, 1) not in layouts:
        layouts.append((1, 1))
    throughput = throughput_runs(args, out, layouts)
    checkpoints = [checkpoint_run(args, out, ranks, max(1, cores // ranks), mode)
                   for ranks in args.ranks for mode in ("sync", "async")] if args.saves else []
    num_workers = harness.load_config(args.config, args.overrides).data.num_workers
    return {"benchmark": "ddp_scaling", "config": args.config, "per_rank_batch": args.batch_size,
            "overrides": args.overrides, "data_workers_per_rank": num_workers,
            "machine": harness.machine_info(), "throughput": throughput,
            "scaling": scaling(throughput, cores), "checkpoints": checkpoints,
            "load": witness.report()}


def scaling(runs: list[dict], cores: int) -> dict:
    """2-rank samples/s against 1 rank on all cores, and against 2 x one single-thread rank."""
    by = {(r["ranks"], r["threads_per_rank"]): r["samples_per_s"]["median"] for r in runs}
    two, all_cores, one_thread = by.get((2, max(1, cores // 2))), by.get((1, cores)), by.get((1, 1))
    return {"two_ranks_vs_one_rank_all_cores": two / all_cores if two and all_cores else None,
            "two_ranks_vs_twice_one_thread": two / (2 * one_thread) if two and one_thread else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(harness.PRODUCTION),
                   help="YAML config (default: production)")
    p.add_argument("--batch-size", type=int, default=12, help="per rank (default 12)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the 1 rank x 1 thread run")
    p.add_argument("--steps", type=int, default=60, help="steps of each throughput run")
    p.add_argument("--repeats", type=int, default=1,
                   help="throughput runs per layout, taken in turn (intervals pooled)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--checkpoint-interval", type=int, default=20)
    p.add_argument("--saves", type=int, default=4, help="saves per checkpoint run (0: none)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training run")
    harness.add_out_option(p)
    harness.add_common_options(p)
    return p.parse_args(argv)


def format_report(r: dict) -> str:
    m, sc = r["machine"], r["scaling"]
    lines = [
        (f"DDP scaling on CPU (gloo, torchrun): {Path(r['config']).name}, "
         f"{r['per_rank_batch']} samples per rank per step, "
         f"{r['data_workers_per_rank']} data-loader worker(s) per rank"),
        f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; {m['date']}",
        "",
        (f"{'ranks':>5} {'threads/rank':>12} {'global batch':>12} "
         f"{'samples/s (median [min-max])':>30} {'step ms':>8} {'rank-0 RSS MB':>13}  "
         "per-run medians"),
    ]
    for t in r["throughput"]:
        s = t["samples_per_s"]
        rate = f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"
        lines.append(f"{t['ranks']:>5} {t['threads_per_rank']:>12} {t['global_batch']:>12} "
                     f"{rate:>30} {t['step_time_ms']:>8.1f} {t['rank0_rss_mb_max']:>13.0f}  "
                     + " ".join(f"{m:.1f}" for m in t["run_medians"]))
    if sc["two_ranks_vs_one_rank_all_cores"] is not None:
        lines.append(f"2 ranks / 1 rank on all cores: {sc['two_ranks_vs_one_rank_all_cores']:.2f}x")
    if sc["two_ranks_vs_twice_one_thread"] is not None:
        lines.append(f"2 ranks / (2 x one single-thread rank): "
                     f"{sc['two_ranks_vs_twice_one_thread']:.2f}")
    lines += checkpoint_rows(r["checkpoints"])
    lines += ["", ("samples/s: the runs' own train lines (all ranks, data loading included), "
                   "first interval left out; rank-0 RSS: the largest of their memory_mb "
                   "(resident set at each log step, not a peak)."),
              harness.describe_load(r["load"])]
    return "\n".join(lines)


def checkpoint_rows(checkpoints: list[dict]) -> list[str]:
    if not checkpoints:
        return []
    rows = ["", (f"{'ranks':>5} {'save':>6} {'blocked s (each save)':>36} "
                 f"{'median after 1st':>16} {'lost per save s':>15} {'size MB':>8}")]
    for c in checkpoints:
        each = " ".join(f"{b:.3f}" for b in c["blocked_s"])
        lost = c["time_lost_per_save_s"]
        lost = f"{lost:.3f}" if lost is not None else "n/a"
        rows.append(f"{c['ranks']:>5} {c['mode']:>6} {each:>36} "
                    f"{c['blocked_s_median_after_first']:>16.3f} {lost:>15} "
                    f"{c['checkpoint_bytes'] / 2**20:>8.1f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with harness.run_folder(args.out, "ddp_scaling_") as out:
        result = run_benchmark(args, out)
    harness.print_result(result, args.json, format_report)


if __name__ == "__main__":
    main()
