"""Hostile checkpoint folders: a checkpoint reads only regular files inside itself, and loads
whole or not at all.

Each case runs in a forked child with a time and a memory limit (tests/bounded.py): before the
checks these cases hung forever (a named pipe) or read gigabytes (a `.metadata` pointing at
../../dev/zero), and a symlinked shard loaded from outside the folder.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.stateful import Stateful

from tests.bounded import run_bounded
from tests.test_checkpoint import IDENTITY, identity_files, shard
from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager, verify
from trainer.checkpoint.manifest import write_manifest
from trainer.checkpoint.safe_load import PlainDataLoadPlanner
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


def experiment_with_a_linked_step(tmp_path) -> tuple[Path, Path, Path]:
    """(experiment folder, its real step 5, its step 9: a link to an intact checkpoint
    elsewhere)."""
    real = write_checkpoint_with_values(tmp_path / "exp" / STEP_FOLDER)
    elsewhere = write_checkpoint_with_values(tmp_path / "elsewhere" / "checkpoint_step_000009")
    link = tmp_path / "exp" / "checkpoint_step_000009"
    link.symlink_to(elsewhere, target_is_directory=True)
    return tmp_path / "exp", real, link


def test_resume_auto_skips_a_step_folder_that_is_a_symbolic_link(tmp_path, caplog):
    """The newest step, a link to an intact checkpoint, is skipped with a warning naming it;
    the newest real one is taken."""
    experiment, real, link = experiment_with_a_linked_step(tmp_path)
    manager = CheckpointManager(CheckpointConfig(), experiment)
    with caplog.at_level("WARNING"):
        assert find_resumable(manager, "auto", IDENTITY) == real
    assert f"skipping checkpoint {link}: checkpoint_step_000009: refused: a symbolic link" \
        in caplog.text
    assert_one_line_naming(verify(link), "checkpoint_step_000009", "symbolic link")
    assert_one_line_naming(load_error(link), str(link), "symbolic link")


def test_resume_auto_with_only_a_linked_step_stops(tmp_path):
    experiment, real, _ = experiment_with_a_linked_step(tmp_path)
    shutil.rmtree(real)
    error = resume_auto_error(experiment)
    assert_one_line_naming(error, "none of the 1 checkpoint(s)", "symbolic link")


def test_pruning_leaves_a_linked_step_and_its_target_alone_a_save_replaces_the_link(tmp_path):
    experiment, real, link = experiment_with_a_linked_step(tmp_path)
    shutil.rmtree(real)
    manager = CheckpointManager(CheckpointConfig(keep_last=1), experiment)
    manager.save(12, {"app": Holder({"w": torch.ones(3), "progress": {"step": 12}})},
                 identity_files())
    assert manager.complete_checkpoints() == [experiment / "checkpoint_step_000012"]
    assert link.is_symlink() and verify(link.resolve()) is None
    keeping_two = CheckpointManager(CheckpointConfig(keep_last=2), experiment)
    keeping_two.save(9, {"app": Holder({"w": torch.ones(3), "progress": {"step": 9}})},
                     identity_files())       # a save of the link's step replaces the link only
    assert not link.is_symlink() and verify(link) is None
    assert verify(tmp_path / "elsewhere" / "checkpoint_step_000009") is None
    assert not list(experiment.glob("*.tmp"))


def test_explicit_resume_through_a_symbolic_link_loads_its_target(tmp_path, caplog):
    """A path the user typed is resolved, as a shell command resolves its arguments: the
    checkpoint is checked and loaded by its real path."""
    _, _, link = experiment_with_a_linked_step(tmp_path)
    typed = tmp_path / "typed" / "mine"
    typed.parent.mkdir()
    typed.symlink_to(link, target_is_directory=True)
    manager = CheckpointManager(CheckpointConfig(), typed.parent)
    with caplog.at_level("INFO"):
        folder = find_resumable(manager, str(typed), IDENTITY)
    assert folder == (tmp_path / "elsewhere" / "checkpoint_step_000009").resolve()
    assert f"--resume {typed}: resolved to {folder}" in caplog.text
    manager.load(folder, empty_state())


def test_intact_checkpoint_loads_through_the_confined_reader(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    assert verify(folder) is None
    state = empty_state()
    CheckpointManager(CheckpointConfig(), tmp_path).load(folder, state)
    assert torch.equal(state["app"].value["w"], torch.arange(1000.0))
    assert state["app"].value["progress"] == {"step": 5}


# --------------------------------------------------------- no silent partial load (point 2)
def move_chunk(metadata, name: str, offsets: tuple) -> None:
    """Give the first chunk of tensor `name` other offsets, its storage record following."""
    chunk = metadata.state_dict_metadata[name].chunks[0]
    record = metadata.storage_data.pop(MetadataIndex(name, chunk.offsets))
    chunk.offsets = torch.Size(offsets)
    metadata.storage_data[MetadataIndex(name, offsets)] = record


def test_negative_chunk_offset_is_refused_by_verify_and_by_the_load(tmp_path):
    """DCP loads such a chunk in part and leaves the rest of the tensor as it was."""
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    rewrite_metadata(folder, lambda m: move_chunk(m, "app.w", (-4,)))
    assert_one_line_naming(verify(folder), "app.w", "offsets (-4,)")
    assert_one_line_naming(load_error(folder), str(folder), "app.w")


def test_a_partial_load_is_found_after_the_load_whatever_the_metadata_check(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    rewrite_metadata(folder, lambda m: move_chunk(m, "app.w", (-4,)))
    state = {"app": {"w": torch.full((1000,), -1.0), "progress": {"step": 0}}}
    planner = PlainDataLoadPlanner()
    dcp.load(state, checkpoint_id=str(folder), planner=planner)     # DCP's own reader: no check
    assert planner.not_loaded_whole() == ["app.w"]
    assert (state["app"]["w"][-4:] == -1).all()          # what DCP alone leaves behind


def duplicate_chunks(metadata, times: int) -> None:
    entry = metadata.state_dict_metadata["app.w"]
    entry.chunks = entry.chunks * times


def test_20000_duplicate_chunks_are_refused_fast(tmp_path):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    rewrite_metadata(folder, lambda m: duplicate_chunks(m, 20_000))
    started = time.perf_counter()
    problem = run_bounded(verify, folder, seconds=10, memory_mb=200)
    assert_one_line_naming(problem, "app.w", "20000 chunks")
    assert time.perf_counter() - started < 5
    assert_one_line_naming(run_bounded(load_error, folder, seconds=10, memory_mb=200), "app.w")


def split_overlapping(metadata) -> None:
    """Two chunks of 500 elements at 0 and 250: 1000 in all, but 750-999 never written."""
    entry = metadata.state_dict_metadata["app.w"]
    record = metadata.storage_data[MetadataIndex("app.w", (0,))]
    entry.chunks = [ChunkStorageMetadata(torch.Size([0]), torch.Size([500])),
                    ChunkStorageMetadata(torch.Size([250]), torch.Size([500]))]
    metadata.storage_data[MetadataIndex("app.w", (250,))] = record


def drop_record(metadata, name: str) -> None:
    metadata.storage_data = {i: r for i, r in metadata.storage_data.items() if i.fqn != name}


@pytest.mark.parametrize("damage, expected", [
    (lambda m: move_chunk(m, "app.w", (1,)), "not within its shape"),
    (lambda m: duplicate_chunks(m, 2), "exactly once"),
    (split_overlapping, "exactly once"),
    (lambda m: drop_record(m, "app.w"), "no storage record"),
    (lambda m: drop_record(m, "app.progress.step"), "no storage record"),
    (lambda m: setattr(m.state_dict_metadata["app.w"].chunks[0], "sizes", torch.Size([999])),
     "exactly once"),
])
def test_malformed_chunks_are_refused_naming_the_value(tmp_path, damage, expected):
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    rewrite_metadata(folder, damage)
    assert_one_line_naming(verify(folder), ".metadata", expected)


def shrink_tensor(metadata) -> None:
    """app.w claims 10 elements; its storage record still holds the 1000 saved."""
    entry = metadata.state_dict_metadata["app.w"]
    entry.size = entry.chunks[0].sizes = torch.Size([10])


def point_at_value(metadata) -> None:
    """app.w's chunk points at the bytes of the value app.progress.step."""
    record = metadata.storage_data[MetadataIndex("app.progress.step")]
    metadata.storage_data[MetadataIndex("app.w", (0,))] = record


def widen_dtype(metadata) -> None:
    metadata.state_dict_metadata["app.w"].properties.dtype = torch.float64


@pytest.mark.parametrize("damage, expected", [
    (shrink_tensor, "of sizes (10,) needs 40 bytes of torch.float32"),
    (point_at_value, "of sizes (1000,) needs 4000 bytes of torch.float32"),
    (widen_dtype, "of sizes (1000,) needs 8000 bytes of torch.float64"),
    (lambda m: setattr(m.state_dict_metadata["app.w"].properties, "dtype", "float32"),
     "malformed shape, dtype or chunk list"),
])
def test_chunk_whose_record_does_not_hold_its_bytes_is_refused_before_reading(
        tmp_path, damage, expected, monkeypatch):
    """Plain data that passes as a slice but is not the saved tensor's: refused by the metadata
    check, by verify and by the load, before a shard byte is read."""
    from trainer.checkpoint import safe_load
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    rewrite_metadata(folder, damage)
    assert_one_line_naming(verify(folder), ".metadata", "tensor 'app.w'", expected)
    def no_reading(*args, **kwargs):
        raise AssertionError("a shard was opened")
    monkeypatch.setattr(safe_load._ConfinedFileSystem, "create_stream", no_reading)
    assert_one_line_naming(load_error(folder), str(folder), "tensor 'app.w'", expected)


def test_tensor_of_another_shape_than_the_runs_is_refused_before_reading(tmp_path,
                                                                          monkeypatch):
    """A checkpoint whose app.w is consistently (2, 500): plain data to the metadata check, but
    not this run's (1000,). DCP's planner refuses it in one line before a shard is opened."""
    from trainer.checkpoint import safe_load

    def reshape(metadata):
        entry = metadata.state_dict_metadata["app.w"]
        record = metadata.storage_data.pop(MetadataIndex("app.w", (0,)))
        entry.size = torch.Size([2, 500])
        entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 500]))]
        metadata.storage_data[MetadataIndex("app.w", (0, 0))] = record
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    rewrite_metadata(folder, reshape)
    assert verify(folder) is None

    def no_reading(*args, **kwargs):
        raise AssertionError("a shard was opened")
    monkeypatch.setattr(safe_load._ConfinedFileSystem, "create_stream", no_reading)
    error = load_error(folder)
    assert "\n" not in error and "saved torch.Size([2, 500])" in error and "app.w" in error


@pytest.mark.slow
def test_trainer_refuses_a_checkpoint_that_covers_a_parameter_in_part(short_csv, tmp_path,
                                                                     monkeypatch):
    """The case found: a negative offset in wave_patching_composer.position's chunk resumed
    "at step 2" with part of that parameter random. Refused by the metadata check, and by the
    count of what was loaded when that check is bypassed."""
    from tests.conftest import small_config
    from trainer import distributed
    from trainer.build import build_trainer
    from trainer.checkpoint import safe_load
    config = small_config(short_csv, tmp_path, "p", train__max_steps=2, checkpoint__interval=2,
                          train__validate_at_start=False)
    env = distributed.init_distributed("cpu")
    assert build_trainer(config, env).train() == 0
    folder = tmp_path / "checkpoints" / "p" / "checkpoint_step_000002"
    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    name = next(k for k in keys if k.endswith("wave_patching_composer.position"))
    rewrite_metadata(folder, lambda m: move_chunk(
        m, name, (-4,) + (0,) * (len(keys[name].size) - 1)))
    resuming = small_config(short_csv, tmp_path, "q", train__resume=str(folder))
    with pytest.raises(UserError, match=f"tensor '{name}'.*not within its shape"):
        build_trainer(resuming, env)
    monkeypatch.setattr(safe_load, "check_metadata_entries", lambda metadata, sizes: None)
    with pytest.raises(UserError, match=f"does not cover {name} whole"):
        build_trainer(resuming, env)


@pytest.mark.parametrize("length", [0, 100])
def test_value_record_pointing_at_other_bytes_is_a_verdict_not_an_exception(tmp_path, length):
    """Found by tests/test_checkpoint_fuzz.py: verify raised EOFError (an empty slice) or
    RuntimeError (a slice cut short)."""
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)

    def cut(metadata):
        record = metadata.storage_data[MetadataIndex("app.progress.step")]
        record.offset, record.length = 0, length
    rewrite_metadata(folder, cut)
    problem = verify(folder)
    assert "'app.progress.step' in the shards is unreadable" in problem, problem
    assert "\n" not in problem and "app.progress.step" in load_error(folder)


def test_crafted_tensor_slice_is_refused_in_our_words(tmp_path):
    """Torch's own text for a refused pickle spans paragraphs ("you have two options")."""
    from tests.test_checkpoint_faults import CodeOnLoad
    marker = tmp_path / "pwned"
    folder = write_checkpoint_with_values(tmp_path / STEP_FOLDER)
    crafted = io.BytesIO()      # padded to the bytes app.w's chunk needs: past the metadata check
    torch.save({"payload": CodeOnLoad(marker), "pad": "x" * 4000}, crafted)
    assert 4000 <= len(crafted.getvalue()) <= 4000 + 4096
    shard_size = shard(folder).stat().st_size
    with open(shard(folder), "ab") as f:
        f.write(crafted.getvalue())

    def point_at_crafted(metadata):
        record = metadata.storage_data[MetadataIndex("app.w", (0,))]
        record.offset, record.length = shard_size, len(crafted.getvalue())
    rewrite_metadata(folder, point_at_crafted)
    error = load_error(folder)
    assert "a tensor in the shards is not plain tensor data" in error and "\n" not in error
    assert "two options" not in error and not marker.exists()
