"""Trials in parallel: N trials at a time on N cores against N x one trial alone, and what the
pinning of `celestial-experiment --parallel N` does.

    python benchmarks/parallel_trials.py                      # quickstart config, N = the cores
    python benchmarks/parallel_trials.py --parallel 2 --steps 300 --repeats 2 --json
    python benchmarks/parallel_trials.py --layouts alone pinned unpinned    # a subset

Every trial is started by the experiment command's own runner, the code behind `--parallel N`:
`experiments.runner.make_slots` shares out the cores and `run_trials` starts each trial pinned to
its slot (`os.sched_setaffinity`) with `OMP_NUM_THREADS` / `MKL_NUM_THREADS` set to the slot's
size; each trial is an ordinary `launch/train.py` run of `--config` for `--steps` steps on the
CPU (`experiments.plan.train_command`), with its own run folder in a temporary folder. Layouts:

- alone: one trial on slot 0 of `make_slots(N)`: its share of the cores (one core when N is the
  number of cores), as many threads;
- pinned: N trials on the N slots of `make_slots(N)`, as `--parallel N` runs them;
- unpinned: N trials with the same threads each, free to run on every core (one slot of all the
  cores shared by the N trials, its threads divided among them as among a trial's ranks);
- oversubscribed: N trials, each free on every core with a thread per core (N trials started by
  hand without OMP_NUM_THREADS).

samples/s come from each run's own `train` lines of metrics.jsonl (one per --log-interval steps,
data loading included), the first --warmup-intervals left out. In the N-trial layouts only the
intervals while every trial of the layout was training count, since a trial that has finished
leaves its cores to the others. A layout's total is the sum of its trials' rates; the verdict
compares the pinned total with N x the trial alone, against 0.9. Validation and test run once, at
the end of each trial, outside the timed intervals.

Timings are valid only on an otherwise idle machine: the script records the cores other
processes used meanwhile and says when the machine was not quiet.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):          # run as a file: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from experiments.plan import build_trials, read_metrics, train_command
from experiments.runner import Slot, make_slots, run_trials
from experiments.spec import ExperimentSpec
from trainer.config import parse_override
from trainer.errors import UserError

QUICKSTART = "configs/quickstart_cpu.yaml"
TARGET_RATIO = 0.9
LAYOUTS = ("alone", "pinned", "unpinned", "oversubscribed")
UNPINNED = ("unpinned", "oversubscribed")


@dataclass(frozen=True)
class Interval:
    """One `train` line: the wall-clock span of its steps and the samples they took."""
    start: float
    end: float
    samples: float


def layout_slots(layout: str, parallel: int, cores: list[int]) -> tuple[list[Slot], int]:
    """The runner's slots for a layout and the `ranks` that divide each slot's threads."""
    pinned = make_slots(parallel, cores, [])
    everywhere = make_slots(1, cores, [])[0]
    return {"alone": ([pinned[0]], 1), "pinned": (pinned, 1),
            "unpinned": ([everywhere] * parallel, parallel),
            "oversubscribed": ([everywhere] * parallel, 1)}[layout]


def trial_overrides(args: argparse.Namespace, out: Path) -> dict:
    """--set first, then what makes every trial the same fixed-length CPU run in `out`."""
    overrides = dict(parse_override(text) for text in args.overrides)
    overrides.update({"train.max_steps": args.steps, "train.log_interval": args.log_interval,
                      "train.eval_interval": 10**9, "train.validate_at_start": False,
                      "train.early_stopping_patience": 0, "checkpoint.interval": 10**9,
                      "train.device": "cpu", "train.log_root": str(out / "logs"),
                      "checkpoint.root": str(out / "checkpoints")})
    return overrides


def run_layout(args: argparse.Namespace, out: Path, layout: str, repeat: int,
               cores: list[int]) -> dict:
    """Run the layout's trials through the experiment runner; their rates and where they ran."""
    slots, ranks = layout_slots(layout, args.parallel, cores)
    spec = ExperimentSpec(name=f"{layout}_{repeat}", base_config=args.config, control="trial",
                          variants={"trial": {}}, seeds=list(range(1, len(slots) + 1)),
                          overrides=trial_overrides(args, out))
    trials = build_trials(spec)
    commands = {t.name: train_command(spec, t) for t in trials}
    records = run_trials(trials, commands, out / "experiments" / spec.name, slots, ranks,
                         announce=lambda line: print(line, file=sys.stderr))
    failed = [f"{name}: {r.get('reason')}" for name, r in records.items()
              if r["status"] != "finished"]
    if failed:
        raise RuntimeError(f"{layout}: trial(s) failed: {'; '.join(failed)}")
    intervals = [timed_intervals(t.run_dir, args.warmup_intervals) for t in trials]
    together = while_all_trained(intervals)
    overlapped = all(together)
    kept = together if overlapped else intervals
    rates = [sum(i.samples for i in k) / sum(i.end - i.start for i in k) for k in kept]
    return {"layout": layout, "repeat": repeat, "trials": len(trials),
            "threads_per_trial": int(slots[0].environment(ranks)["OMP_NUM_THREADS"]),
            "cores_of_each_trial": [records[t.name]["cores"] for t in trials],
            "samples_per_s_each": rates, "samples_per_s_total": sum(rates),
            "intervals_each": [len(k) for k in kept], "overlapped": overlapped}


def timed_intervals(run_dir: Path, warmup: int) -> list[Interval]:
    """The run's `train` lines after the first `warmup` ones."""
    intervals, previous_step = [], 0
    for line in read_metrics(run_dir):
        if line.get("kind") != "train":
            continue
        seconds = line["step_time_s"] * (line["step"] - previous_step)
        previous_step = line["step"]
        intervals.append(Interval(line["time"] - seconds, line["time"],
                                  line["samples_per_s"] * seconds))
    return intervals[warmup:]


def while_all_trained(intervals: list[list[Interval]]) -> list[list[Interval]]:
    """Each trial's intervals that lie within the span in which every trial was training."""
    if not all(intervals):
        return [[] for _ in intervals]
    first = max(each[0].start for each in intervals)
    last = min(each[-1].end for each in intervals)
    return [[i for i in each if i.start >= first and i.end <= last] for each in intervals]


def summarize(runs: list[dict], parallel: int) -> dict:
    """Per layout: the median over repeats of its total samples/s; the ratios to N x alone and
    what pinning gains over each unpinned layout."""
    layouts = [layout for layout in LAYOUTS if any(r["layout"] == layout for r in runs)]
    totals = {layout: [r["samples_per_s_total"] for r in runs if r["layout"] == layout]
              for layout in layouts}
    median = {layout: statistics.median(values) for layout, values in totals.items()}
    ideal = parallel * median["alone"]
    ratios = {layout: median[layout] / ideal for layout in layouts if layout != "alone"}
    overlapped = all(r["overlapped"] for r in runs if r["layout"] == "pinned")
    verdict = ("NOT MEASURED" if not overlapped
               else "PASS" if ratios["pinned"] >= TARGET_RATIO else "FAIL")
    return {"median_total_samples_per_s": median, "totals_per_repeat": totals,
            "n_times_alone": ideal, "vs_n_times_alone": ratios,
            "pinned_over": {layout: median["pinned"] / median[layout]
                            for layout in layouts if layout in UNPINNED},
            "target_ratio": TARGET_RATIO, "verdict": verdict}


def run_benchmark(args: argparse.Namespace, out: Path, cores: list[int]) -> dict:
    from series.dataset import ensure_dataset
    config = harness.load_config(args.config, args.overrides)
    ensure_dataset(config.data)            # generated once here, not by every trial at once
    witness = harness.CpuWitness()
    runs = [run_layout(args, out, layout, repeat, cores)
            for repeat in range(args.repeats) for layout in LAYOUTS if layout in args.layouts]
    return {"benchmark": "parallel_trials", "config": args.config, "parallel": args.parallel,
            "steps": args.steps, "log_interval": args.log_interval,
            "warmup_intervals": args.warmup_intervals, "batch_size": config.data.batch_size,
            "overrides": args.overrides,
            "machine": {**harness.machine_info(), "usable_cores": cores},
            "runs": runs, "summary": summarize(runs, args.parallel), "load": witness.report()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", type=int, default=len(os.sched_getaffinity(0)),
                   help="trials at a time, N (default: the cores this process may use)")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps of each trial (default 300)")
    p.add_argument("--config", default=QUICKSTART, help=f"YAML config (default: {QUICKSTART})")
    p.add_argument("--log-interval", type=int, default=10,
                   help="steps per timed interval (default 10)")
    p.add_argument("--warmup-intervals", type=int, default=2,
                   help="first intervals of each trial left out (default 2)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every layout, taken in turn (default 1; median total reported)")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                   help="layouts to run (default: all; alone and pinned are needed)")
    harness.add_out_option(p)
    harness.add_common_options(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, cores: list[int]) -> None:
    """User errors, before anything runs."""
    for name in ("parallel", "steps", "log_interval", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not {"alone", "pinned"} <= set(args.layouts):
        raise UserError("--layouts must include alone and pinned (the verdict compares them)")
    if args.warmup_intervals < 0:
        raise UserError("--warmup-intervals must be >= 0")
    if args.parallel > len(cores):
        raise UserError(f"--parallel {args.parallel}: this process may use only {len(cores)} "
                        f"core(s)")
    if args.steps // args.log_interval <= args.warmup_intervals:
        raise UserError(f"--steps {args.steps} at --log-interval {args.log_interval} leaves no "
                        f"interval after --warmup-intervals {args.warmup_intervals}")
    harness.load_config(args.config, args.overrides)


def format_report(r: dict) -> str:
    m, s, n = r["machine"], r["summary"], r["parallel"]
    lines = [
        (f"Trials in parallel through the experiment runner: {Path(r['config']).name}, "
         f"{r['steps']} steps of {r['batch_size']} samples per trial, N = {n}"),
        (f"machine: {m['cpu']}, {m['cores']} cores ({len(m['usable_cores'])} usable); "
         f"torch {m['torch']}; {m['date']}"),
        "timings are valid only on an otherwise idle machine",
        "",
        (f"{'layout':<15} {'trials':>6} {'threads':>7} {'cores of each trial':<24} "
         f"{'samples/s each':<24} {'total':>8} {'/ (N x alone)':>13}"),
    ]
    lines += [layout_row(run, s) for run in r["runs"]]
    ratio = s["vs_n_times_alone"]["pinned"]
    lines += ["", (f"{n} pinned trials: {s['median_total_samples_per_s']['pinned']:.1f} "
                   f"samples/s = {ratio:.2f} x {n} x one trial alone "
                   f"({s['n_times_alone']:.1f})"),
              pinning_line(s["pinned_over"], len(m["usable_cores"])),
              verdict_line(s, n, r["load"]), "",
              (f"samples/s: each run's train lines (data loading included), the first "
               f"{r['warmup_intervals']} interval(s) of {r['log_interval']} steps left out; "
               "N-trial layouts: only while all their trials trained."),
              harness.describe_load(r["load"])]
    return "\n".join(lines)


def pinning_line(pinned_over: dict, cores: int) -> str:
    described = {"unpinned": "unpinned (same threads)",
                 "oversubscribed": f"oversubscribed ({cores} threads each)"}
    gains = [f"pinned / {described[layout]} {gain:.2f}x" for layout, gain in pinned_over.items()]
    return "pinning: " + (", ".join(gains) if gains else "no unpinned layout run")


def layout_row(run: dict, summary: dict) -> str:
    cores = " / ".join(_core_list(c) for c in run["cores_of_each_trial"])
    each = " ".join(f"{x:.1f}" for x in run["samples_per_s_each"])
    ratio = summary["vs_n_times_alone"].get(run["layout"])
    note = "" if run["overlapped"] else "  (trials did not train at the same time)"
    return (f"{run['layout']:<15} {run['trials']:>6} {run['threads_per_trial']:>7} "
            f"{cores:<24} {each:<24} {run['samples_per_s_total']:>8.1f} "
            f"{'' if ratio is None else f'{ratio:.2f}':>13}{note}")


def _core_list(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])


def verdict_line(summary: dict, parallel: int, load: dict) -> str:
    ratio, verdict = summary["vs_n_times_alone"]["pinned"], summary["verdict"]
    if verdict == "NOT MEASURED":
        return ("NOT MEASURED: the pinned trials did not train at the same time after their "
                "warm-up: raise --steps")
    sign = ">=" if verdict == "PASS" else "<"
    quiet = "" if load["quiet"] else " (machine NOT quiet: not a valid measurement)"
    return (f"{verdict}: {parallel} trials in parallel at {ratio:.2f} x {parallel} x one trial "
            f"alone ({sign} {TARGET_RATIO}){quiet}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    try:
        check_args(args, cores)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    with harness.run_folder(args.out, "parallel_trials_") as out:
        result = run_benchmark(args, out, cores)
    harness.print_result(result, args.json, format_report)


if __name__ == "__main__":
    main()
