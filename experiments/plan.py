"""Trials (variant x seed) and where each one writes; the training command that runs one.

A trial `<experiment>__<variant>__s<seed>` is an ordinary training run of launch/train.py with
its own run folder `<log root>/<trial>/` and checkpoints, analysable on its own. Its command
always asks for `--resume auto`: a fresh trial starts from scratch, an interrupted one continues
from its newest checkpoint.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from experiments.spec import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launch" / "train.py"


@dataclass(frozen=True)
class Trial:
    name: str
    variant: str
    seed: int
    run_dir: Path             # logs/<trial>/
    overrides: tuple[tuple[str, object], ...]

    def is_finished(self) -> bool:
        """The run scored its test split (its metrics.jsonl has a `test` line)."""
        return any(line.get("kind") == "test" for line in read_metrics(self.run_dir))


def trial_name(experiment: str, variant: str, seed: int) -> str:
    return f"{experiment}__{variant}__s{seed}"


def build_trials(spec: ExperimentSpec) -> list[Trial]:
    """Every trial, seed-major so that an early look at the results sees all variants."""
    log_root = Path(spec.trial_config(spec.control, spec.seeds[0]).train.log_root)
    trials = []
    for seed in spec.seeds:
        for variant, overrides in spec.variants.items():
            name = trial_name(spec.name, variant, seed)
            trials.append(Trial(name, variant, seed, log_root / name,
                                (*spec.common_overrides(), *overrides.items(),
                                 ("train.seed", seed), ("train.experiment_name", name))))
    return trials


def experiment_dir(spec: ExperimentSpec) -> Path:
    log_root = Path(spec.trial_config(spec.control, spec.seeds[0]).train.log_root)
    return log_root / "experiments" / spec.name


def train_command(spec: ExperimentSpec, trial: Trial, ranks: int = 1,
                  script: Path = TRAIN_SCRIPT) -> list[str]:
    """`script` (launch/train.py or its search variant; under torchrun with `ranks` > 1) with
    the trial's overrides."""
    sets = [f"{key}={_as_text(value)}" for key, value in trial.overrides]
    args = [str(script), "--config", spec.base_config, "--resume", "auto",
            "--set", "train.progress_bar=false", *sets]
    if ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={ranks}", *args]
    return [sys.executable, *args]


def _as_text(value: object) -> str:
    """A value as `--set` reads it back (YAML flow style: strings, numbers, lists)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...").strip()


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl lines (a line cut by a crash is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines
