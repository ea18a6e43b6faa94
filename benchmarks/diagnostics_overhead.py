"""What diagnostics cost: training throughput with every diagnostic on at the card's intervals
against none, interleaved in one process, and the size of one record at each model size.

    python benchmarks/diagnostics_overhead.py                        # quickstart and production
    python benchmarks/diagnostics_overhead.py --json \
        --configs configs/celestial_enhanced_pgat_production.yaml

The card's intervals: log 10, gradients 50, attention 100, component profile 500 (= the
checkpoint interval). Target: at most 3% slower; each record under 100 KB.

Method. The parts of a run from `build_parts` (the real model, optimizer, observers and run
folder) make two trainers, one with the observers and one with none, each driven through
`Trainer.take_step`, as `Trainer.run_epoch` drives it: observers are asked `is_active(step)` and
only the active ones are called. Short blocks of steps alternate between
the full observer set and none, in ABBA order: this machine's speed drifts by 10-20% over tens
of seconds (a shared VM), so blocks must be much shorter than that for the drift to cancel.
Each arm keeps its own step counter, so over R blocks of K steps the "on" arm passes steps
1..R*K once and meets every interval in its true proportion (the defaults, 50 x 10, include
one profiled step). Overhead = 1 - (on samples/s) / (off samples/s) over all blocks. For the
spread, consecutive pairs form groups (default 10 pairs: 100 steps per arm, each group with its
share of gradient and attention steps); the median and range of the groups' overheads are given.
Both arms write a train line every 10 steps (the trainer always does). A third figure, the
"attributed" overhead, compares the pairs whose "on" block ran an observer with the pairs
where none ran: a machine stall in a block without observers then does not count.
Not part of the comparison: validation and the occlusion attribution that runs with it (they
run at validations, not on training steps), checkpoint saving (not a diagnostic: moved beyond
the run here), the observers' one-time set-up (FLOP counting) and data loading (batches are
drawn from the real loader once, before timing, and reused).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

QUICKSTART = harness.REPO / "configs" / "quickstart_cpu.yaml"
TARGET_OVERHEAD, TARGET_RECORD_BYTES = 0.03, 100_000
CARD = ["train.log_interval=10", "diagnostics.gradient_log_interval=50",
        "diagnostics.attention_log_interval=100", "diagnostics.profile_interval=500"]
ALL_ON = ["diagnostics.enable_gradient_diagnostics=true",
          "diagnostics.enable_attention_logging=true",
          "diagnostics.enable_component_profiling=true"]


def build(config_path: str, overrides: list[str], out: Path, total_steps: int):
    """The trainer of a run with every diagnostic on; no validation or checkpoint in range."""
    from trainer import distributed
    from trainer.build import build_parts
    name = f"diagnostics_overhead_{Path(config_path).stem}"
    run = [f"train.experiment_name={name}", f"train.log_root={out / 'logs'}",
           f"checkpoint.root={out / 'checkpoints'}", "train.progress_bar=false",
           f"train.max_steps={total_steps}", "train.eval_interval=0",
           f"checkpoint.interval={10**9}"]
    config = harness.load_config(config_path, [*ALL_ON, *CARD, *overrides, *run])
    return build_parts(config, distributed.init_distributed(config.train.device))


def take_batches(trainer, count: int) -> list:
    batches = []
    for batch in trainer.data.train_loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


class Arms:
    """Two trainers on the same parts (model, optimizer, run log), one with every observer and
    one with none, each with its own step counter."""

    def __init__(self, parts) -> None:
        from dataclasses import replace

        from trainer.loop import Trainer
        from trainer.observer import ObserverGroup
        from trainer.train_state import TrainState
        total = parts.train_state.total_steps
        self.trainers = {"on": Trainer(parts),
                         "off": Trainer(replace(parts, observers=ObserverGroup([]),
                                                train_state=TrainState(total_steps=total)))}
        self.groups = {arm: t.observers for arm, t in self.trainers.items()}
        self.batch_index = 0

    def run(self, arm: str, num_steps: int, batches: list) -> float:
        """Take `num_steps` steps with arm's observers; returns the seconds they took."""
        t = self.trainers[arm]
        started = time.perf_counter()
        for _ in range(num_steps):
            t.take_step([batches[self.batch_index % len(batches)]], 0.0)
            self.batch_index += 1
        if t.env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def steps_taken(self, arm: str) -> int:
        return self.trainers[arm].train_state.step

    def restart_counter(self, arm: str, step: int) -> None:
        """The next step `arm` takes is `step` + 1 (benchmark blocks only: nothing is saved)."""
        self.trainers[arm].train_state.step = step


def warm_up(arms: Arms, batches: list, steps: int) -> None:
    """Untimed: plain steps, then steps ending on a multiple of 500, where every observer
    fires once (first files, folders and TensorBoard tags); then both counters restart."""
    arms.run("off", steps, batches)
    arms.restart_counter("on", -steps % 500)
    arms.run("on", steps, batches)
    arms.restart_counter("on", 0)
    arms.restart_counter("off", 0)


def interleave(arms: Arms, batches: list, pairs: int, block: int) -> list[dict]:
    """ABBA: off/on, on/off, ... Returns each pair's seconds per arm, and whether any observer
    ran in its "on" block."""
    results = []
    for r in range(pairs):
        first = arms.steps_taken("on") + 1
        active = any(o.is_active(s) for o in arms.groups["on"].observers
                     for s in range(first, first + block))
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        results.append({**{arm: arms.run(arm, block, batches) for arm in order},
                        "observers_active": active})
    return results


def activations(arms: Arms) -> dict[str, int]:
    """How many times each observer ran on a training step in the "on" arm."""
    last = arms.steps_taken("on")
    return {type(o).__name__: sum(o.is_active(s) for s in range(1, last + 1))
            for o in arms.groups["on"].observers}


def intervals(config) -> dict[str, int]:
    d = config.diagnostics
    return {"log": config.train.log_interval, "gradients": d.gradient_log_interval,
            "attention": d.attention_log_interval, "profile": d.profile_interval}


def record_sizes(log_dir: Path) -> dict[str, int]:
    """Bytes of the largest file of each kind the observers wrote."""
    kinds = {"gradient_record": "gradients/gradients_step_*.json",
             "gradient_history": "gradients/history.json",
             "attention_record": "attention/attention_step_*.json",
             "profile_record": "components/profile_step_*.json"}
    return {kind: max((p.stat().st_size for p in log_dir.glob(pattern)), default=0)
            for kind, pattern in kinds.items()}


def summarize(pairs: list[dict], samples_per_step: int, block: int, group: int) -> dict:
    """Samples/s per arm over all blocks and per group of consecutive pairs; the overheads."""
    groups = [pairs[i:i + group] for i in range(0, len(pairs), group)]
    rate = {arm: [samples_per_step * block * len(g) / sum(p[arm] for p in g) for g in groups]
            for arm in ("on", "off")}
    total = {arm: samples_per_step * block * len(pairs) / sum(p[arm] for p in pairs)
             for arm in ("on", "off")}
    group_overhead = [1 - on / off for on, off in zip(rate["on"], rate["off"])]
    return {"samples_per_s": {arm: {"total": total[arm], "median": statistics.median(rate[arm]),
                                    "min": min(rate[arm]), "max": max(rate[arm])}
                              for arm in ("on", "off")},
            "overhead": 1 - total["on"] / total["off"],
            "attributed_overhead": attributed_overhead(pairs),
            "group_overhead": {"median": statistics.median(group_overhead),
                               "min": min(group_overhead), "max": max(group_overhead),
                               "all": group_overhead, "pairs_per_group": group},
            "block_seconds": pairs}


def attributed_overhead(pairs: list[dict]) -> float | None:
    """The extra time of the pairs whose "on" block ran an observer, over the median on-off
    difference of the pairs where none ran (the control), as a fraction of the "off" time.
    Unlike the totals, a stall of the machine in a block without observers does not count."""
    diffs = [(p["on"] - p["off"], p["observers_active"]) for p in pairs]
    control = [d for d, active in diffs if not active]
    if not control:
        return None
    typical = statistics.median(control)
    extra = sum(d - typical for d, active in diffs if active)
    return extra / sum(p["off"] for p in pairs)


def measure_config(config_path: str, args: argparse.Namespace, out: Path) -> dict:
    witness = harness.CpuWitness()
    total = args.warmup * 2 + 2 * args.pairs * args.block
    parts = build(config_path, args.overrides, out, total)
    parts.observers.on_start(parts.run_context)         # as Trainer.train() does
    arms = Arms(parts)
    trainer = arms.trainers["on"]
    batches = take_batches(trainer, args.num_batches)
    warm_up(arms, batches, args.warmup)
    pairs = interleave(arms, batches, args.pairs, args.block)
    result = summarize(pairs, trainer.samples_per_step, args.block, args.group)
    trainer.run_log.close()
    c = trainer.config
    return {"config": str(config_path), "batch_size": c.data.batch_size,
            "d_model": c.model.d_model,
            "parameters": sum(p.numel() for p in trainer.train_step.model.parameters()),
            "device": str(trainer.env.device), "torch_threads": torch.get_num_threads(),
            "block_steps": args.block, "pairs": args.pairs, **result,
            "intervals": intervals(c), "observer_activations": activations(arms),
            "record_bytes": record_sizes(trainer.run_context.log_dir), "load": witness.report()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=[str(QUICKSTART), str(harness.PRODUCTION)])
    p.add_argument("--pairs", type=int, default=50, help="on/off block pairs (repetitions)")
    p.add_argument("--block", type=int, default=10, help="steps per block (multiple of 10)")
    p.add_argument("--group", type=int, default=10, help="pairs per group, for the spread")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per arm first")
    p.add_argument("--num-batches", type=int, default=32, help="real batches, reused in turn")
    harness.add_out_option(p)
    harness.add_common_options(p)
    args = p.parse_args(argv)
    if args.block % 10:
        p.error("--block must be a multiple of the log interval, 10")
    return args


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [("Diagnostics overhead: all diagnostics on against none, interleaved (ABBA) in one "
              "process (the card's intervals: log 10, gradients 50, attention 100, profile 500)"),
             f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; {m['date']}"]
    for c in r["configs"]:
        lines += ["", *config_rows(c)]
    lines += ["", ("Not compared: validation and occlusion attribution (they run at validations, "
                   "not on training steps), checkpoint saves, observer set-up, data loading.")]
    return "\n".join(lines)


def config_rows(c: dict) -> list[str]:
    s, go = c["samples_per_s"], c["group_overhead"]
    verdict = "meets" if c["overhead"] <= TARGET_OVERHEAD else "MISSES"
    rows = [(f"{Path(c['config']).name}: batch {c['batch_size']}, d_model {c['d_model']}, "
             f"{c['parameters']:,} parameters, {c['device']}, {c['torch_threads']} threads; "
             f"{c['pairs']} pairs of {c['block_steps']}-step blocks"),
            "  intervals: " + ", ".join(f"{k} {v}" for k, v in c["intervals"].items())]
    for arm in ("off", "on"):
        a = s[arm]
        rows.append(f"  diagnostics {arm:<3}: {a['total']:8.1f} samples/s over all blocks "
                    f"(groups: median {a['median']:.1f}, {a['min']:.1f}-{a['max']:.1f})")
    rows.append(f"  overhead {100 * c['overhead']:+.2f}% ({verdict} the 3% target); per group of "
                f"{go['pairs_per_group']} pairs: median {100 * go['median']:+.2f}%, "
                f"{100 * go['min']:+.2f}% to {100 * go['max']:+.2f}%")
    if c["attributed_overhead"] is not None:
        rows.append(f"  attributed to the blocks where an observer ran: "
                    f"{100 * c['attributed_overhead']:+.2f}%")
    rows.append("  observer calls in the 'on' arm: "
                + ", ".join(f"{k} {v}" for k, v in c["observer_activations"].items()))
    sizes = ", ".join(f"{k} {v:,}" for k, v in c["record_bytes"].items())
    rows.append(f"  largest record (bytes): {sizes} (target < {TARGET_RECORD_BYTES:,} for "
                "gradient and attention records)")
    rows.append("  " + harness.describe_load(c["load"]))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with harness.run_folder(args.out, "diag_overhead_") as out:
        configs = [measure_config(path, args, out) for path in args.configs]
    result = {"benchmark": "diagnostics_overhead", "machine": harness.machine_info(),
              "configs": configs}
    harness.print_result(result, args.json, format_report)


if __name__ == "__main__":
    main()
