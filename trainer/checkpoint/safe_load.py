"""Loading untrusted checkpoint files without running code.

Everything this project writes loads without unpickling code (model files and RNG states load
with weights_only=True); a file that would need more is refused. DCP's `.metadata` is a pickle
that DCP would unpickle unrestricted, so it is read with an unpickler that resolves only DCP's
metadata records, every entry is checked, and DCP gets it through `ConfinedReader`, which reads
only the files the manifest lists; non-tensor values load weights-only (`PlainDataLoadPlanner`).
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import math
import os
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from trainer import distributed
from trainer.checkpoint.manifest import open_inside, read_inside
from trainer.errors import UserError, first_line, short_repr

# A checkpoint of this project holds a few thousand metadata entries, one chunk per tensor per
# saving rank at most: the caps refuse a crafted file before it costs time or memory.
_MAX_METADATA_ENTRIES = 200_000
_MAX_CHUNKS_PER_TENSOR = 1024
_MAX_DIMS = 16
# What torch.save adds around a tensor's bytes (zip entries, pickle, alignment): measured at most
# 1.7 KB for 16-dimensional shapes of any dtype. A chunk's uncompressed storage record holds its
# elements' bytes plus at most this much.
_MAX_TENSOR_FILE_OVERHEAD = 4096


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
        raise UserError(f"{path}: not a readable torch file ({first_line(err)})") from None


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
        raise UserError(f".metadata: refused: it refers to {first_line(err)}, which a "
                        f"checkpoint's metadata never needs (a crafted file can run code when "
                        f"unpickled)") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise UserError(f".metadata: unreadable ({first_line(err)})") from None
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
    """The chunks of tensor `name` lie within its shape, each has a storage record holding as
    many bytes as its elements need, and together they cover every element exactly once (DCP
    would leave a gap unloaded)."""
    shape, chunks = entry.size, entry.chunks
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    where = f".metadata: refused: tensor {short_repr(name)}"
    if not (_is_shape(shape) and isinstance(chunks, list) and isinstance(dtype, torch.dtype)):
        raise UserError(f"{where}: malformed shape, dtype or chunk list")
    if len(chunks) > _MAX_CHUNKS_PER_TENSOR:
        raise UserError(f"{where}: {len(chunks)} chunks (at most {_MAX_CHUNKS_PER_TENSOR})")
    for chunk in chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (isinstance(chunk, ChunkStorageMetadata) and _is_shape(offsets)
                and _is_shape(sizes) and len(offsets) == len(sizes) == len(shape)
                and all(o + n <= d for o, n, d in zip(offsets, sizes, shape))):
            raise UserError(f"{where}: a chunk at offsets {_dims(offsets)} of sizes "
                            f"{_dims(sizes)} is not within its shape {tuple(shape)}")
        record = records.get(MetadataIndex(name, offsets))
        if record is None:
            raise UserError(f"{where}: the chunk at offsets {tuple(offsets)} has no storage "
                            f"record")
        _check_chunk_bytes(where, chunk, record, dtype)
    covered = sum(math.prod(chunk.sizes) for chunk in chunks)
    if covered != math.prod(shape) or _any_overlap(chunks):
        raise UserError(f"{where}: its chunks do not cover its {math.prod(shape)} elements "
                        f"exactly once")


def _check_chunk_bytes(where: str, chunk: ChunkStorageMetadata, record: _StorageInfo,
                       dtype: torch.dtype) -> None:
    """An uncompressed chunk's storage record holds its elements' bytes (numel x element size)
    plus at most torch.save's wrapping: a record of other bytes (of another tensor, another
    shape, a value) is refused here, before anything is read. An encoded record (not written
    by this project) has no size to compare: the load checks what it decodes."""
    if getattr(record, "transform_descriptors", None):
        return
    needed = math.prod(chunk.sizes) * dtype.itemsize
    if not needed <= record.length <= needed + _MAX_TENSOR_FILE_OVERHEAD:
        raise UserError(f"{where}: the chunk at offsets {tuple(chunk.offsets)} of sizes "
                        f"{tuple(chunk.sizes)} needs {needed} bytes of {dtype}, but its "
                        f"storage record in {record.relative_path} holds {record.length}")


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


def check_plain_values(folder: Path, metadata: Metadata) -> None:
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


def refuse_partial_load(not_loaded: list[str]) -> None:
    """A value the checkpoint covers only in part would keep part of its fresh values
    silently: every rank refuses, so the run stops before a step or a save."""
    problems = distributed.agree_on_failure(not_loaded or None)
    if problems:
        raise UserError(f"refused: the checkpoint does not cover {problems[0][0]} whole "
                        f"({len(problems[0])} value(s) in all on the first rank short of one)")


def load_failure(err: BaseException) -> str:
    """The first line of the first rank's error inside a CheckpointException; ours for a
    tensor that torch's weights-only unpickler refused (its text spans paragraphs)."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    if isinstance(err, pickle.UnpicklingError):
        return ("refused: a tensor in the shards is not plain tensor data (a crafted checkpoint "
                "can run code when unpickled)")
    return first_line(err)


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
                         f"({first_line(err)})") from None
