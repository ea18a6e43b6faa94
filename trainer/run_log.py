"""What a run writes as it goes: the text log, metrics.jsonl, TensorBoard scalars, the bar.

Rank 0 logs to the console and `training_full.log`; other ranks append only their warnings to
the same file (prefixed with their rank). `RunLog` is a no-op on ranks other than 0.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _HideProgressLines(logging.Filter):
    """On a terminal the bar shows progress: keep per-interval lines out of the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "progress_line", False)


def progress_bar_wanted(enabled: bool) -> bool:
    return enabled and sys.stderr.isatty()


def setup_logging(log_dir: Path | None, rank: int, progress_bar: bool = True) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "celestial", False)]:
        root.removeHandler(handler)     # ours from an earlier run in this process
        handler.close()
    root.setLevel(logging.INFO)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(_FORMAT.replace("%(message)s", prefix + "%(message)s"))
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    if progress_bar_wanted(progress_bar):
        console.addFilter(_HideProgressLines())
    console.celestial = True
    root.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_dir / "training_full.log")
        file_handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        file_handler.setFormatter(formatter)
        file_handler.celestial = True
        root.addHandler(file_handler)
    logging.captureWarnings(True)
    # Expected when training in one process: DCP then saves without a process group.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar of rank 0."""

    def __init__(self, log_dir: Path | None, total_steps: int, start_step: int,
                 tensorboard: bool, progress_bar: bool) -> None:
        self.enabled = log_dir is not None
        self.log_dir = log_dir
        self._jsonl = open(log_dir / "metrics.jsonl", "a") if self.enabled else None
        self.writer = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (self.enabled and progress_bar_wanted(progress_bar)), mininterval=1.0,
                        file=sys.stderr)

    def record(self, kind: str, step: int, values: dict) -> None:
        """One line of metrics.jsonl and the matching TensorBoard scalars (`<kind>/<name>`)."""
        if not self.enabled:
            return
        line = {"kind": kind, "step": step, "time": round(time.time(), 3),
                **{k: _clean(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        self.scalars(kind, step, values)

    def scalars(self, prefix: str, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's key settings with its final metrics, in TensorBoard's HParams tab."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        values = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
        finite = {k: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        experiment, session_start, session_end = hparams_summary(values, finite)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)
        for name, value in finite.items():
            self.writer.add_scalar(name, value)

    def advance(self, steps: int = 1, **postfix) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
