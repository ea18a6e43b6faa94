"""What `train.compile_mode: reduce-overhead` (CUDA graphs) needs from the model and the data,
checked on CPU: one graph without breaks (a break is a host round trip and ends a CUDA graph)
and training batches of one shape (a new shape re-records the graphs). The GPU run itself is
tests/test_gpu.py::test_reduce_overhead_compile_trains_like_eager."""
from __future__ import annotations

import pytest
import torch

from model import CelestialPGAT
from tests.conftest import small_config
from trainer.data import WindowDataset, build_loader, prepare


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


def test_the_training_forward_and_loss_are_one_graph_without_breaks(prepared):
    config, data, train = prepared
    model = CelestialPGAT(config.model, data.spec).train()
    batch = next(iter(build_loader(train, config.data, 0, 1, seed=0, train=True)))

    def loss(wave, target, future_wave, future_target):
        return model(wave, target, future_wave).loss(future_target)
    explained = torch._dynamo.explain(loss)(*batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
