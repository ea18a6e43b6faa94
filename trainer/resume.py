"""Resuming a run: which checkpoint (and whether it belongs to this run), loading it into the
parts, applying what the resumed run's config changed, and the note when the number of ranks
changed.

A checkpoint fits a run when it is intact and safe to load (`checkpoint.verify`) and has the
run's model config (regularisation strengths may change), data layout (bodies, targets, feature
columns) and, for `--resume auto`, experiment. `--resume auto` takes the newest fitting
checkpoint of the experiment and skips the others with a warning; when checkpoints exist but
none fits, the run stops (starting fresh would bury them). `--resume <folder>` takes that folder
or refuses it. Rank 0 decides and broadcasts its verdict, so a refusal stops every rank at once
with the same one-line error.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from trainer import distributed
from trainer.checkpoint.manager import CheckpointManager, typed_folder, verify
from trainer.checkpoint.manifest import complete_checkpoints_in, read_inside, read_manifest, step_of
from trainer.checkpoint.state import checkpointed_state
from trainer.config import Config, parse_yaml
from trainer.errors import UserError
from trainer.optim import apply_optim_settings, set_total_steps

if TYPE_CHECKING:
    from model.config import InputSpec
    from trainer.step import TrainStep
    from trainer.train_state import TrainState

log = logging.getLogger(__name__)
LAYOUT_FILE = "layout.json"
# Model keys that shape no parameter: a resumed run may change them (the run's value applies).
REGULARISATION_KEYS = ("dropout", "body_dropout", "kl_weight")
_LAYOUT_KEYS = ("bodies", "targets", "feature_names", "body_columns")
_MAX_TEXT_BYTES = 1 << 20      # config.yaml and layout.json hold a few KB


@dataclass
class RunIdentity:
    """What a checkpoint must share with the run that resumes it."""
    experiment: str
    model: dict
    layout: dict       # _LAYOUT_KEYS of the data's InputSpec; {} if unknown (older checkpoints)

    @classmethod
    def of(cls, config, spec) -> RunIdentity:
        spec_dict = spec.to_dict()
        return cls(config.train.experiment_name, config.to_dict()["model"],
                   {k: spec_dict[k] for k in _LAYOUT_KEYS})


def checkpoint_files(config, spec) -> dict[str, str]:
    """The text files a checkpoint carries beside its shards, to be checked before loading."""
    return {"config.yaml": config.to_yaml(),
            LAYOUT_FILE: json.dumps(RunIdentity.of(config, spec).layout)}


def saved_config(folder: Path) -> dict:
    """The config a checkpoint was saved with (safe YAML: plain data only, bounded)."""
    data = parse_yaml(read_inside(folder, "config.yaml", _MAX_TEXT_BYTES).decode(),
                      str(folder / "config.yaml"))
    if not isinstance(data, dict):
        raise TypeError("config.yaml is not a mapping")
    return data


def saved_identity(folder: Path) -> RunIdentity:
    config = saved_config(folder)
    try:
        layout = json.loads(read_inside(folder, LAYOUT_FILE, _MAX_TEXT_BYTES))
    except FileNotFoundError:
        layout = {}
    if not layout:     # saved before layout.json existed: the targets at least are known
        layout = {"targets": config.get("data", {}).get("targets")}
    return RunIdentity(str(config.get("train", {}).get("experiment_name")),
                       config.get("model", {}), layout)


def _brief(value) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(map(repr, value[:3]))}, ... ({len(value)} in all)]"
    return repr(value)


def fit_problem(folder: Path, expected: RunIdentity, other_experiment_ok: bool) -> str | None:
    """None if checkpoint `folder` fits the run; else the reason, for one line."""
    try:
        saved = saved_identity(folder)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as err:
        return f"unreadable config.yaml or {LAYOUT_FILE} ({str(err).splitlines()[0]})"
    for key, value in expected.model.items():
        if key not in REGULARISATION_KEYS and saved.model.get(key) != value:
            return (f"another model config (model.{key}: checkpoint {saved.model.get(key)!r}, "
                    f"this run {value!r})")
    for key, value in saved.layout.items():
        if expected.layout.get(key) != value:
            return (f"another data layout ({key}: checkpoint {_brief(value)}, this run "
                    f"{_brief(expected.layout.get(key))})")
    if saved.experiment != expected.experiment and not other_experiment_ok:
        return f"it belongs to experiment {saved.experiment!r}, not {expected.experiment!r}"
    return None


def find_resumable(manager: CheckpointManager, requested: str, expected: RunIdentity,
                   fallback: Path | None = None) -> Path | None:
    """Resolve `--resume` ("auto" or a folder) to a checkpoint that fits, agreed by all ranks;
    None to start fresh. `fallback`: a folder to use when the experiment has no checkpoint of
    its own yet (a restarted worker of a run started with `--resume <folder>`).
    Raises UserError (on every rank) when the request cannot be met."""
    verdict = _decide(manager, requested, expected, fallback) if distributed.is_main() else None
    verdict = distributed.broadcast_object(verdict)
    if verdict.get("error"):
        raise UserError(verdict["error"])
    folder = Path(verdict["folder"]) if verdict.get("folder") else None
    if folder is not None and distributed.is_main():
        log_membership_change(folder)
    return folder


def saved_world_size(folder: Path) -> int | None:
    """How many ranks saved checkpoint `folder` (None if its manifest does not say)."""
    manifest, _ = read_manifest(folder)
    size = manifest.get("world_size") if manifest else None
    return size if type(size) is int else None


def log_membership_change(folder: Path) -> None:
    """Say so when the run resumes on another number of ranks than saved `folder`: a host lost
    or regained under `torchrun --nnodes=MIN:MAX`, or a resubmission on other nodes. The epoch
    goes on from the sample where the checkpoint stopped (ResumableDistributedSampler)."""
    saved, now = saved_world_size(folder), distributed.world_size()
    if saved is not None and saved != now:
        log.info("world size %d -> %d: resuming from %s at step %d, the epoch from the sample "
                 "where it stopped", saved, now, folder, step_of(folder))


def _decide(manager, requested, expected, fallback) -> dict:
    """Rank 0's verdict; never raises, since every other rank waits for it."""
    try:
        if requested == "auto":
            return _decide_auto(manager, expected, fallback)
        return _decide_explicit(manager, Path(requested), expected)
    except Exception as err:  # noqa: BLE001 - any surprise must still reach every rank
        return {"error": f"--resume {requested}: could not be checked "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"}


def _decide_auto(manager, expected, fallback) -> dict:
    candidates = manager.resume_candidates()
    first_problem = None
    for candidate in candidates:
        problem = verify(candidate) or fit_problem(candidate, expected, other_experiment_ok=False)
        if problem is None:
            return {"folder": str(candidate)}
        first_problem = first_problem or f"{candidate.name}: {problem}"
        log.warning("--resume auto: skipping checkpoint %s: %s", candidate, problem)
    if fallback is not None:
        log.info("no usable checkpoint of this run yet: the restarted worker resumes from %s, the "
                 "folder the run was started from", fallback)
        return _decide_explicit(manager, fallback, expected, restarting=True)
    if candidates:
        return {"error": f"--resume auto: none of the {len(candidates)} checkpoint(s) in "
                         f"{manager.folder} is usable (newest: {first_problem}); move them away "
                         f"or choose another --experiment_name"}
    return {"folder": None}


def _decide_explicit(manager, folder: Path, expected, restarting: bool = False) -> dict:
    folder = typed_folder(folder)
    if not folder.is_dir():
        return {"error": f"--resume {folder}: not a folder"}
    mistaken = _not_a_checkpoint(folder, manager)
    if mistaken:
        return {"error": f"--resume {folder}: {mistaken}"}
    own = _is_inside(folder, manager.folder)
    problem = verify(folder) or fit_problem(folder, expected, other_experiment_ok=not own)
    if problem is None and not restarting:
        problem = _would_bury(manager, folder, own)
    if problem:
        return {"error": f"--resume {folder}: {problem}"}
    saved = saved_identity(folder).experiment
    if saved != expected.experiment:
        log.warning("experiment %r starts from checkpoint %s of experiment %r", expected.experiment,
                    folder, saved)
    return {"folder": str(folder)}


LOG_FOLDER_FILES = ("metrics.jsonl", "training_full.log")


def _not_a_checkpoint(folder: Path, manager: CheckpointManager) -> str | None:
    """What `folder` is when it is a run's log folder or an experiment's checkpoint folder
    rather than one checkpoint, and which folder to pass instead."""
    if any((folder / name).is_file() for name in LOG_FOLDER_FILES):
        return f"this is a log folder, not a checkpoint; {_checkpoints_of(folder, manager)}"
    inside = complete_checkpoints_in(folder)
    if inside:
        return (f"this is an experiment's checkpoint folder, not a checkpoint: pass one of its "
                f"checkpoints (newest: {inside[0]}), or --resume auto")
    return None


def _checkpoints_of(log_folder: Path, manager: CheckpointManager) -> str:
    """Where the checkpoints of the run that wrote `log_folder` are, in words."""
    try:
        root = saved_config(log_folder).get("checkpoint", {}).get("root")
    except (OSError, TypeError, AttributeError, yaml.YAMLError):
        root = None
    checkpoints = Path(root or manager.folder.parent) / log_folder.name
    newest = complete_checkpoints_in(checkpoints)
    if not newest:
        return f"no checkpoint of it was found in {checkpoints}"
    return (f"its newest checkpoint is {newest[0]} (or continue the run with --resume auto "
            f"--experiment_name {log_folder.name})")


def _is_inside(folder: Path, parent: Path) -> bool:
    return folder.resolve().parent == parent.resolve()


def _would_bury(manager, folder: Path, own: bool) -> str | None:
    """Resuming from an older point (or from elsewhere) while the experiment has newer usable
    checkpoints would overwrite or prune them, and a restart would pick them up: refused.
    (Damaged ones are skipped by every resume and may be replaced.)"""
    step = step_of(folder)
    newer = [c for c in manager.complete_checkpoints()
             if (not own or (c.resolve() != folder.resolve() and step_of(c) >= step))
             and verify(c) is None]
    if not newer:
        return None
    return (f"experiment {manager.folder.name!r} already has {newer[0].name}, which "
            f"resuming from here would overwrite or prune: continue it with --resume auto, or "
            f"start from this folder under another --experiment_name")


def check_experiment_folder(checkpoints: CheckpointManager, resume: str, name: str) -> None:
    if not resume and checkpoints.complete_checkpoints():
        raise UserError(f"experiment {name!r} already has checkpoints in {checkpoints.folder}: "
                        f"pass --resume auto to continue it, or choose another --experiment_name")


def resume_request(config: Config) -> tuple[str, Path | None]:
    """(what to resume from, fallback folder). A worker restarted by torchrun continues from
    the newest checkpoint of the experiment, even when the run was started with
    `--resume <folder>`: that folder is only the fallback until the run has saved its own
    (it may be pruned by then)."""
    requested = config.train.resume
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return requested, None
    return "auto", Path(requested) if requested not in ("", "auto") else None


def resume_if_asked(config: Config, step: TrainStep, train_state: TrainState,
                    checkpoints: CheckpointManager, spec: InputSpec) -> Path | None:
    """Load the checkpoint `train.resume` asks for into the step and the train state; returns
    its folder (None: a fresh start). Refusals are one-line UserErrors on every rank."""
    resume, fallback = resume_request(config)
    if not resume:
        return None
    folder = find_resumable(checkpoints, resume, RunIdentity.of(config, spec), fallback)
    if folder is None:
        log.info("--resume auto: no usable checkpoint in %s (none saved yet), starting fresh",
                 checkpoints.folder)
        return None
    load_checkpoint(folder, config, step, train_state, checkpoints)
    return folder


def load_checkpoint(folder: Path, config: Config, step: TrainStep, train_state: TrainState,
                    checkpoints: CheckpointManager) -> None:
    """Load the checkpoint in `folder` into the parts; what this run's config changed (the
    optimizer settings, the run length) applies over it."""
    planned = replace(train_state)
    checkpoints.load(folder, {"app": checkpointed_state(step, train_state, config)})
    log.info("resumed from %s at step %d (epoch %d, %d samples into it)", folder,
             train_state.step, train_state.epoch, train_state.epoch_position)
    apply_changed_settings(step, config, saved_config(folder))
    keep_planned_length(train_state, planned, step.scheduler)


def apply_changed_settings(step: TrainStep, config: Config, saved: dict) -> None:
    """A checkpoint restores its own optimizer hyperparameters and LR schedule; settings the
    resumed run changed are applied over them (and logged), never silently dropped."""
    now = config.to_dict()
    changed_optim = {k: (saved.get("optim", {}).get(k), v) for k, v in now["optim"].items()
                     if saved.get("optim", {}).get(k) != v}
    changed_model = {k: (saved.get("model", {}).get(k), now["model"][k]) for k in
                     REGULARISATION_KEYS if saved.get("model", {}).get(k) != now["model"][k]}
    if changed_optim:
        apply_optim_settings(step.optimizer, step.scheduler, config.optim)
    for key, (old, new) in [*(("optim." + k, v) for k, v in changed_optim.items()),
                            *(("model." + k, v) for k, v in changed_model.items())]:
        log.info("%s changed on resume (checkpoint %s, this run %s): applied", key, old, new)


def keep_planned_length(train_state: TrainState, planned: TrainState, scheduler) -> None:
    """A resumed run keeps its length (and LR schedule) unless `epochs`/`max_steps` changed."""
    if train_state.length_setting == planned.length_setting:
        return
    log.info("run length changed on resume (%s -> %s): %d steps in all, the LR schedule "
             "follows the new length", train_state.length_setting, planned.length_setting,
             planned.total_steps)
    train_state.total_steps = planned.total_steps
    train_state.length_setting = planned.length_setting
    set_total_steps(scheduler, planned.total_steps)
