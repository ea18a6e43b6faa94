"""Numerical faults: NaN/inf in the inputs, in the loss on one rank, in one
component's gradients -> the step is skipped on every rank, counted, logged and recorded with the
first non-finite part; a run of them stops the run cleanly. Faults come from trainer/faults.py."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from diagnostics.analysis.load import read_metrics
from series.dataset import Batch
from tests import dist_workers
from tests.conftest import small_config
from tests.test_model import inputs, make_model
from trainer import distributed, faults
from trainer.build import build_trainer
from trainer.checkpoint.manager import verify
from trainer.nonfinite import FiniteCheck, describe_skip


def _backward(model, check: FiniteCheck, batch: Batch) -> None:
    out = model(batch.wave, batch.target, batch.future_wave)
    check.guard_loss(out.loss(batch.future_target), batch).backward()


def test_healthy_step_clips_exactly_like_clip_grad_norm():
    """The flags come at no cost to the numbers: norm and clipped gradients are bitwise those
    of torch's clip_grad_norm_, and every flag is 0."""
    torch.manual_seed(0)
    model = make_model().eval()
    batch = Batch(*inputs(model))
    check = FiniteCheck(model)
    _backward(model, check, batch)
    params = [torch.nn.Parameter(torch.zeros_like(p)) for p in model.parameters()]
    for copy, p in zip(params, model.parameters()):
        copy.grad = p.grad.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=True)
    norm, flags = check.clip(0.1)
    assert torch.equal(norm, ref_norm)
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(model.parameters(), params))
    assert flags.tolist() == [0.0] * len(check.names)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_checks_never_sync_the_host_on_cuda():
    """The flags stay on the device: guarding the loss and clipping never wait for the GPU."""
    torch.manual_seed(0)
    model = make_model().eval().cuda()
    batch = Batch(*(t.cuda() for t in inputs(model)))
    check = FiniteCheck(model)
    for _ in range(2):               # the second step uses the cached component index
        loss = model(batch.wave, batch.target, batch.future_wave).loss(batch.future_target)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guarded = check.guard_loss(loss, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        guarded.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            norm, flags = check.clip(1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.zero_grad()
    assert torch.isfinite(norm) and flags.sum().item() == 0


def test_nonfinite_input_poisons_every_gradient():
    """A NaN input on one rank must skip the step on all: every gradient turns NaN, so DDP's
    all-reduce carries it to every rank."""
    model = make_model().eval()
    wave, target, future, y = inputs(model)
    wave[0, 0, 0] = math.inf
    check = FiniteCheck(model)
    _backward(model, check, Batch(wave, target, future, y))
    norm, flags = check.clip(math.inf)
    assert not torch.isfinite(norm)
    assert all(not torch.isfinite(p.grad).any() for p in model.parameters())
    named = dict(zip(check.names, flags.tolist()))
    assert named["inputs"] == 1.0 and named["loss"] == 1.0 and named["decoder"] == 1.0


def test_skip_names_the_first_nonfinite_part():
    names = ["inputs", "loss", "graph_combiner", "fusion_cross_attention", "decoder"]
    grad = describe_skip(names, [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])
    # back-propagation reaches fusion_cross_attention before graph_combiner
    assert grad["cause"] == "gradient" and grad["component"] == "fusion_cross_attention"
    loss = describe_skip(names, [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert loss["component"] == "loss" and loss["ranks"] == [1]
    data = describe_skip(names, [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert data["component"] == "inputs" and data["ranks"] == [0]


@pytest.fixture
def fault(monkeypatch):
    """Set CELESTIAL_FAULT for an in-process trainer built after it; cleared afterwards."""
    return lambda text: monkeypatch.setenv(faults.ENV_VAR, text)


def _records(root: Path, name: str, kind: str) -> list[dict]:
    lines = (root / "logs" / name / "metrics.jsonl").read_text().splitlines()
    return [line for line in map(json.loads, lines) if line["kind"] == kind]


@pytest.mark.slow
def test_skips_are_named_on_any_step_and_a_run_of_them_stops_cleanly(short_csv, tmp_path, fault,
                                                                     caplog):
    """Skips at steps 3 and 5 (not log steps: log_interval 2) are each named in a log line and
    a `skip` record. NaN losses from step 7 on stop the run at the first log step with >= 3 in a
    row (step 10): exit status 1, the checkpoint of step 6 (before the trouble) kept and
    complete, nothing saved after."""
    fault("nan_grad:3:celestial_to_target_attention,nan_input:5,nan_loss:7-")
    config = small_config(short_csv, tmp_path, "skips", train__max_steps=40,
                          train__log_interval=2, train__max_consecutive_skips=3,
                          checkpoint__interval=6, train__validate_at_start=False)
    trainer = build_trainer(config, distributed.init_distributed("cpu"))
    assert trainer.train() == 1
    assert trainer.train_state.step == 10 and trainer.stop_reason == "nonfinite"
    skips = {r["step"]: r for r in _records(tmp_path, "skips", "skip")}
    assert sorted(skips) == [3, 5, 7, 8, 9, 10]
    assert skips[3]["cause"] == "gradient"
    assert skips[3]["component"] == "celestial_to_target_attention"
    assert skips[3]["nonfinite_components"] == ["celestial_to_target_attention"]
    assert skips[5]["component"] == "inputs" and skips[5]["ranks"] == [0]
    assert {skips[s]["component"] for s in (7, 8, 9, 10)} == {"loss"}
    assert [r["skipped_steps"] for r in _records(tmp_path, "skips", "train")] == [0, 1, 1, 2, 2]
    assert "step 3 skipped: non-finite gradient, first in component " \
           "celestial_to_target_attention" in caplog.text
    assert "step 5 skipped: non-finite inputs on rank 0" in caplog.text
    folder = tmp_path / "checkpoints" / "skips"
    kept = sorted(p.name for p in folder.glob("checkpoint_step_*"))
    assert kept == ["checkpoint_step_000006"] and verify(folder / kept[0]) is None
    assert "4 optimizer steps in a row had a non-finite loss or gradient" in caplog.text
    assert "newest checkpoint: " + str(folder / kept[0]) in caplog.text
    assert not (folder / "final_model.pth").exists()
    notes = []      # the analysis reads the skip records
    assert len(read_metrics(tmp_path / "logs" / "skips" / "metrics.jsonl", notes)["skip"]) == 6


def faulty_ranks(rank, world_size, port, csv, root):
    """Two real gloo ranks: rank 1's loss is NaN at step 2, a component's gradients at step 4
    (both ranks), rank 0's inputs at step 5, rank 1's loss from step 7 on (-> stop at log step
    9 with max_consecutive_skips 2). Each rank writes what it saw."""
    env = dist_workers.join_group(rank, world_size, port)
    os.environ[faults.ENV_VAR] = ("nan_loss:2@1,nan_grad:4:fusion_cross_attention,"
                                  "nan_input:5@0,nan_loss:7-@1")
    config = small_config(Path(csv), Path(root), "ranks", train__max_steps=40,
                          train__log_interval=3, train__max_consecutive_skips=2,
                          train__validate_at_start=False)
    trainer = build_trainer(config, env)
    code = trainer.train()
    result = {"code": code, "skipped": trainer.train_state.skipped_steps,
              "step": trainer.train_state.step,
              "param_sum": float(sum(p.double().sum()
                                     for p in trainer.train_step.model.parameters()))}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.destroy()


@pytest.mark.slow
def test_faults_on_one_rank_skip_the_step_on_both(short_csv, tmp_path):
    dist_workers.spawn(faulty_ranks, 2, str(short_csv), str(tmp_path), timeout_s=240)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["code"], r["step"], r["skipped"]) for r in results] == [(1, 9, 6)] * 2
    assert results[0]["param_sum"] == results[1]["param_sum"]
    skips = {r["step"]: r for r in _records(tmp_path, "ranks", "skip")}
    assert sorted(skips) == [2, 4, 5, 7, 8, 9]
    assert (skips[2]["component"], skips[2]["ranks"]) == ("loss", [1])
    assert skips[4]["component"] == "fusion_cross_attention"
    assert (skips[5]["component"], skips[5]["ranks"]) == ("inputs", [0])
    assert (skips[9]["component"], skips[9]["ranks"]) == ("loss", [1])
    log = (tmp_path / "logs" / "ranks" / "training_full.log").read_text()
    assert "step 2 skipped: non-finite loss on rank 1" in log
    assert "3 optimizer steps in a row had a non-finite" in log
