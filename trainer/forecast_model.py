"""Load a consolidated model file (`best_model.pth` / `final_model.pth`) for forecasting and
evaluation, refusing anything else with one clear line.

Only `torch.load(weights_only=True)` is used: a file that holds anything but tensors and plain
data (a crafted pickle) is refused without running any of its code. The column layout, the
scaling statistics and the config come from the file, never from new data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import CelestialPGAT
from model.config import InputSpec
from trainer.checkpoint import load_tensor_file
from trainer.config import Config, build_dataclass
from trainer.errors import UserError

REQUIRED_KEYS = ("model", "config", "spec", "scaling")
SCALING_KEYS = ("feature_mean", "feature_std", "target_mean", "target_std")
_HINT = "give a consolidated model file such as checkpoints/<exp>/best_model.pth"


@dataclass
class LoadedModel:
    """A trained model in eval mode with everything needed to feed it new data."""

    path: Path
    model: CelestialPGAT
    config: Config
    spec: InputSpec
    feature_mean: np.ndarray     # (F,) training statistics, in spec.feature_names order
    feature_std: np.ndarray
    target_mean: np.ndarray      # (T,) in spec.targets order
    target_std: np.ndarray
    step: int

    @property
    def seq_len(self) -> int:
        return self.config.model.seq_len

    @property
    def pred_len(self) -> int:
        return self.config.model.pred_len


def load_model_file(path: Path, device: torch.device | None = None) -> LoadedModel:
    """Read, check and rebuild the model saved in `path`; UserError for anything else."""
    saved = _read_saved_dict(path)
    try:
        config = build_dataclass(Config, saved["config"], "")
    except UserError as err:
        raise UserError(f"{path}: the saved config is not valid here: {err}") from None
    spec = _saved_spec(path, saved["spec"])
    scaling = _saved_scaling(path, saved["scaling"], spec)
    model = CelestialPGAT(config.model, spec)
    try:
        model.load_state_dict(saved["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: the saved weights do not fit the saved config "
                        f"({first})") from None
    model.to(device or torch.device("cpu")).eval()
    return LoadedModel(path, model, config, spec, *scaling, step=int(saved.get("step", 0)))


def _read_saved_dict(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        inside = [name for name in ("best_model.pth", "final_model.pth")
                  if (path / name).is_file()]
        found = f" (this folder holds {', '.join(inside)})" if inside else ""
        raise UserError(f"{path}: is a folder (a sharded training checkpoint is not a model "
                        f"file): {_HINT}{found}")
    try:
        saved = load_tensor_file(path)
    except UserError as err:
        raise UserError(f"{err}: not a consolidated model file; {_HINT}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UserError(f"{path}: not a consolidated model file (no {', '.join(missing)}; a "
                        f"model file from before scaling statistics were saved needs retraining); "
                        f"{_HINT}")
    return saved


def _saved_spec(path: Path, data) -> InputSpec:
    try:
        spec = InputSpec.from_dict(data)
    except TypeError as err:
        raise UserError(f"{path}: the saved input spec is damaged ({err})") from None
    if len(spec.body_columns) != len(spec.bodies):
        raise UserError(f"{path}: the saved input spec is damaged (bodies and body_columns differ)")
    return spec


def _saved_scaling(path: Path, scaling, spec: InputSpec) -> tuple[np.ndarray, ...]:
    sizes = {"feature_mean": spec.num_features, "feature_std": spec.num_features,
             "target_mean": len(spec.targets), "target_std": len(spec.targets)}
    arrays = []
    for key in SCALING_KEYS:
        found = scaling.get(key, []) if isinstance(scaling, dict) else []
        values = np.asarray(found, dtype=np.float64)
        if values.shape != (sizes[key],) or not np.isfinite(values).all():
            raise UserError(f"{path}: the saved scaling statistics are damaged ({key})")
        arrays.append(values)
    return tuple(arrays)
