"""Hostile checkpoint folders: a checkpoint reads only regular files inside itself.

Each case runs in a forked child with a time and a memory limit (tests/bounded.py): before the
checks these cases hung forever (a named pipe) or read gigabytes (a `.metadata` pointing at
../../dev/zero), and a symlinked shard loaded from outside the folder.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from tests.bounded import run_bounded
from tests.test_checkpoint import IDENTITY, identity_files, shard
from trainer.checkpoint import CheckpointConfig, CheckpointManager, verify, write_manifest
from trainer.errors import UserError
from trainer.resume import find_resumable

STEP_FOLDER = "checkpoint_step_000005"


class Holder(Stateful):
    """A Stateful part holding plain values: what a trainer's parts look like to DCP."""

    def __init__(self, value: dict) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, sd: dict) -> None:
        self.value = sd


def write_checkpoint_with_values(folder: Path) -> Path:
    """A checkpoint holding a tensor and a non-tensor value, as the trainer's do."""
    folder.mkdir(parents=True)
    dcp.save({"app": {"w": torch.arange(1000.0), "progress": {"step": 5}}},
             checkpoint_id=str(folder))
    for name, text in identity_files().items():
        (folder / name).write_text(text)
    write_manifest(folder, 5)
    return folder


def rewrite_metadata(folder: Path, change) -> None:
    """Apply `change(metadata)` to `.metadata` (our own file, unpickled here as trusted), then
    write a matching manifest: a crafted folder can always carry matching checksums."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))
    write_manifest(folder, 5)


def empty_state() -> dict:
    return {"app": Holder({"w": torch.zeros(1000), "progress": {"step": 0}})}


def explicit_resume_error(folder: Path) -> str:
    manager = CheckpointManager(CheckpointConfig(), folder.parent)
    try:
        find_resumable(manager, str(folder), IDENTITY)
    except UserError as err:
        return str(err)
    return "accepted"


def resume_auto_error(experiment: Path) -> str:
    try:
        find_resumable(CheckpointManager(CheckpointConfig(), experiment), "auto", IDENTITY)
    except UserError as err:
        return str(err)
    return "accepted"


def load_error(folder: Path) -> str:
    """What CheckpointManager.load says when called without a verify first."""
    try:
        CheckpointManager(CheckpointConfig(), folder.parent).load(folder, empty_state())
    except UserError as err:
        return str(err)
    return "loaded"


def assert_one_line_naming(text: str, *names: str) -> None:
    assert "\n" not in text and "refused" in text, text
    assert all(name in text for name in names), text


def test_metadata_pointing_at_dev_zero_with_3_gb_is_refused_without_reading(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / "exp" / STEP_FOLDER)
    dev_zero = "../" * (len(folder.parts) - 1) + "dev/zero"

    def point_at_dev_zero(metadata):
        for index, record in metadata.storage_data.items():
            if index.fqn == "app.progress.step":
                record.relative_path, record.length = dev_zero, 3 * 2**30
    rewrite_metadata(folder, point_at_dev_zero)
    problem = run_bounded(verify, folder, seconds=20, memory_mb=300)
    assert_one_line_naming(problem, ".metadata", "app.progress.step", "../dev/zero")
    assert_one_line_naming(run_bounded(explicit_resume_error, folder, memory_mb=300), str(folder))
    assert_one_line_naming(run_bounded(load_error, folder, memory_mb=300), ".metadata")


def test_storage_record_beyond_its_shard_is_refused(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)

    def past_the_end(metadata):
        for record in metadata.storage_data.values():
            record.length = 3 * 2**30
    rewrite_metadata(folder, past_the_end)
    problem = run_bounded(verify, folder, memory_mb=300)
    assert_one_line_naming(problem, ".metadata", "__0_0.distcp", "bytes")


@pytest.mark.parametrize("name", ["rng_rank1.pt", "config.yaml", "notes.txt"])
def test_named_pipe_in_a_checkpoint_is_refused_at_once(tmp_path, name):
    """A pipe with no writer: opening or reading it blocked forever, deaf to SIGTERM."""
    experiment = tmp_path / "exp"
    folder = write_checkpoint_with_values(experiment / STEP_FOLDER)
    if name == "config.yaml":          # a file the manifest lists, replaced by a pipe
        (folder / name).unlink()
    os.mkfifo(folder / name)
    problem = run_bounded(verify, folder, seconds=20)
    assert_one_line_naming(problem, name)
    assert_one_line_naming(run_bounded(explicit_resume_error, folder, seconds=20), name)
    assert "none of the 1 checkpoint" in run_bounded(resume_auto_error, experiment, seconds=20)


def test_symlinked_shard_is_refused_by_verify_and_by_the_load(tmp_path):
    """The link's target has the very bytes the manifest lists: only the link is wrong."""
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    outside = tmp_path / "outside.distcp"
    shutil.move(shard(folder), outside)
    (folder / "__0_0.distcp").symlink_to(outside)
    assert_one_line_naming(run_bounded(verify, folder), "__0_0.distcp", "symbolic link")
    assert_one_line_naming(run_bounded(load_error, folder), str(folder), "__0_0.distcp")


def test_symlink_to_a_device_is_refused(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to("/dev/zero")
    assert_one_line_naming(run_bounded(verify, folder, memory_mb=300), "config.yaml")


def test_manifest_that_is_a_link_to_a_huge_file_is_not_read(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to("/dev/zero")
    assert_one_line_naming(run_bounded(verify, folder, memory_mb=300), "manifest.json")


def test_intact_checkpoint_loads_through_the_confined_reader(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    assert verify(folder) is None
    state = empty_state()
    CheckpointManager(CheckpointConfig(), tmp_path).load(folder, state)
    assert torch.equal(state["app"].value["w"], torch.arange(1000.0))
    assert state["app"].value["progress"] == {"step": 5}
