"""Worker functions for the multi-process tests (spawned: real gloo process groups)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from trainer import distributed, faults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args, timeout_s: float = 300) -> None:
    """Run fn(rank, world_size, port, *args) on world_size real processes; a hang past
    `timeout_s` kills them and fails the test instead of stalling the suite."""
    port = free_port()
    context = torch.multiprocessing.start_processes(fn, args=(world_size, port, *args),
                                                    nprocs=world_size, start_method="spawn",
                                                    join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks still running after "
                               f"{timeout_s:.0f} s: killed")


def join_group(rank: int, world_size: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    return distributed.init_distributed("cpu", timeout_s=60)


def ddp_gradients(rank, world_size, port, out_dir):
    """Each rank takes its half of a fixed global batch through DDP; saves the averaged grads."""
    from tests.test_model import inputs, make_model
    join_group(rank, world_size, port)
    torch.manual_seed(0)
    model = make_model().eval()        # eval: no graph sampling noise, same function on all ranks
    env = distributed.DistEnv(rank, rank, world_size, torch.device("cpu"), "gloo")
    ddp = distributed.wrap_ddp(model, env)
    torch.manual_seed(1)
    wave, target, future, y = inputs(model, batch=8)
    half = slice(rank * 4, rank * 4 + 4)
    ddp(wave[half], target[half], future[half]).loss(y[half]).backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, Path(out_dir) / f"grads{rank}.pt")
    distributed.destroy()


def trainer_with_poisoned_rank(rank, world_size, port, csv, root, poison_step):
    """Train 6 steps; rank 1 feeds a NaN input at `poison_step`. Save what each rank saw."""
    from tests.conftest import small_config
    from trainer.build import build_trainer
    env = join_group(rank, world_size, port)
    config = small_config(Path(csv), Path(root), "nan", train__max_steps=6, train__log_interval=3)
    os.environ[faults.ENV_VAR] = f"nan_input:{poison_step}@1"   # rank 1's inputs, that step
    trainer = build_trainer(config, env)
    trainer.train()
    model = trainer.train_step.model
    result = {"skipped": trainer.train_state.skipped_steps, "step": trainer.train_state.step,
              "param_sum": float(sum(p.double().sum() for p in model.parameters()))}
    (Path(root) / f"nan{rank}.json").write_text(json.dumps(result))
    distributed.destroy()


def resume_and_report_state(rank, world_size, port, csv, root, checkpoint):
    """Build a trainer resuming from `checkpoint` and save its model and optimizer state."""
    from tests.conftest import small_config
    from trainer.build import build_trainer
    env = join_group(rank, world_size, port)
    config = small_config(Path(csv), Path(root), f"reload{world_size}",
                          train__resume=str(checkpoint))
    trainer = build_trainer(config, env)
    torch.save(state_of(trainer), Path(root) / f"state_w{world_size}_r{rank}.pt")
    distributed.destroy()


def state_of(trainer) -> dict:
    """Model parameters and AdamW moments keyed by parameter name."""
    names = {p: n for n, p in trainer.train_step.model.named_parameters()}
    optim = {}
    for p, st in trainer.train_step.optimizer.state.items():
        optim[names[p]] = {k: v.clone() for k, v in st.items()}
    model = trainer.train_step.model
    return {"model": {n: p.detach().clone() for n, p in model.named_parameters()},
            "optim": optim, "step": trainer.train_state.step}


def plain_train_step(model, train_model, optimizer, device: torch.device, world_size: int):
    """The loop's own `TrainStep` around `model`, in fp32 at a constant learning rate: the step
    and its hook order as the trainer runs them, without a config."""
    from trainer.step import TrainStep
    return TrainStep(model=model, train_model=train_model, optimizer=optimizer,
                     scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                     scaler=torch.amp.GradScaler(device.type, enabled=False), device=device,
                     world_size=world_size, autocast_dtype=None)


def observed_step(rank, world_size, port, out_dir):
    """One optimizer step of the trainer's `TrainStep` on this rank's share of a fixed global
    batch of 8, observed by the gradient and attention observers (eval mode: identical function
    on every rank)."""
    from diagnostics.attention import AttentionObserver
    from diagnostics.gradients import GradientObserver
    from series.dataset import Batch
    from tests.test_model import inputs, make_model
    from trainer.config import Config
    from trainer.diagnostics_config import DiagnosticsConfig
    from trainer.observer import ObserverGroup, RunContext, StepContext
    from trainer.run_log import RunLog
    env = join_group(rank, world_size, port) if world_size > 1 else \
        distributed.DistEnv(0, 0, 1, torch.device("cpu"), None)
    torch.manual_seed(0)
    model = make_model().eval()
    train_model = distributed.wrap_ddp(model, env)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = DiagnosticsConfig(gradient_log_interval=1, attention_log_interval=1)
    observers = ObserverGroup([GradientObserver(diag), AttentionObserver(diag)])
    local = 8 // world_size
    run = RunContext(config=Config(), model=model, train_model=train_model, optimizer=optimizer,
                     spec=model.spec, log_dir=Path(out_dir) / f"w{world_size}",
                     run_log=RunLog(None, 1, 0, False, False), device=env.device,
                     world_size=world_size, local_batch_size=local, is_main=rank == 0)
    observers.on_start(run)
    torch.manual_seed(1)
    wave, target, future, y = inputs(model, batch=8)
    part = slice(rank * local, rank * local + local)
    ctx = StepContext(step=1, epoch=0, clip_norm=1e9)
    observers.start_step(ctx.step)
    train_step = plain_train_step(model, train_model, optimizer, env.device, world_size)
    train_step([Batch(wave[part], target[part], future[part], y[part])], ctx, observers)
    observers.after_step(ctx)
    assert len(observers.observers) == 2, "an observer raised and was switched off"
    if world_size > 1:
        distributed.destroy()


def known_noise(rank, world_size, port, out_dir, dim, sigma2, local_batch):
    """Local gradients G + noise with known per-sample covariance sigma2 * I (|G| = 1)."""
    from diagnostics.gradients import noise_scale_terms, rank_statistics
    join_group(rank, world_size, port)
    g_true = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    g_true /= g_true.norm()
    noise = torch.randn(dim, generator=torch.Generator().manual_seed(100 + rank))
    local = g_true + noise * (sigma2 / local_batch) ** 0.5
    global_mean = distributed.all_reduce_mean(local.clone())
    statistics = rank_statistics({"c": [local]}, {"c": [global_mean]}, world_size)
    unit_sq, small_sq, big_sq = statistics[0].tolist()
    true_sq, trace = noise_scale_terms(small_sq, big_sq, local_batch, world_size * local_batch)
    if rank == 0:
        result = {"agreement": (unit_sq - world_size) / (world_size * (world_size - 1)),
                  "noise_scale": trace / true_sq, "true_sq": true_sq, "trace": trace}
        (Path(out_dir) / "noise.json").write_text(json.dumps(result))
    distributed.destroy()


def _hooked_ddp_traffic(steps: int):
    """A DDP model with the local-gradient hook, `steps` backward passes and Python-level
    all-reduces after each (what a trainer with diagnostics sends); returns the DDP model."""
    import torch.distributed as dist
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    distributed.register_local_gradient_hook(ddp, lambda params, grads: None)
    for _ in range(steps):
        ddp(torch.randn(8, 64)).sum().backward()
        for _ in range(3):
            dist.all_reduce(torch.randn(100))
    return ddp


def teardown_cycles(rank, world_size, port, cycles):
    """Bring a group up and down `cycles` times, each time with hooked DDP traffic, then
    `distributed.destroy()` BEFORE the DDP model is freed, as happens when a trainer outlives
    the group. Before the fix, this hung within 20 cycles."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    for cycle in range(cycles):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"cycle{cycle}", store),
                                rank=rank, world_size=world_size)
        ddp = _hooked_ddp_traffic(steps=1)
        distributed.destroy()
        del ddp                 # the reducer goes after the group was destroyed


def exit_like_a_trainer() -> None:
    """Run as a process of its own (RANK etc. in the environment): hooked DDP traffic, the model
    held in a reference cycle as the Trainer is, `distributed.destroy()` and a normal interpreter
    exit. Before the fix, about 1 process in 5 aborted at exit ("terminate called without an
    active exception")."""
    torch.set_num_threads(1)
    distributed.init_distributed("cpu", 60)
    holder = {"ddp": _hooked_ddp_traffic(steps=2)}
    holder["self"] = holder                  # freed only by a garbage collection
    del holder
    distributed.destroy()


def save_checkpoints_until_killed(root: str, async_save: bool) -> None:
    """Run as a process of its own: save a small state as checkpoints 2 and 4 through the
    trainer's CheckpointManager; CELESTIAL_FAULT in the environment kills it during one save."""
    import warnings

    from tests.test_checkpoint import identity_files
    from trainer.checkpoint.manager import CheckpointConfig, CheckpointManager
    warnings.filterwarnings("ignore")          # DCP's note that no process group exists
    manager = CheckpointManager(CheckpointConfig(async_save=async_save), Path(root),
                                faults.from_environment())
    for step in (2, 4):
        manager.save(step, {"w": torch.full((1000,), float(step))}, identity_files())
    manager.wait()


def trainer_with_failing_observer(rank, world_size, port, csv, root):
    """Train 5 steps with an observer that raises on rank 1 at step 2, one that all-reduces on
    every step, and one whose schedule differs between ranks; save what each rank saw."""
    from tests.conftest import small_config
    from trainer.build import build_trainer
    from trainer.observer import Observer

    class Raising(Observer):
        def __init__(self):
            self.steps = []

        def is_active(self, step):
            return True

        def after_backward(self, ctx):
            self.steps.append(ctx.step)
            if rank == 1 and ctx.step == 2:
                raise RuntimeError("observer bug on rank 1")

    class Summing(Observer):
        communicates = True

        def __init__(self):
            self.sums = {}

        def is_active(self, step):
            return True

        def after_step(self, ctx):
            self.sums[ctx.step] = distributed.all_reduce_sum(torch.ones(())).item()

    class RankDependent(Summing):
        def is_active(self, step):
            return step % 2 == rank      # a plug-in bug: would leave ranks in different collectives

    raising, summing, unaligned = Raising(), Summing(), RankDependent()
    env = join_group(rank, world_size, port)
    config = small_config(Path(csv), Path(root), "failing", train__max_steps=5,
                          train__log_interval=5, train__validate_at_start=False)
    trainer = build_trainer(config, env, observers=lambda c: [raising, summing, unaligned])
    status = trainer.train()
    result = {"status": status, "raising_steps": raising.steps, "sums": summing.sums,
              "still_on": [type(o).__name__ for o in trainer.observers.observers],
              "unaligned_sums": unaligned.sums}
    (Path(root) / f"failing{rank}.json").write_text(json.dumps(result))
    distributed.destroy()


def failure_agreement(rank, world_size, port, out_dir):
    """Three agreements: none fails; rank 1 fails; every rank fails (the problems in rank
    order); then one whose failure was agreed beforehand (`known_failed`)."""
    join_group(rank, world_size, port)
    seen = [distributed.agree_on_failure(None),
            distributed.agree_on_failure("disk full" if rank == 1 else None),
            distributed.agree_on_failure(f"rank {rank}"),
            distributed.agree_on_failure(None if rank else "known", known_failed=True)]
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(seen))
    distributed.destroy()
