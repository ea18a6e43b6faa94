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
from series.dataset import DataConfig
from trainer.checkpoint.manager import CheckpointConfig
from trainer.diagnostics_config import DiagnosticsConfig
from trainer.errors import UserError, short_repr
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
            raise UserError(f"{key}: {short_repr(value)} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {short_repr(value)}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {short_repr(value)}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # No setting means anything at NaN or infinity; NaN also slips past every range check.
        raise UserError(f"{key}: expected a finite number, got {short_repr(value)}")
    if tp is str and isinstance(value, datetime.date):
        return value.isoformat()     # YAML reads an unquoted 1950-01-01 as a date
    if tp in (int, float, str) and not (isinstance(value, tp) and not isinstance(value, bool)):
        raise UserError(f"{key}: expected {_type_name(tp)}, got {short_repr(value)}")
    if tp is int and not -2**63 <= value < 2**63:   # torch and numpy take 64-bit integers
        raise UserError(f"{key}: {short_repr(value)} is out of range")
    return value


def _key_text(key: str) -> str:
    return key if key.isidentifier() else repr(key)


def build_dataclass(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, naming `prefix.key` in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {short_repr(data)}")
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
        value = parse_yaml(raw, f"override {key.strip()}") if raw.strip() else ""
    except UserError:
        raise
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
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        if len(raw) > _MAX_CONFIG_BYTES:
            raise UserError(f"{path}: over {_MAX_CONFIG_BYTES // 2**20} MiB, too large for a "
                            f"config file")
        data = parse_yaml(raw.decode("utf-8"), str(path))
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


# A config is a few hundred values at most four levels deep; these bounds refuse a crafted or
# mistaken file (an alias bomb, thousands of levels, a number of thousands of digits) before it
# costs time or memory.
_MAX_CONFIG_BYTES = 1 << 20
_MAX_YAML_DEPTH = 32
_MAX_YAML_VALUES = 100_000       # counted as if every alias were written out
_MAX_INT_CHARS = 40              # 64-bit integers have at most 20 digits
_INT_TAG = "tag:yaml.org,2002:int"
_RESOLVER = yaml.resolver.Resolver()
_EVENT_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml's parser when built


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` once one linear pass over its events has found it within the
    bounds above (UserError naming `where` and the line otherwise). The pass does not recurse,
    and counts each alias as the values it stands for."""
    _check_yaml_bounds(text, where)
    return yaml.safe_load(text)


def _check_yaml_bounds(text: str, where: str) -> None:
    open_nodes: list[list] = []          # [anchor, values, height] of each open collection
    anchored: dict[str, tuple[int, int]] = {}     # anchor -> (values, height)
    total = 0
    for event in yaml.parse(text, Loader=_EVENT_LOADER):
        line = f"{where}: line {event.start_mark.line + 1}"
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_nodes) >= _MAX_YAML_DEPTH:
                raise UserError(f"{line}: nested deeper than {_MAX_YAML_DEPTH} levels")
            open_nodes.append([event.anchor, 1, 0])
            total += 1
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, values, height = open_nodes.pop()
            node = (values, height + 1)
            if anchor is not None:
                anchored[anchor] = node
        elif isinstance(event, yaml.AliasEvent):
            node = _alias_size(event.anchor, anchored, open_nodes, line)
            total += node[0]
        elif isinstance(event, yaml.ScalarEvent):
            _check_scalar(event, line)
            node = (1, 0)
            total += 1
            if event.anchor is not None:
                anchored[event.anchor] = node
        else:
            continue
        if total > _MAX_YAML_VALUES:
            raise UserError(f"{line}: more than {_MAX_YAML_VALUES} values (each alias counted "
                            f"as the values it stands for)")
        if len(open_nodes) + node[1] > _MAX_YAML_DEPTH:
            raise UserError(f"{line}: nested deeper than {_MAX_YAML_DEPTH} levels (aliases "
                            f"written out)")
        if open_nodes:
            open_nodes[-1][1] += node[0]
            open_nodes[-1][2] = max(open_nodes[-1][2], node[1])


def _alias_size(anchor: str, anchored: dict, open_nodes: list, line: str) -> tuple[int, int]:
    if any(node[0] == anchor for node in open_nodes):
        raise UserError(f"{line}: the alias *{anchor} refers to a value that contains it")
    return anchored.get(anchor, (1, 0))   # an undefined alias: safe_load names it


def _check_scalar(event: yaml.ScalarEvent, line: str) -> None:
    tag = event.tag if event.tag not in (None, "!") else \
        _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == _INT_TAG and len(event.value) > _MAX_INT_CHARS:
        raise UserError(f"{line}: an integer of {len(event.value)} characters (settings take "
                        f"64-bit integers)")


def _one_line(err: Exception) -> str:
    """PyYAML's messages span lines (with a caret under the column): keep them on one line."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> Config:
    """Defaults, then the YAML file, then (dotted key, value) overrides in order."""
    tree = read_yaml(path) if path else {}
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return build_dataclass(Config, tree, "")
