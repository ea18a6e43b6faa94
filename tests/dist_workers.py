"""Worker functions for the multi-process tests (spawned: real gloo process groups)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from trainer import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, port, *args) on world_size real processes."""
    port = free_port()
    torch.multiprocessing.start_processes(fn, args=(world_size, port, *args), nprocs=world_size,
                                          start_method="spawn", join=True)


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
    ddp = distributed.wrap_ddp(model, distributed.DistEnv(rank, rank, world_size, torch.device("cpu"), "gloo"))
    torch.manual_seed(1)
    wave, target, future, y = inputs(model, batch=8)
    half = slice(rank * 4, rank * 4 + 4)
    ddp(wave[half], target[half], future[half]).loss(y[half]).backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, Path(out_dir) / f"grads{rank}.pt")
    distributed.destroy()


def trainer_with_poisoned_rank(rank, world_size, port, csv, root, poison_step):
    """Train 6 steps; rank 1 feeds a NaN target at `poison_step`. Save what each rank saw."""
    from tests.conftest import small_config
    from trainer.build import build_trainer
    env = join_group(rank, world_size, port)
    config = small_config(Path(csv), Path(root), "nan", train__max_steps=6, train__log_interval=3)
    trainer = build_trainer(config, env)
    original = trainer.train_step

    def poisoned(micro_batches, ctx, active):
        if rank == 1 and ctx.step == poison_step:
            micro_batches[0].target[0, 0, 0] = float("nan")
        return original(micro_batches, ctx, active)
    trainer.train_step = poisoned
    trainer.train()
    result = {"skipped": trainer.progress.skipped_steps, "step": trainer.progress.step,
              "param_sum": float(sum(p.double().sum() for p in trainer.model.parameters()))}
    (Path(root) / f"nan{rank}.json").write_text(json.dumps(result))
    distributed.destroy()


def resume_and_report_state(rank, world_size, port, csv, root, checkpoint):
    """Build a trainer resuming from `checkpoint` and save its model and optimizer state."""
    from tests.conftest import small_config
    from trainer.build import build_trainer
    env = join_group(rank, world_size, port)
    config = small_config(Path(csv), Path(root), f"reload{world_size}", train__resume=str(checkpoint))
    trainer = build_trainer(config, env)
    torch.save(state_of(trainer), Path(root) / f"state_w{world_size}_r{rank}.pt")
    distributed.destroy()


def state_of(trainer) -> dict:
    """Model parameters and AdamW moments keyed by parameter name."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    optim = {}
    for p, st in trainer.optimizer.state.items():
        optim[names[p]] = {k: v.clone() for k, v in st.items()}
    return {"model": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "optim": optim, "step": trainer.progress.step}
