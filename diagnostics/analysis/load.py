"""Read a run folder (OUTPUTS.md) and check every file against diagnostics/schemas.py.

What a run in progress or a crash leaves is tolerated: a half-written last line of
metrics.jsonl, a line a crash cut short (and the line a resumed run appended to it), a
history.json caught mid-rewrite (the step files hold the same records), diagnostics not written
yet. Anything else that cannot be read or does not match its schema is a AnalysisError naming the
file. What is missing or was skipped is listed in `RunData.notes`; the analysis does the rest.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import yaml

from diagnostics import schemas
from diagnostics.analysis.errors import AnalysisError

log = logging.getLogger(__name__)
HUGE = 1e300   # metrics.jsonl written before the one encoding (null) carried +-inf as +-1e308


@dataclass
class GradientSeries:
    """Every logged gradient record as aligned arrays (one entry per logged step)."""

    steps: np.ndarray                       # (R,) int
    total_norm: np.ndarray                  # (R,)
    clipped: np.ndarray                     # (R,) bool
    skipped: np.ndarray                     # (R,) bool
    lr: np.ndarray                          # (R,)
    norms: dict[str, np.ndarray]            # component -> (R,), nan where absent
    update_ratios: dict[str, np.ndarray]
    agreement: dict[str, np.ndarray]        # world size > 1 only
    noise_scale: dict[str, np.ndarray]
    world_size: int | None = None
    local_batch: int | None = None
    global_batch: int | None = None

    @property
    def components(self) -> list[str]:
        return list(self.norms)


@dataclass
class RunData:
    log_dir: Path
    config: dict
    train: list[dict] = field(default_factory=list)        # metrics.jsonl lines by kind
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    restored: list[dict] = field(default_factory=list)      # val lines of restored best weights
    gradients: GradientSeries | None = None
    attention: list[dict] = field(default_factory=list)    # attention_step_*.json, by step
    attribution: list[dict] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)         # what is missing or was tolerated

    @property
    def name(self) -> str:
        return self.log_dir.name

    @property
    def has_steps(self) -> bool:
        """Whether anything was logged for a step (a refused start leaves only a config)."""
        return bool(self.train or self.val or self.test or self.gradients is not None
                    or self.attention or self.attribution or self.profiles)

    def config_number(self, dotted: str):
        """A numeric config value, or None if the config lacks it (or it is not a number)."""
        value = self.config_value(dotted)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def config_value(self, dotted: str, default=None):
        node = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node


def column(lines: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric; null becomes nan, an older file's +-1e308 becomes +-inf."""
    steps = np.array([line["step"] for line in lines], dtype=int)
    values = np.array([np.nan if line.get(key) is None else float(line[key]) for line in lines],
                      dtype=float)
    values[np.abs(values) >= HUGE] = np.copysign(np.inf, values[np.abs(values) >= HUGE])
    return steps, values



def finite_median(values) -> float:
    """The median of the finite values; nan when there are none."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else math.nan


# --- reading and validating -------------------------------------------------------------------

_validators: dict[int, jsonschema.protocols.Validator] = {}


def _validate(doc, schema: dict, where: str) -> None:
    validator = _validators.get(id(schema))
    if validator is None:
        validator = _validators[id(schema)] = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise AnalysisError(f"{where}: does not match its schema: {error.message} (at {at})")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise AnalysisError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise AnalysisError(f"{path}: not a text file") from None


def _parse_json(path: Path, text: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise AnalysisError(f"{path}: not valid JSON ({err})") from None


def read_record(path: Path) -> dict:
    """One JSON record, checked against the schema its file name selects."""
    doc = _parse_json(path, _read_text(path))
    _validate(doc, schemas.schema_for(path.name), str(path))
    return doc


def read_records(folder: Path, prefix: str) -> list[dict]:
    """Every `<prefix>_step_NNNNNN.json` in a folder, by step (temporary files are ignored)."""
    records = [read_record(p) for p in sorted(folder.glob(f"{prefix}_step_*.json"))]
    return sorted(records, key=lambda r: r["step"])


def read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise AnalysisError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise AnalysisError(f"{path}: expected a mapping of config sections")
    return config


def _metrics_line(where: str, line: dict) -> dict:
    _validate(line, schemas.METRICS_LINE, where)
    kind_schema = {"train": schemas.TRAIN_LINE, "val": schemas.EVAL_LINE,
                   "test": schemas.EVAL_LINE}.get(line["kind"])
    if kind_schema is not None:
        _validate(line, kind_schema, where)
    return line


def read_metrics(path: Path, notes: list[str]) -> dict[str, list[dict]]:
    """metrics.jsonl by kind, one line per step (a resumed run's later line wins). A line that is
    not JSON (cut short by a crash, or glued to one) is skipped with a note: one lost line must
    not cost the whole run's analysis."""
    rows = _read_bytes(path).decode("utf-8", errors="replace").split("\n")
    by_kind: dict[str, dict[int, dict]] = {}
    broken = []
    for number, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            line = json.loads(row)
        except ValueError:
            broken.append(number)
            continue
        line = _metrics_line(f"{path} line {number}", line)
        # The best weights' re-validation after early stopping shares the last step: kept apart.
        kind = "restored" if line.get("restored_best") else line["kind"]
        by_kind.setdefault(kind, {})[line["step"]] = line
    if broken == [len(rows)]:   # no newline after it: still being written
        notes.append(f"{path.name}: ignored a half-written last line (run in progress?)")
    elif broken:
        shown = ", ".join(map(str, broken[:5])) + (" ..." if len(broken) > 5 else "")
        notes.append(f"{path.name}: skipped {len(broken)} line(s) that are not valid JSON (cut "
                     f"short by a crash?): line {shown}")
        log.warning("%s: skipped %d line(s) that are not valid JSON: line %s",
                    path, len(broken), shown)
    return {kind: [lines[s] for s in sorted(lines)] for kind, lines in by_kind.items()}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise AnalysisError(f"{path}: cannot read ({err.strerror or err})") from None


def _read_history(path: Path, have_step_files: bool, notes: list[str]) -> dict | None:
    """history.json; one caught mid-rewrite is read again, else left to the step files."""
    for attempt in range(3):
        try:
            doc = json.loads(_read_text(path))
            break
        except json.JSONDecodeError:
            time.sleep(0.2 * (attempt + 1))
    else:
        if not have_step_files:
            raise AnalysisError(f"{path}: not valid JSON "
                                "(and no gradient step files to use instead)")
        notes.append(f"gradients/{path.name}: unreadable (being rewritten?): used the step files")
        return None
    _validate(doc, schemas.GRADIENT_HISTORY, str(path))
    return doc


# --- gradient records into one series ---------------------------------------------------------

def _row_of_record(record: dict) -> dict:
    ranks = (record.get("ranks") or {}).get("components", {})
    comps = record["components"]
    return {"total_norm": record["total_norm"], "clipped": record["clipped"],
            "skipped": record["skipped"], "lr": record["lr"],
            "norm": {c: v["norm"] for c, v in comps.items()},
            "update_ratio": {c: v["update_ratio"] for c, v in comps.items()},
            "agreement": {c: v["agreement"] for c, v in ranks.items()},
            "noise_scale": {c: v["noise_scale"] for c, v in ranks.items()}}


def _aligned(values: list, i: int, length: int):
    """Entry i of a series aligned with `steps`; a shorter series is aligned to the end."""
    j = i - (length - len(values))
    return values[j] if 0 <= j < len(values) else None


def _rows_of_history(history: dict) -> dict[int, dict]:
    n, comps = len(history["steps"]), history["components"]
    rows = {}
    for i, step in enumerate(history["steps"]):
        at = functools.partial(_aligned, i=i, length=n)
        rows[step] = {"total_norm": at(history["total_norm"]), "clipped": at(history["clipped"]),
                      "skipped": False, "lr": at(history["lr"]),
                      "norm": {c: at(v["norm"]) for c, v in comps.items()},
                      "update_ratio": {c: at(v["update_ratio"]) for c, v in comps.items()},
                      "agreement": {c: at(v) for c, v in history["agreement"].items()},
                      "noise_scale": {c: at(v) for c, v in history["noise_scale"].items()}}
    return rows


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _per_component(rows: list[dict], key: str) -> dict[str, np.ndarray]:
    """component -> values over the rows; nan where a row lacks the component."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row[key]))
    return {c: _array([row[key].get(c) for row in rows]) for c in names}


def _rank_series(rows: list[dict], key: str) -> dict[str, np.ndarray]:
    """Like _per_component, without the all-null series a one-rank history carries."""
    return {c: v for c, v in _per_component(rows, key).items() if not np.all(np.isnan(v))}


def gradient_series(history: dict | None, records: list[dict]) -> GradientSeries | None:
    """History rows, overridden by the step files (which also know skipped steps and batches)."""
    rows = _rows_of_history(history) if history else {}
    rows.update({r["step"]: _row_of_record(r) for r in records})
    if not rows:
        return None
    steps = sorted(rows)
    ordered = [rows[s] for s in steps]
    ranked = [r["ranks"] for r in records if r.get("ranks")]
    return GradientSeries(
        steps=np.array(steps, dtype=int), total_norm=_array(r["total_norm"] for r in ordered),
        clipped=np.array([bool(r["clipped"]) for r in ordered]),
        skipped=np.array([bool(r["skipped"]) for r in ordered]),
        lr=_array(r["lr"] for r in ordered), norms=_per_component(ordered, "norm"),
        update_ratios=_per_component(ordered, "update_ratio"),
        agreement=_rank_series(ordered, "agreement"),
        noise_scale=_rank_series(ordered, "noise_scale"),
        world_size=records[-1]["world_size"] if records else None,
        local_batch=ranked[-1]["local_batch"] if ranked else None,
        global_batch=ranked[-1]["global_batch"] if ranked else None)


def read_gradients(folder: Path, notes: list[str]) -> GradientSeries | None:
    records = read_records(folder, "gradients")
    history_path = folder / "history.json"
    history = _read_history(history_path, bool(records), notes) if history_path.exists() else None
    return gradient_series(history, records)


# --- the run folder ----------------------------------------------------------------------------

_SWITCHES = {"gradients": "diagnostics.enable_gradient_diagnostics",
             "attention": "diagnostics.enable_attention_logging",
             "components": "diagnostics.enable_component_profiling"}


def _check_is_run(log_dir: Path) -> None:
    if not log_dir.is_dir():
        raise AnalysisError(f"{log_dir}: no such folder (pass --log_dir logs/<experiment>)")
    if (log_dir / "config.yaml").is_file() or (log_dir / "metrics.jsonl").is_file():
        return
    runs = sorted(p.name for p in log_dir.iterdir() if (p / "metrics.jsonl").is_file())
    hint = f"; runs inside it: {', '.join(runs[:3])}" if runs else ""
    raise AnalysisError(f"{log_dir} is not a run folder (no config.yaml or metrics.jsonl){hint}")


def _note_missing(run: RunData) -> None:
    present = {"gradients": run.gradients is not None, "attention": bool(run.attention),
               "components": bool(run.profiles)}
    for folder, key in _SWITCHES.items():
        if present[folder]:
            continue
        if run.config_value(key) is False:
            run.notes.append(f"{folder}/: none ({key} is off): analysed the rest")
        else:
            run.notes.append(f"{folder}/: no records yet: analysed the rest")
    if run.attention and not run.attribution:
        why = ("diagnostics.attribution_at_validation is off"
               if run.config_value("diagnostics.attribution_at_validation") is False
               else "written at each validation")
        run.notes.append(f"attention/attribution_step_*.json: none yet ({why})")
    if not run.train:
        run.notes.append("metrics.jsonl: no training lines yet")
    if not run.val:
        run.notes.append("metrics.jsonl: no validation lines yet")


def load_run(log_dir: Path | str) -> RunData:
    """Everything a run folder holds, validated; AnalysisError (naming the file) if it cannot be."""
    log_dir = Path(log_dir)
    _check_is_run(log_dir)
    config_path = log_dir / "config.yaml"
    run = RunData(log_dir=log_dir, config=read_config(config_path) if config_path.is_file() else {})
    if not config_path.is_file():
        run.notes.append("config.yaml: missing: suggestions cannot quote current values")
    metrics_path = log_dir / "metrics.jsonl"
    metrics = read_metrics(metrics_path, run.notes) if metrics_path.is_file() else {}
    run.train, run.val, run.test, run.restored = (
        metrics.get(k, []) for k in ("train", "val", "test", "restored"))
    if (log_dir / "gradients").is_dir():
        run.gradients = read_gradients(log_dir / "gradients", run.notes)
    run.attention = read_records(log_dir / "attention", "attention")
    run.attribution = read_records(log_dir / "attention", "attribution")
    run.profiles = read_records(log_dir / "components", "profile")
    _note_missing(run)
    return run
