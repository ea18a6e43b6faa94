"""Writing run records: atomic JSON files (readers never see half a file), finite floats."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from trainer.run_log import guarded_write


def finite_or_none(value):
    """JSON has no NaN/inf: non-finite floats become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: Path, record: dict) -> None:
    """Write atomically; a failure (full disk) is held for the trainer's next agreement across
    ranks (trainer.run_log), so the rank that writes does not leave the others waiting."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with guarded_write(path, leftover=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(finite_or_none(record), separators=(",", ":")))
        tmp.replace(path)


def step_file(folder: Path, prefix: str, step: int) -> Path:
    return folder / f"{prefix}_step_{step:06d}.json"
