"""`python launch/evaluate.py --checkpoint checkpoints/<exp>/best_model.pth [--split test|val]
[--out file.json] [--windows windows.csv]` (also the `celestial-evaluate` console script).

Rebuilds the split from the data the model was trained on (the config saved in the model file;
`--data` if the file moved; it must exist), checks that its training rows give the scaling
statistics saved with the model (else the data changed since training), and scores the model and
the naive baselines on the same windows in one process: every score of scoring/scores.py with
the quantile scores, overall, per target and per horizon step; skill against each baseline with
its 95% interval and Diebold-Mariano p-value (stats/intervals.py); the same for NLL and CRPS per
target, Holm-adjusted; calibration per horizon step; and the NLL rise with every body blanked.
Prints a table and writes JSON (default: `<model file stem>_<split>_evaluation.json` beside the
model file), and with `--windows` the per-window scores (trainer/test_windows.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from forecasting.forecast import run_command
from forecasting.model_file import SCALING_KEYS, LoadedModel, input_data, load_model_file
from scoring.scores import (
    BASELINE_NAMES,
    BASELINES,
    DERIVED_SCORES,
    PART_SCORES,
    QUANTILE_SCORES,
    SCORES,
    skill_metrics,
)
from series.dataset import PreparedData, WindowDataset, build_loader, prepare
from stats.intervals import holm, paired_difference
from trainer.distributed import pick_device
from trainer.errors import UserError
from trainer.evaluate import FORECASTERS, celestial_effect, evaluate
from trainer.run_log import json_safe
from trainer.test_windows import window_origins, window_rows, write_windows_csv

FORECASTER_NAMES = {"model": "model", **BASELINE_NAMES}
REPORT_SCORES = tuple(s for s in (*SCORES, *QUANTILE_SCORES, *DERIVED_SCORES)
                      if s not in PART_SCORES)
UNITS = ("nll, crps: scaled target units (target / training std); crps_units, mae, rmse, "
         "pinball_*, interval_score_*: target units; mase, msis_*: over the naive one-step MAE "
         "of each window's look-back; wql: over the mean |outcome| in target units")
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


def score_split(loaded: LoadedModel, prepared: PreparedData, split: str, device
                ) -> tuple[dict, dict]:
    """The flat metrics the trainer logs (with `_by_horizon`), skill and the blank-all rise, and
    the per-window scores in time order (`series`, trainer/evaluate.py)."""
    config, model = loaded.config, loaded.model
    dataset = WindowDataset(prepared, split, loaded.seq_len, loaded.pred_len,
                            config.data.window_stride)
    loader = build_loader(dataset, config.data, rank=0, world_size=1, seed=config.train.seed,
                          train=False)

    def evaluate_fn(_split: str, **kwargs) -> dict:
        return evaluate(model, loader, device, prepared.target_std, **kwargs)

    metrics = evaluate_fn(split, with_series=True, per_horizon=True,
                          target_mean_T=prepared.target_mean)
    metrics.update(celestial_effect(evaluate_fn, split, loaded.spec, loaded.pred_len,
                                    config.data.window_stride, base=metrics))
    series = metrics.pop("series")
    metrics.update(skill_metrics(series, loaded.pred_len, config.data.window_stride))
    metrics["origins"] = window_origins(dataset, prepared.dates)
    metrics["first_date"], metrics["last_date"] = metrics["origins"][0], metrics["origins"][-1]
    return metrics, series


def paired_tests(series: dict, targets: list[str], pred_len: int, stride: int) -> dict:
    """Model minus each baseline on the same windows, NLL and CRPS, overall and per target: the
    mean difference with its 95% HAC interval and Diebold-Mariano p-value (HLN-corrected, from
    the stats helpers). Per-target p-values also Holm-adjusted over every per-target test here
    (`holm_pvalue`): the report makes one claim per target and baseline and score."""
    tests: dict = {"overall": {}, "per_target": {t: {} for t in targets}}
    for score in ("nll", "crps"):
        model_NT = series[f"model_{score}_T"]
        for b in BASELINES:
            base_NT = series[f"{b}_{score}_T"]
            tests["overall"][f"{b}_{score}"] = paired_difference(
                model_NT.mean(1), base_NT.mean(1), pred_len, stride).as_dict()
            for t, target in enumerate(targets):
                tests["per_target"][target][f"{b}_{score}"] = paired_difference(
                    model_NT[:, t], base_NT[:, t], pred_len, stride).as_dict()
    keys = [(t, k) for t, row in tests["per_target"].items() for k in row]
    adjusted = holm({f"{t}/{k}": tests["per_target"][t][k]["dm_pvalue"] for t, k in keys})
    for t, k in keys:
        tests["per_target"][t][k]["holm_pvalue"] = adjusted[f"{t}/{k}"]
    return tests


def _key(name: str, score: str) -> str:
    return score if name == "model" else f"{name}_{score}"


def _forecaster_scores(flat: dict, name: str, targets: list[str]) -> dict:
    """One forecaster's scores: overall, per target, and per target per horizon step."""
    return {"description": FORECASTER_NAMES[name],
            **{s: flat[_key(name, s)] for s in REPORT_SCORES},
            "per_target": {t: {s: flat[f"{_key(name, s)}_per_target"][i] for s in REPORT_SCORES}
                           for i, t in enumerate(targets)},
            "by_horizon": {t: {s: [row[i] for row in flat[f"{_key(name, s)}_by_horizon"]]
                               for s in REPORT_SCORES} for i, t in enumerate(targets)}}


def difference_entry(flat: dict, name: str) -> dict:
    """One paired difference of the flat metrics (scoring.scores.difference_metrics) as a dict."""
    return {"mean": flat[name], **{k: flat[f"{name}_{k}"]
                                   for k in ("low", "high", "shown", "reason", "dm_pvalue")}}


def report(loaded: LoadedModel, data_file: Path, split: str, flat: dict, tests: dict) -> dict:
    """The JSON document: per forecaster, per target and per horizon step, keyed by name."""
    targets = loaded.spec.targets
    forecasters = {name: _forecaster_scores(flat, name, targets) for name in FORECASTERS}
    skill = {b: difference_entry(flat, f"skill_{b}") for b in FORECASTERS[1:]}
    return {
        "checkpoint": str(loaded.path), "step": loaded.step, "data": str(data_file),
        "split": split, "first_date": flat["first_date"], "last_date": flat["last_date"],
        "num_windows": flat["num_windows"], "horizon_steps": loaded.pred_len, "targets": targets,
        "units": UNITS,
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
        "calibration_by_horizon": flat["calibration_by_horizon"],
        "crps_skill": {"definition": "model CRPS minus the best baseline's (by NLL) on the same "
                                    "windows, scaled target units; 95% HAC interval",
                       "baseline": flat["best_baseline"],
                       **tests["overall"][f"{flat['best_baseline']}_crps"]},
        "paired_tests": {"definition": "model minus baseline per window (negative: the model "
                                       "is better), 95% HAC interval, Diebold-Mariano p-value "
                                       "with the Harvey-Leybourne-Newbold correction; "
                                       "per_target also Holm-adjusted over all per-target tests",
                         **tests},
    }


TABLE_COLUMNS = [("nll", 9, "nll", ".4f"), ("crps (scaled)", 15, "crps", ".4f"),
                 ("crps (units)", 14, "crps_units", ".4g"), ("mae", 10, "mae", ".4g"),
                 ("rmse", 10, "rmse", ".4g"), ("mase", 8, "mase", ".3f"), ("wql", 9, "wql", ".4g"),
                 ("msis 90%", 10, "msis_90", ".3f"), ("cover 50%", 11, "coverage_50", ".3f"),
                 ("cover 90%", 11, "coverage_90", ".3f")]


def table_cell(value: float, width: int, spec: str) -> str:
    """A right-aligned cell that keeps at least one space before it, however wide the value."""
    return f"{' ' + format(value, spec):>{width}}"


def table_lines(doc: dict) -> list[str]:
    """A readable summary of the report."""
    lines = [(f"{doc['checkpoint']} (step {doc['step']}) on the {doc['split']} split of "
              f"{doc['data']}: {doc['num_windows']} windows, origins {doc['first_date']} to "
              f"{doc['last_date']}, {doc['horizon_steps']} steps, {len(doc['targets'])} targets"),
             "", "units: nll and crps (scaled) per training std; crps (units), mae and rmse in "
                 "target units; mase and msis per the look-back's naive one-step MAE", "",
             f"{'forecaster':<34}" + "".join(f"{h:>{w}}" for h, w, _, _ in TABLE_COLUMNS)]
    for f in doc["forecasters"].values():
        lines.append(f"{f['description']:<34}" + "".join(table_cell(f[k], w, spec)
                                                         for _, w, k, spec in TABLE_COLUMNS))
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
    lines += paired_test_lines(doc) + horizon_table_lines(doc)
    e = doc["celestial_effect"]
    helps = ("the celestial inputs help" if e["shown"] and e["low"] > 0
             else "no proof the celestial inputs help")
    lines.append(f"all bodies blanked: NLL rise {e['mean']:+.4f} [{e['low']:+.4f}, "
                 f"{e['high']:+.4f}]  ({helps})")
    return lines


def _difference(d: dict) -> str:
    verdict = "shown" if d["shown"] else f"not shown: {d['reason']}"
    return (f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]  DM p={d['dm_pvalue']:.3g}"
            f"  ({verdict})")


def paired_test_lines(doc: dict) -> list[str]:
    """Model minus each baseline: CRPS overall (the NLL is the skill above), NLL and CRPS per
    target with Holm-adjusted p-values."""
    tests = doc["paired_tests"]
    lines = ["", "CRPS: model - baseline on the same windows (negative: the model is better), "
             "95% HAC interval, Diebold-Mariano p (HLN):"]
    for b in BASELINES:
        lines.append(f"  vs {FORECASTER_NAMES[b]:<32}{_difference(tests['overall'][f'{b}_crps'])}")
    lines.append("per target (Holm-adjusted p over the per-target tests):")
    for target, row in tests["per_target"].items():
        for key, d in row.items():
            lines.append(f"  {target:<14}{key:<12}{_difference(d)}  Holm p="
                         f"{d['holm_pvalue']:.3g}")
    return lines


def horizon_table_lines(doc: dict) -> list[str]:
    """Per horizon step: the model's CRPS per forecaster (mean over targets) and its calibration."""
    cal, steps = doc["calibration_by_horizon"], doc["calibration_by_horizon"]["steps"]
    crps = {name: np.mean([f["by_horizon"][t]["crps"] for t in doc["targets"]], axis=0)
            for name, f in doc["forecasters"].items()}
    lines = ["", "per horizon step (CRPS in scaled units, mean over targets; model coverage "
                 "with the 95% interval of the 90% one):",
             f"{'step':>5}" + "".join(f"{'crps ' + n:>12}" for n in crps)
             + f"{'cover 50%':>11}{'cover 90%':>11}{'90% interval':>18}"]
    for p, step in enumerate(steps):
        band = f"[{cal['coverage_90_low'][p]:.3f}, {cal['coverage_90_high'][p]:.3f}]"
        lines.append(f"{step:>5}" + "".join(f"{c[p]:>12.4f}" for c in crps.values())
                     + f"{cal['coverage_50'][p]:>11.3f}{cal['coverage_90'][p]:>11.3f}{band:>18}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/evaluate.py", description="Score a trained "
                                     "model file against the naive baselines on a split.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a consolidated model file, e.g. checkpoints/<exp>/best_model.pth")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the split to score (default: %(default)s); val chose the "
                             "checkpoint (early stopping): its scores are optimistic")
    parser.add_argument("--out", type=Path, help="JSON file (default: <model file stem>_<split>"
                                                 "_evaluation.json beside the model file)")
    parser.add_argument("--data", type=Path, help="the training data file, if it moved since "
                        "training (it must exist and hold the same data)")
    parser.add_argument("--windows", type=Path, help="also write per-window scores to this CSV "
                        "(the columns of logs/<exp>/test_windows.csv)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="where to run the model (default: %(default)s)")
    return parser.parse_args(argv)


VAL_WARNING = ("warning: the validation split chose this checkpoint (best validation NLL, early "
               "stopping): its scores there are optimistic; use --split test for an honest "
               "estimate")


def evaluate_command(args: argparse.Namespace) -> list[str]:
    device = pick_device(args.device, 0)
    loaded = load_model_file(args.checkpoint, device)
    prepared = rebuild_data(loaded, args.data)
    data_file = args.data or loaded.config.data.resolved_path()
    flat, series = score_split(loaded, prepared, args.split, device)
    tests = paired_tests(series, loaded.spec.targets, loaded.pred_len,
                         loaded.config.data.window_stride)
    doc = report(loaded, data_file, args.split, flat, tests)
    out = args.out or args.checkpoint.with_name(
        f"{args.checkpoint.stem}_{args.split}_evaluation.json")
    out.parent.mkdir(parents=True, exist_ok=True)      # only now: nothing written on bad input
    out.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False))
    written = [f"wrote {out}"]
    if args.windows:
        args.windows.parent.mkdir(parents=True, exist_ok=True)
        write_windows_csv(args.windows, window_rows(series, flat["origins"], loaded.spec.targets))
        written.append(f"wrote {args.windows} (per-window scores)")
    warning = [VAL_WARNING] if args.split == "val" else []
    return [*warning, *table_lines(doc), *warning, *written]


def run(argv: list[str] | None = None) -> int:
    """Evaluate; returns the exit status (0 done, 2 bad input)."""
    return run_command(evaluate_command, parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
