"""Fuzzed `.metadata` contents (hypothesis): whatever a checkpoint's metadata says, checking
and loading it ends in a verdict within a time and a memory bound, never in an exception.

Every example runs in a forked child (tests/bounded.py) with 20 s and 300 MiB beyond the
test process. The metadata is changed where a crafted file would change it (chunk offsets and
sizes, their number, tensor shapes, storage records, the pickle's bytes), and a manifest that
matches is written, as a crafted folder can always carry one.
"""
from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bounded import run_bounded
from tests.conftest import fuzz_examples
from tests.test_checkpoint_hostile import empty_state, write_checkpoint_with_values
from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager, verify
from trainer.checkpoint.manifest import write_manifest
from trainer.errors import UserError

FUZZ = settings(max_examples=fuzz_examples(40), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

any_int = st.one_of(st.integers(-3, 2000), st.integers(-2**70, 2**70))
dims = st.lists(st.one_of(st.integers(-3, 2000), st.integers(-2**63, 2**63 - 1)),
                max_size=3).map(tuple)
shard_names = st.sampled_from(["__0_0.distcp", "../__0_0.distcp", "/dev/zero", ".metadata",
                               "manifest.json", "config.yaml", "__9_0.distcp", ""])


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    return write_checkpoint_with_values(tmp_path_factory.mktemp("fuzz") / "checkpoint_step_5")


@st.composite
def metadata_changes(draw):
    """A function changing unpickled metadata in one of the ways a crafted file could."""
    kind = draw(st.sampled_from(["chunk", "duplicate", "shape", "record", "drop", "keys"]))
    if kind == "chunk":
        offsets, sizes = draw(dims), draw(dims)

        def change(m):
            chunk = m.state_dict_metadata["app.w"].chunks[0]
            chunk.offsets, chunk.sizes = torch.Size(offsets), torch.Size(sizes)
    elif kind == "duplicate":
        times = draw(st.integers(0, 30_000))

        def change(m):
            entry = m.state_dict_metadata["app.w"]
            entry.chunks = entry.chunks * times
    elif kind == "shape":
        shape = draw(dims)

        def change(m):
            m.state_dict_metadata["app.w"].size = torch.Size(shape)
    elif kind == "record":
        which, name = draw(st.integers(0, 1)), draw(shard_names)
        offset, length = draw(any_int), draw(any_int)

        def change(m):
            record = list(m.storage_data.values())[which]
            record.relative_path, record.offset, record.length = name, offset, length
    elif kind == "drop":
        keep = draw(st.lists(st.booleans(), min_size=2, max_size=2))

        def change(m):
            m.storage_data = {i: r for (i, r), k in zip(m.storage_data.items(), keep) if k}
    else:
        extra = draw(st.integers(0, 300_000))

        def change(m):
            m.state_dict_metadata.update({f"x{i}": m.state_dict_metadata["app.w"]
                                          for i in range(extra)})
    return change


def verdicts(folder: Path) -> tuple[str | None, str]:
    """verify's verdict, and what loading without verify says: never an exception."""
    problem = verify(folder)
    try:
        CheckpointManager(CheckpointConfig(), folder.parent).load(folder, empty_state())
        loaded = "loaded"
    except UserError as err:
        loaded = str(err)
    return problem, loaded


def check_verdicts(problem: str | None, loaded: str) -> None:
    assert problem is None or ("\n" not in problem and len(problem) < 600), problem
    assert "\n" not in loaded and len(loaded) < 800, loaded
    if problem is not None:
        assert loaded != "loaded", f"verify refused ({problem}) what the load took"


def fuzzed_copy(intact: Path, tmp: str) -> Path:
    folder = Path(tmp) / intact.name
    shutil.copytree(intact, folder)
    return folder


@FUZZ
@given(change=metadata_changes())
def test_fuzzed_metadata_ends_in_a_verdict_within_bounds(intact, change):
    with tempfile.TemporaryDirectory() as tmp:
        folder = fuzzed_copy(intact, tmp)
        metadata = pickle.loads((folder / ".metadata").read_bytes())   # our own file: trusted
        change(metadata)
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        write_manifest(folder, 5)
        check_verdicts(*run_bounded(verdicts, folder, seconds=20, memory_mb=300))


@FUZZ
@given(data=st.data())
def test_fuzzed_metadata_bytes_end_in_a_verdict_within_bounds(intact, data):
    """Bytes flipped, cut or appended: a damaged pickle."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = fuzzed_copy(intact, tmp)
        raw = bytearray((folder / ".metadata").read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = raw[:data.draw(st.integers(1, len(raw)))] + data.draw(st.binary(max_size=64))
        (folder / ".metadata").write_bytes(bytes(raw))
        write_manifest(folder, 5)
        check_verdicts(*run_bounded(verdicts, folder, seconds=20, memory_mb=300))
