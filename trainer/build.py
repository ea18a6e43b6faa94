"""Assemble a run from its config: folders, logging, data, model, optimizer, observers."""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from model import CelestialPGAT
from series.dataset import DataBundle, build_loaders, ensure_dataset, prepare
from trainer import distributed, experiment_lock, precision
from trainer.checkpoint.manager import CheckpointManager
from trainer.config import Config
from trainer.distributed import DistEnv
from trainer.errors import UserError
from trainer.experiment_lock import ExperimentLock
from trainer.faults import FaultHook, from_environment, no_faults
from trainer.loop import (
    SplitEvaluator,
    Trainer,
    TrainerParts,
    TrainState,
    TrainStep,
)
from trainer.observer import ObserverFactory, ObserverGroup, RunContext
from trainer.optim import (
    build_optimizer,
    build_scheduler,
)
from trainer.plugins import plug_in
from trainer.resume import check_experiment_folder, resume_if_asked, resume_request
from trainer.run_log import (
    RunLog,
    guarded_write,
    open_log_file,
    setup_logging,
    stop_if_any_rank_failed_to_write,
)

log = logging.getLogger(__name__)


def resolve_experiment_name(config: Config, config_path: str | None) -> str:
    """`train.experiment_name`, else `<config stem>_<start time>`, agreed by all ranks.

    Under torchrun the start time is the launcher's, so workers restarted after a failure
    find the same experiment (and its checkpoints)."""
    if config.train.experiment_name:
        return config.train.experiment_name
    started = time.time()
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        started = psutil.Process(os.getppid()).create_time()
    stem = Path(config_path).stem if config_path else "run"
    name = f"{stem}_{time.strftime('%Y%m%d_%H%M%S', time.localtime(started))}"
    return distributed.broadcast_object(name)


def build_data(config: Config, env: DistEnv, faults: FaultHook = no_faults) -> DataBundle:
    faults("data_preparation")
    # The built-in dataset is generated once, by rank 0; the others wait for its verdict.
    agree_on_user_error(lambda: ensure_dataset(config.data) if env.rank == 0 else None)
    return agree_on_user_error(lambda: _prepare_loaders(config, env))


def _prepare_loaders(config: Config, env: DistEnv) -> DataBundle:
    m = config.model
    data = build_loaders(prepare(config.data, m.seq_len, m.pred_len), config.data, m.seq_len,
                         m.pred_len, env.rank, env.world_size, config.train.seed)
    if len(data.train_loader) < config.train.grad_accum_steps:
        raise UserError(f"the training split gives {len(data.train_loader)} batches per rank, "
                        f"fewer than train.grad_accum_steps ({config.train.grad_accum_steps}): "
                        f"lower data.batch_size or use more data")
    return data


def agree_on_user_error(work):
    """Run this rank's part; if any rank's part raised a UserError, every rank raises the first
    one (instead of one rank leaving while the others wait in the next collective)."""
    problem, result = None, None
    try:
        result = work()
    except UserError as err:
        problem = str(err)
    problems = distributed.agree_on_failure(problem)
    if problems:
        raise UserError(problems[0])
    return result


def check_writable(folders: list[Path]) -> None:
    """Refuse, on every rank with one line, a log or checkpoint folder that cannot be written
    (a read-only file system, no permission), before anything is written: otherwise the first
    checkpoint save, after the training it was meant to keep, would find it."""
    problems = distributed.agree_on_failure(next(filter(None, map(_unwritable, folders)), None))
    if problems:
        raise UserError(problems[0])


def _unwritable(folder: Path) -> str | None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return None       # a file in the way: creating the folder says so, naming it
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{folder}: {existing} is on a read-only file system: choose a writable folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{folder}: no permission to write in {existing}: choose a writable folder"
    return None


def open_run_folder(log_dir: Path, config: Config, env: DistEnv, train_state: TrainState) -> RunLog:
    """Create logs/<exp>/ (training_full.log with what was logged so far, config.yaml,
    metrics.jsonl, tensorboard/): only once every input has been checked and the checkpoint to
    resume from loaded, so a refused start leaves nothing behind."""
    with guarded_write(log_dir):
        open_log_file(log_dir, env.rank)
    if env.rank == 0:
        config_path = log_dir / "config.yaml"
        with guarded_write(config_path):
            config_path.write_text(config.to_yaml())
    run_log = RunLog(log_dir if env.rank == 0 else None, train_state.total_steps, train_state.step,
                     config.diagnostics.tensorboard, config.train.progress_bar)
    run_log.describe(config.to_yaml())
    stop_if_any_rank_failed_to_write()      # every file of the folder could be opened
    return run_log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")     # compile modes with CUDA graphs


def maybe_compile(model: torch.nn.Module, enabled: bool,
                  mode: str = "default") -> torch.nn.Module:
    if not enabled:
        return model
    # Compilation happens lazily at the first call: a failure there falls back to eager code
    # for the affected frames (with a warning) instead of ending the run.
    torch._dynamo.config.suppress_errors = True
    try:
        compiled = torch.compile(model, mode=mode)
        log.info("model compiled with torch.compile, mode %s (the first steps are slower while it "
                 "traces; a compiler error falls back to eager execution with a warning)", mode)
        return compiled
    except Exception as err:
        log.warning("torch.compile failed (%s): training the eager model", err)
        return model


def build_trainer(config: Config, env: DistEnv, config_path: str | None = None, *,
                  observers: ObserverFactory | None = None) -> Trainer:
    """The run's Trainer, built from its config (with the observers `observers` builds from
    it) and resumed from the checkpoint `train.resume` asks for."""
    trainer = Trainer(build_parts(config, env, config_path, observers=observers))
    describe_run(trainer)
    return trainer


def build_parts(config: Config, env: DistEnv, config_path: str | None = None, *,
                observers: ObserverFactory | None = None) -> TrainerParts:
    """Every part of a run. All of them are built and every input is checked (the checkpoint
    to resume from included) before the run folder is opened: a refused start writes nothing."""
    name = resolve_experiment_name(config, config_path)
    config.train.experiment_name = name
    setup_logging(None, env.rank, config.train.progress_bar)   # the file once the folder exists
    faults = from_environment()
    checkpoints = CheckpointManager(config.checkpoint, Path(config.checkpoint.root) / name, faults)
    log_dir = Path(config.train.log_root) / name
    check_writable([log_dir, checkpoints.folder])
    lock = agree_on_user_error(lambda: take_lock(checkpoints.folder, env))
    try:
        return build_locked_parts(config, env, checkpoints, log_dir, lock, observers, faults)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def take_lock(folder: Path, env: DistEnv) -> ExperimentLock | None:
    """The experiment's one-writer lock, held by rank 0 (trainer/experiment_lock.py)."""
    return experiment_lock.acquire(folder) if env.rank == 0 else None


def build_locked_parts(config: Config, env: DistEnv, checkpoints: CheckpointManager,
                       log_dir: Path, lock: ExperimentLock | None,
                       observers: ObserverFactory | None, faults: FaultHook) -> TrainerParts:
    name = config.train.experiment_name
    check_experiment_folder(checkpoints, resume_request(config)[0], name)
    data = build_data(config, env, faults)    # every input check, before anything is written
    plugged_in = ObserverGroup(plug_in(observers, config))
    train_state = TrainState(total_steps=total_steps(config, data),
                        length_setting=length_setting(config))
    agree_on_user_error(lambda: check_model_fits(config, data.prepared.spec, env.device))
    step = build_train_step(config, data.prepared.spec, env, train_state.total_steps, faults)
    # Per-rank RNG streams (dropout, graph sampling) derive from the one seed.
    seed_everything(config.train.seed + 1_000_003 * env.rank)
    resumed_from = resume_if_asked(config, step, train_state, checkpoints, data.prepared.spec)
    run_log = open_run_folder(log_dir, config, env, train_state)
    checkpoints.remove_stale_writes()
    context = RunContext(config=config, model=step.model, train_model=step.train_model,
                         optimizer=step.optimizer, spec=data.prepared.spec, log_dir=log_dir,
                         run_log=run_log, device=env.device, world_size=env.world_size,
                         local_batch_size=config.data.batch_size * config.train.grad_accum_steps,
                         is_main=env.rank == 0)
    return TrainerParts(config=config, env=env, data=data, train_step=step,
                        evaluate=SplitEvaluator(step, data), observers=plugged_in,
                        checkpoints=checkpoints, run_log=run_log, run_context=context,
                        train_state=train_state, resumed_from=resumed_from, lock=lock,
                        faults=faults)


BYTES_PER_PARAMETER = 16      # fp32 weights, gradients and AdamW's two moments


def check_model_fits(config: Config, spec, device: torch.device) -> None:
    """Refuse, before allocating any of it, a model whose weights, gradients and optimizer state
    would not fit the memory available now (a mistyped model.d_model would otherwise end in an
    allocation traceback). The model is laid out on the meta device, which takes no memory."""
    with torch.device("meta"):
        count = sum(p.numel() for p in CelestialPGAT(config.model, spec).parameters())
    need, available = BYTES_PER_PARAMETER * count, available_memory(device)
    if need > available:
        m = config.model
        raise UserError(f"the model has {count:,} parameters (model.d_model={m.d_model}, "
                        f"{spec.num_features} feature columns): its weights, gradients and "
                        f"optimizer state need {need / 2**30:.1f} GiB, and {device} has "
                        f"{available / 2**30:.1f} GiB available: lower model.d_model")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def build_train_step(config: Config, spec, env: DistEnv, total: int,
                     faults: FaultHook = no_faults) -> TrainStep:
    """The model (identical initial weights on every rank), its optimizer, LR schedule and
    precision: the step every run takes, also timed on its own by the benchmarks."""
    faults("model_build")
    seed_everything(config.train.seed)
    model = CelestialPGAT(config.model, spec).to(env.device)
    faults("model_built", model=model)
    compiled = maybe_compile(model, config.train.compile, config.train.compile_mode)
    train_model = distributed.wrap_ddp(compiled, env)
    optimizer = build_optimizer(model, config.optim, env.device)
    dtype = precision.autocast_dtype(agreed_precision(config.train.precision, env))
    return TrainStep(model=model, train_model=train_model, optimizer=optimizer,
                     scheduler=build_scheduler(optimizer, config.optim, total),
                     scaler=torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16),
                     device=env.device, world_size=env.world_size, autocast_dtype=dtype,
                     cuda_graphs=compiled is not model
                     and config.train.compile_mode in CUDA_GRAPH_MODES)


def agreed_precision(setting: str, env: DistEnv) -> str:
    """`train.precision` made concrete for this device (trainer/precision.py), rank 0's choice
    on every rank: a CPU probe could differ between ranks, and their numerics must not. Only
    rank 0 probes."""
    decided = precision.resolve_precision(setting, env.device) if env.rank == 0 else None
    chosen, why = distributed.broadcast_object(decided)
    log.info("precision %s (%s)", chosen, why)
    slower = precision.slower_than_fp32(chosen, env.device) if env.rank == 0 else None
    if slower:
        log.warning(slower)
    return chosen


def steps_per_epoch(config: Config, data: DataBundle) -> int:
    return len(data.train_loader) // config.train.grad_accum_steps


def total_steps(config: Config, data: DataBundle) -> int:
    total = config.train.epochs * steps_per_epoch(config, data)
    return min(total, config.train.max_steps) if config.train.max_steps else total


def length_setting(config: Config) -> str:
    """What the run length was derived from: a resumed run keeps its length (and LR schedule)
    unless these change, even when the number of ranks (so steps per epoch) changes."""
    return f"epochs={config.train.epochs} max_steps={config.train.max_steps}"


def describe_run(trainer: Trainer) -> None:
    c, env = trainer.config, trainer.env
    params = sum(p.numel() for p in trainer.train_step.model.parameters())
    log.info("experiment %s: logs in %s, checkpoints in %s", c.train.experiment_name,
             trainer.run_context.log_dir, trainer.checkpoints.folder)
    log.info("device %s x %d rank(s), backend %s, precision %s, %s parameters",
             env.device, env.world_size, env.backend or "none",
             precision.name_of(trainer.train_step.autocast_dtype), f"{params:,}")
    timeouts = distributed.describe_group_timeouts()
    if timeouts:
        log.info("collective timeout (train.collective_timeout_s): %s", timeouts)
    log.info("effective batch %d = %d per rank x %d rank(s) x %d accumulation; %d steps per "
             "epoch, %d steps in all", trainer.samples_per_step, c.data.batch_size,
             env.world_size, c.train.grad_accum_steps, steps_per_epoch(c, trainer.data),
             trainer.train_state.total_steps)
