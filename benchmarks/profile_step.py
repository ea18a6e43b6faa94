"""Where a training step's time goes: torch.profiler over the trainer's own step.

    python benchmarks/profile_step.py                              # production config, batch 12
    python benchmarks/profile_step.py --precision fp32 bf16 --steps 10
    python benchmarks/profile_step.py --config configs/quickstart_cpu.yaml --batch-size 64

For each precision: warm-up steps, then `--steps` profiled steps of the trainer's `TrainStep`
(forward, backward, clipping, AdamW, LR schedule) on synthetic batches of the real shapes, as
benchmarks/throughput.py times them. Every ATen operator's self time (exclusive of the operators
it calls) is put in one category:

- matmul: matrix products (mm, addmm, bmm, attention kernels), the work the hardware's peak is for;
- optimizer: everything inside `optimizer.step` / `zero_grad` (AdamW, fused or not);
- copies and casts: copy_, _to_copy (autocast's casts), cat, stack, clone, fills, allocation;
- indexing: gathers, scatters, index, unfold and masks;
- random: dropout masks and noise (bernoulli_, rand, uniform_);
- elementwise and reductions: everything else (add, mul, GELU, softmax, layer norm, sums...).

"python and dispatch" is the step's wall time minus all operators' self time: the Python code
of the model and trainer, the autograd engine's bookkeeping and the dispatcher. "Operator
calls" counts the ATen operators that are not called by another ATen operator and are not
views (view, expand, permute, ...): on a GPU each is at least one kernel launch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):          # run as a file: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from benchmarks.throughput import TimedStep, input_spec, synthetic_batches

CATEGORIES = ("matmul", "optimizer", "copies and casts", "indexing", "random",
              "elementwise and reductions", "python and dispatch")
MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "dot", "mv", "addmv", "_mkldnn_matmul",
          "_scaled_dot_product_flash_attention_for_cpu",
          "_scaled_dot_product_flash_attention_for_cpu_backward",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
          "_flash_attention_forward", "_flash_attention_backward", "convolution"}
COPIES = {"copy_", "_to_copy", "clone", "contiguous", "cat", "stack", "fill_", "zero_", "empty",
          "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "new_zeros",
          "new_empty", "new_empty_strided", "_reshape_copy", "resize_", "full", "full_like"}
INDEXING = {"index", "index_put_", "_index_put_impl_", "index_select", "gather", "scatter",
            "scatter_", "scatter_add_", "index_add_", "unfold", "unfold_backward", "embedding",
            "embedding_dense_backward", "masked_fill", "masked_fill_", "where",
            "repeat_interleave", "constant_pad_nd", "select_backward", "slice_backward"}
RANDOM = {"bernoulli_", "bernoulli", "rand", "rand_like", "uniform_", "normal_", "randn", "random_",
          "randint"}
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "expand_as", "permute", "transpose", "t",
         "unsqueeze", "squeeze", "select", "slice", "as_strided", "detach", "alias", "unbind",
         "split", "chunk", "narrow", "flatten", "unflatten", "view_as", "numpy_T", "lift_fresh",
         "_unsafe_split", "split_with_sizes", "unsafe_split", "diagonal", "movedim",
         "resolve_conj", "resolve_neg", "result_type", "is_nonzero", "item", "_local_scalar_dense",
         "broadcast_tensors", "is_same_size", "set_", "_has_compatible_shallow_copy_type"}


def op_name(event) -> str | None:
    return event.name[len("aten::"):] if event.name.startswith("aten::") else None


def has_ancestor(event, prefix: str) -> bool:
    """Whether an enclosing profiler event's name starts with `prefix`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def in_optimizer(event) -> bool:
    return has_ancestor(event, "Optimizer.")


def called_by_an_operator(event) -> bool:
    return has_ancestor(event, "aten::")


def category(event) -> str:
    name = op_name(event)
    if in_optimizer(event):
        return "optimizer"
    for label, names in (("matmul", MATMUL), ("copies and casts", COPIES),
                         ("indexing", INDEXING), ("random", RANDOM)):
        if name in names:
            return label
    return "elementwise and reductions"


def breakdown(events, wall_s: float, steps: int) -> dict:
    """Per-step milliseconds by category, operator calls per step and the costliest operators
    outside the matmuls."""
    ms, by_op, calls = Counter(), Counter(), 0
    for event in events:
        name = op_name(event)
        if name is None:
            continue
        self_ms = event.self_cpu_time_total / 1e3
        label = category(event)
        ms[label] += self_ms
        if label != "matmul":
            by_op[f"{name} ({label})"] += self_ms
        if name not in VIEWS and not called_by_an_operator(event):
            calls += 1
    ms["python and dispatch"] = max(0.0, wall_s * 1e3 - sum(ms.values()))
    return {"step_ms": wall_s * 1e3 / steps,
            "ms_per_step": {label: ms[label] / steps for label in CATEGORIES},
            "operator_calls_per_step": calls / steps,
            "top_non_matmul": [(op, total / steps) for op, total in by_op.most_common(8)]}


def profile_precision(config_path: str, batch_size: int, precision: str, warmup: int,
                      steps: int, overrides: tuple[str, ...] = ()) -> dict:
    config = harness.load_config(config_path, [*overrides, f"data.batch_size={batch_size}",
                                                 f"train.precision={precision}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timed = TimedStep(config, input_spec(config), device)
    batches = synthetic_batches(config, timed.step.model.spec, device)
    timed.run(batches, warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        timed.run(batches, steps)
        wall_s = time.perf_counter() - started
    result = breakdown(prof.events(), wall_s, steps)
    result.update(precision=precision, batch_size=batch_size,
                  samples_per_s=batch_size * steps / wall_s)
    return result


def format_report(results: list[dict], info: dict, config_path: str) -> str:
    lines = [f"{Path(config_path).name}, {info['cpu']}, {info['cores']} cores, torch "
             f"{info['torch']}, {torch.get_num_threads()} threads, {info['date']}", "",
             "| | " + " | ".join(r["precision"] for r in results) + " |",
             "|---|" + "---|" * len(results)]
    row = lambda label, cells: lines.append(f"| {label} | " + " | ".join(cells) + " |")  # noqa: E731
    row("step", [f"{r['step_ms']:.1f} ms ({r['samples_per_s']:.1f} samples/s)" for r in results])
    for label in CATEGORIES:
        row(label, [f"{r['ms_per_step'][label]:.1f} ms "
                    f"({r['ms_per_step'][label] / r['step_ms']:.0%})" for r in results])
    row("operator calls per step", [f"{r['operator_calls_per_step']:.0f}" for r in results])
    for r in results:
        lines += ["", f"Costliest operators outside the matmuls, {r['precision']} (ms per step):"]
        lines += [f"- {op}: {ms:.1f}" for op, ms in r["top_non_matmul"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(harness.PRODUCTION))
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    harness.add_common_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    results = [profile_precision(args.config, args.batch_size, precision, args.warmup, args.steps,
                                 tuple(args.overrides))
               for precision in args.precision]
    machine = harness.machine_info()
    if args.json:
        print(json.dumps({"machine": machine, "config": args.config, "results": results}))
    else:
        print(format_report(results, machine, args.config))


if __name__ == "__main__":
    main()
