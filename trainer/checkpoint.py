"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and consolidated model files.

Layout: `checkpoints/<exp>/checkpoint_step_NNNNNN/` holds DCP's `.metadata` and shards, one
`rng_rank<r>.pt` per rank (DCP would collapse per-rank values into one), `config.yaml` and
`manifest.json` (size and SHA-256 of every file: DCP itself loads flipped bytes silently).
A checkpoint is written under `<name>.tmp` and renamed by rank 0 once complete, so a folder
without `.tmp` and with a matching manifest is a usable checkpoint.
`best_model.pth` / `final_model.pth` are single `torch.save` files (weights + config + spec).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer import distributed
from trainer.errors import WriteFailed

log = logging.getLogger(__name__)
_PREFIX = "checkpoint_step_"
_MANIFEST = "manifest.json"


@dataclass
class CheckpointConfig:
    root: str = "checkpoints"
    interval: int = 500         # optimizer steps between sharded checkpoints
    keep_last: int = 3          # newest complete checkpoints kept
    async_save: bool = False    # training blocks only while the state is staged

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"checkpoint.interval must be >= 1, got {self.interval}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST}
    manifest = {"step": step, "world_size": distributed.world_size(), "files": files}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify(folder: Path) -> str | None:
    """None if the folder is a complete, intact checkpoint; else what is wrong with it."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete write)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest.json ({err})"
    if ".metadata" not in files:
        return "manifest lists no .metadata"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves, finds, verifies and loads the sharded checkpoints of one experiment."""

    def __init__(self, config: CheckpointConfig, folder: Path) -> None:
        self.config, self.folder = config, folder
        self._pending: list[Future] = []        # this rank's async DCP write
        self._pending_tmp: Path | None = None   # the folder it writes
        self._finalizer = ThreadPoolExecutor(max_workers=1) if config.async_save else None
        if config.async_save:
            distributed.enable_async_checkpoint_group()

    def complete_checkpoints(self) -> list[Path]:
        """Renamed (complete) checkpoint folders, newest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir()
                 if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)

    def save(self, step: int, app_state: dict, config_yaml: str) -> float:
        """Write checkpoint `step`. Returns the seconds training was blocked. A failed write
        (full disk) on any rank raises WriteFailed on every rank, with the partial folder
        removed and the newest complete checkpoint untouched."""
        started = time.perf_counter()
        self._agreed(self._pending_tmp, self.wait)
        final = self.folder / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        self._agreed(tmp, lambda: self._start_folder(tmp, config_yaml))
        self._agreed(tmp, lambda: torch.save(_rng_state(), tmp / f"rng_rank{distributed.rank()}.pt"))
        if self.config.async_save:
            future = dcp.async_save(app_state, checkpoint_id=str(tmp),
                                    process_group=distributed.checkpoint_group())
            self._pending.append(future)
            self._pending_tmp = tmp
            if distributed.is_main():
                self._pending.append(self._finalizer.submit(self._finalize_after, future, tmp, final, step))
        else:
            self._agreed(tmp, lambda: dcp.save(app_state, checkpoint_id=str(tmp)))
            self._agreed(tmp, lambda: self._finalize(tmp, final, step) if distributed.is_main() else None)
        return time.perf_counter() - started

    def _start_folder(self, tmp: Path, config_yaml: str) -> None:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "config.yaml").write_text(config_yaml)

    def _agreed(self, tmp: Path | None, work) -> None:
        """Run this rank's part of a save, then agree (this is also the barrier between parts):
        if it failed on any rank, rank 0 removes the partial `tmp` and every rank raises."""
        failure = None
        try:
            work()
        except (OSError, RuntimeError, CheckpointException, WriteFailed) as err:
            # torch.save reports a short write (a full disk) as a RuntimeError
            failure = _failure_text(err) + _free_space(self.folder)
        if not distributed.agree_any([failure is not None])[0]:
            return
        failures = [f for f in distributed.all_gather_object(failure) if f is not None]
        if distributed.is_main() and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = self.complete_checkpoints()
        kept = f"the newest complete checkpoint {newest[0]} is intact" if newest else \
            "no complete checkpoint yet"
        raise WriteFailed(f"cannot write checkpoint {tmp}: {failures[0]}; removed the partial "
                          f"folder, {kept}: make room, then continue with --resume auto")

    def _finalize_after(self, future: Future, tmp: Path, final: Path, step: int) -> None:
        future.result()
        self._finalize(tmp, final, step)

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        write_manifest(tmp, step)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(final.parent)
        log.info("saved checkpoint %s", final)
        for old in self.complete_checkpoints()[self.config.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Block until any asynchronous save of this rank is complete (and finalized); a
        failed one raises WriteFailed on this rank (`wait_all_ranks` agrees on it)."""
        try:
            for future in self._pending:
                future.result()
        except (OSError, CheckpointException) as err:
            raise WriteFailed(_failure_text(err)) from None
        finally:
            self._pending.clear()

    def wait_all_ranks(self) -> None:
        """Collective `wait`: a failed asynchronous save stops every rank."""
        self._agreed(self._pending_tmp, self.wait)

    def find_resumable(self, requested: str) -> Path | None:
        """Resolve `--resume` (auto or a path) to a verified checkpoint, agreed by all ranks."""
        choice = self._choose(requested) if distributed.is_main() else None
        choice = distributed.broadcast_object(choice)
        if isinstance(choice, dict):
            raise ValueError(choice["error"])
        return Path(choice) if choice else None

    def _choose(self, requested: str):
        if requested != "auto":
            path = Path(requested)
            problem = verify(path) if path.is_dir() else "not a folder"
            return {"error": f"--resume {path}: {problem}"} if problem else str(path)
        for candidate in self.complete_checkpoints():
            problem = verify(candidate)
            if problem is None:
                return str(candidate)
            log.warning("skipping checkpoint %s: %s", candidate, problem)
        return None

    def load(self, folder: Path, app_state: dict) -> None:
        """Load in place; restore this rank's RNG state if that rank saved one."""
        dcp.load(app_state, checkpoint_id=str(folder))
        rng_file = folder / f"rng_rank{distributed.rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("checkpoint %s has no RNG state for rank %d (it was saved by fewer "
                        "ranks): this rank keeps its freshly seeded generator",
                        folder, distributed.rank())


def _failure_text(err: BaseException) -> str:
    """`rank r: what failed` in one line; DCP wraps each rank's error in a CheckpointException."""
    rank = distributed.rank()
    if isinstance(err, WriteFailed):
        return str(err)
    if isinstance(err, CheckpointException):
        rank, (err, _) = next(iter(err.failures.items()))
    return f"rank {rank}: {_root_cause(err)}"


def _free_space(folder: Path) -> str:
    """What is left on the filesystem: torch's writers hide ENOSPC behind other messages."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:.1f} MiB free on the filesystem of {folder})"


def _root_cause(err: BaseException) -> str:
    while not isinstance(err, OSError) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    return " ".join(str(err).split())[:300]


def save_consolidated(path: Path, model: torch.nn.Module, extra: dict) -> None:
    """Rank 0 writes a single-file model (plain torch.load, no process group needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, **extra}, tmp)
    tmp.replace(path)


def load_consolidated(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
