"""The experiment file: a base config, named variants (config overrides), seeds, a score.

    name: celestial_ablation
    base_config: configs/quickstart_cpu.yaml
    overrides: {train.max_steps: 2000}          # optional, every trial
    control: real
    variants:
      real: {}
      shuffled: {data.celestial_ablation: block_shuffle}
    seeds: [1, 2, 3]
    score: nll                                  # or crps

Every check happens before anything starts: an unknown key, a wrong type or an impossible value
(also inside a variant's overrides, checked against the config tree) is a one-line `UserError`
naming the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.config import Config, load_config, read_yaml
from trainer.errors import UserError

SCORES = ("nll", "crps")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Set by the experiment for each trial.
TRIAL_KEYS = ("train.seed", "train.experiment_name", "train.resume")
# Keys that move the test windows or the data they hold: every trial must score the same windows.
WINDOW_KEYS = ("data.source", "data.path", "data.date_column", "data.targets",
               "data.train_fraction", "data.val_fraction", "data.window_stride",
               "data.difference_columns", "data.builtin", "model.seq_len", "model.pred_len",
               "train.log_root", "checkpoint.root")
FIELDS = {"name": str, "base_config": str, "overrides": dict, "control": str, "variants": dict,
          "seeds": list, "score": str}
REQUIRED = ("name", "base_config", "control", "variants", "seeds")


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    base_config: str
    control: str
    variants: dict[str, dict[str, Any]]     # variant -> dotted key -> value
    seeds: list[int]
    score: str = "nll"
    overrides: dict[str, Any] | None = None  # every trial

    def to_dict(self) -> dict:
        return {"name": self.name, "base_config": self.base_config,
                "overrides": dict(self.overrides or {}), "control": self.control,
                "variants": {k: dict(v) for k, v in self.variants.items()},
                "seeds": list(self.seeds), "score": self.score}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def trial_config(self, variant: str, seed: int) -> Config:
        """The trial's resolved config (checks every override on the way)."""
        overrides = [*self.common_overrides(), *self.variants[variant].items(),
                     ("train.seed", seed)]
        return load_config(self.base_config, overrides)

    def common_overrides(self) -> list[tuple[str, Any]]:
        return list((self.overrides or {}).items())


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check an experiment file (UserError naming the key on any problem)."""
    return check_spec(read_yaml(path), str(path))


def check_spec(data: dict, where: str) -> ExperimentSpec:
    if "search" in data:
        raise UserError(f"{where}: a file with a search section is a search: run it with "
                        f"celestial-experiment --search {where}")
    check_fields(data, FIELDS, REQUIRED, where, "experiment")
    spec = ExperimentSpec(name=check_name(data["name"], "name"), base_config=data["base_config"],
                          control=data["control"], variants=_variants(data["variants"]),
                          seeds=check_seeds(data["seeds"]),
                          score=check_score(data.get("score", "nll")),
                          overrides=check_overrides(data.get("overrides") or {}, "overrides"))
    if spec.control not in spec.variants:
        raise UserError(f"control: {spec.control!r} is not one of the variants "
                        f"({', '.join(spec.variants)})")
    if len(spec.variants) < 2:
        raise UserError("variants: name at least two (the control and one to compare with it)")
    check_configs(spec)
    return spec


def check_fields(data: dict, fields: dict, required: tuple, where: str, what: str,
                 prefix: str = "") -> None:
    """Unknown keys, missing required ones and values of the wrong type, each one line naming
    the key (`prefix` + key) and, for unknown ones, the known keys."""
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise UserError(f"{where}: unknown {what} key {prefix}{unknown[0]} "
                        f"(known: {', '.join(fields)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"{where}: missing {what} key {prefix}{missing[0]}")
    for key, kind in fields.items():
        value = data.get(key)
        is_bool = isinstance(value, bool)
        if value is None or (isinstance(value, kind) and not (kind is int and is_bool)):
            continue
        raise UserError(f"{prefix}{key}: expected {'a mapping' if kind is dict else kind.__name__}"
                        f", got {shorten(value)}")


def shorten(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(value: str, key: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value) or "__" in value:
        raise UserError(f"{key}: {shorten(value)} is not a plain name (letters, digits, '_', "
                        f"'-', '.'; no '__', which separates a trial's parts)")
    return value


def _variants(data: dict) -> dict[str, dict[str, Any]]:
    return {check_name(name, f"variants.{name}"):
            check_overrides(overrides or {}, f"variants.{name}")
            for name, overrides in data.items()}


def check_overrides(data: Any, key: str) -> dict[str, Any]:
    """A mapping of dotted config keys; those the experiment sets itself are refused."""
    if not isinstance(data, dict):
        raise UserError(f"{key}: expected a mapping of config keys, got {shorten(data)}")
    for dotted in data:
        if not isinstance(dotted, str):
            raise UserError(f"{key}: config key {shorten(dotted)} is not a name")
        if dotted in TRIAL_KEYS:
            raise UserError(f"{key}.{dotted}: set by the experiment for each trial "
                            f"(seeds come from `seeds`)")
        if isinstance(data[dotted], dict):
            raise UserError(f"{key}.{dotted}: give dotted keys (e.g. {dotted}.some_key: value), "
                            f"not a mapping that would replace the whole section")
        if key.startswith("variants.") and is_window_key(dotted):
            raise UserError(f"{key}.{dotted}: would change the test windows or their data, and "
                            f"every trial must be scored on the same windows (set it in the base "
                            f"config or `overrides`)")
    return dict(data)


def is_window_key(dotted: str) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in WINDOW_KEYS)


def check_seeds(values: list) -> list[int]:
    for i, seed in enumerate(values):
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise UserError(f"seeds[{i}]: expected an integer in [0, 2^31), got {shorten(seed)}")
    if not values:
        raise UserError("seeds: name at least one seed")
    if len(set(values)) != len(values):
        raise UserError("seeds: a seed is listed twice")
    return list(values)


def check_score(value: str) -> str:
    if value not in SCORES:
        raise UserError(f"score: {shorten(value)} is not one of {list(SCORES)}")
    return value


def check_configs(spec: ExperimentSpec) -> None:
    """Every variant's config resolves (with the first seed): errors name the variant."""
    if not Path(spec.base_config).is_file():
        raise UserError(f"base_config: config file not found: {spec.base_config}")
    try:
        load_config(spec.base_config, spec.common_overrides())
    except UserError as err:
        raise UserError(f"overrides: {err}") from None
    for variant in spec.variants:
        try:
            spec.trial_config(variant, spec.seeds[0])
        except UserError as err:
            raise UserError(f"variants.{variant}: {err}") from None
