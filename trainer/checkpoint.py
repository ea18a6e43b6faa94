"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and consolidated model files.

Layout: `checkpoints/<exp>/checkpoint_step_NNNNNN/` holds DCP's `.metadata` and shards, one
`rng_rank<r>.pt` per rank (DCP would collapse per-rank values into one), `config.yaml`,
`layout.json` (the data's bodies, targets and feature columns) and `manifest.json` (size and
SHA-256 of every file: DCP itself loads flipped bytes silently).
A checkpoint is written under `<name>.tmp` and renamed by rank 0 once complete, so a folder
without `.tmp` and with a matching manifest is a usable checkpoint; `.tmp` folders are what a
killed save left and are removed at the next start.
`best_model.pth` / `final_model.pth` are single `torch.save` files (weights + config + spec).

Untrusted files: everything this project writes loads without unpickling code (RNG states are
tensors, model files load with weights_only=True); a file that would need more is refused.
DCP's `.metadata` is a pickle that DCP unpickles unrestricted, so it is first read with an
unpickler that resolves only DCP's metadata records.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from trainer import distributed, faults
from trainer.errors import UserError, WriteFailed

log = logging.getLogger(__name__)
_PREFIX = "checkpoint_step_"
_MANIFEST = "manifest.json"
_RNG_PREFIX = "rng_rank"
_RNG_FORMAT = 2          # 1 (unversioned): numpy's state pickled as an ndarray
_OLD_RNG_GLOBALS = {"numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                    "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}


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


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path, step: int) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST}
    manifest = {"step": step, "world_size": distributed.world_size(), "files": files}
    _write_durably(folder / _MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when manifest.json has the expected shape, else (None, what is wrong).
    Never raises: every rank waits for rank 0's verdict, so rank 0 must always reach one."""
    path = folder / _MANIFEST
    if not path.is_file():
        return None, "no manifest.json (incomplete write)"
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:
        return None, f"unreadable manifest.json ({_first_line(err)})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None, "malformed manifest.json (no mapping of files)"
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            return None, f"malformed manifest.json (file name {name!r} is not a plain name)"
        if not (isinstance(entry, dict) and type(entry.get("size")) is int
                and isinstance(entry.get("sha256"), str)):
            return None, f"malformed manifest.json (entry for {name!r} lacks size or sha256)"
    return manifest, None


def verify(folder: Path) -> str | None:
    """None if the folder is a complete, intact checkpoint whose own files are safe to load;
    else what is wrong with it. Never raises."""
    try:
        return _integrity_problem(folder) or _unsafe_file_problem(folder)
    except OSError as err:
        return f"unreadable ({_first_line(err)})"


def _integrity_problem(folder: Path) -> str | None:
    manifest, problem = read_manifest(folder)
    if problem:
        return problem
    files = manifest["files"]
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


def _unsafe_file_problem(folder: Path) -> str | None:
    """The checkpoint's own files must load without running code: a folder can be crafted
    with a matching manifest, so checksums alone prove nothing about safety."""
    for path in sorted(folder.glob(f"{_RNG_PREFIX}*.pt")):
        try:
            read_rng_file(path)
        except UserError as err:
            return str(err)
    return metadata_problem(folder / ".metadata")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------- files that must not run code
def unsafe_globals(path: Path) -> str:
    """What a refused file would have needed to import, read without unpickling it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch.save archive at all: a raw pickle or junk
        return "a raw pickle stream, not a torch.save archive"
    return ", ".join(names) if names else "pickle instructions outside the weights-only subset"


def load_tensor_file(path: Path) -> dict:
    """torch.load restricted to tensors, numbers, strings and containers (weights_only=True).
    A file that needs anything else (a crafted pickle can run code on load) is refused with a
    one-line UserError naming it."""
    try:
        with warnings.catch_warnings():   # torch warns about the pickle protocol of odd files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused to load: it is not a plain tensor file (it needs "
                        f"{unsafe_globals(path)}; a crafted file can run code when unpickled). "
                        f"Load only files from a source you trust") from None
    except Exception as err:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise UserError(f"{path}: not a readable torch file ({_first_line(err)})") from None


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors only, so the file loads with weights_only=True."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"format": torch.tensor(_RNG_FORMAT), "torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
             "numpy_pos_has_gauss": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
             "numpy_gauss": torch.tensor(np_gauss, dtype=torch.float64),
             "python_version": torch.tensor(py_version),
             "python_internal": torch.tensor(py_internal, dtype=torch.int64),
             "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0],
                                          dtype=torch.float64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_pos_has_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, float(state["numpy_gauss"])))
    has_py_gauss, py_gauss = state["python_gauss"].tolist()
    random.setstate((int(state["python_version"]), tuple(state["python_internal"].tolist()),
                     py_gauss if has_py_gauss else None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


_RNG_SHAPES = {"torch": None, "numpy_keys": (624,), "numpy_pos_has_gauss": (2,),
               "numpy_gauss": (), "python_version": (), "python_internal": (625,),
               "python_gauss": (2,)}


def read_rng_file(path: Path) -> dict[str, torch.Tensor] | None:
    """A rank's RNG states. None for a file of the old format (numpy state pickled as an
    ndarray): it is not loaded at all, the rank seeds afresh. Anything else that is not a
    tensor-only RNG file is refused (UserError naming the file)."""
    if _is_old_rng_format(path):
        return None
    state = load_tensor_file(path)
    if not (isinstance(state, dict) and int(state.get("format", -1)) == _RNG_FORMAT
            and all(isinstance(state.get(k), torch.Tensor)
                    and (shape is None or tuple(state[k].shape) == shape)
                    for k, shape in _RNG_SHAPES.items())):
        raise UserError(f"{path}: not an RNG state file of this version")
    return state


def _is_old_rng_format(path: Path) -> bool:
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a torch.save archive: load_tensor_file says so
        return False
    return bool(names) and names <= _OLD_RNG_GLOBALS


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` but resolves only the names a metadata file is made of, so
    a crafted one fails here (naming what it wanted) before DCP unpickles it unrestricted."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        obj = getattr(importlib.import_module(module), name, None) \
            if module in _METADATA_MODULES else None
        if obj is None or not _is_metadata_name(module, name, obj):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return obj


def _enum_member(cls, name: str):
    """`getattr` as a metadata pickle may use it: some Python 3.11 releases (3.11.2, Debian 12's
    python3; not 3.11.7) pickle an enum member as getattr(EnumClass, name). Only members of an
    enum this unpickler resolved are fetched, never another attribute."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise pickle.UnpicklingError(f"builtins.getattr on {cls!r}")
    return cls[name]


_METADATA_MODULES = {"torch", "torch.serialization", "pathlib", "collections",
                     "torch.distributed.checkpoint.metadata",
                     "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner"}
_METADATA_FUNCTIONS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                       ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                       ("collections", "OrderedDict")}


def _is_metadata_name(module: str, name: str, obj) -> bool:
    if (module, name) in _METADATA_FUNCTIONS or isinstance(obj, (torch.dtype, torch.layout)):
        return True
    # DCP's own records: dataclasses (their __init__ only stores fields) and enums.
    return (module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)
            and (issubclass(obj, enum.Enum)
                 or (dataclasses.is_dataclass(obj) and not hasattr(obj, "__post_init__"))))


def metadata_problem(path: Path) -> str | None:
    """None if DCP's `.metadata` refers only to DCP's metadata records (DCP unpickles it
    without restriction) and every non-tensor value it points to in the shards is plain data;
    else why the checkpoint is refused."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        return (f"{path.name}: refused: it refers to {_first_line(err)}, which a checkpoint's "
                f"metadata never needs (a crafted file can run code when unpickled)")
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways
        return f"{path.name}: unreadable ({_first_line(err)})"
    try:
        _check_plain_values(path.parent, metadata)
    except Exception as err:  # noqa: BLE001 - verify must reach a verdict, whatever the shards hold
        return _first_line(err)
    return None


def _check_plain_values(folder: Path, metadata) -> None:
    """Read each non-tensor value where `.metadata` says it lies and load it weights-only,
    as PlainDataLoadPlanner will: a crafted shard is skipped by --resume auto, not loaded."""
    for name, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue
        info = metadata.storage_data[MetadataIndex(name)]
        if getattr(info, "transform_descriptors", None):
            continue        # an encoded value (not written by this project): the planner checks it
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            _plain_value(data, name)
        except ValueError as err:
            raise ValueError(f"{info.relative_path}: {err}") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------ what a checkpoint holds
class AppState(Stateful):
    """A sharded checkpoint's content: named Stateful parts, saved under the one key `app`, plus
    the config as text (read back from config.yaml, never from here). Per-rank RNG states go in
    files beside it. The names are the checkpoint layout: changing one breaks resuming."""

    def __init__(self, parts: dict[str, Stateful], config_yaml: str) -> None:
        self.parts, self.config_yaml = parts, config_yaml

    def state_dict(self) -> dict:
        return {**{name: part.state_dict() for name, part in self.parts.items()},
                "config": self.config_yaml}

    def load_state_dict(self, sd: dict) -> None:
        for name, part in self.parts.items():    # in order: the model before its optimizer
            part.load_state_dict(sd[name])


class ModelState(Stateful):
    """The model's weights, by parameter name whatever wraps it (DDP, torch.compile)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, sd)


class OptimizerState(Stateful):
    """The optimizer's moments and groups, by parameter name (so any world size loads them)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd)


class ScalerState(Stateful):
    """The fp16 loss scaler; a placeholder when it is off (the layout keeps the key)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {"off": 1}

    def load_state_dict(self, sd: dict) -> None:
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(sd)


def complete_checkpoints_in(folder: Path) -> list[Path]:
    """The renamed (complete) checkpoint folders in an experiment's `folder`, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


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
        return complete_checkpoints_in(self.folder)

    def stale_writes(self) -> list[Path]:
        """Folders a killed save or prune left behind (`*.tmp`): never resumable."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{_PREFIX}*.tmp") if p.is_dir())

    def remove_stale_writes(self) -> None:
        """Rank 0 deletes what an interrupted save left (called at start, before any save)."""
        if not distributed.is_main():
            return
        for stale in self.stale_writes():
            log.warning("removing %s: left by a save that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, app_state: dict, files: dict[str, str]) -> float:
        """Write checkpoint `step` with the text `files` (name -> content) beside the shards.
        Returns the seconds training was blocked. A failed write (full disk) on any rank raises
        WriteFailed on every rank, with the partial folder removed and the newest complete
        checkpoint untouched."""
        started = time.perf_counter()
        self._agreed(self._pending_tmp, self.wait)
        final = self.folder / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        self._agreed(tmp, lambda: self._start_folder(tmp, files))
        rng_file = tmp / f"{_RNG_PREFIX}{distributed.rank()}.pt"
        self._agreed(tmp, lambda: torch.save(_rng_state(), rng_file))
        faults.kill("dcp_write", step)
        if self.config.async_save:
            future = dcp.async_save(app_state, checkpoint_id=str(tmp),
                                    process_group=distributed.checkpoint_group())
            self._pending.append(future)
            self._pending_tmp = tmp
            if distributed.is_main():
                self._pending.append(self._finalizer.submit(self._finalize_after, future, tmp,
                                                            final, step))
        else:
            self._agreed(tmp, lambda: dcp.save(app_state, checkpoint_id=str(tmp)))
            self._agreed(tmp, lambda: (self._finalize(tmp, final, step)
                                       if distributed.is_main() else None))
        return time.perf_counter() - started

    def _start_folder(self, tmp: Path, files: dict[str, str]) -> None:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, text in files.items():
                _write_durably(tmp / name, text)

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
        """Manifest, then one atomic rename: a kill at any point leaves either the finished
        folder or a `.tmp` one, which resume ignores and the next start removes."""
        faults.kill("manifest", step)
        write_manifest(tmp, step)
        faults.kill("rename", step)
        if final.exists():
            _remove_aside(final)
        tmp.rename(final)
        _fsync_dir(final.parent)
        log.info("saved checkpoint %s", final)
        for old in self.complete_checkpoints()[self.config.keep_last:]:
            _remove_aside(old)

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

    def load(self, folder: Path, app_state: dict) -> None:
        """Load in place; restore this rank's RNG state if that rank saved one. The folder was
        verified (by rank 0) before; errors here still name it, on one line."""
        try:
            dcp.load(app_state, checkpoint_id=str(folder), planner=PlainDataLoadPlanner())
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise UserError(f"--resume {folder}: the checkpoint does not load into this run "
                            f"({_load_failure(err)})") from None
        self._restore_rng(folder / f"{_RNG_PREFIX}{distributed.rank()}.pt")

    def _restore_rng(self, rng_file: Path) -> None:
        if not rng_file.is_file():
            log.warning("checkpoint %s has no RNG state for rank %d (it was saved by fewer "
                        "ranks): this rank keeps its freshly seeded generator",
                        rng_file.parent, distributed.rank())
            return
        state = read_rng_file(rng_file)
        if state is None:
            log.warning("%s has the old RNG format (numpy state pickled, which this version "
                        "no longer unpickles): this rank keeps its freshly seeded generator, "
                        "so dropout and sampling differ from an uninterrupted run", rng_file)
            return
        _set_rng_state(state)


def _load_failure(err: BaseException) -> str:
    """The first line of the first rank's error inside a CheckpointException."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    return _first_line(err)


class PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles a checkpoint's non-tensor values (progress, config, LR
    schedule, optimizer hyperparameters) with weights_only=False. Ours are plain data, so this
    one reads them with weights_only=True: a crafted value is refused instead of run."""

    def load_bytes(self, read_item, value) -> None:
        plain = _plain_value(value.read(), read_item.dest_index.fqn)
        again = io.BytesIO()
        torch.save(plain, again)     # re-serialised from plain data: safe for the default load
        again.seek(0)
        super().load_bytes(read_item, again)


def _plain_value(data: bytes, name: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"refused: the value {name!r} in the shards is not plain data (a "
                         f"crafted checkpoint can run code when unpickled)") from None


def _remove_aside(folder: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.tmp` folder, not a half checkpoint
    that looks complete."""
    doomed = folder.with_name(f"{folder.name}.removing.tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
    """A best/final model file, loaded without unpickling anything but tensors and plain data;
    a crafted file is refused with a one-line UserError naming it."""
    content = load_tensor_file(path)
    if not (isinstance(content, dict) and isinstance(content.get("model"), dict)):
        raise UserError(f"{path}: not a model file of this project (no 'model' weights)")
    return content
