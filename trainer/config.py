"""One typed config tree: defaults <- YAML file <- card flags <- `--set a.b=value` overrides.

Every section is a dataclass next to the code that owns it; this module composes them into
`Config`, converts plain YAML data into them with type checks, and reports any unknown key,
wrong type or impossible value as a `UserError` that names the dotted key.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ModelConfig
from trainer.checkpoint import CheckpointConfig
from trainer.data import DataConfig
from trainer.diagnostics_config import DiagnosticsConfig
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
            raise UserError(f"{key}: {_short(value)} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {_short(value)}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {_short(value)}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # No setting means anything at NaN or infinity; NaN also slips past every range check.
        raise UserError(f"{key}: expected a finite number, got {_short(value)}")
    if tp is str and isinstance(value, datetime.date):
        return value.isoformat()     # YAML reads an unquoted 1950-01-01 as a date
    if tp in (int, float, str) and not (isinstance(value, tp) and not isinstance(value, bool)):
        raise UserError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")
    if tp is int and not -2**63 <= value < 2**63:   # torch and numpy take 64-bit integers
        raise UserError(f"{key}: {value} is out of range")
    return value


def _key_text(key: str) -> str:
    return key if key.isidentifier() else repr(key)


def _short(value: Any) -> str:
    """A value for an error message: a fuzzed or mistaken value may be huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_dataclass(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, naming `prefix.key` in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    not_names = [k for k in data if not isinstance(k, str)]
    if not_names:   # YAML reads `1:`, `true:` or `~:` as keys of other types
        raise UserError(f"config key {where}{not_names[0]!r} is not a name "
                        f"(known: {', '.join(sorted(names))})")
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown config key {where}{_key_text(unknown[0])} "
                        f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError, ArithmeticError) as err:
        raise UserError(str(err)) from None


def key_default_and_choices(dotted: str) -> tuple[Any, tuple | None]:
    """The default of config key `dotted` (e.g. "train.precision") and, for a key with a fixed
    set of values, those values (else None)."""
    *sections, name = dotted.split(".")
    node = Config()
    for section in sections:
        node = getattr(node, section)
    hint = typing.get_type_hints(type(node))[name]
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
    return getattr(node, name), choices


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
    if path.is_dir():
        raise UserError(f"config file {path} is a directory (expected a YAML file)")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return data


def _one_line(err: Exception) -> str:
    """PyYAML's messages span lines (with a caret under the column): keep them on one line."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> Config:
    """Defaults, then the YAML file, then (dotted key, value) overrides in order."""
    tree = read_yaml(path) if path else {}
    for key, value in overrides:
        _set_dotted(tree, key, value)
    try:
        return build_dataclass(Config, tree, "")
    except RecursionError:   # a YAML alias that contains itself (`a: &x [*x]`)
        raise UserError(f"{path or 'config'}: a value refers to itself (YAML alias loop)") from None
