"""The training loop: `Trainer.train()` runs epochs, `Trainer.take_step` takes one optimizer
step (its `train_step`, a `TrainStep` of trainer/step.py) and does what the step boundary asks
(logging, validation, checkpoints, requests from signals).

Everything that changes control flow (skip a step, stop, save now, early stopping) is decided
from values every rank has (all-reduced gradients and metrics) or agreed with one small
all-reduce, so ranks never take different branches.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scoring.scores import describe_skill, skill_metrics
from trainer import distributed
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.model_file import load_consolidated, save_consolidated
from trainer.checkpoint.state import checkpointed_state
from trainer.evaluate import celestial_effect, evaluate
from trainer.faults import FaultHook, no_faults
from trainer.nonfinite import describe_skip, skip_message
from trainer.observer import EXIT_PRUNED, ObserverGroup, RunContext, StepContext
from trainer.preemption import EXIT_PREEMPTED, process_requests, requeue_slurm_job
from trainer.resources import memory_mb
from trainer.resume import checkpoint_files
from trainer.run_log import (
    guarded_write,
    raise_agreed_write_failure,
    stop_if_any_rank_failed_to_write,
    write_failure,
)
from trainer.step import TrainStep
from trainer.test_windows import write_test_windows
from trainer.train_state import TrainState

if TYPE_CHECKING:
    from series.dataset import DataBundle
    from trainer.config import Config
    from trainer.experiment_lock import ExperimentLock
    from trainer.run_log import RunLog

log = logging.getLogger(__name__)


class IntervalMeter:
    """Device-side sums between two log steps; read (one sync) only when logging."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.norm = torch.zeros((), device=self.device)
        self.clipped = torch.zeros((), device=self.device)
        self.skip_flags: list[torch.Tensor] = []
        self.part_flags: list[torch.Tensor] = []     # per step: FiniteCheck's flags
        self.data_time = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, found_inf: torch.Tensor,
            clip_norm: float, part_flags: torch.Tensor) -> None:
        finite = found_inf == 0
        self.loss += torch.where(finite, loss, 0.0)
        self.norm += torch.where(finite, grad_norm, 0.0)
        if clip_norm > 0:
            self.clipped += (finite & (grad_norm > clip_norm)).float()
        self.skip_flags.append(found_inf)
        self.part_flags.append(part_flags)

    @contextmanager
    def paused(self):
        """Validation and checkpoint saves inside do not count as training time (samples/s)."""
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused_at


def flat_hparams(config) -> dict:
    """The settings worth comparing across runs, as `section.key` scalars."""
    tree = config.to_dict()
    keys = {"model": ("d_model", "num_heads", "num_mixtures", "dropout", "body_dropout"),
            "optim": ("lr", "weight_decay", "grad_clip_norm", "warmup_steps"),
            "data": ("batch_size",), "train": ("grad_accum_steps", "seed")}
    flat = {f"{section}.{k}": tree[section][k] for section, ks in keys.items() for k in ks}
    flat["world_size"] = distributed.world_size()
    return flat


class StopReason(str, Enum):
    """Why a run ends before its configured length. Each is decided where it is found (a stop
    signal in act_on_requests, non-finite steps in _count_skips, a pruning observer and early
    stopping in validate) through Trainer.stop, and handled in Trainer.finish."""

    SIGNAL = "signal"
    NONFINITE = "nonfinite"
    PRUNED = "pruned"
    EARLY_STOPPING = "early_stopping"

    def __str__(self) -> str:
        return self.value

    @property
    def keeps_state(self) -> bool:
        """Whether the state is worth a checkpoint: a diverged or pruned run is not continued."""
        return self not in (StopReason.NONFINITE, StopReason.PRUNED)


class SplitEvaluator:
    """`evaluate(split, **kwargs)`: the model's metrics on the val or test split."""

    def __init__(self, step: TrainStep, data: DataBundle) -> None:
        self.step, self.data = step, data

    def __call__(self, split: str = "val", **kwargs) -> dict:
        loader = self.data.val_loader if split == "val" else self.data.test_loader
        return evaluate(self.step.model, loader, self.step.device, self.data.prepared.target_std,
                        autocast=self.step.autocast(), **kwargs)


@dataclass(frozen=True, kw_only=True)
class TrainerParts:
    """What a Trainer is made of, built from the config in one place (trainer.build)."""

    config: Config
    env: distributed.DistEnv
    data: DataBundle
    train_step: TrainStep
    evaluate: Callable[..., dict]     # SplitEvaluator, or a stand-in in tests
    observers: ObserverGroup
    checkpoints: CheckpointManager
    run_log: RunLog
    run_context: RunContext
    train_state: TrainState           # its total_steps and length_setting: this run's plan
    resumed_from: Path | None = None  # the checkpoint loaded into the parts, if any
    lock: ExperimentLock | None = None    # the experiment's one-writer lock, on rank 0
    faults: FaultHook = no_faults     # called at the named points of trainer.faults


class Trainer:
    def __init__(self, parts: TrainerParts) -> None:
        self.config, self.env, self.data = parts.config, parts.env, parts.data
        self.train_step, self.evaluate = parts.train_step, parts.evaluate
        self.observers, self.checkpoints = parts.observers, parts.checkpoints
        self.run_log, self.lock, self.faults = parts.run_log, parts.lock, parts.faults
        self.run_context, self.train_state = parts.run_context, parts.train_state
        self.app_state = checkpointed_state(self.train_step, self.train_state, self.config)
        self.requests = process_requests()
        self.meter = IntervalMeter(self.env.device)
        self.stop_reason: StopReason | None = None
        self.requeue_requested = False
        self.last_validation_step, self.last_validation = -1, {}
        self.last_series: dict = {}     # per-window scores of the last `scored` split
        self.weights_step = -1        # at the end: the step of the weights the run kept
        self.samples_per_step = (self.config.data.batch_size * self.config.train.grad_accum_steps
                                 * self.env.world_size)

    def stop(self, reason: StopReason) -> bool:
        """Stop the run for `reason`, unless it already stops for another (the first decides);
        whether `reason` is now the run's."""
        if self.stop_reason is not None:
            return False
        self.stop_reason = reason
        return True

    # ----------------------------------------------------------------- the loop
    def train(self) -> int:
        """Train to the configured length; returns the process exit status."""
        installed_here = not self.requests.installed   # the CLI installs them at process start
        if installed_here:
            self.requests.install()
        try:
            if self.stopped_before_training("start-up"):
                return EXIT_PREEMPTED
            self.observers.on_start(self.run_context)
            if self.train_state.step == 0 and self.config.train.validate_at_start:
                self.validate()   # the starting point, so the curve shows what training gained
                if self.stopped_before_training("the first validation"):
                    return EXIT_PREEMPTED
            self.meter.reset()    # the first interval's clock starts with training
            while self.stop_reason is None and self.train_state.step < self.train_state.total_steps:
                self.run_epoch()
            return self.finish()
        finally:
            if installed_here:
                self.requests.uninstall()
            self.checkpoints.wait()
            self.run_log.close()
            if self.lock is not None:
                self.lock.release()

    def stopped_before_training(self, phase: str) -> bool:
        """A stop signal during `phase` (before the first step of this process): nothing new to
        save, so all ranks agree and exit; the run resumes from where it was."""
        self.act_on_requests(f"during {phase}, before any training step: exiting without a new "
                             f"checkpoint")
        if self.stop_reason is not StopReason.SIGNAL:
            return False
        self.report_stop()
        return True

    def run_epoch(self) -> None:
        loader = self.data.train_loader
        self.train_state.start_epoch(self.data.train_sampler)
        accum = self.config.train.grad_accum_steps
        micro_batches, data_time, fetch_started = [], 0.0, time.perf_counter()
        for batch in loader:
            data_time += time.perf_counter() - fetch_started
            micro_batches.append(batch)
            if len(micro_batches) == accum:
                self.meter.data_time += data_time
                self.take_step(micro_batches, data_time)
                micro_batches, data_time = [], 0.0
                if self.stop_reason or self.train_state.step >= self.train_state.total_steps:
                    return
            fetch_started = time.perf_counter()
        self.end_epoch()

    def take_step(self, micro_batches, data_time: float) -> None:
        step_started = time.perf_counter()
        step = self.train_state.step + 1
        ctx = StepContext(step=step, epoch=self.train_state.epoch,
                          lr=self.train_step.scheduler.get_last_lr()[0],
                          clip_norm=self.config.optim.grad_clip_norm, data_time_s=data_time)
        self.observers.start_step(step)
        self.faults("before_step", step)
        loss, part_flags = self.train_step(micro_batches, ctx, self.observers)
        self.train_state.took_step(self.samples_per_step)
        self.meter.add(loss, ctx.grad_norm, ctx.found_inf, ctx.clip_norm, part_flags)
        ctx.step_time_s = time.perf_counter() - step_started
        self.observers.after_step(ctx)
        self.at_step_boundary(step)

    # ---------------------------------------------------------- step boundary
    def at_step_boundary(self, step: int) -> None:
        self.faults("after_step", step)
        train = self.config.train
        if step % train.log_interval == 0:
            self.log_training(step)
        else:
            self.run_log.advance()
        if train.eval_interval and step % train.eval_interval == 0:
            self.validate()
        if self.stop_reason is None or self.stop_reason.keeps_state:
            self.save_checkpoint()
        # After the validation and save: a signal that came during them is acted on now, and
        # a stop right after a save needs no second checkpoint.
        self.act_on_requests()

    def act_on_requests(self, then: str = "saving a checkpoint and exiting") -> None:
        """Agree with all ranks on the signals received (so all take the same branch): a stop
        is taken at once (finish() saves), a save-now request saves here."""
        r = self.requests
        stop, save_now, requeue, cancel, write_failed = distributed.agree_any(
            [r.stop_signal is not None, r.save_now, r.requeue, r.cancel,
             write_failure() is not None])
        if write_failed:     # a log or record could not be written (full disk): all ranks stop
            raise_agreed_write_failure()
        r.save_now = False
        if stop and self.stop(StopReason.SIGNAL):
            self.requeue_requested = requeue and not cancel    # a SIGTERM anywhere cancels
            log.warning("stop requested (signal) at step %d: %s", self.train_state.step, then)
        elif save_now:
            self.save_checkpoint(now=True)

    def log_training(self, step: int) -> None:
        """One sync: read the interval's sums, log them, check for runs of skipped steps."""
        m = self.meter
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - m.started
        flags = [int(f) for f in torch.stack(m.skip_flags).tolist()]
        skipped = [step - len(flags) + 1 + i for i, f in enumerate(flags) if f]
        done = len(flags) - len(skipped)
        values = {"epoch": self.train_state.epoch,
                  "loss": m.loss.item() / done if done else math.nan,
                  "lr": self.train_step.scheduler.get_last_lr()[0],
                  "grad_norm": m.norm.item() / done if done else math.nan,
                  "clip_fraction": m.clipped.item() / len(flags), "skipped_steps": len(skipped),
                  "samples_per_s": len(flags) * self.samples_per_step / elapsed,
                  "step_time_s": elapsed / len(flags), "data_time_s": m.data_time / len(flags),
                  "memory_mb": memory_mb(self.env.device), "world_size": self.env.world_size,
                  "device": self.env.device.type}
        self.run_log.record("train", step, values)
        self.run_log.advance(1, loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        log.info("step %d/%d epoch %d: loss %.4f, lr %.2e, grad norm %.3g, %.1f samples/s",
                 step, self.train_state.total_steps, self.train_state.epoch, values["loss"],
                 values["lr"], values["grad_norm"], values["samples_per_s"],
                 extra={"progress_line": True})
        self._count_skips(flags, skipped)
        m.reset()

    def _count_skips(self, flags: list[int], skipped: list[int]) -> None:
        p = self.train_state
        p.skipped_steps += len(skipped)
        for f in flags:
            p.consecutive_skips = p.consecutive_skips + 1 if f else 0
        if skipped:
            self._record_skips(flags, skipped)
        limit = self.config.train.max_consecutive_skips
        if p.consecutive_skips >= limit and self.stop(StopReason.NONFINITE):
            log.error("stopping: %d optimizer steps in a row had a non-finite loss or gradient "
                      "(limit train.max_consecutive_skips=%d). Lower optim.lr, tighten "
                      "optim.grad_clip_norm or check the data.", p.consecutive_skips, limit)

    def _record_skips(self, flags: list[int], skipped: list[int]) -> None:
        """A log line and a `skip` record per skipped step, naming the first non-finite part.
        Every rank skipped the same steps (the flags come from all-reduced gradients), so all
        take part in the one gather of their flags."""
        rows = [i for i, f in enumerate(flags) if f]
        local = torch.stack([self.meter.part_flags[i] for i in rows]).tolist()
        by_rank = distributed.all_gather_object(local)
        for n, step in enumerate(skipped):
            names = self.train_step.finite_check.names
            skip = describe_skip(names, [flags[n] for flags in by_rank])
            log.warning(skip_message(step, skip))
            self.run_log.record("skip", step, skip)

    def end_epoch(self) -> None:
        self.train_state.finished_epoch()
        if self.config.train.eval_interval == 0:
            self.validate()
            self.act_on_requests()    # a signal during this validation: stop before the next step

    # ------------------------------------------------------------- evaluation
    def scored(self, split: str, with_effect: bool = False, what: str | None = None) -> dict:
        """The split's metrics for the model and the baselines, with skill intervals; with
        `with_effect`, also the NLL rise when every body is blanked (`celestial_effect`).
        `what` names the work in the log and on its progress bar."""
        loader = self.data.val_loader if split == "val" else self.data.test_loader
        passes = 2 if with_effect else 1
        with self.run_log.phase(what or f"{split} split", passes * len(loader)) as bar:
            metrics = self.evaluate(split, with_series=True, on_batch=bar.update)
            if with_effect:
                metrics.update(celestial_effect(self.evaluate, split, self.data.prepared.spec,
                                                self.config.model.pred_len,
                                                self.config.data.window_stride, base=metrics,
                                                on_batch=bar.update))
        series = self.last_series = metrics.pop("series")
        metrics.update(skill_metrics(series, self.config.model.pred_len,
                                     self.config.data.window_stride))
        return metrics

    def validate(self) -> None:
        self.faults("validation")
        with self.meter.paused():     # not training time
            p, step = self.train_state, self.train_state.step
            metrics = self.scored("val", what=f"validation at step {step}")
            improved = metrics["nll"] < p.best_val_nll - 1e-6
            if improved:
                p.best_val_nll, p.evals_without_improvement = metrics["nll"], 0
                self.save_model_file("best_model.pth", metrics)
            else:
                p.evals_without_improvement += 1
            self.last_validation, self.last_validation_step = metrics, step
            self.run_log.record("val", step, {"epoch": p.epoch, "best": improved, **metrics})
            log.info("validation at step %d: nll %.4f, %s, mae %.4f, coverage 50%% %.3f, "
                     "90%% %.3f%s", step, metrics["nll"], describe_skill(metrics), metrics["mae"],
                     metrics["coverage_50"], metrics["coverage_90"], " (best)" if improved else "")
            if (self.observers.on_validation(step, {"epoch": p.epoch, **metrics}, self.evaluate)
                    and self.stop(StopReason.PRUNED)):
                log.info("stopping at step %d: an observer pruned the run (validation NLL %.4f)",
                         step, metrics["nll"])
            patience = self.config.train.early_stopping_patience
            stop = patience and p.evals_without_improvement >= patience
            if distributed.agree_any([bool(stop)])[0] and self.stop(StopReason.EARLY_STOPPING):
                log.info("early stopping: no improvement of validation NLL in %d validations "
                         "(best %.4f)", patience, p.best_val_nll)

    def test(self) -> dict:
        """The test split scored, and how much the NLL rises with every body blanked."""
        metrics = self.scored("test", with_effect=True,
                              what=f"test with the weights of step {self.weights_step}")
        metrics.update(write_test_windows(self.run_log, self.data.test_loader,
                                          self.data.prepared, self.last_series))
        log.info("test: nll %.4f, %s; all bodies blanked: nll %+.4f [%+.4f, %+.4f]",
                 metrics["nll"], describe_skill(metrics), metrics["blank_all_rise"],
                 metrics["blank_all_rise_low"], metrics["blank_all_rise_high"])
        return metrics

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, *, last: bool = False, now: bool = False) -> None:
        """This step's checkpoint, if the manager finds one due (CheckpointManager.maybe_save)."""
        with self.meter.paused():     # not training time; blocked_s is recorded below
            blocked = self.checkpoints.maybe_save(
                self.train_state.step, {"app": self.app_state},
                lambda: checkpoint_files(self.config, self.data.prepared.spec), last=last, now=now)
        if blocked is not None:
            self.run_log.record("checkpoint", self.train_state.step, {"blocked_s": blocked})

    def save_model_file(self, name: str, metrics: dict, weights_step: int | None = None) -> None:
        """A single-file model; its `step` is the step of its weights (default: this one)."""
        path = self.checkpoints.folder / name
        if distributed.is_main():
            # a failure is held and agreed at the step's end
            with guarded_write(path, leftover=path.with_suffix(".tmp")):
                save_consolidated(path, self.train_step.model, {
                    "config": self.config.to_dict(), "spec": self.data.prepared.spec.to_dict(),
                    "scaling": self.data.prepared.scaling(),
                    "step": self.train_state.step if weights_step is None else weights_step,
                    "epoch": self.train_state.epoch,
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})

    def report_stop(self) -> None:
        """After a stop signal: requeue the Slurm job if the last signal asked for it."""
        if distributed.is_main() and self.requeue_requested:
            requeue_slurm_job()
        elif distributed.is_main():
            sig = self.requests.stop_signal
            log.info("stopped on %s: resume with --resume auto",
                     signal.Signals(sig).name if sig else "another rank's stop signal")

    def stop_nonfinite(self) -> int:
        """End a run that kept producing non-finite steps, without saving its state: the
        checkpoints written before are kept for a resume with other settings."""
        self.checkpoints.wait()
        newest = self.checkpoints.complete_checkpoints()
        log.error("run stopped at step %d after %d non-finite steps in a row (see the `skip` "
                  "lines in metrics.jsonl for what went non-finite); newest checkpoint: %s",
                  self.train_state.step, self.train_state.consecutive_skips,
                  newest[0] if newest else "none")
        return 1

    def stop_pruned(self) -> int:
        """End a run an observer pruned: no checkpoint, no test (it is not to be continued)."""
        self.checkpoints.wait()
        state = self.train_state
        self.run_log.record("pruned", state.step,
                            {"epoch": state.epoch, "val_nll": self.last_validation["nll"]})
        stop_if_any_rank_failed_to_write()
        log.info("pruned at step %d: no checkpoint saved, the test split not scored",
                 self.train_state.step)
        return EXIT_PRUNED

    def restore_best_weights(self) -> dict | None:
        """After early stopping, load best_model.pth (the sharded checkpoint keeps the last
        state for resuming) and return its validation metrics, drawn in TensorBoard as
        `val_kept/*` at the step of those weights (`val/*` keeps the last validation's)."""
        best = self.checkpoints.folder / "best_model.pth"
        if not (self.stop_reason is StopReason.EARLY_STOPPING and self.config.train.restore_best):
            return None
        distributed.barrier()
        saved = load_consolidated(best)
        self.train_step.model.load_state_dict(saved["model"])
        self.weights_step = int(saved["step"])
        metrics = self.scored("val", what=f"validation of the restored weights of step "
                                          f"{self.weights_step}")
        self.run_log.record("val", self.train_state.step, {"epoch": self.train_state.epoch,
                                                        "restored_best": True, **metrics},
                            tag="val_kept", weights_step=self.weights_step)
        log.info("early stopping: restored the best weights, of step %d (validation NLL %.4f)",
                 self.weights_step, metrics["nll"])
        return metrics

    def finish(self) -> int:
        if self.meter.skip_flags:
            self.log_training(self.train_state.step)    # the steps since the last log line
        if self.stop_reason is StopReason.NONFINITE:
            return self.stop_nonfinite()
        if self.stop_reason is StopReason.PRUNED:
            return self.stop_pruned()
        self.save_checkpoint(last=True)
        self.checkpoints.wait_all_ranks()
        if self.stop_reason is StopReason.SIGNAL:
            self.report_stop()
            return EXIT_PREEMPTED
        if self.last_validation_step != self.train_state.step:
            self.validate()
        self.weights_step = self.train_state.step       # unless the best weights are restored
        final = self.restore_best_weights() or self.last_validation
        self.save_model_file("final_model.pth", final, self.weights_step)
        test = self.test()
        self.run_log.record("test", self.train_state.step, test, weights_step=self.weights_step)
        self.observers.on_end({"val": final, "test": test,
                               "best_val_nll": self.train_state.best_val_nll})
        self.run_log.hparams(flat_hparams(self.config), {
            "hparam/best_val_nll": self.train_state.best_val_nll, "hparam/test_nll": test["nll"],
            "hparam/test_mae": test["mae"], "hparam/test_coverage_90": test["coverage_90"],
            "hparam/test_skill": test["skill"]})
        log.info("finished at step %d (%s): best validation NLL %.4f, test NLL %.4f (%s)",
                 self.train_state.step, self.stop_reason or "completed",
                 self.train_state.best_val_nll, test["nll"], describe_skill(test))
        stop_if_any_rank_failed_to_write()    # the final model, test line and summaries
        log.info("logs: %s   checkpoints: %s   analyse with: python launch/analyze.py --log_dir %s",
                 self.run_context.log_dir, self.checkpoints.folder, self.run_context.log_dir)
        return 0
