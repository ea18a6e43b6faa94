"""The `train:` section: run identity, device, precision, length, logging and stopping."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    experiment_name: str = ""          # default: <config file stem>_<timestamp>
    log_root: str = "logs"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 where the device computes it natively (trainer/precision.py), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    epochs: int = 10
    max_steps: int = 0                 # optimizer steps; 0: as many as `epochs` take
    grad_accum_steps: int = 1
    log_interval: int = 10
    eval_interval: int = 0             # steps between validations; 0: at the end of each epoch
    validate_at_start: bool = True     # a validation before the first step: the curve's origin
    early_stopping_patience: int = 3  # validations without improvement; 0 disables
    restore_best: bool = True          # after early stopping, end with the best weights
    max_consecutive_skips: int = 10    # non-finite steps in a row before the run stops
    collective_timeout_s: int = 600
    compile: bool = False              # torch.compile the model (falls back if it fails)
    # torch.compile's mode; "reduce-overhead" replays the step's kernels as CUDA graphs (GPU:
    # removes launch overhead; needs the static shapes and sync-free forward the tests check)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    progress_bar: bool = True
    resume: str = ""                   # "", "auto" or a checkpoint folder

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum_steps", "log_interval", "max_consecutive_skips",
                     "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_interval", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if any(c in self.experiment_name for c in "/\\") or self.experiment_name in (".", ".."):
            raise ValueError(f"train.experiment_name must be a plain folder name, "
                             f"got {self.experiment_name!r}")
