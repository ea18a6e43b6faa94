"""`python launch/evaluate.py --checkpoint checkpoints/<exp>/best_model.pth [--split test|val]
[--out file.json]` (also the `celestial-evaluate` console script).

Rebuilds the split from the data the model was trained on (the config saved in the model file;
`--data` if the file moved), checks that its training rows give the scaling statistics saved
with the model (else the data changed since training), and scores the model and the naive
baselines on the same windows in one process: NLL, CRPS, MAE of the median and coverage, overall,
per target and per horizon step; skill against each baseline with its 95% interval and
Diebold-Mariano p-value (stats/intervals.py); and the NLL rise with every body blanked. Prints a
table and writes JSON (default: `<model file stem>_<split>_evaluation.json` beside the model file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from trainer.data import PreparedData, WindowDataset, build_loader, prepare
from trainer.distributed import pick_device
from trainer.errors import UserError
from trainer.evaluate import FORECASTERS, celestial_effect, evaluate
from trainer.forecast import run_command
from trainer.forecast_model import SCALING_KEYS, LoadedModel, input_data, load_model_file
from trainer.run_log import json_safe
from trainer.scoring import BASELINE_NAMES, SCORES, skill_metrics

FORECASTER_NAMES = {"model": "model", **BASELINE_NAMES}
INTERVAL = ("95% studentised interval, HAC (Bartlett) variance over overlapping windows, t with "
            "df from the independent blocks; shown only if it excludes 0 on at least 8 blocks")


def rebuild_data(loaded: LoadedModel, data_file: Path | None) -> PreparedData:
    """The training-time data, checked to be what the model was trained on."""
    data_config = input_data(loaded, data_file)
    prepared = prepare(data_config, loaded.seq_len, loaded.pred_len)
    path = data_config.resolved_path()
    if prepared.spec.feature_names != loaded.spec.feature_names or \
            prepared.spec.targets != loaded.spec.targets:
        raise UserError(f"{path}: its columns are not those the model was trained on "
                        f"(targets {prepared.spec.targets} vs {loaded.spec.targets}, "
                        f"{len(prepared.spec.feature_names)} vs {len(loaded.spec.feature_names)} "
                        f"feature columns)")
    _check_same_scaling(loaded, prepared, path)
    return prepared


def _check_same_scaling(loaded: LoadedModel, prepared: PreparedData, path: Path) -> None:
    saved = dict(zip(SCALING_KEYS, (loaded.feature_mean, loaded.feature_std,
                                    loaded.target_mean, loaded.target_std)))
    names = {"feature": loaded.spec.feature_names, "target": loaded.spec.targets}
    for key, now in prepared.scaling().items():
        now = np.asarray(now)
        differs = ~np.isclose(now, saved[key], rtol=1e-9, atol=1e-12)
        if differs.any():
            i = int(np.argmax(differs))
            column = names[key.split("_")[0]][i]
            raise UserError(f"{path}: the data file changed since training: the training rows "
                            f"give {key.split('_')[1]} {now[i]:.8g} for column {column!r}, the "
                            f"model file {loaded.path} saved {saved[key][i]:.8g}")


def score_split(loaded: LoadedModel, prepared: PreparedData, split: str, device) -> dict:
    """The flat metrics the trainer logs (with `_by_horizon`), skill and the blank-all rise."""
    config, model = loaded.config, loaded.model
    dataset = WindowDataset(prepared, split, loaded.seq_len, loaded.pred_len,
                            config.data.window_stride)
    loader = build_loader(dataset, config.data, rank=0, world_size=1, seed=config.train.seed,
                          train=False)

    def evaluate_fn(_split: str, **kwargs) -> dict:
        return evaluate(model, loader, device, prepared.target_std, **kwargs)

    metrics = evaluate_fn(split, with_series=True, per_horizon=True)
    metrics.update(celestial_effect(evaluate_fn, split, loaded.spec, loaded.pred_len,
                                    config.data.window_stride, base=metrics))
    metrics.update(skill_metrics(metrics.pop("series"), loaded.pred_len, config.data.window_stride))
    origin_rows = dataset.starts[[0, -1]] + loaded.seq_len - 1   # a window's last observed row
    metrics["first_date"], metrics["last_date"] = (str(prepared.dates[int(r)]) for r in origin_rows)
    return metrics


def _key(name: str, score: str) -> str:
    return score if name == "model" else f"{name}_{score}"


def _forecaster_scores(flat: dict, name: str, targets: list[str]) -> dict:
    """One forecaster's scores: overall, per target, and per target per horizon step."""
    return {"description": FORECASTER_NAMES[name],
            **{s: flat[_key(name, s)] for s in SCORES},
            "per_target": {t: {s: flat[f"{_key(name, s)}_per_target"][i] for s in SCORES}
                           for i, t in enumerate(targets)},
            "by_horizon": {t: {s: [row[i] for row in flat[f"{_key(name, s)}_by_horizon"]]
                               for s in SCORES} for i, t in enumerate(targets)}}


def difference_entry(flat: dict, name: str) -> dict:
    """One paired difference of the flat metrics (trainer.scoring.difference_metrics) as a dict."""
    return {"mean": flat[name], **{k: flat[f"{name}_{k}"]
                                   for k in ("low", "high", "shown", "reason", "dm_pvalue")}}


def report(loaded: LoadedModel, data_file: Path, split: str, flat: dict) -> dict:
    """The JSON document: per forecaster, per target and per horizon step, keyed by name."""
    targets = loaded.spec.targets
    forecasters = {name: _forecaster_scores(flat, name, targets) for name in FORECASTERS}
    skill = {b: difference_entry(flat, f"skill_{b}") for b in FORECASTERS[1:]}
    return {
        "checkpoint": str(loaded.path), "step": loaded.step, "data": str(data_file),
        "split": split, "first_date": flat["first_date"], "last_date": flat["last_date"],
        "num_windows": flat["num_windows"], "horizon_steps": loaded.pred_len, "targets": targets,
        "units": "nll and crps in scaled target units (training std), mae in target units",
        "forecasters": forecasters,
        "skill": {"definition": "model NLL minus baseline NLL on the same windows (negative: "
                                f"the model is better), {INTERVAL}",
                  "block_length_windows": flat["skill_block_length"],
                  "best_baseline": flat["best_baseline"], **skill},
        "celestial_effect": {
            "definition": "model NLL with every body's columns blanked minus without (positive: "
                          f"the celestial inputs help), {INTERVAL}",
            **difference_entry(flat, "blank_all_rise"),
            "per_target": dict(zip(targets, flat["blank_all_rise_per_target"]))},
        "model_mixture": {k: flat[k] for k in ("effective_components", "sigma_at_floor")},
    }


def table_lines(doc: dict) -> list[str]:
    """A readable summary of the report."""
    lines = [(f"{doc['checkpoint']} (step {doc['step']}) on the {doc['split']} split of "
              f"{doc['data']}: {doc['num_windows']} windows, origins {doc['first_date']} to "
              f"{doc['last_date']}, {doc['horizon_steps']} steps, {len(doc['targets'])} targets"),
             "", (f"{'forecaster':<34}{'nll':>9}{'crps':>9}{'mae':>10}{'cover 50%':>11}"
                 f"{'cover 90%':>11}")]
    for f in doc["forecasters"].values():
        lines.append(f"{f['description']:<34}{f['nll']:>9.4f}{f['crps']:>9.4f}{f['mae']:>10.4g}"
                     f"{f['coverage_50']:>11.3f}{f['coverage_90']:>11.3f}")
    lines += ["", "NLL per target" + "".join(f"{n:>10}" for n in doc["forecasters"])]
    for t in doc["targets"]:
        lines.append(f"{t:<14}" + "".join(f"{f['per_target'][t]['nll']:>10.4f}"
                                          for f in doc["forecasters"].values()))
    skill = doc["skill"]
    lines += ["", (f"skill = model NLL - baseline NLL (negative: the model is better), 95% "
                   f"studentised HAC interval, blocks of {skill['block_length_windows']} windows, "
                   f"Diebold-Mariano p:")]
    for b in FORECASTERS[1:]:
        verdict = (skill[b]["reason"] if not skill[b]["shown"]
                   else "better" if skill[b]["high"] < 0 else "worse")
        lines.append(f"  vs {FORECASTER_NAMES[b]:<32}{skill[b]['mean']:+.4f} "
                     f"[{skill[b]['low']:+.4f}, {skill[b]['high']:+.4f}]  "
                     f"p {skill[b]['dm_pvalue']:.3g}  {verdict}")
    e = doc["celestial_effect"]
    helps = ("the celestial inputs help" if e["shown"] and e["low"] > 0
             else "no proof the celestial inputs help")
    lines.append(f"all bodies blanked: NLL rise {e['mean']:+.4f} [{e['low']:+.4f}, "
                 f"{e['high']:+.4f}]  ({helps})")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/evaluate.py", description="Score a trained "
                                     "model file against the naive baselines on a split.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a consolidated model file, e.g. checkpoints/<exp>/best_model.pth")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--out", type=Path, help="JSON file (default: <model file stem>_<split>"
                                                 "_evaluation.json beside the model file)")
    parser.add_argument("--data", type=Path, help="the training data file, if it moved since "
                        "training (it must hold the same data)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def evaluate_command(args: argparse.Namespace) -> list[str]:
    device = pick_device(args.device, 0)
    loaded = load_model_file(args.checkpoint, device)
    prepared = rebuild_data(loaded, args.data)
    data_file = args.data or loaded.config.data.resolved_path()
    doc = report(loaded, data_file, args.split, score_split(loaded, prepared, args.split, device))
    out = args.out or args.checkpoint.with_name(
        f"{args.checkpoint.stem}_{args.split}_evaluation.json")
    out.parent.mkdir(parents=True, exist_ok=True)      # only now: nothing written on bad input
    out.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False))
    return [*table_lines(doc), f"wrote {out}"]


def run(argv: list[str] | None = None) -> int:
    """Evaluate; returns the exit status (0 done, 2 bad input)."""
    return run_command(evaluate_command, parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
