"""What a run writes as it goes: the text log, metrics.jsonl, TensorBoard scalars, the bar.

Rank 0 logs to the console and `training_full.log`; other ranks append only their warnings to
the same file (prefixed with their rank). `RunLog` is a no-op on ranks other than 0.
What is logged before the run folder exists (while the inputs are checked) is held and written
to `training_full.log` when the folder is created, so a run refused for bad input creates nothing.

A failed write of a log or record (a full disk) is not raised where it happens, on the one rank
that writes: it is held (`note_write_failure`) until the next point where all ranks agree
(`write_failure()`), so every rank stops with the same one-line error instead of rank 0 dying
and the others waiting in a collective.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

from tqdm import tqdm

from trainer import distributed
from trainer.errors import WriteFailed

_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_log = logging.getLogger(__name__)


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


FALLBACK_TERMINAL_SIZE = (80, 24)


def terminal_size() -> tuple[int, int] | None:
    """(columns, lines) of the terminal on stderr when it reports a size; None where it reports
    zero (COLUMNS=0, or a pseudo-terminal whose size was never set, as in some CI and container
    consoles) or none."""
    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):
        return None
    if os.environ.get("COLUMNS") == "0" or columns <= 0 or lines <= 0:
        return None
    return columns, lines


def make_bar(enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr. Where the terminal reports no size, tqdm would draw it -1 columns
    wide on row -1 and hide it: it is drawn 80x24 instead."""
    if terminal_size() is None:
        columns, lines = FALLBACK_TERMINAL_SIZE
        kwargs.update(ncols=columns - 1, nrows=lines - 1, dynamic_ncols=False)
    else:
        kwargs.update(dynamic_ncols=True)
    return tqdm(disable=not progress_bar_wanted(enabled), file=sys.stderr, **kwargs)


def counted(count: int, unit: str) -> str:
    """`12 batches`, `1 pass`."""
    plural = unit + ("es" if unit.endswith(("s", "ch")) else "s")
    return f"{count} {unit if count == 1 else plural}"


# --- write failures held until the ranks agree --------------------------------------------------

_write_failure: str | None = None


def note_write_failure(path, err: OSError) -> None:
    """Hold the first failed write of this process (see the module docstring)."""
    global _write_failure
    if _write_failure is None:
        _write_failure = f"cannot write {path}: {err.strerror or err}"


def write_failure() -> str | None:
    """This process's held write failure, if any (agree on it across ranks before acting)."""
    return _write_failure


def clear_write_failure() -> None:
    global _write_failure
    _write_failure = None


def _hold_thread_write_failures(args) -> None:
    """threading.excepthook: TensorBoard writes from a thread of its own; its failed write is
    held like any other instead of printing a thread traceback."""
    if issubclass(args.exc_type, OSError):
        frames = traceback.extract_tb(args.exc_traceback)
        writer = "TensorBoard's event file" if any("tensorboard" in f.filename for f in frames) \
            else f"a file written by thread {args.thread.name}"
        note_write_failure(getattr(args.exc_value, "filename", None) or writer, args.exc_value)
    else:
        _default_thread_hook(args)


_default_thread_hook = threading.excepthook


def stop_if_any_rank_failed_to_write() -> None:
    """Collective: if any rank holds a write failure, every rank raises WriteFailed with it."""
    _raise_write_failed(distributed.agree_on_failure(_write_failure))


def raise_agreed_write_failure() -> None:
    """Collective, once the ranks agreed (in an all-reduce shared with other flags) that one
    holds a write failure: all raise it."""
    _raise_write_failed(distributed.agree_on_failure(_write_failure, known_failed=True))


def _raise_write_failed(failures: list[str]) -> None:
    if failures:
        raise WriteFailed(f"{failures[0]}; checkpoints already written are intact: make room, "
                          f"then continue from the newest with --resume auto")


@contextmanager
def guarded_write(path, leftover: Path | None = None):
    """Run a write; an OSError is held for the next agreement, and `leftover` (a half-written
    temporary file) is removed."""
    try:
        yield
    except OSError as err:
        note_write_failure(path, err)
        if leftover is not None:
            with suppress(OSError):     # its folder is gone or unreadable: nothing to clean
                leftover.unlink(missing_ok=True)


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, then one rename, so that a
    reader (the analysis, another worker) sees the old file or the new one, never part of one.
    On an error the temporary file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        with suppress(OSError):     # its folder is gone or unreadable: nothing to clean
            tmp.unlink(missing_ok=True)
        raise


# --- the text log ---------------------------------------------------------------------------------

class _RunFileHandler(logging.FileHandler):
    """training_full.log: a failed write is held (see above), not printed as a logging traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            note_write_failure(self.baseFilename, err)
        else:
            super().handleError(record)

    def close(self) -> None:
        with guarded_write(self.baseFilename):
            super().close()


class _HoldUntilFolder(logging.Handler):
    """What is logged before the run folder exists, for training_full.log once it does."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)


def _our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "celestial", False)]


def _add(handler: logging.Handler, rank: int) -> None:
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(_FORMAT.replace("%(message)s", prefix + "%(message)s")))
    handler.celestial = True
    logging.getLogger().addHandler(handler)


def setup_logging(log_dir: Path | None, rank: int, progress_bar: bool = True) -> None:
    """Console logging now; training_full.log in `log_dir` now, or (log_dir None) whatever is
    logged until `open_log_file()` creates the run folder."""
    root = logging.getLogger()
    for handler in _our_handlers():
        root.removeHandler(handler)     # ours from an earlier run in this process
        handler.close()
    clear_write_failure()
    threading.excepthook = _hold_thread_write_failures
    root.setLevel(logging.INFO)
    level = logging.INFO if rank == 0 else logging.WARNING
    console = _TqdmHandler()
    console.setLevel(level)
    if progress_bar_wanted(progress_bar):
        console.addFilter(_HideProgressLines())
    _add(console, rank)
    _add(_HoldUntilFolder(level), rank)
    if log_dir is not None:
        open_log_file(log_dir, rank)
    logging.captureWarnings(True)
    # Expected when training in one process: DCP then saves without a process group.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")


def open_log_file(log_dir: Path, rank: int) -> None:
    """Create the run folder and training_full.log, starting with what was held so far."""
    root = logging.getLogger()
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = _RunFileHandler(log_dir / "training_full.log")
    file_handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    _add(file_handler, rank)
    for holder in [h for h in _our_handlers() if isinstance(h, _HoldUntilFolder)]:
        root.removeHandler(holder)
        for record in holder.held:
            file_handler.handle(record)


def log_error_to_file(message: str, exc_info=None) -> None:
    """Put the error that ends a run into training_full.log (when the run folder exists)
    without printing it again on the console, where the entry point prints it once."""
    if exc_info is True:
        exc_info = sys.exc_info()
    record = logging.getLogger("trainer").makeRecord(
        "trainer", logging.ERROR, __file__, 0, "%s", (message,), exc_info)
    for handler in _our_handlers():
        if isinstance(handler, _RunFileHandler):
            handler.handle(record)


# --- records that survive crashes ---------------------------------------------------------------

def repair_partial_last_line(path: Path) -> int:
    """Cut a JSONL file back to its last complete line; returns the bytes removed.

    A crash (or a full disk) mid-write can leave a partial last line; the next line appended
    after a resume would be glued to it and both would be lost to a reader."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    removed = len(data) - keep
    _log.warning(
        "%s: removed a partial last line (%d bytes, left by a crash or a full disk): %r",
        path, removed, data[keep:keep + 60].decode("utf-8", "replace"))
    return removed


def repair_jsonl_files(log_dir: Path) -> None:
    """Repair every JSONL file the run appends to, before appending again."""
    for path in sorted(log_dir.rglob("*.jsonl")):
        if path.is_file():
            repair_partial_last_line(path)


def json_safe(value):
    """The one JSON encoding of non-finite floats in this project's files: NaN and infinities
    become null (strict JSON readers reject the NaN tokens Python would write), recursively.
    Readers map null to NaN; files written before this encoding carried +-inf as +-1e308."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _exactly(*tags: str) -> list[str]:
    """Custom-scalar multiline charts match tags as regular expressions: match these only."""
    return [f"^{tag}$" for tag in tags]


def _forecast_charts(split: str, name: str) -> dict[str, list]:
    """The model's scores with the baselines' in one chart each, and the skill's interval."""
    kept = ("val_kept",) if split == "val" else ()     # restored best weights, at their step
    kept_note = " (val_kept: the weights the run kept)" if kept else ""
    return {
        f"{name} NLL: model vs random walk and EWMA random walk{kept_note}": [
            "Multiline", _exactly(*(f"{s}/nll" for s in (split, *kept)), f"{split}/rw_nll",
                                  f"{split}/ewma_nll")],
        f"{name} CRPS: model vs random walk and EWMA random walk": [
            "Multiline", _exactly(f"{split}/crps", f"{split}/rw_crps", f"{split}/ewma_crps")],
        f"{name} skill vs the better baseline (nats, below 0: the model is better), 95% "
        f"interval": ["Margin", [f"{split}/skill", f"{split}/skill_low", f"{split}/skill_high"]],
    }


# TensorBoard's Custom Scalars tab (torch.utils.tensorboard's layout: category -> chart -> tags)
CUSTOM_SCALARS = {"forecast vs baselines (validation)": _forecast_charts("val", "validation"),
                  "forecast vs baselines (test)": _forecast_charts("test", "test")}


class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar of rank 0."""

    def __init__(self, log_dir: Path | None, total_steps: int, start_step: int,
                 tensorboard: bool, progress_bar: bool) -> None:
        self.enabled = log_dir is not None
        self.log_dir = log_dir
        self._jsonl, self.writer = None, None
        if self.enabled:    # a failure is held: build_trainer agrees on it across ranks
            with guarded_write(log_dir / "metrics.jsonl"):
                repair_jsonl_files(log_dir)
                # the append handle lives as long as the logger: closed by close()
                self._jsonl = open(log_dir / "metrics.jsonl", "a")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                with guarded_write(log_dir / "tensorboard"):
                    self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        self.show_bars = self.enabled and progress_bar
        self.bar = make_bar(self.show_bars, total=total_steps, initial=start_step,
                                unit="step", mininterval=1.0)

    def record(self, kind: str, step: int, values: dict, *, tag: str | None = None,
               weights_step: int | None = None) -> None:
        """One line of metrics.jsonl and the matching TensorBoard scalars (`<tag>/<name>`, the
        tag defaulting to `kind`). `weights_step`: the step whose weights were scored, written
        into the line; the scalars are drawn at that step, not at `step`."""
        if not self.enabled:
            return
        line = {"kind": kind, "step": step, "time": round(time.time(), 3),
                **({} if weights_step is None else {"weights_step": weights_step}),
                **json_safe(values)}
        if self._jsonl is not None and write_failure() is None:   # no appending after a failure
            with guarded_write(self.log_dir / "metrics.jsonl"):
                self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
                self._jsonl.flush()
        self.scalars(tag or kind, step if weights_step is None else weights_step, values)

    def scalars(self, prefix: str, step: int, values: dict) -> None:
        if self.writer is None:
            return
        with guarded_write(self.log_dir / "tensorboard"):
            for name, value in values.items():
                is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if is_number and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def describe(self, config_yaml: str) -> None:
        """TensorBoard's Custom Scalars layout (CUSTOM_SCALARS) and the resolved config as text
        (`config/text_summary`, a code block in the Text tab)."""
        if self.writer is None:
            return
        with guarded_write(self.log_dir / "tensorboard"):
            self.writer.add_custom_scalars(CUSTOM_SCALARS)
            self.writer.add_text("config", "".join(f"    {line}\n"
                                                   for line in config_yaml.splitlines()))

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's key settings with its final metrics, in TensorBoard's HParams tab."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        values = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
        finite = {k: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        experiment, session_start, session_end = hparams_summary(values, finite)
        with guarded_write(self.log_dir / "tensorboard"):
            file_writer = self.writer._get_file_writer()
            for summary in (experiment, session_start, session_end):
                file_writer.add_summary(summary)
            for name, value in finite.items():
                self.writer.add_scalar(name, value)

    @contextmanager
    def phase(self, what: str, total: int, unit: str = "batch"):
        """Work between training steps (validation, attribution, test): a log line saying what
        runs and how much of it, and a bar of its own below the training bar, gone when done.
        Yields the bar: call its `update()` per `unit` done."""
        if self.enabled:
            _log.info("%s: %s", what, counted(total, unit))
        bar = make_bar(self.show_bars, total=total, desc=what.split(" ")[0], unit=unit,
                           leave=False, mininterval=1.0)
        try:
            yield bar
        finally:
            bar.close()

    def advance(self, steps: int = 1, **postfix) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self._jsonl is not None:
            with guarded_write(self.log_dir / "metrics.jsonl"):
                self._jsonl.close()
        if self.writer is not None:
            with guarded_write(self.log_dir / "tensorboard"):
                self.writer.flush()
                self.writer.close()
