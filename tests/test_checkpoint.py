"""Checkpoint integrity: manifests catch what DCP loads silently; consolidated files load."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager, verify
from trainer.checkpoint.manifest import write_manifest
from trainer.checkpoint.model_file import load_consolidated, save_consolidated
from trainer.resume import RunIdentity, find_resumable

IDENTITY = RunIdentity("t", {"d_model": 32}, {"targets": ["A", "B"]})


def identity_files(identity: RunIdentity = IDENTITY) -> dict[str, str]:
    """The config and layout files a trainer writes into a checkpoint, for `identity`."""
    config = {"train": {"experiment_name": identity.experiment}, "model": identity.model,
              "data": {"targets": identity.layout.get("targets")}}
    return {"config.yaml": yaml.safe_dump(config), "layout.json": json.dumps(identity.layout)}


def write_checkpoint(folder: Path, step: int = 5, identity: RunIdentity = IDENTITY) -> Path:
    """A small DCP checkpoint with the config and layout files a trainer writes."""
    folder.mkdir(parents=True)
    dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=str(folder))
    for name, text in identity_files(identity).items():
        (folder / name).write_text(text)
    write_manifest(folder, step)
    return folder


def shard(folder: Path) -> Path:
    return next(folder.glob("*.distcp"))


def test_intact_checkpoint_verifies(tmp_path):
    assert verify(write_checkpoint(tmp_path / "c")) is None


def test_flipped_byte_is_caught(tmp_path):
    folder = write_checkpoint(tmp_path / "c")
    data = bytearray(shard(folder).read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard(folder).write_bytes(bytes(data))
    assert "does not match its checksum" in verify(folder)


def test_truncated_missing_and_incomplete(tmp_path):
    truncated = write_checkpoint(tmp_path / "a")
    shard(truncated).write_bytes(shard(truncated).read_bytes()[:100])
    assert "bytes, the manifest says" in verify(truncated)
    no_metadata = write_checkpoint(tmp_path / "b")
    (no_metadata / ".metadata").unlink()
    assert "missing file .metadata" in verify(no_metadata)
    incomplete = write_checkpoint(tmp_path / "c")
    (incomplete / "manifest.json").unlink()
    assert "no manifest.json" in verify(incomplete)


def test_resume_auto_skips_damaged_newest(tmp_path, caplog):
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    good = write_checkpoint(tmp_path / "checkpoint_step_000010", 10)
    bad = write_checkpoint(tmp_path / "checkpoint_step_000020", 20)
    (bad / "manifest.json").write_text(json.dumps({"files": {}}))
    (tmp_path / "checkpoint_step_000030.tmp").mkdir()          # an unfinished write
    assert find_resumable(manager, "auto", IDENTITY) == good
    assert "skipping checkpoint" in caplog.text and "checkpoint_step_000020" in caplog.text


def test_consolidated_file_loads_with_plain_torch_load(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "best_model.pth"
    save_consolidated(path, model, {"config": {"a": 1}, "step": 4})
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["weight"], model.weight) and loaded["step"] == 4
    assert load_consolidated(path)["config"] == {"a": 1}


def test_checkpoint_keys_are_those_main_wrote(short_csv, tmp_path):
    """The Stateful parts save under the keys of the checkpoint format already on disk
    (fixture: the DCP keys of a checkpoint written without them), so existing checkpoints
    load."""
    from tests.conftest import small_config
    from trainer import distributed
    from trainer.build import build_trainer
    fixture = Path(__file__).parent / "fixtures" / "checkpoint_keys_main.json"
    config = small_config(short_csv, tmp_path, "k", train__max_steps=2, checkpoint__interval=2,
                          train__validate_at_start=False)
    assert build_trainer(config, distributed.init_distributed("cpu")).train() == 0
    folder = tmp_path / "checkpoints" / "k" / "checkpoint_step_000002"
    keys = sorted(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    assert keys == json.loads(fixture.read_text())
