"""Shared fixtures: a short built-in dataset, small configs, and helpers to run the CLI."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from series.builtin import BuiltinDataConfig, write_builtin_csv
from tests.processes import REPO, train_command
from trainer.config import load_config

FAST_SUBSET_MARKEXPR = "not slow"
_fast_subset = False


def pytest_configure(config):
    global _fast_subset
    _fast_subset = (config.getoption("markexpr") or "").strip() == FAST_SUBSET_MARKEXPR


def fuzz_examples(num_examples: int) -> int:
    """A fuzz test's number of hypothesis examples: all of them in the default suite, a tenth
    (at least 5) in the fast subset (`-m "not slow"`), which is a smoke of each area."""
    return max(5, num_examples // 10) if _fast_subset else num_examples


@pytest.fixture(scope="session")
def short_csv(tmp_path_factory) -> Path:
    """The built-in dataset over 1996-2003 (about 2900 daily rows)."""
    path = tmp_path_factory.mktemp("data") / "builtin_short.csv"
    write_builtin_csv(BuiltinDataConfig(start_date="1996-01-01", end_date="2003-12-31"), path)
    return path


def small_overrides(csv: Path, root: Path, name: str = "t") -> list[tuple[str, object]]:
    """A model and run small enough for unit tests (seconds on 2 cores), in fp32: `auto` could
    pick bf16 on a CPU whose bf16 is fast, and tests comparing layouts need fp32's rounding."""
    return [("data.path", str(csv)), ("data.batch_size", 16), ("data.eval_batch_size", 128),
            ("model.seq_len", 48), ("model.pred_len", 12), ("model.d_model", 32),
            ("model.num_heads", 4), ("model.fusion_heads", 2), ("model.num_mixtures", 3),
            ("model.num_time_summaries", 4), ("model.graph_rounds", 1),
            ("model.patch_scales", [[4, 2], [8, 4]]),
            ("train.experiment_name", name), ("train.log_root", str(root / "logs")),
            ("train.progress_bar", False), ("checkpoint.root", str(root / "checkpoints")),
            ("optim.warmup_steps", 5), ("train.precision", "fp32")]


def small_config(csv: Path, root: Path, name: str = "t", **extra):
    overrides = small_overrides(csv, root, name) + [(k.replace("__", "."), v)
                                                    for k, v in extra.items()]
    return load_config(None, overrides)


def as_cli_args(overrides: list[tuple[str, object]]) -> list[str]:
    import json
    return ["--set", *[f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                       for k, v in overrides]]


def run_cli(args: list[str], *, torchrun: int = 0, env: dict | None = None, timeout: int = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run launch/train.py (or torchrun with N ranks) in a subprocess, one thread per rank."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if torchrun else "2", **(env or {})}
    return subprocess.run(train_command(args, torchrun), cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """`extended` tests (the experiment and search commands end to end on the two-node Slurm
    cluster and on several hosts, the benchmark scripts run whole: minutes) run only when `-m`
    names them."""
    if "extended" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="extended tests take minutes: select them with `-m extended`")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)
