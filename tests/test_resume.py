"""trainer/resume.py: the log says when a run resumes on another number of ranks."""
from __future__ import annotations

import json
import logging

from tests.test_checkpoint import IDENTITY, write_checkpoint
from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager
from trainer.resume import find_resumable, saved_world_size


def saved_by(folder, num_ranks: int) -> None:
    """Make the manifest say `num_ranks` ranks saved `folder` (the manifest lists every file
    but itself, so the checkpoint stays intact)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "world_size": num_ranks}))


def test_resuming_on_fewer_ranks_than_saved_says_so(tmp_path, caplog):
    folder = write_checkpoint(tmp_path / "checkpoint_step_000040", 40)
    saved_by(folder, 2)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    with caplog.at_level(logging.INFO, logger="trainer.resume"):
        assert find_resumable(manager, "auto", IDENTITY) == folder
    assert f"world size 2 -> 1: resuming from {folder} at step 40" in caplog.text


def test_resuming_on_as_many_ranks_as_saved_says_nothing_of_it(tmp_path, caplog):
    folder = write_checkpoint(tmp_path / "checkpoint_step_000040", 40)
    assert saved_world_size(folder) == 1
    with caplog.at_level(logging.INFO, logger="trainer.resume"):
        find_resumable(CheckpointManager(CheckpointConfig(), tmp_path), "auto", IDENTITY)
    assert "world size" not in caplog.text


def test_a_manifest_without_world_size_says_nothing_of_it(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint_step_000040", 40)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["world_size"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert saved_world_size(folder) is None
