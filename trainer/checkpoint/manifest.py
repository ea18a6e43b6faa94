"""A checkpoint folder's files and their manifest: names, sizes, SHA-256 hashes.

`manifest.json` lists every file of a checkpoint with its size and hash (DCP itself loads
flipped bytes silently). A checkpoint reads only the regular files inside its folder that its
manifest lists, within the sizes listed: no link, pipe or device, nothing outside.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from trainer import distributed
from trainer.errors import UserError, first_line, short_repr

PREFIX = "checkpoint_step_"
_MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 4 << 20   # a manifest lists a few files per rank


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


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


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path, step: int) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST}
    manifest = {"step": step, "world_size": distributed.world_size(), "files": files}
    write_durably(folder / _MANIFEST, json.dumps(manifest, indent=1))


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
        return None, f"unreadable manifest.json ({first_line(err)})"
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


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_entries_in(folder: Path) -> list[Path]:
    """What `--resume auto` considers in an experiment's `folder`, newest first: the renamed
    (complete) checkpoint folders and symbolic links named like one (which `verify` refuses)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p.is_symlink() or p.is_dir())]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def complete_checkpoints_in(folder: Path) -> list[Path]:
    """The renamed (complete) checkpoint folders in an experiment's `folder`, newest first: real
    folders only, so that pruning never deletes through a link."""
    return [p for p in checkpoint_entries_in(folder) if not p.is_symlink()]


def refuse_linked_folder(folder: Path) -> None:
    """A checkpoint folder found in an experiment's folder is read as itself, never through a
    symbolic link: whoever can write the experiment's folder could otherwise point a step at
    any folder. (A path the user typed is resolved before, as a shell command resolves its
    arguments: `typed_folder`.)"""
    if folder.is_symlink():
        target = short_repr(os.readlink(folder))
        raise UserError(f"{folder.name}: refused: a symbolic link (to {target}), not a "
                        f"checkpoint folder; --resume auto follows no link (pass its target "
                        f"to --resume to resume from it)")


def step_of(folder: Path) -> int:
    """The step of checkpoint `folder`: its manifest's, else its name's (-1 if neither)."""
    manifest, _ = read_manifest(folder)
    step = manifest.get("step") if manifest else None
    if type(step) is int:
        return step
    digits = folder.name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else -1
