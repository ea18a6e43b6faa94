"""Writing run records: atomic JSON files (readers never see half a file), non-finite floats
as null (trainer.run_log.json_safe)."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.run_log import guarded_write, json_safe, replace_text


def write_json(path: Path, record: dict) -> None:
    """Write atomically; a failure (full disk) is held for the trainer's next agreement across
    ranks (trainer.run_log), so the rank that writes does not leave the others waiting."""
    with guarded_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps(json_safe(record), separators=(",", ":")))


def step_file(folder: Path, prefix: str, step: int) -> Path:
    return folder / f"{prefix}_step_{step:06d}.json"
