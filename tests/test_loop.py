"""The single-device loop: run folder, accumulation, skipped steps, early stopping, CLI errors."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import as_cli_args, run_cli, small_config, small_overrides
from trainer import distributed, faults
from trainer.build import build_parts, build_trainer
from trainer.cli import run
from trainer.loop import Trainer


def make_trainer(short_csv, tmp_path, name="t", **extra):
    config = small_config(short_csv, tmp_path, name, **extra)
    env = distributed.init_distributed("cpu")
    return build_trainer(config, env)


def trainer_evaluating_with(evaluate, short_csv, tmp_path, name="t", **extra):
    """A trainer whose validation and test scores come from `evaluate(parts.evaluate)`."""
    config = small_config(short_csv, tmp_path, name, **extra)
    parts = build_parts(config, distributed.init_distributed("cpu"))
    return Trainer(dataclasses.replace(parts, evaluate=evaluate(parts.evaluate)))


@pytest.fixture
def injected_faults(monkeypatch):
    """CELESTIAL_FAULT for the trainers this test builds after setting it, this test only."""
    return lambda text: monkeypatch.setenv(faults.ENV_VAR, text)


def metrics(tmp_path, name="t", kind=None):
    text = (tmp_path / "logs" / name / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    return [line for line in lines if kind is None or line["kind"] == kind]


def test_short_run_writes_logs_checkpoints_and_model_files(short_csv, tmp_path):
    argv = as_cli_args(small_overrides(short_csv, tmp_path, "run1") +
                       [("train.max_steps", 24), ("train.log_interval", 6),
                        ("checkpoint.interval", 12)])
    assert run(argv) == 0
    logs, ckpts = tmp_path / "logs" / "run1", tmp_path / "checkpoints" / "run1"
    assert (logs / "config.yaml").is_file()
    assert "step 24/24" in (logs / "training_full.log").read_text()
    train = metrics(tmp_path, "run1", "train")
    assert [line["step"] for line in train] == [6, 12, 18, 24]
    assert all(math.isfinite(line["loss"]) and line["samples_per_s"] > 0 for line in train)
    val = metrics(tmp_path, "run1", "val")
    assert val[0]["step"] == 0 and val[-1]["step"] == 24
    assert {"nll", "mae", "coverage_50", "coverage_90", "rw_nll"} <= set(val[-1])
    assert sorted(p.name for p in ckpts.glob("checkpoint_step_*")) == \
        ["checkpoint_step_000012", "checkpoint_step_000024"]
    final = torch.load(ckpts / "final_model.pth", weights_only=True)
    assert final["step"] == 24 and "spec" in final and (ckpts / "best_model.pth").is_file()


def _one_step_params(trainer, micro_batches):
    trainer.train_step.model.eval()   # no dropout or graph sampling: both runs see one function
    trainer.train_step(micro_batches, _ctx(trainer))
    return [p.detach().clone() for p in trainer.train_step.model.parameters()]


def _ctx(trainer):
    from trainer.observer import StepContext
    return StepContext(step=1, epoch=0, clip_norm=trainer.config.optim.grad_clip_norm)


def test_gradient_accumulation_matches_one_large_batch(short_csv, tmp_path):
    from series.dataset import Batch
    big = make_trainer(short_csv, tmp_path, "big", data__batch_size=16)
    batch = next(iter(big.data.train_loader))
    halves = [Batch(*(t[:8] for t in batch)), Batch(*(t[8:] for t in batch))]
    accum = make_trainer(short_csv, tmp_path, "acc", data__batch_size=8, train__grad_accum_steps=2)
    for a, b in zip(_one_step_params(big, [batch]), _one_step_params(accum, halves)):
        assert torch.allclose(a, b, atol=1e-6)


def test_nonfinite_step_is_skipped_exactly(short_csv, tmp_path):
    trainer = make_trainer(short_csv, tmp_path)
    batch = next(iter(trainer.data.train_loader))
    batch.target[0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in trainer.train_step.model.parameters()]
    ctx = _ctx(trainer)
    trainer.train_step([batch], ctx)
    assert ctx.found_inf.item() == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.train_step.model.parameters()))


def test_consecutive_nonfinite_steps_stop_the_run(short_csv, tmp_path, caplog, injected_faults):
    injected_faults("nan_input:3-")     # a NaN in every step's inputs from step 3 on
    trainer = make_trainer(short_csv, tmp_path, train__log_interval=2,
                           train__max_consecutive_skips=3)
    assert trainer.train() == 1
    # Skips are counted at each log interval: 2 after step 4, 4 after step 6, past the limit.
    assert ("stopping: 4 optimizer steps in a row had a non-finite loss or gradient "
            "(limit train.max_consecutive_skips=3)") in caplog.text
    train = metrics(tmp_path, kind="train")
    assert [line["skipped_steps"] for line in train] == [0, 2, 2]


def test_early_stopping_after_patience(short_csv, tmp_path):
    series = {name: np.ones(50) for name in ("model", "rw", "ewma")}
    flat = lambda real: lambda split="val", **kw: {"nll": 1.0, "rw_nll": 1.0, "ewma_nll": 1.0,  # noqa: E731
                                                   "mae": 0.1, "coverage_50": 0.5,
                                                   "coverage_90": 0.9, "nll_per_target": [1.0] * 4,
                                                   "series": dict(series)}
    trainer = trainer_evaluating_with(flat, short_csv, tmp_path, train__early_stopping_patience=2)
    trainer.validate()
    assert trainer.stop_reason is None and trainer.train_state.best_val_nll == 1.0
    trainer.validate()
    assert trainer.stop_reason is None
    trainer.validate()
    assert trainer.stop_reason == "early_stopping"


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--set", "model.d_model=30"],
     "error: model.d_model (30) must be divisible by model.num_heads"),
    (["--set", "data.path=/nonexistent.csv", "data.source=csv"],
     "error: data file not found: /nonexistent.csv"),
    (["--config", "/nonexistent.yaml"], "error: config file not found"),
    (["--set", "optim.learning_rate=1"], "error: unknown config key optim.learning_rate"),
])
def test_user_errors_exit_2_with_one_line(extra, message, tmp_path):
    result = run_cli(["--set", f"train.log_root={tmp_path}/logs", *extra], timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_existing_experiment_needs_resume(short_csv, tmp_path, capsys):
    base = as_cli_args(small_overrides(short_csv, tmp_path, "again") + [("train.max_steps", 4)])
    assert run(base) == 0
    assert run(base) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    assert run(base + ["--resume", "auto", "--set", "train.max_steps=6"]) == 0


PAUSE_S = 1e4    # how long a validation or a save "takes" below: far longer than any real step


class JumpingClock:
    """`time.perf_counter` and `time.sleep` where a sleep of PAUSE_S or more moves the clock on at
    once instead of waiting: a pause the loop counted as training time would add thousands of
    seconds to the step time, whatever the machine's speed."""

    def __init__(self, monkeypatch) -> None:
        import time
        self.jumped = 0.0
        self.perf_counter, self.sleep = time.perf_counter, time.sleep
        monkeypatch.setattr(time, "perf_counter", lambda: self.perf_counter() + self.jumped)
        monkeypatch.setattr(time, "sleep", self.sleep_or_jump)

    def sleep_or_jump(self, seconds: float) -> None:
        if seconds >= PAUSE_S:
            self.jumped += seconds
        else:
            self.sleep(seconds)


def test_throughput_excludes_validation_and_checkpoints(short_csv, tmp_path, injected_faults,
                                                        monkeypatch):
    """samples/s and step time in the log are training's own: a validation at the start, in
    the middle of an interval, and a checkpoint save (each made to take PAUSE_S on a clock
    that jumps) are not counted."""
    import time

    def slow(evaluate):
        def slow_evaluate(split="val", **kw):
            time.sleep(PAUSE_S)
            return evaluate(split, **kw)
        return slow_evaluate
    clock = JumpingClock(monkeypatch)
    injected_faults(f"delay:checkpoint_save:{PAUSE_S}")     # inside the save's pause
    trainer = trainer_evaluating_with(slow, short_csv, tmp_path, train__max_steps=4,
                                      train__log_interval=2, train__eval_interval=3,
                                      checkpoint__interval=3, train__validate_at_start=True)
    assert trainer.train() == 0
    assert clock.jumped >= 3 * PAUSE_S        # the two validations and the save, at least
    train = metrics(tmp_path, kind="train")
    assert [line["step"] for line in train] == [2, 4]
    # Counted, one pause would add PAUSE_S / 2 to each of the interval's two steps.
    assert all(line["step_time_s"] < PAUSE_S / 2 for line in train), train
