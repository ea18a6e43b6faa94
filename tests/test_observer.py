"""The hook protocol's group (trainer/observer.py): it owns every hook call, switches off an
observer that raised on every rank at the same step, and keeps ranks in step."""
from __future__ import annotations

import json

import pytest
import torch

from series.dataset import Batch
from tests import dist_workers
from tests.dist_workers import plain_train_step
from tests.test_model import inputs, make_model
from trainer.observer import Observer, ObserverGroup, StepContext


class Recording(Observer):
    needs_attention = True

    def __init__(self, interval: int, fail_at: int = 0) -> None:
        self.interval, self.fail_at, self.calls = interval, fail_at, []

    def is_active(self, step: int) -> bool:
        return step % self.interval == 0

    def before_forward(self, ctx):
        self.calls.append(("before_forward", ctx.step))
        if ctx.step == self.fail_at:
            raise ValueError("broken")

    def after_step(self, ctx):
        self.calls.append(("after_step", ctx.step))


def take_steps(group: ObserverGroup, steps) -> list[int]:
    """Drive the group through the trainer's `TrainStep` (one micro-batch a step), between the
    calls the loop makes around it; returns, per step, how many attention maps were kept for
    the observers."""
    model = make_model()
    train_step = plain_train_step(model, model, torch.optim.SGD(model.parameters(), lr=0.01),
                                  torch.device("cpu"), world_size=1)
    batch = Batch(*inputs(model, batch=2))
    kept = []
    for step in steps:
        ctx = StepContext(step=step, epoch=0)
        group.start_step(step)
        train_step([batch], ctx, group)
        kept.append(len(ctx.attention))
        group.after_step(ctx)
    return kept


def test_only_active_observers_are_called_and_get_attention():
    every_other = Recording(interval=2)
    assert take_steps(ObserverGroup([every_other]), range(1, 5)) == [0, 1, 0, 1]
    assert every_other.calls == [("before_forward", 2), ("after_step", 2),
                                 ("before_forward", 4), ("after_step", 4)]


def test_a_raising_observer_is_switched_off_and_the_others_go_on(caplog):
    broken, healthy = Recording(interval=1, fail_at=2), Recording(interval=1)
    group = ObserverGroup([broken, healthy])
    take_steps(group, range(1, 5))
    # not called again after it raised, not even in the rest of its step
    assert broken.calls == [("before_forward", 1), ("after_step", 1), ("before_forward", 2)]
    assert [step for hook, step in healthy.calls if hook == "after_step"] == [1, 2, 3, 4]
    assert group.observers == [healthy]
    assert "Recording raised in before_forward" in caplog.text
    assert "switched off on every rank" in caplog.text


@pytest.mark.slow
def test_an_observer_failing_on_one_rank_is_switched_off_on_both(short_csv, tmp_path):
    """2 gloo ranks: the observer raises on rank 1 only; both ranks switch it off at that step,
    finish the run, and a communicating observer keeps all-reducing in step on both. One whose
    schedule differs between the ranks is switched off at the start, before it runs."""
    dist_workers.spawn(dist_workers.trainer_with_failing_observer, 2, str(short_csv),
                       str(tmp_path), timeout_s=240)
    results = [json.loads((tmp_path / f"failing{r}.json").read_text()) for r in range(2)]
    assert [r["status"] for r in results] == [0, 0]
    assert [r["raising_steps"] for r in results] == [[1, 2], [1, 2]]
    assert [r["still_on"] for r in results] == [["Summing"], ["Summing"]]
    assert all(r["sums"] == {str(s): 2.0 for s in range(1, 6)} for r in results)
    assert [r["unaligned_sums"] for r in results] == [{}, {}]


class Pruning(Observer):
    def __init__(self, stop_at: int | None = None, broken: bool = False) -> None:
        self.stop_at, self.broken, self.seen = stop_at, broken, []

    def on_validation(self, step, metrics, evaluate_fn):
        self.seen.append(step)

    def asks_to_stop(self) -> bool:
        if self.broken:
            raise RuntimeError("cannot reach the study")
        return self.seen[-1] == self.stop_at


def test_an_observer_may_ask_the_run_to_stop_after_a_validation_and_a_broken_one_cannot():
    group = ObserverGroup([Pruning(stop_at=4), Pruning(broken=True)])
    assert [group.on_validation(step, {}, None) for step in (2, 4)] == [False, True]
    assert not ObserverGroup([Pruning(broken=True)]).on_validation(2, {}, None)
    assert not ObserverGroup([]).on_validation(2, {}, None)
