"""Load a consolidated model file (`best_model.pth` / `final_model.pth`) for forecasting and
evaluation, refusing anything else with one clear line.

Only `torch.load(weights_only=True)` is used: a file that holds anything but tensors and plain
data (a crafted pickle) is refused without running any of its code. The column layout, the
scaling statistics and the config come from the file, never from new data.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model import CelestialPGAT
from model.config import InputSpec
from series.dataset import DataConfig, given_data_file
from trainer.checkpoint.safe_load import load_tensor_file
from trainer.config import Config, build_dataclass
from trainer.errors import UserError, short_repr

REQUIRED_KEYS = ("model", "config", "spec", "scaling")
SCALING_KEYS = ("feature_mean", "feature_std", "target_mean", "target_std")
log = logging.getLogger(__name__)
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
    """Read, check and rebuild the model saved in `path`; UserError for anything else. The file
    is data: its config is checked like any config, its spec and step for type and range, and
    the model its config describes is laid out without memory first, so that its sizes are
    checked against the tensors the file holds before anything is allocated."""
    saved = _read_saved_dict(path)
    try:
        config = build_dataclass(Config, saved["config"], "")
    except UserError as err:
        raise UserError(f"{path}: the saved config is not valid here: {err}") from None
    spec = _saved_spec(path, saved["spec"], config.model.pred_len)
    scaling = _saved_scaling(path, saved["scaling"], spec)
    step = _saved_step(path, saved.get("step", 0))
    _check_sizes_against_weights(path, config, saved["model"])
    _check_weights(path, _parameter_shapes(path, config, spec), saved["model"])
    model = CelestialPGAT(config.model, spec)
    try:
        model.load_state_dict(saved["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: the saved weights do not fit the saved config "
                        f"({first})") from None
    model.to(device or torch.device("cpu")).eval()
    return LoadedModel(path, model, config, spec, *scaling, step=step)


_LAYER_COUNTS = ("graph_rounds", "patch_scales")     # each makes layers, so saved tensors
_SIZES = ("seq_len", "pred_len", "d_model", "num_heads", "fusion_heads", "num_mixtures",
          "num_time_summaries", "ffn_multiplier")


def _check_sizes_against_weights(path: Path, config: Config, weights) -> None:
    """A size the config asks for cannot exceed what the weights in the file hold: a layer
    count their number of tensors, any other size their number of values. This bounds the
    work of laying the model out before its shapes can be compared."""
    if not isinstance(weights, dict):
        raise UserError(f"{path}: the saved weights are not a mapping of tensors")
    tensors = [v for v in weights.values() if isinstance(v, torch.Tensor)]
    num_values = sum(t.numel() for t in tensors)
    m = config.model
    asked = [(name, len(getattr(m, name)) if name == "patch_scales" else getattr(m, name),
              len(tensors), "tensors") for name in _LAYER_COUNTS]
    asked += [(name, getattr(m, name), num_values, "values") for name in _SIZES]
    for name, value, held, unit in asked:
        if value > held:
            raise UserError(f"{path}: the saved config asks for model.{name} = "
                            f"{short_repr(value)}, more than its weights hold ({held} {unit})")


def _parameter_shapes(path: Path, config: Config, spec: InputSpec) -> dict[str, torch.Size]:
    """The shape of every saved value of the model the config describes, laid out on the meta
    device (no memory), so a crafted size (d_model=65536) is found before it is allocated."""
    try:
        with torch.device("meta"):
            layout = CelestialPGAT(config.model, spec)
    except Exception as err:  # noqa: BLE001 - a crafted config fails inside the model's code
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: the saved config and input spec do not describe a model "
                        f"({first[:200]})") from None
    return {name: value.shape for name, value in layout.state_dict().items()}


def _check_weights(path: Path, shapes: dict[str, torch.Size], weights) -> None:
    if not isinstance(weights, dict):
        raise UserError(f"{path}: the saved weights are not a mapping of tensors")
    missing = [name for name in shapes if name not in weights]
    unexpected = [name for name in weights if name not in shapes]
    if missing or unexpected:
        what = (f"no {short_repr(missing[0])}" if missing
                else f"an unexpected {short_repr(unexpected[0])}")
        raise UserError(f"{path}: the saved weights do not fit the saved config ({what}; "
                        f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for name, shape in shapes.items():
        value = weights[name]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else short_repr(value)
            raise UserError(f"{path}: the saved weights do not fit the saved config ({name}: "
                            f"{found}, the config makes {tuple(shape)})")


def _saved_step(path: Path, step) -> int:
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
        raise UserError(f"{path}: the saved step is damaged ({short_repr(step)}, expected a "
                        f"step number)")
    return step


def input_data(loaded: LoadedModel, given: Path | None) -> DataConfig:
    """The data to read: the file given, else the training data: the CSV the model was trained
    on (only read), or, when that built-in dataset's file is gone, the built-in dataset computed
    into the user's cache folder. Nothing is written at a path taken from the model file."""
    data = loaded.config.data
    if given is not None:
        return replace(data, path=str(given_data_file(given)))
    if data.source != "builtin" or data.resolved_path().exists():
        return data
    cached = user_cache() / replace(data, path="").resolved_path().name
    if not cached.exists():
        log.warning("the model was trained on the built-in dataset, and %s is gone: computing "
                    "the dataset into %s", data.resolved_path(), cached)
    return replace(data, path=str(cached))


def user_cache() -> Path:
    """$XDG_CACHE_HOME/celestial-pgat, or ~/.cache/celestial-pgat."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "celestial-pgat"


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


def _saved_spec(path: Path, data, pred_len: int) -> InputSpec:
    try:
        spec = build_dataclass(InputSpec, data, "spec")
    except UserError as err:
        raise UserError(f"{path}: the saved input spec is damaged ({err})") from None
    problem = _spec_problem(spec, pred_len)
    if problem:
        raise UserError(f"{path}: the saved input spec is damaged ({problem})")
    return spec


def _spec_problem(spec: InputSpec, pred_len: int) -> str | None:
    num_features, num_targets = spec.num_features, len(spec.targets)
    if not spec.bodies or len(spec.body_columns) != len(spec.bodies):
        return "bodies and body_columns differ"
    if not all(cols and all(0 <= i < num_features for i in cols) for cols in spec.body_columns):
        return f"a body without columns, or a column index outside 0..{num_features - 1}"
    if not num_targets or len(spec.change_scale) != pred_len or \
            any(len(row) != num_targets for row in spec.change_scale):
        return f"change_scale is not {pred_len} rows of {num_targets} values"
    if not all(math.isfinite(v) and v > 0 for row in spec.change_scale for v in row):
        return "change_scale has a value that is not a positive number"
    return None


def _saved_scaling(path: Path, scaling, spec: InputSpec) -> tuple[np.ndarray, ...]:
    sizes = {"feature_mean": spec.num_features, "feature_std": spec.num_features,
             "target_mean": len(spec.targets), "target_std": len(spec.targets)}
    arrays = []
    for key in SCALING_KEYS:
        found = scaling.get(key, []) if isinstance(scaling, dict) else []
        values = _as_float_array(found)
        if values is None or values.shape != (sizes[key],) or not np.isfinite(values).all():
            raise UserError(f"{path}: the saved scaling statistics are damaged ({key})")
        arrays.append(values)
    return tuple(arrays)


def _as_float_array(values) -> np.ndarray | None:
    if not isinstance(values, (list, tuple, torch.Tensor)) or len(values) > 1_000_000:
        return None
    try:
        return np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
