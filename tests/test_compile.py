"""What `train.compile_mode: reduce-overhead` (CUDA graphs) needs from the model and the data,
checked on CPU: one graph without breaks (a break is a host round trip and ends a CUDA graph)
and training batches of one shape (a new shape re-records the graphs). The GPU run itself is
tests/test_gpu.py::test_reduce_overhead_compile_trains_like_eager (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from model import CelestialPGAT
from series.dataset import WindowDataset, build_loader, prepare
from tests.conftest import small_config
from trainer.observer import StepContext
from trainer.step import TrainStep


@pytest.fixture(scope="module")
def prepared(short_csv, tmp_path_factory):
    config = small_config(short_csv, tmp_path_factory.mktemp("logs"))
    data = prepare(config.data, config.model.seq_len, config.model.pred_len)
    return config, data, WindowDataset(data, "train", config.model.seq_len, config.model.pred_len,
                                       config.data.window_stride)


def test_every_training_batch_has_the_same_shape(prepared):
    config, _, train = prepared
    for world_size in (1, 2):
        loader = build_loader(train, config.data, rank=world_size - 1,
                              world_size=world_size, seed=0, train=True)
        shapes = {tuple(tuple(part.shape) for part in batch) for batch in loader}
        assert len(shapes) == 1, shapes


@pytest.mark.slow
def test_the_training_forward_and_loss_are_one_graph_without_breaks(prepared):
    config, data, train = prepared
    model = CelestialPGAT(config.model, data.spec).train()
    batch = next(iter(build_loader(train, config.data, 0, 1, seed=0, train=True)))

    def loss(wave, target, future_wave, future_target):
        return model(wave, target, future_wave).loss(future_target)
    explained = torch._dynamo.explain(loss)(*batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1



@pytest.mark.parametrize("cuda_graphs, marks_per_step", [(False, 0), (True, 2)])
def test_cuda_graph_steps_start_a_generation_before_every_forward(prepared, monkeypatch,
                                                                  cuda_graphs, marks_per_step):
    """With CUDA graphs the step marks each micro-batch's forward (a graph's outputs are reused
    memory); without them it does not."""
    config, data, train = prepared
    batch = next(iter(build_loader(train, config.data, 0, 1, seed=0, train=True)))
    model = CelestialPGAT(config.model, data.spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model=model, train_model=model, optimizer=optimizer,
                     scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                     scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                     world_size=1, autocast_dtype=None, cuda_graphs=cuda_graphs)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    step([batch, batch], StepContext(step=1, epoch=0, lr=1e-3, clip_norm=1.0))
    assert len(marks) == marks_per_step


@pytest.mark.parametrize("mode, cuda_graphs", [("default", False), ("reduce-overhead", True),
                                               ("max-autotune", True)])
def test_the_build_asks_for_marks_in_the_cuda_graph_modes(short_csv, tmp_path, mode, cuda_graphs):
    from trainer import distributed
    from trainer.build import build_train_step
    config = small_config(short_csv, tmp_path, train__compile=True, train__compile_mode=mode)
    spec = prepare(config.data, config.model.seq_len, config.model.pred_len).spec
    step = build_train_step(config, spec, distributed.init_distributed("cpu"), total=10)
    assert step.cuda_graphs is cuda_graphs


def test_a_model_that_failed_to_compile_asks_for_no_marks(short_csv, tmp_path, monkeypatch):
    """torch.compile refused: the step runs the eager model, which has no CUDA graphs to mark."""
    from trainer import distributed
    from trainer.build import build_train_step

    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", refuse)
    config = small_config(short_csv, tmp_path, train__compile=True,
                          train__compile_mode="reduce-overhead")
    spec = prepare(config.data, config.model.seq_len, config.model.pred_len).spec
    step = build_train_step(config, spec, distributed.init_distributed("cpu"), total=10)
    assert step.train_model is step.model and step.cuda_graphs is False
