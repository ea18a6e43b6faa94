"""What a search reports: the console summary, search.json and a self-contained report.html
(Optuna's own matplotlib plots inline as PNG: optimisation history, parameter importances,
parallel coordinates), with the final test comparison of the best configuration against the
start. Every trial was chosen on the validation split; only the final comparison reads test.
"""
from __future__ import annotations

import json
import math
import warnings
from html import escape
from pathlib import Path

import optuna
from optuna.trial import TrialState

from experiments.compare import OVERALL
from experiments.report import ExperimentResult, _png, _table, comparison_line
from experiments.search.driver import RUN_ATTR
from experiments.search.spec import BEST, START, SearchSpec

NOT_USED = ("The test split was not used for choosing: every trial was scored, pruned and "
            "ranked on the validation split only; the test split is read once, by the final "
            "comparison of the chosen configuration with the start.")


def trial_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return counts


def final_line(result: ExperimentResult | None) -> str:
    if result is None:
        return "no final comparison: no trial completed"
    overall = [c for c in result.comparisons if c.target == OVERALL and c.variant == BEST]
    if not overall:
        return "no final comparison"
    return comparison_line(overall[0], START, result.spec.score)


def search_summary_lines(spec: SearchSpec, study: optuna.Study,
                         best: optuna.trial.FrozenTrial | None,
                         result: ExperimentResult | None) -> list[str]:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(trial_counts(study).items()))
    lines = [f"searched {', '.join(p.key for p in spec.parameters)} over "
             f"{len(study.trials)} trials ({counts}), sampler {spec.sampler}, pruner "
             f"{spec.pruner}"]
    if best is None:
        return [*lines, "no trial completed: nothing to choose"]
    lines.append(f"won (lowest validation {spec.val_score} of the kept weights, step "
                 f"{best.user_attrs.get('val_step')}): trial {best.number}, "
                 f"{best.value:.4f}: " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    lines.append(f"retrained with seeds {spec.seeds}: {final_line(result)}")
    lines.append(NOT_USED)
    return lines


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (empty with fewer than two completed trials)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(done) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


def search_json(spec: SearchSpec, study: optuna.Study, best, result) -> dict:
    return {"search": spec.to_dict(), "splits": {"trials": "validation", "final": "test"},
            "test_used_for_choosing": False, "counts": trial_counts(study),
            "best": None if best is None else {
                "trial": best.number, "run": best.user_attrs.get(RUN_ATTR),
                "val_score": spec.val_score, "value": best.value, "params": best.params,
                "val_step": best.user_attrs.get("val_step")},
            "importances": importances(study),
            "final_comparison": {"split": "test", "line": final_line(result),
                                 "experiment": None if result is None else result.spec.name},
            "trials": [trial_row(t) for t in study.get_trials(deepcopy=False)]}


def trial_row(trial: optuna.trial.FrozenTrial) -> dict:
    return {"number": trial.number, "state": trial.state.name, "value": trial.value,
            "params": trial.params, "run": trial.user_attrs.get(RUN_ATTR),
            "last_step": trial.last_step, "reason": trial.user_attrs.get("reason")}


def write_search_report(spec: SearchSpec, study: optuna.Study, best, result,
                        folder: Path) -> list[Path]:
    paths = [folder / "search.json", folder / "report.html"]
    paths[0].write_text(json.dumps(search_json(spec, study, best, result), indent=2,
                                   default=_plain) + "\n")
    paths[1].write_text(render_html(spec, study, best, result))
    return [*paths, folder / "best_config.yaml"] if best is not None else paths


def _plain(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


PLOTS = {"optimisation history": "plot_optimization_history",
         "parameter importances": "plot_param_importances",
         "parallel coordinates": "plot_parallel_coordinate"}


def plots(study: optuna.Study) -> list[tuple[str, str | None, str | None]]:
    """(title, PNG data URL or None, why not drawn) for each of Optuna's matplotlib plots."""
    drawn = []
    for title, name in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # Optuna marks the backend experimental
                axes = getattr(optuna.visualization.matplotlib, name)(study)
            drawn.append((title, _png(axes.figure), None))
        except (RuntimeError, ValueError, ImportError) as err:
            drawn.append((title, None, str(err) or type(err).__name__))
    return drawn


def _final_link(result: ExperimentResult | None) -> str:
    if result is None:
        return ""
    name = escape(result.spec.name)
    return (f"<p>The final comparison on test (every seed, per target, paired intervals) is the "
            f"experiment {name}: <a href=\"../{name}/report.html\">its report</a>.</p>")


def render_html(spec: SearchSpec, study: optuna.Study, best, result) -> str:
    summary = "".join(f"<li>{escape(x)}</li>"
                      for x in search_summary_lines(spec, study, best, result))
    figures = "".join(
        f"<h2>{escape(title)} (validation {spec.val_score})</h2>"
        + (f'<img alt="{escape(title)}" src="{url}">' if url else f"<p>not drawn: "
           f"{escape(why)}</p>") for title, url, why in plots(study))
    rows = [[r["number"], r["state"], "n/a" if r["value"] is None else f"{r['value']:.4f}",
             r["last_step"], json.dumps(r["params"]), r["run"] or "", r["reason"] or ""]
            for r in map(trial_row, study.get_trials(deepcopy=False))]
    table = _table(["trial", "state", f"validation {spec.val_score}", "last reported step",
                    "parameters", "run", "reason"], rows)
    weights = "".join(f"<li>{escape(k)}: {v:.3f}</li>" for k, v in importances(study).items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Search {escape(spec.name)}</title>
<style>body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
img {{ max-width: 100%; }}</style></head><body>
<h1>Search {escape(spec.name)}</h1>
<p><b>{escape(NOT_USED)}</b></p>
<h2>Summary</h2><ul>{summary}</ul>
{_final_link(result)}
<h2>Parameter importances (validation {spec.val_score})</h2>
<ul>{weights or "<li>not computed: fewer than two completed trials</li>"}</ul>
{figures}
<h2>Trials (validation split)</h2>{table}
<h2>Search file</h2><pre>{escape(spec.to_yaml())}</pre>
</body></html>
"""
