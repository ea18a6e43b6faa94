"""Writing run records: atomic JSON files (readers never see half a file), non-finite floats
as null (trainer.run_log.json_safe)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.run_log import guarded_write, json_safe


def write_json(path: Path, record: dict) -> None:
    """Write atomically; a failure (full disk) is held for the trainer's next agreement across
    ranks (trainer.run_log), so the rank that writes does not leave the others waiting."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with guarded_write(path, leftover=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(json_safe(record), separators=(",", ":")))
        tmp.replace(path)


def step_file(folder: Path, prefix: str, step: int) -> Path:
    return folder / f"{prefix}_step_{step:06d}.json"
