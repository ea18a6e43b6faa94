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
DCP's `.metadata` is a pickle that DCP would unpickle unrestricted, so the trainer reads it with
an unpickler that resolves only DCP's metadata records, checks every entry, and hands it to DCP
itself (`ConfinedReader`). A checkpoint reads only the regular files inside its folder that its
manifest lists, within the sizes listed: no link, pipe or device, nothing outside.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import importlib
import io
import json
import logging
import math
import os
import pickle
import random
import shutil
import stat
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from trainer import distributed, faults
from trainer.errors import UserError, WriteFailed, short_repr

log = logging.getLogger(__name__)
_PREFIX = "checkpoint_step_"
_MANIFEST = "manifest.json"
_RNG_PREFIX = "rng_rank"
_RNG_FORMAT = 2          # 1 (unversioned): numpy's state pickled as an ndarray
_MAX_MANIFEST_BYTES = 4 << 20   # a manifest lists a few files per rank
_MAX_RNG_BYTES = 1 << 20        # an RNG state file holds about 10 KB
# A checkpoint of this project holds a few thousand metadata entries, one chunk per tensor per
# saving rank at most: the caps refuse a crafted file before it costs time or memory.
_MAX_METADATA_ENTRIES = 200_000
_MAX_CHUNKS_PER_TENSOR = 1024
_MAX_DIMS = 16
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


def _sha256_of_open(f, size: int) -> str:
    """SHA-256 of the first `size` bytes of an open file: never reads past what the manifest
    states, whatever the file holds."""
    h = hashlib.sha256()
    left = size
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_of_open(f, os.fstat(f.fileno()).st_size)


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a folder"))


def open_inside(folder: Path, name: str) -> BinaryIO:
    """Open `folder/name` for reading only if it is a regular file in the folder itself: a
    symbolic link, named pipe, device or folder is refused (UserError naming it) before a
    byte is read. O_NONBLOCK: opening a named pipe must not wait for a writer."""
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"{name!r}: refused: not a plain file name inside the checkpoint")
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{name}: refused: a symbolic link (a checkpoint reads only regular "
                            f"files inside its own folder)") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((text for test, text in _FILE_KINDS if test(mode)), "not a regular file")
        raise UserError(f"{name}: refused: {kind}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_inside(folder: Path, name: str, max_bytes: int) -> bytes:
    """The content of regular file `folder/name`, refused (UserError) when over `max_bytes`."""
    with open_inside(folder, name) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{name}: refused: over {max_bytes} bytes")
    return data


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
    try:
        manifest = json.loads(read_inside(folder, _MANIFEST, _MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        return None, "no manifest.json (incomplete write)"
    except UserError as err:
        return None, str(err)
    except (ValueError, OSError, RecursionError) as err:
        return None, f"unreadable manifest.json ({_first_line(err)})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None, "malformed manifest.json (no mapping of files)"
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", "..", _MANIFEST):
            return None, f"malformed manifest.json (file name {name!r} is not a plain name)"
        if not (isinstance(entry, dict) and type(entry.get("size")) is int
                and isinstance(entry.get("sha256"), str)):
            return None, f"malformed manifest.json (entry for {name!r} lacks size or sha256)"
    return manifest, None


def verify(folder: Path) -> str | None:
    """None if the folder is a complete, intact checkpoint whose own files are safe to load;
    else what is wrong with it. Never raises."""
    try:
        sizes = verified_sizes(folder)
        for name in sorted(sizes):
            if name.startswith(_RNG_PREFIX) and name.endswith(".pt"):
                read_rng_file(folder / name)
        _check_plain_values(folder, read_metadata(folder, sizes))
    except UserError as err:
        return str(err)
    except OSError as err:
        return f"unreadable ({_first_line(err)})"
    return None


def listed_files(folder: Path) -> dict[str, dict]:
    """File name -> {"size", "sha256"} as manifest.json lists them (UserError if unreadable)."""
    manifest, problem = read_manifest(folder)
    if problem:
        raise UserError(problem)
    if ".metadata" not in manifest["files"]:
        raise UserError("manifest lists no .metadata")
    return manifest["files"]


def verified_sizes(folder: Path) -> dict[str, int]:
    """File name -> size of every file the manifest lists, once each is checked regular, of
    its size and hash, and the folder holds nothing else: nothing is read from outside it."""
    files = listed_files(folder)
    unlisted = sorted(set(os.listdir(folder)) - set(files) - {_MANIFEST})
    if unlisted:
        raise UserError(f"{unlisted[0]}: refused: not listed in manifest.json (a checkpoint "
                        f"holds only files its manifest lists with size and hash)")
    for name, entry in files.items():
        _check_listed_file(folder, name, entry["size"], entry["sha256"])
    return {name: entry["size"] for name, entry in files.items()}


def _check_listed_file(folder: Path, name: str, size: int, sha256: str) -> None:
    try:
        f = open_inside(folder, name)
    except FileNotFoundError:
        raise UserError(f"missing file {name}") from None
    with f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise UserError(f"{name} has {actual} bytes, the manifest says {size}")
        if _sha256_of_open(f, size) != sha256:
            raise UserError(f"{name} does not match its checksum")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------- files that must not run code
def unsafe_globals(path: Path, source=None) -> str:
    """What a refused file would have needed to import, read without unpickling it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source or path)
    except Exception:  # noqa: BLE001 - not a torch.save archive at all: a raw pickle or junk
        return "a raw pickle stream, not a torch.save archive"
    return ", ".join(names) if names else "pickle instructions outside the weights-only subset"


def load_tensor_file(path: Path, data: bytes | None = None) -> dict:
    """torch.load restricted to tensors, numbers, strings and containers (weights_only=True),
    of `path` or of `data` read from it. A file that needs anything else (a crafted pickle can
    run code on load) is refused with a one-line UserError naming it."""
    source = (lambda: io.BytesIO(data)) if data is not None else (lambda: path)
    try:
        with warnings.catch_warnings():   # torch warns about the pickle protocol of odd files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(source(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused to load: it is not a plain tensor file (it needs "
                        f"{unsafe_globals(path, source())}; a crafted file can run code when "
                        f"unpickled). Load only files from a source you trust") from None
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
    """A rank's RNG states, read only from a regular file inside its checkpoint folder. None
    for a file of the old format (numpy state pickled as an ndarray): it is not loaded at all,
    the rank seeds afresh. Anything else that is not a tensor-only RNG file is refused
    (UserError naming the file)."""
    data = read_inside(path.parent, path.name, _MAX_RNG_BYTES)
    if _is_old_rng_format(data):
        return None
    state = load_tensor_file(path, data)
    if not (isinstance(state, dict) and int(state.get("format", -1)) == _RNG_FORMAT
            and all(isinstance(state.get(k), torch.Tensor)
                    and (shape is None or tuple(state[k].shape) == shape)
                    for k, shape in _RNG_SHAPES.items())):
        raise UserError(f"{path}: not an RNG state file of this version")
    return state


def _is_old_rng_format(data: bytes) -> bool:
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
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


def read_metadata(folder: Path, sizes: dict[str, int]) -> Metadata:
    """DCP's `.metadata` of a checkpoint whose files are `sizes` (name -> bytes, from its
    manifest), unpickled so that it may refer only to DCP's metadata records (DCP itself would
    unpickle it without restriction), every entry checked. Raises UserError saying why not."""
    data = read_inside(folder, ".metadata", sizes[".metadata"])
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise UserError(f".metadata: refused: it refers to {_first_line(err)}, which a "
                        f"checkpoint's metadata never needs (a crafted file can run code when "
                        f"unpickled)") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise UserError(f".metadata: unreadable ({_first_line(err)})") from None
    check_metadata_entries(metadata, sizes)
    return metadata


def check_metadata_entries(metadata, sizes: dict[str, int]) -> None:
    """Every storage record of `metadata` is a slice of a shard the manifest lists, within its
    stated size; every tensor is covered by its chunks exactly once, each with a storage
    record; every other value has one. Raises UserError naming the first entry that is not."""
    values, records = (getattr(metadata, "state_dict_metadata", None),
                       getattr(metadata, "storage_data", None))
    if not (isinstance(metadata, Metadata) and isinstance(values, dict)
            and isinstance(records, dict)):
        raise UserError(".metadata: refused: not DCP metadata")
    num_entries = len(values) + len(records) + sum(
        len(entry.chunks) for entry in values.values()
        if isinstance(entry, TensorStorageMetadata) and isinstance(entry.chunks, list))
    if num_entries > _MAX_METADATA_ENTRIES:
        raise UserError(f".metadata: refused: {num_entries} entries (at most "
                        f"{_MAX_METADATA_ENTRIES})")
    for index, record in records.items():
        _check_storage_record(index, record, sizes)
    for name, entry in values.items():
        if not isinstance(name, str):
            raise UserError(f".metadata: refused: the key {short_repr(name)} is not a name")
        if isinstance(entry, TensorStorageMetadata):
            _check_tensor_chunks(name, entry, records)
        elif not (isinstance(entry, BytesStorageMetadata) and MetadataIndex(name) in records):
            raise UserError(f".metadata: refused: the value {short_repr(name)} has no storage "
                            f"record")


def _check_tensor_chunks(name: str, entry: TensorStorageMetadata, records: dict) -> None:
    """The chunks of tensor `name` lie within its shape, each has a storage record, and
    together they cover every element exactly once (DCP would leave a gap unloaded)."""
    shape, chunks = entry.size, entry.chunks
    where = f".metadata: refused: tensor {short_repr(name)}"
    if not (_is_shape(shape) and isinstance(chunks, list)):
        raise UserError(f"{where}: malformed shape or chunk list")
    if len(chunks) > _MAX_CHUNKS_PER_TENSOR:
        raise UserError(f"{where}: {len(chunks)} chunks (at most {_MAX_CHUNKS_PER_TENSOR})")
    for chunk in chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (isinstance(chunk, ChunkStorageMetadata) and _is_shape(offsets)
                and _is_shape(sizes) and len(offsets) == len(sizes) == len(shape)
                and all(o + n <= d for o, n, d in zip(offsets, sizes, shape))):
            raise UserError(f"{where}: a chunk at offsets {_dims(offsets)} of sizes "
                            f"{_dims(sizes)} is not within its shape {tuple(shape)}")
        if MetadataIndex(name, offsets) not in records:
            raise UserError(f"{where}: the chunk at offsets {tuple(offsets)} has no storage "
                            f"record")
    covered = sum(math.prod(chunk.sizes) for chunk in chunks)
    if covered != math.prod(shape) or _any_overlap(chunks):
        raise UserError(f"{where}: its chunks do not cover its {math.prod(shape)} elements "
                        f"exactly once")


def _dims(value) -> str:
    return short_repr(tuple(value) if isinstance(value, tuple) else value)


def _is_shape(value) -> bool:
    return (isinstance(value, tuple) and len(value) <= _MAX_DIMS
            and all(type(n) is int and 0 <= n < 2**62 for n in value))


def _any_overlap(chunks: list) -> bool:
    """Whether two chunks share an element (chunks are boxes: [offsets, offsets + sizes))."""
    if len(chunks) < 2:
        return False
    start = np.array([tuple(c.offsets) for c in chunks], dtype=np.int64)
    end = start + np.array([tuple(c.sizes) for c in chunks], dtype=np.int64)
    nonempty = np.all(end > start, axis=1)
    start, end = start[nonempty], end[nonempty]
    overlap = np.all((start[:, None] < end[None]) & (start[None] < end[:, None]), axis=2)
    np.fill_diagonal(overlap, False)
    return bool(overlap.any())


def _check_storage_record(index, record, sizes: dict[str, int]) -> None:
    if not (isinstance(index, MetadataIndex) and isinstance(record, _StorageInfo)):
        raise UserError(".metadata: refused: a storage record that is not DCP's")
    name, offset, length = record.relative_path, record.offset, record.length
    if not (isinstance(name, str) and name.endswith(".distcp") and name in sizes):
        raise UserError(f".metadata: refused: {index.fqn!r} lies in {short_repr(name)}, not "
                        f"in a shard that manifest.json lists")
    if not (type(offset) is int and type(length) is int and offset >= 0
            and 0 <= length <= sizes[name] - offset):
        raise UserError(f".metadata: refused: {index.fqn!r} lies at bytes {short_repr(offset)} "
                        f"to {short_repr(offset)}+{short_repr(length)} of {name}, which has "
                        f"{sizes[name]} bytes")


def _check_plain_values(folder: Path, metadata: Metadata) -> None:
    """Read each non-tensor value where `.metadata` says it lies and load it weights-only,
    as PlainDataLoadPlanner will: a crafted shard is skipped by --resume auto, not loaded."""
    for name, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue
        record = metadata.storage_data.get(MetadataIndex(name))
        if record is None:
            raise UserError(f".metadata: refused: no storage record for {name!r}")
        if getattr(record, "transform_descriptors", None):
            continue        # an encoded value (not written by this project): the planner checks it
        with open_inside(folder, record.relative_path) as f:
            f.seek(record.offset)
            data = f.read(record.length)
        try:
            _plain_value(data, name)
        except ValueError as err:
            raise UserError(f"{record.relative_path}: {err}") from None


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
            if _interrupted(err):
                raise KeyboardInterrupt from None     # a second Ctrl-C, not a write failure
            # torch.save reports a short write (a full disk) as a RuntimeError
            failure = (_failure_text(err) + _free_space(self.folder), _remedy(err))
        if not distributed.agree_any([failure is not None])[0]:
            return
        failures = [f for f in distributed.all_gather_object(failure) if f is not None]
        if distributed.is_main() and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = self.complete_checkpoints()
        kept = f"the newest complete checkpoint {newest[0]} is intact" if newest else \
            "no complete checkpoint yet"
        text, remedy = failures[0]
        raise WriteFailed(f"cannot write checkpoint {tmp}: {text}; removed the partial folder, "
                          f"{kept}: {remedy}, then continue with --resume auto")

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

    def load(self, folder: Path, app_state: dict[str, Stateful]) -> None:
        """Load into the Stateful parts; restore this rank's RNG state if that rank saved one.
        Only files the manifest lists are read, as regular files inside the folder, and every
        value must be written whole. The folder was verified (by rank 0) before; errors here
        still name it, on one line."""
        try:
            sizes = {name: entry["size"] for name, entry in listed_files(folder).items()}
            reader = ConfinedReader(folder, sizes, read_metadata(folder, sizes))
            state = {key: part.state_dict() for key, part in app_state.items()}
            planner = PlainDataLoadPlanner()
            dcp.load(state, storage_reader=reader, planner=planner)
            _refuse_partial_load(planner.not_loaded_whole())
        except UserError as err:
            raise UserError(f"--resume {folder}: {err}") from None
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise UserError(f"--resume {folder}: the checkpoint does not load into this run "
                            f"({_load_failure(err)})") from None
        for key, part in app_state.items():
            part.load_state_dict(state[key])
        self._restore_rng(folder, f"{_RNG_PREFIX}{distributed.rank()}.pt", sizes)

    def _restore_rng(self, folder: Path, name: str, sizes: dict[str, int]) -> None:
        if name not in sizes:
            log.warning("checkpoint %s has no RNG state for rank %d (it was saved by fewer "
                        "ranks): this rank keeps its freshly seeded generator",
                        folder, distributed.rank())
            return
        state = read_rng_file(folder / name)
        if state is None:
            log.warning("%s has the old RNG format (numpy state pickled, which this version "
                        "no longer unpickles): this rank keeps its freshly seeded generator, "
                        "so dropout and sampling differ from an uninterrupted run", folder / name)
            return
        _set_rng_state(state)


class _ConfinedFileSystem(FileSystem):
    """DCP's file access for loading, limited to the regular files of one folder that its
    manifest lists, each of the size listed."""

    def __init__(self, folder: Path, sizes: dict[str, int]) -> None:
        super().__init__()
        self.folder, self.sizes = folder, sizes

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[BinaryIO]:
        path = Path(path)
        if mode != "rb" or path.parent != self.folder or path.name not in self.sizes:
            raise UserError(f"{path.name}: refused: not a file manifest.json lists")
        with open_inside(self.folder, path.name) as f:
            if os.fstat(f.fileno()).st_size != self.sizes[path.name]:
                raise UserError(f"{path.name}: changed since the checkpoint was verified")
            yield f


class ConfinedReader(FileSystemReader):
    """DCP's file reader, reading only through `_ConfinedFileSystem` and returning metadata
    already read with `read_metadata` (DCP's own would unpickle `.metadata` unrestricted)."""

    def __init__(self, folder: Path, sizes: dict[str, int], metadata: Metadata) -> None:
        super().__init__(folder)
        self.fs = _ConfinedFileSystem(Path(folder), sizes)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


def _refuse_partial_load(not_loaded: list[str]) -> None:
    """A value the checkpoint covers only in part would keep part of its fresh values
    silently: every rank refuses, so the run stops before a step or a save."""
    if distributed.agree_any([bool(not_loaded)])[0]:
        first = not_loaded[0] if not_loaded else "a value on another rank"
        raise UserError(f"refused: the checkpoint does not cover {first} whole "
                        f"({len(not_loaded)} value(s) in all on this rank)")


def _load_failure(err: BaseException) -> str:
    """The first line of the first rank's error inside a CheckpointException; ours for a
    tensor that torch's weights-only unpickler refused (its text spans paragraphs)."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    if isinstance(err, pickle.UnpicklingError):
        return ("refused: a tensor in the shards is not plain tensor data (a crafted checkpoint "
                "can run code when unpickled)")
    return _first_line(err)


class PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles a checkpoint's non-tensor values (progress, config, LR
    schedule, optimizer hyperparameters) with weights_only=False. Ours are plain data, so this
    one reads them with weights_only=True: a crafted value is refused instead of run. It also
    counts what it wrote, so that a value the checkpoint covers only in part is found."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self.elements_left = {name: value.numel() if isinstance(value, torch.Tensor) else 1
                              for name, value in self.state_dict.items()}

    def load_bytes(self, read_item, value) -> None:
        plain = _plain_value(value.read(), read_item.dest_index.fqn)
        again = io.BytesIO()
        torch.save(plain, again)     # re-serialised from plain data: safe for the default load
        again.seek(0)
        super().load_bytes(read_item, again)
        self.elements_left[read_item.dest_index.fqn] -= 1

    def commit_tensor(self, read_item, tensor) -> None:
        super().commit_tensor(read_item, tensor)
        self.elements_left[read_item.dest_index.fqn] -= math.prod(read_item.lengths)

    def not_loaded_whole(self) -> list[str]:
        """Names of the values the load did not write exactly once, element by element."""
        return [name for name, left in self.elements_left.items() if left != 0]


def _plain_value(data: bytes, name: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"refused: the value {name!r} in the shards is not plain data (a "
                         f"crafted checkpoint can run code when unpickled)") from None
    except Exception as err:  # noqa: BLE001 - bytes that are not a value fail in many ways
        raise ValueError(f"the value {name!r} in the shards is unreadable "
                         f"({_first_line(err)})") from None


def _remove_aside(folder: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.tmp` folder, not a half checkpoint
    that looks complete."""
    doomed = folder.with_name(f"{folder.name}.removing.tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _interrupted(err: BaseException) -> bool:
    """Whether DCP wrapped a KeyboardInterrupt of this process in its CheckpointException."""
    failures = getattr(err, "failures", None) or {}
    return any(isinstance(cause, KeyboardInterrupt) for cause, _ in failures.values())


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


def _remedy(err: BaseException) -> str:
    """What to do about a failed write: a full disk is the common case, but not the only one."""
    code = getattr(_root_error(err), "errno", None)
    if code == errno.EROFS:
        return "the file system is read-only: make it writable or choose another checkpoint.root"
    if code in (errno.EACCES, errno.EPERM):
        return "no permission to write there: fix it or choose another checkpoint.root"
    return "make room"


def _root_error(err: BaseException) -> BaseException:
    """The OSError behind `err` (inside DCP's CheckpointException too), else `err` itself."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    while not isinstance(err, OSError) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    return err


def _root_cause(err: BaseException) -> str:
    err = _root_error(err)
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
