"""The one module that touches torch.distributed.

Launch modes, all through `init_distributed()`:
- plain `python launch/train.py`: one process, no process group;
- `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set);
- `srun` without torchrun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR defaults to
  the first host of the allocation, MASTER_PORT to 29500 + job id % 1000).
NCCL with one GPU per LOCAL_RANK on CUDA, gloo on CPU. Control-flow flags (stop, save now)
travel over a gloo group so agreeing on them never syncs the GPU. Every group gets the configured
`train.collective_timeout_s`: a rank that stops participating makes the others fail with an error
within it (`explain_failure` turns that error into one line), not wait forever.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.api import CheckpointException

from trainer.errors import UserError

_control_group = None
_checkpoint_group = None
_timeout = datetime.timedelta(seconds=600)      # set by init_distributed for every group
_retired_groups: list = []      # see destroy()


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None       # None: no process group


def _launch_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        _fill_slurm_rendezvous()
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def _fill_slurm_rendezvous() -> None:
    """MASTER_ADDR / MASTER_PORT for ranks started by srun without torchrun."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (`node[01-04],gpu7` -> node01), via scontrol if present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but CUDA is not available on this machine")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Join the process group if launched with several ranks (no-op for a single process)."""
    global _control_group, _timeout
    rank, local_rank, world_size = _launch_env()
    device = pick_device(device_preference, local_rank)
    if world_size == 1:
        return DistEnv(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = _timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store = _store_of_this_attempt(store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return DistEnv(rank, local_rank, world_size, device, backend)


def _store_of_this_attempt(store):
    """torchrun's workers share the launcher's store across restarts by default; a prefix per
    attempt keeps a restarted group from reading the dead attempt's addresses (pytorch issue
    135712). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (needed when hosts join an elastic run)
    rank 0 opens a fresh store each round, and the restart counts differ between hosts (one that
    joins counts from 0): a prefix made of them would split the group, so none is used."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"celestial/attempt{attempt}", store)


def enable_async_checkpoint_group() -> None:
    """A separate gloo group for async checkpoint writes (on the default group they hang).
    Collective: every rank must call it."""
    global _checkpoint_group
    if is_distributed() and _checkpoint_group is None:
        _checkpoint_group = dist.new_group(backend="gloo", timeout=_timeout)


def checkpoint_group():
    return _checkpoint_group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_control_group)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity for one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def agree_any(flags: list[bool]) -> list[bool]:
    """Per flag: True on every rank if True on any rank (one small gloo all-reduce)."""
    if not is_distributed():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return [bool(v) for v in t.tolist()]


def agree_on_failure(problem, *, known_failed: bool | None = None) -> list:
    """Collective: the problems of the ranks that have one, in rank order (this rank's
    `problem`, None when it has none); empty on every rank when no rank has one. Every place
    where ranks must take the same branch after a failure goes through here: one small
    all-reduce when all is well, and the problems travel only when one rank has one.
    `known_failed`: whether a rank failed, when the caller already agreed on it in an
    all-reduce it shares with other flags (then that all-reduce is not repeated)."""
    failed = agree_any([problem is not None])[0] if known_failed is None else known_failed
    if not failed:
        return []
    return [p for p in all_gather_object(problem) if p is not None]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    if env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=False)


def register_local_gradient_hook(ddp_model, on_bucket) -> None:
    """Show each bucket's LOCAL gradients (before the all-reduce) to `on_bucket(params, grads)`,
    then all-reduce as DDP would by default (averaged, bitwise the same result)."""
    def hook(state, bucket):
        on_bucket(bucket.parameters(), bucket.gradients())
        return default_hooks.allreduce_hook(None, bucket)
    ddp_model.register_comm_hook(None, hook)


def group_timeouts() -> dict[str, float]:
    """Seconds each live process group lets a collective wait (what `train.collective_timeout_s`
    reached); empty outside a process group."""
    if not is_distributed():
        return {}
    groups = {"default": dist.group.WORLD, "control": _control_group,
              "checkpoint": _checkpoint_group}
    timeouts = {}
    for name, group in groups.items():
        if group is not None:
            device = torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
            timeouts[name] = group._get_backend(device).options._timeout.total_seconds()
    return timeouts


def describe_group_timeouts() -> str | None:
    """How long a collective may wait, read back from the live process groups (None outside
    one): '10 s on every process group (default, checkpoint)', or each group's where they
    differ."""
    timeouts = group_timeouts()
    if not timeouts:
        return None
    if len(set(timeouts.values())) == 1:
        return (f"{next(iter(timeouts.values())):g} s on every process group "
                f"({', '.join(timeouts)})")
    return ", ".join(f"{name} {seconds:g} s" for name, seconds in timeouts.items())


_BACKEND_WORDS = ("gloo", "nccl", "c10d", "processgroup", "pair closure")
_TIMEOUT_WORDS = ("timed out", "timeout")
_LOST_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                    "connection refused")


def _from_collective(err: BaseException, text: str) -> bool:
    """Raised by a process group (gloo raises plain RuntimeErrors naming itself; DCP wraps
    them in a CheckpointException, a BaseException)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, (RuntimeError, CheckpointException)) and \
        any(word in text for word in _BACKEND_WORDS)


def explain_failure(err: BaseException) -> str | None:
    """One line saying what to do if `err` is a collective that timed out or lost a peer; None
    for any other error (and outside a process group)."""
    text = str(err).lower()
    if not is_distributed() or not _from_collective(err, text):
        return None
    seconds = int(_timeout.total_seconds())
    if any(word in text for word in _TIMEOUT_WORDS):
        return (f"rank {rank()}: a collective operation did not complete within "
                f"train.collective_timeout_s={seconds} s: another rank stopped participating "
                f"(hung, or much slower than this one). Look at the other ranks' output for "
                f"where it stopped; if a step, validation or checkpoint save can legitimately "
                f"take longer, raise train.collective_timeout_s. Resume with --resume auto")
    if any(word in text for word in _LOST_PEER_WORDS):
        return (f"rank {rank()}: another rank left the process group (it crashed or was "
                f"killed): see its output for why. Under torchrun --max-restarts the group "
                f"restarts from the newest checkpoint; otherwise resume with --resume auto")
    return None


def destroy() -> None:
    """Tear the process groups down, in an order gloo survives.

    A gloo group's C++ destructor joins its worker threads; a worker that is releasing a tensor
    Python has seen needs the GIL. Destroyed from its Python handle, the group releases the GIL
    first; destroyed by its last other owner, a DDP reducer, it does not, and the process hangs
    (reducer freed soon after) or aborts with "terminate called without an active exception"
    (reducer freed during interpreter shutdown, e.g. a trainer kept alive by a reference cycle).
    Both happened in CI; tests/test_distributed.py reproduces them. So: reap unreachable
    trainers now, and keep the groups' Python handles until `atexit`, which frees them after
    reaping again, while the interpreter is still whole."""
    global _control_group, _checkpoint_group
    if is_distributed():
        gc.collect()
        if not _retired_groups:
            atexit.register(_release_retired_groups)
        _retired_groups.extend(g for g in (dist.group.WORLD, _control_group, _checkpoint_group)
                               if g is not None)
        dist.destroy_process_group()
    _control_group = _checkpoint_group = None


def _release_retired_groups() -> None:
    gc.collect()
    _retired_groups.clear()
