"""Saving and loading an experiment's sharded checkpoints, synchronously or asynchronously.

Layout: `checkpoints/<exp>/checkpoint_step_NNNNNN/` holds DCP's `.metadata` and shards, one
`rng_rank<r>.pt` per rank, `config.yaml`, `layout.json` (the data's bodies, targets and feature
columns) and `manifest.json`. A checkpoint is written under `<name>.tmp` and renamed by rank 0
once complete, so a folder without `.tmp` and with a matching manifest is a usable checkpoint;
`.tmp` folders are what a killed save left and are removed at the next start.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from trainer import distributed
from trainer.checkpoint.manifest import (
    PREFIX,
    checkpoint_entries_in,
    checkpoint_name,
    complete_checkpoints_in,
    fsync_dir,
    listed_files,
    refuse_linked_folder,
    step_of,
    verified_sizes,
    write_durably,
    write_manifest,
)
from trainer.checkpoint.rng import RNG_PREFIX, read_rng_file, rng_state, set_rng_state
from trainer.checkpoint.safe_load import (
    ConfinedReader,
    PlainDataLoadPlanner,
    check_plain_values,
    load_failure,
    read_metadata,
    refuse_partial_load,
)
from trainer.errors import UserError, WriteFailed, first_line
from trainer.faults import FaultHook, no_faults

log = logging.getLogger(__name__)

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


def verify(folder: Path) -> str | None:
    """None if the folder is a complete, intact checkpoint whose own files are safe to load;
    else what is wrong with it. Never raises."""
    try:
        refuse_linked_folder(folder)
        sizes = verified_sizes(folder)
        for name in sorted(sizes):
            if name.startswith(RNG_PREFIX) and name.endswith(".pt"):
                read_rng_file(folder / name)
        check_plain_values(folder, read_metadata(folder, sizes))
    except UserError as err:
        return str(err)
    except OSError as err:
        return f"unreadable ({first_line(err)})"
    return None


def typed_folder(path: Path) -> Path:
    """The real path of a checkpoint folder the user typed (`--resume <path>`): its symbolic
    links are followed, as `find -H` or `cp -H` follow the paths on their command line, and
    the folder is then checked and loaded by that path, so every rank loads what was checked.
    A path without a link is returned as typed."""
    real = path.resolve()
    if real == Path(os.path.abspath(path)):
        return path
    log.info("--resume %s: resolved to %s (a symbolic link on the path)", path, real)
    return real


class CheckpointManager:
    """Saves, finds, verifies and loads the sharded checkpoints of one experiment."""

    def __init__(self, config: CheckpointConfig, folder: Path,
                 faults: FaultHook = no_faults) -> None:
        self.config, self.folder, self.faults = config, folder, faults
        self.last_saved_step = -1               # saved or loaded: never saved again
        self._pending: list[Future] = []        # this rank's async DCP write
        self._pending_tmp: Path | None = None   # the folder it writes
        self._finalizer = ThreadPoolExecutor(max_workers=1) if config.async_save else None
        if config.async_save:
            distributed.enable_async_checkpoint_group()

    def complete_checkpoints(self) -> list[Path]:
        """Renamed (complete) checkpoint folders, newest first."""
        return complete_checkpoints_in(self.folder)

    def resume_candidates(self) -> list[Path]:
        """What `--resume auto` tries, newest first: the complete checkpoints and the links
        named like one, which it skips with a warning (`verify` refuses them)."""
        return checkpoint_entries_in(self.folder)

    def stale_writes(self) -> list[Path]:
        """Folders a killed save or prune left behind (`*.tmp`): never resumable."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{PREFIX}*.tmp") if p.is_dir())

    def remove_stale_writes(self) -> None:
        """Rank 0 deletes what an interrupted save left (called at start, before any save)."""
        if not distributed.is_main():
            return
        for stale in self.stale_writes():
            log.warning("removing %s: left by a save that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def maybe_save(self, step: int, app_state: dict, files: Callable[[], dict[str, str]], *,
                   last: bool = False, now: bool = False) -> float | None:
        """Save checkpoint `step` if one is due: every `checkpoint.interval` steps, when asked
        (`now`: a save-now signal) and at the run's last step (`last`), never twice for one
        step. Returns the seconds training was blocked, None when nothing was due."""
        due = last or now or step % self.config.interval == 0
        if not due or step == self.last_saved_step:
            return None
        return self.save(step, app_state, files())

    def save(self, step: int, app_state: dict, files: dict[str, str]) -> float:
        """Write checkpoint `step` with the text `files` (name -> content) beside the shards.
        Returns the seconds training was blocked. A failed write (full disk) on any rank raises
        WriteFailed on every rank, with the partial folder removed and the newest complete
        checkpoint untouched."""
        self.faults("checkpoint_save")
        started = time.perf_counter()
        self._agreed(self._pending_tmp, self.wait)
        final = self.folder / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        self._agreed(tmp, lambda: self._start_folder(tmp, files))
        rng_file = tmp / f"{RNG_PREFIX}{distributed.rank()}.pt"
        self._agreed(tmp, lambda: torch.save(rng_state(), rng_file))
        self.faults("dcp_write", step)
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
        self.last_saved_step = step
        return time.perf_counter() - started

    def _start_folder(self, tmp: Path, files: dict[str, str]) -> None:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, text in files.items():
                write_durably(tmp / name, text)

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
        failures = distributed.agree_on_failure(failure)
        if not failures:
            return
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
        self.faults("manifest", step)
        write_manifest(tmp, step)
        self.faults("rename", step)
        if final.exists():
            _remove_aside(final)
        tmp.rename(final)
        fsync_dir(final.parent)
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
        self.faults("resume")
        try:
            refuse_linked_folder(folder)
            sizes = {name: entry["size"] for name, entry in listed_files(folder).items()}
            reader = ConfinedReader(folder, sizes, read_metadata(folder, sizes))
            state = {key: part.state_dict() for key, part in app_state.items()}
            planner = PlainDataLoadPlanner()
            dcp.load(state, storage_reader=reader, planner=planner)
            refuse_partial_load(planner.not_loaded_whole())
        except UserError as err:
            raise UserError(f"--resume {folder}: {err}") from None
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise UserError(f"--resume {folder}: the checkpoint does not load into this run "
                            f"({load_failure(err)})") from None
        for key, part in app_state.items():
            part.load_state_dict(state[key])
        self.last_saved_step = step_of(folder)
        self._restore_rng(folder, f"{RNG_PREFIX}{distributed.rank()}.pt", sizes)

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
        set_rng_state(state)


def _remove_aside(folder: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.tmp` folder, not a half checkpoint
    that looks complete. A symbolic link (a save replacing a linked step) loses only itself."""
    if folder.is_symlink():
        folder.unlink()
        return
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
