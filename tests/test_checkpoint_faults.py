"""Untrusted, damaged and foreign checkpoints, without a process group (fast).

A checkpoint folder or model file may come from anywhere: loading it must never run code
(crafted pickles are refused, naming the file), a malformed manifest is a reason to skip, not an
exception, and a checkpoint of another model, data layout or experiment is skipped by
`--resume auto` and refused by `--resume <folder>` with one line naming folder and reason.
The multi-process and killed-process cases are in tests/test_checkpoint_crashes.py.
"""
from __future__ import annotations

import enum
import logging
import math
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.test_checkpoint import IDENTITY, write_checkpoint
from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager, verify
from trainer.checkpoint.manifest import verified_sizes, write_manifest
from trainer.checkpoint.model_file import load_consolidated
from trainer.checkpoint.rng import read_rng_file, rng_state, set_rng_state
from trainer.checkpoint.safe_load import PlainDataLoadPlanner
from trainer.config import load_config
from trainer.errors import UserError
from trainer.optim import OptimConfig, apply_optim_settings, build_optimizer, build_scheduler
from trainer.resume import RunIdentity, find_resumable, resume_request


class CodeOnLoad:
    """Unpickling this creates `marker`: proof that loading ran code of the file's choice."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted_torch_file(path: Path, marker: Path, **plain) -> Path:
    torch.save({**plain, "payload": CodeOnLoad(marker)}, path)
    return path


def assert_refused_on_one_line(err: UserError, path: Path, marker: Path) -> None:
    text = str(err)
    assert str(path) in text and "refused" in text and "\n" not in text, text
    assert not marker.exists(), "the crafted file ran code"


# ------------------------------------------------------------------ crafted pickles (point 9)
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_crafted_model_file_is_refused(tmp_path, kind):
    marker, path = tmp_path / "pwned", tmp_path / "best_model.pth"
    if kind == "torch_save":
        crafted_torch_file(path, marker, model={"w": torch.zeros(2)})
    else:
        path.write_bytes(pickle.dumps({"model": {}, "payload": CodeOnLoad(marker)}))
    with pytest.raises(UserError) as err:
        load_consolidated(path)
    if kind == "torch_save":
        assert ".open" in str(err.value)          # names what it wanted to run
    assert_refused_on_one_line(err.value, path, marker)


def _with_rng_file(folder: Path, content_writer) -> Path:
    """A checkpoint whose rng_rank0.pt is written by `content_writer(path)`, with a manifest
    that matches (a crafted folder can always carry matching checksums)."""
    write_checkpoint(folder)
    content_writer(folder / "rng_rank0.pt")
    write_manifest(folder, 5)
    return folder


def test_crafted_rng_file_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = _with_rng_file(tmp_path / "exp" / "checkpoint_step_000005",
                            lambda p: crafted_torch_file(p, marker, torch=torch.get_rng_state()))
    problem = verify(folder)
    assert "rng_rank0.pt" in problem and "refused" in problem and ".open" in problem
    manager = CheckpointManager(CheckpointConfig(), tmp_path / "exp")
    with pytest.raises(UserError) as err:          # explicit: refused, one line
        find_resumable(manager, str(folder), IDENTITY)
    assert_refused_on_one_line(err.value, folder, marker)
    with pytest.raises(UserError, match="none of the 1 checkpoint"):   # auto: nothing usable
        find_resumable(manager, "auto", IDENTITY)
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused_before_dcp_reads_it(tmp_path):
    marker = tmp_path / "pwned"
    folder = write_checkpoint(tmp_path / "c")
    (folder / ".metadata").write_bytes(pickle.dumps(CodeOnLoad(marker)))
    write_manifest(folder, 5)
    problem = verify(folder)
    assert problem.startswith(".metadata: refused") and ".open" in problem, problem
    assert not marker.exists()


def test_crafted_value_in_a_shard_is_refused_by_verify_and_by_the_load(tmp_path):
    """DCP's own load planner unpickles non-tensor values with weights_only=False."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "c"
    dcp.save({"w": torch.ones(3), "progress": {"step": 4}, "x": CodeOnLoad(marker)},
             checkpoint_id=str(folder))
    write_manifest(folder, 4)
    problem = verify(folder)
    assert problem.startswith("__0_0.distcp: refused: the value 'x'"), problem
    state = {"w": torch.zeros(3), "progress": {"step": 0}, "x": None}
    with pytest.raises(BaseException, match="refused: the value 'x'"):   # DCP's CheckpointException
        dcp.load(state, checkpoint_id=str(folder), planner=PlainDataLoadPlanner())
    assert not marker.exists()


def test_plain_values_load_through_the_safe_planner(tmp_path):
    dcp.save({"w": torch.ones(3), "progress": {"step": 4, "best": math.inf, "name": "a"},
              "groups": [{"betas": (0.9, 0.95), "lr": 1e-3, "fused": None}]},
             checkpoint_id=str(tmp_path / "c"))
    write_manifest(tmp_path / "c", 4)
    assert verify(tmp_path / "c") is None
    state = {"w": torch.zeros(3), "progress": {"step": 0, "best": 0.0, "name": ""},
             "groups": [{"betas": (0.0, 0.0), "lr": 0.0, "fused": True}]}
    dcp.load(state, checkpoint_id=str(tmp_path / "c"), planner=PlainDataLoadPlanner())
    assert state["progress"] == {"step": 4, "best": math.inf, "name": "a"}
    assert state["groups"] == [{"betas": (0.9, 0.95), "lr": 1e-3, "fused": None}]
    assert torch.equal(state["w"], torch.ones(3))


class WriteOnLoad:
    """Unpickling this calls PosixPath(marker).write_text: only names a metadata file may use."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (self.marker.write_text, ("pwned",))


class EnumByGetattr(pickle.Pickler):
    """Pickles enum members as Python 3.11.2 (Debian 12) does: getattr(EnumClass, name)."""

    def reducer_override(self, obj):
        return (getattr, (type(obj), obj.name)) if isinstance(obj, enum.Enum) else NotImplemented


def test_metadata_pickled_by_python_3_11_2_is_accepted_but_other_getattr_is_not(tmp_path):
    dcp.save({"w": torch.ones(3), "progress": {"step": 4}}, checkpoint_id=str(tmp_path / "c"))
    path = tmp_path / "c" / ".metadata"
    metadata = pickle.loads(path.read_bytes())     # our own file: trusted here
    with open(path, "wb") as f:
        EnumByGetattr(f).dump(metadata)
    assert b"getattr" in path.read_bytes()
    write_manifest(path.parent, 4)
    assert verify(path.parent) is None
    marker = tmp_path / "pwned"
    # a bound method pickles as getattr(PosixPath(marker), "write_text"): allowed names, no enum
    path.write_bytes(pickle.dumps(WriteOnLoad(marker)))
    write_manifest(path.parent, 4)
    assert "refused: it refers to builtins.getattr on" in verify(path.parent)
    assert not marker.exists()


def test_manifest_json_that_is_a_pickle_is_just_unreadable(tmp_path):
    folder = write_checkpoint(tmp_path / "c")
    (folder / "manifest.json").write_bytes(pickle.dumps(CodeOnLoad(tmp_path / "pwned")))
    assert verify(folder).startswith("unreadable manifest.json")
    assert not (tmp_path / "pwned").exists()


def test_rng_states_are_tensor_only_and_restore_exactly(tmp_path):
    random.gauss(0, 1)                         # python's random caches a second gaussian
    np.random.standard_normal()                # numpy too
    path = tmp_path / "rng_rank0.pt"
    torch.save(rng_state(), path)
    expected = (torch.rand(3), np.random.standard_normal(3), random.gauss(0, 1), random.random())
    state = torch.load(path, weights_only=True)           # plain tensors: no unpickling needed
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    set_rng_state(read_rng_file(path))
    again = (torch.rand(3), np.random.standard_normal(3), random.gauss(0, 1), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_old_format_rng_file_is_not_unpickled_and_the_rank_reseeds(tmp_path, caplog):
    """Decision: an RNG file of the old format (numpy's state pickled as an ndarray) is not
    loaded at all; the rank keeps its fresh seed and the log says resume is not exact."""
    folder = _with_rng_file(tmp_path / "c", lambda p: torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
         "python": random.getstate()}, p))
    assert read_rng_file(folder / "rng_rank0.pt") is None and verify(folder) is None
    with caplog.at_level(logging.WARNING):
        CheckpointManager(CheckpointConfig(), tmp_path)._restore_rng(
            folder, "rng_rank0.pt", verified_sizes(folder))
    assert "old RNG format" in caplog.text and "freshly seeded" in caplog.text


# ------------------------------------------------------------ malformed manifests (point 3)
@pytest.mark.parametrize("manifest", [
    b"[]", b'"text"', b"null", b'{"files": []}', b'{"files": {".metadata": 3}}',
    b'{"files": {".metadata": {"size": "12", "sha256": "ab"}}}',
    b'{"files": {"../../etc/passwd": {"size": 1, "sha256": "ab"}}}', b'{"step": 5}',
    b"\x80\x04\x95 binary", b'{"files": {'])
def test_malformed_manifest_is_a_reason_never_an_exception(tmp_path, manifest):
    folder = write_checkpoint(tmp_path / "checkpoint_step_000005")
    (folder / "manifest.json").write_bytes(manifest)
    problem = verify(folder)
    assert isinstance(problem, str) and "manifest.json" in problem


# ------------------------------------------------ foreign checkpoints: skip or refuse (point 3)
def foreign(tmp_path: Path, kind: str) -> RunIdentity:
    if kind == "model":
        return RunIdentity("t", {"d_model": 64}, IDENTITY.layout)
    if kind == "layout":
        return RunIdentity("t", IDENTITY.model, {"targets": ["A", "C"]})
    return RunIdentity("other", IDENTITY.model, IDENTITY.layout)


REASONS = {"model": "another model config (model.d_model: checkpoint 64, this run 32)",
           "layout": "another data layout (targets: checkpoint ['A', 'C'], this run ['A', 'B'])",
           "experiment": "it belongs to experiment 'other', not 't'"}


@pytest.mark.parametrize("kind", ["model", "layout", "experiment"])
def test_resume_auto_skips_a_foreign_checkpoint(tmp_path, caplog, kind):
    good = write_checkpoint(tmp_path / "checkpoint_step_000010", 10)
    alien = write_checkpoint(tmp_path / "checkpoint_step_000020", 20, foreign(tmp_path, kind))
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    assert find_resumable(manager, "auto", IDENTITY) == good
    assert f"skipping checkpoint {alien}: {REASONS[kind]}" in caplog.text


@pytest.mark.parametrize("kind", ["model", "layout"])
def test_explicit_resume_of_a_foreign_checkpoint_is_refused(tmp_path, kind):
    alien = write_checkpoint(tmp_path / "elsewhere" / "checkpoint_step_000020", 20,
                             foreign(tmp_path, kind))
    before = {p.name: p.read_bytes() for p in alien.iterdir()}
    manager = CheckpointManager(CheckpointConfig(), tmp_path / "t")
    with pytest.raises(UserError) as err:
        find_resumable(manager, str(alien), IDENTITY)
    assert str(err.value) == f"--resume {alien}: {REASONS[kind]}"
    assert before == {p.name: p.read_bytes() for p in alien.iterdir()}     # nothing touched


def test_explicit_resume_from_another_experiment_starts_a_new_one_only(tmp_path, caplog):
    """Decision: `--resume <folder of experiment a>` in a run named b is a branch: allowed (with
    a warning naming both) while b has no checkpoints, refused once it has some."""
    other = write_checkpoint(tmp_path / "other" / "checkpoint_step_000020", 20,
                             foreign(tmp_path, "experiment"))
    manager = CheckpointManager(CheckpointConfig(), tmp_path / "t")
    assert find_resumable(manager, str(other), IDENTITY) == other
    assert "experiment 't' starts from checkpoint" in caplog.text
    write_checkpoint(tmp_path / "t" / "checkpoint_step_000005", 5)
    with pytest.raises(UserError, match="already has checkpoint_step_000005"):
        find_resumable(manager, str(other), IDENTITY)


def test_explicit_resume_of_an_older_own_checkpoint_would_bury_newer_ones(tmp_path):
    older = write_checkpoint(tmp_path / "checkpoint_step_000010", 10)
    write_checkpoint(tmp_path / "checkpoint_step_000020", 20)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    with pytest.raises(UserError, match="already has checkpoint_step_000020, which resuming"):
        find_resumable(manager, str(older), IDENTITY)
    assert find_resumable(manager, str(tmp_path / "checkpoint_step_000020"), IDENTITY)


@pytest.mark.parametrize("damage", ["truncated_shard", "missing_shard", "missing_metadata",
                                    "malformed_manifest"])
def test_nothing_usable_left_stops_the_run(tmp_path, damage):
    folder = write_checkpoint(tmp_path / "checkpoint_step_000010", 10)
    shard = next(folder.glob("*.distcp"))
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:50])
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "missing_metadata":
        (folder / ".metadata").unlink()
    else:
        (folder / "manifest.json").write_text('{"files": ["a list"]}')
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    with pytest.raises(UserError) as err:
        find_resumable(manager, "auto", IDENTITY)
    assert "--resume auto: none of the 1 checkpoint(s)" in str(err.value)
    assert "checkpoint_step_000010" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"--resume {folder}: "):
        find_resumable(manager, str(folder), IDENTITY)
    assert folder.is_dir()                               # nothing deleted or overwritten


def test_no_checkpoint_at_all_starts_fresh(tmp_path):
    assert find_resumable(CheckpointManager(CheckpointConfig(), tmp_path), "auto", IDENTITY) is None


# ------------------------------------------------------------- restarts and stale writes
def test_restarted_worker_resumes_newest_of_its_experiment(tmp_path, monkeypatch):
    """A run started with --resume <folder>: once restarted by torchrun it takes the newest
    checkpoint of its own experiment, and the start folder only while it has none."""
    start = write_checkpoint(tmp_path / "other" / "checkpoint_step_000010", 10,
                             foreign(tmp_path, "experiment"))
    config = load_config(None, [("train.resume", str(start))])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    requested, fallback = resume_request(config)
    assert (requested, fallback) == ("auto", start)
    manager = CheckpointManager(CheckpointConfig(), tmp_path / "t")
    assert find_resumable(manager, requested, IDENTITY, fallback) == start
    own = write_checkpoint(tmp_path / "t" / "checkpoint_step_000020", 20)
    shutil.rmtree(start)                                 # pruned, or moved away: no matter
    assert find_resumable(manager, requested, IDENTITY, fallback) == own
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_request(config) == (str(start), None)


def test_stale_tmp_folders_are_removed_and_logged(tmp_path, caplog):
    keep = write_checkpoint(tmp_path / "checkpoint_step_000010", 10)
    for name in ("checkpoint_step_000020.tmp", "checkpoint_step_000005.removing.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"half")
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.remove_stale_writes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep.name]
    assert "checkpoint_step_000020.tmp: left by a save that did not finish" in caplog.text


# ------------------------------------------------------------------- changed optim.* on resume
def test_changed_optim_settings_are_applied_to_a_restored_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    old = OptimConfig(lr=1e-3, warmup_steps=2)
    optimizer = build_optimizer(model, old, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, old, total_steps=10)
    for _ in range(4):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    new = OptimConfig(lr=3e-4, weight_decay=0.2, betas=[0.8, 0.9], warmup_steps=2)
    apply_optim_settings(optimizer, scheduler, new)
    reference = build_scheduler(build_optimizer(model, new, torch.device("cpu")), new, 10)
    for _ in range(4):
        reference.step()
    assert scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    assert all(g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)
    scheduler.step()
    reference.step()
    assert scheduler.get_last_lr() == pytest.approx(reference.get_last_lr())
