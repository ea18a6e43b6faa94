"""One typed config tree: defaults <- YAML file <- card flags <- `--set a.b=value` overrides.

Every section is a dataclass next to the code that owns it; this module composes them into
`Config`, converts plain YAML data into them with type checks, and reports any unknown key,
wrong type or impossible value as a `UserError` that names the dotted key.
"""
from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diagnostics.config import DiagnosticsConfig
from model.config import ModelConfig
from trainer.checkpoint import CheckpointConfig
from trainer.data import DataConfig
from trainer.errors import UserError
from trainer.optim import OptimConfig
from trainer.train_config import TrainConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (ints widen to floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, datetime.date):
        return value.isoformat()     # YAML reads an unquoted 1950-01-01 as a date
    if tp in (int, float, str) and not (isinstance(value, tp) and not isinstance(value, bool)):
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def build_dataclass(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, naming `prefix.key` in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", 0.0003); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    return key.strip(), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> Config:
    """Defaults, then the YAML file, then (dotted key, value) overrides in order."""
    tree = read_yaml(path) if path else {}
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return build_dataclass(Config, tree, "")
