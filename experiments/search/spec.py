"""The search file: a base config, the config keys to search and their ranges, Optuna's settings.

    name: lr_search
    base_config: configs/quickstart_cpu.yaml
    overrides: {train.max_steps: 600}          # optional, every trial
    search:
      parameters:
        optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        model.dropout: {type: float, low: 0.0, high: 0.3}
        model.d_model: {type: int, low: 16, high: 64, step: 16}
        optim.weight_decay: {type: categorical, choices: [0.0, 0.01, 0.1]}
      n_trials: 20
      sampler: tpe            # tpe (default), random, cmaes
      pruner: median          # median (default), none
      score: nll              # validation score minimised, of the kept weights (nll, crps)
      storage: null           # default: a journal file in the search folder; or a database URL
      sampler_seed: 0
    seeds: [1, 2, 3, 4, 5]    # the best and the starting config are retrained with these
    score: nll                # the test score of that final comparison

Every check happens before anything starts (one-line `UserError` naming the key): unknown keys,
wrong types, empty or reversed ranges, a key the config does not have, a range whose ends the
config refuses, a key that is not searchable (one the experiment sets for each trial, or one
that would move the validation and test windows, which must be the same for every trial).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.spec import (
    TRIAL_KEYS,
    ExperimentSpec,
    check_configs,
    check_fields,
    check_name,
    check_overrides,
    check_score,
    check_seeds,
    is_window_key,
    shorten,
)
from trainer.config import key_default_and_choices, load_config, read_yaml
from trainer.errors import UserError

FIELDS = {"name": str, "base_config": str, "overrides": dict, "search": dict, "seeds": list,
          "score": str}
REQUIRED = ("name", "base_config", "search", "seeds")
SEARCH_FIELDS = {"parameters": dict, "n_trials": int, "sampler": str, "pruner": str,
                 "score": str, "storage": str, "sampler_seed": int}
SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "none")
KINDS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"),
         "categorical": ("choices",)}
START = "start"     # the variant name of the starting configuration in the final comparison
BEST = "best"


@dataclass(frozen=True)
class Parameter:
    key: str                          # dotted config key
    kind: str                         # float, int, categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        out = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        return {**out, "step": self.step} if self.step is not None else out

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = "log" if self.log else "linear"
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.key} {self.kind} in [{self.low}, {self.high}] ({scale}{step})"


@dataclass(frozen=True)
class SearchSpec:
    name: str
    base_config: str
    parameters: tuple[Parameter, ...]
    seeds: list[int]
    n_trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    val_score: str = "nll"            # minimised on validation
    test_score: str = "nll"           # the final comparison's test score
    storage: str | None = None        # a database URL; None: the journal file
    sampler_seed: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        search = {"parameters": {p.key: p.to_dict() for p in self.parameters},
                  "n_trials": self.n_trials, "sampler": self.sampler, "pruner": self.pruner,
                  "score": self.val_score}
        if self.storage is not None:
            search["storage"] = self.storage
        if self.sampler_seed is not None:
            search["sampler_seed"] = self.sampler_seed
        return {"name": self.name, "base_config": self.base_config,
                "overrides": dict(self.overrides), "search": search, "seeds": list(self.seeds),
                "score": self.test_score}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def search_seed(self) -> int:
        """Every search trial trains with the first seed: trials differ in their config only."""
        return self.seeds[0]

    def final_experiment(self, best: dict[str, Any], number: int = 0) -> ExperimentSpec:
        """The best configuration (trial `number`) against the start, retrained with every
        seed, compared on test by the experiment machinery. Named after the trial: a search
        extended later that finds a better one gets a new final experiment."""
        return ExperimentSpec(name=f"{self.name}-best-t{number:03d}", base_config=self.base_config,
                              control=START, variants={START: {}, BEST: dict(best)},
                              seeds=list(self.seeds), score=self.test_score,
                              overrides=dict(self.overrides))


def load_search(path: str | Path) -> SearchSpec:
    """Read and check a search file (UserError naming the key on any problem)."""
    return check_search(read_yaml(path), str(path))


def check_search(data: dict, where: str) -> SearchSpec:
    check_fields(data, FIELDS, REQUIRED, where, "search file")
    search = data["search"]
    check_fields(search, SEARCH_FIELDS, ("parameters",), where, "search", prefix="search.")
    overrides = check_overrides(data.get("overrides") or {}, "overrides")
    spec = SearchSpec(
        name=check_name(data["name"], "name"), base_config=data["base_config"],
        parameters=_parameters(search["parameters"], overrides), seeds=check_seeds(data["seeds"]),
        n_trials=_positive(search.get("n_trials", 20), "search.n_trials"),
        sampler=_one_of(search.get("sampler", "tpe"), SAMPLERS, "search.sampler"),
        pruner=_one_of(search.get("pruner", "median"), PRUNERS, "search.pruner"),
        val_score=_score_at(search.get("score", "nll"), "search.score"),
        test_score=_score_at(data.get("score", "nll"), "score"),
        storage=_storage(search.get("storage")), sampler_seed=search.get("sampler_seed"),
        overrides=overrides)
    check_configs(spec.final_experiment({}))
    for parameter in spec.parameters:
        _check_ends(spec, parameter)
    return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _positive(value: int, key: str) -> int:
    if value < 1:
        raise UserError(f"{key}: expected at least 1, got {value}")
    return value


def _one_of(value: str, allowed: tuple, key: str) -> str:
    if value not in allowed:
        raise UserError(f"{key}: {shorten(value)} is not one of {list(allowed)}")
    return value


def _score_at(value: str, key: str) -> str:
    try:
        return check_score(value)
    except UserError as err:
        raise UserError(str(err).replace("score:", f"{key}:", 1)) from None


def _storage(value: str | None) -> str | None:
    if value is not None and "://" not in value:
        raise UserError(f"search.storage: {shorten(value)} is not a database URL (e.g. "
                        f"postgresql+psycopg2://user@host:5432/db); leave it out for the "
                        f"journal file in the search folder")
    return value


def _parameters(data: dict, overrides: dict) -> tuple[Parameter, ...]:
    if not data:
        raise UserError("search.parameters: name at least one config key to search")
    return tuple(_parameter(key, value, overrides) for key, value in data.items())


def _parameter(key: Any, data: Any, overrides: dict) -> Parameter:
    where = f"search.parameters.{key}"
    _check_searchable(key, where, overrides)
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping like {{type: float, low: 0.0, high: 1.0}}"
                        f", got {shorten(data)}")
    kind = data.get("type")
    if kind not in KINDS:
        raise UserError(f"{where}.type: {shorten(kind)} is not one of {list(KINDS)}")
    unknown = sorted(str(k) for k in data if k != "type" and k not in KINDS[kind])
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]} for type {kind} "
                        f"(known: {', '.join(KINDS[kind])})")
    if kind == "categorical":
        return _categorical(key, data, where)
    return _range(key, kind, data, where)


def _check_searchable(key: Any, where: str, overrides: dict) -> None:
    if not isinstance(key, str):
        raise UserError(f"{where}: config key {shorten(key)} is not a name")
    if key in TRIAL_KEYS:
        raise UserError(f"{where}: not searchable, set by the search for each trial")
    if is_window_key(key):
        raise UserError(f"{where}: not searchable, it would change the validation and test "
                        f"windows or their data, and every trial must be scored on the same "
                        f"windows (set it in the base config or `overrides`)")
    if key in overrides:
        raise UserError(f"{where}: also set in overrides; search it or fix it, not both")
    try:
        key_default_and_choices(key)
    except (AttributeError, KeyError):
        raise UserError(f"{where}: unknown config key {key}") from None


def _categorical(key: str, data: dict, where: str) -> Parameter:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}.choices: expected a non-empty list, got {shorten(choices)}")
    for choice in choices:
        if not (choice is None or isinstance(choice, (bool, int, float, str))):
            raise UserError(f"{where}.choices: {shorten(choice)} is not a plain value "
                            f"(number, string, true/false, null)")
    if len({repr(c) for c in choices}) != len(choices):
        raise UserError(f"{where}.choices: a choice is listed twice")
    return Parameter(key, "categorical", choices=tuple(choices))


def _range(key: str, kind: str, data: dict, where: str) -> Parameter:
    default = key_default_and_choices(key)[0]
    wanted = float if kind == "float" else int
    if isinstance(default, bool) or not isinstance(default, wanted):
        raise UserError(f"{where}: not searchable as {kind}: {key} is a "
                        f"{type(default).__name__} setting (use type: categorical)")
    check = _is_number if kind == "float" else _is_int
    expected = "a number" if kind == "float" else "an integer"
    for end in ("low", "high"):
        if not check(data.get(end)):
            raise UserError(f"{where}.{end}: expected {expected}, got {shorten(data.get(end))}")
    low, high, log, step = data["low"], data["high"], data.get("log", False), data.get("step")
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: expected true or false, got {shorten(log)}")
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None:
        _check_step(step, check, low, high, log, where)
    return Parameter(key, kind, float(low) if kind == "float" else low,
                     float(high) if kind == "float" else high, log, step)


def _check_step(step: Any, check, low, high, log: bool, where: str) -> None:
    if not check(step) or step <= 0:
        raise UserError(f"{where}.step: expected a positive number of the range's type, got "
                        f"{shorten(step)}")
    if log:
        raise UserError(f"{where}: step and log cannot be used together")
    if step > high - low:
        raise UserError(f"{where}.step: {step} is larger than the range ({low} to {high})")


def _check_ends(spec: SearchSpec, parameter: Parameter) -> None:
    """Each end of a range (each choice) resolves into a config: the config's own checks."""
    values = parameter.choices if parameter.kind == "categorical" else (parameter.low,
                                                                        parameter.high)
    for value in values:
        try:
            load_config(spec.base_config, [*spec.overrides.items(), (parameter.key, value)])
        except UserError as err:
            raise UserError(f"search.parameters.{parameter.key}: {value!r} is refused by the "
                            f"config: {err}") from None
