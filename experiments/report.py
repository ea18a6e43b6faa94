"""What an experiment reports: the console verdict, results.csv, experiment.json, report.html.

Every number names its split: the differences and the per-seed scores are from the test split
(the weights each trial ended with, at the step given), the selection from the validation split.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

from experiments.compare import OVERALL, UNITS, Comparison, Selection, TrialScores  # noqa: E402
from experiments.plan import Trial  # noqa: E402
from experiments.spec import ExperimentSpec  # noqa: E402


@dataclass
class ExperimentResult:
    spec: ExperimentSpec
    trials: list[Trial]
    records: dict[str, dict]           # trial name -> status, reason, ...
    scores: list[TrialScores]          # finished trials whose scores could be read
    comparisons: list[Comparison]
    selection: Selection

    def missing(self) -> list[tuple[str, str]]:
        """(trial, why) for every trial without scores."""
        have = {s.trial.name for s in self.scores}
        return [(t.name, self.records.get(t.name, {}).get("reason") or
                 self.records.get(t.name, {}).get("status") or "not run")
                for t in self.trials if t.name not in have]


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def steps_text(steps: tuple[int, int] | None) -> str:
    if steps is None:
        return "weights: step unknown"
    low, high = steps
    return f"weights of step {low}" if low == high else f"weights of steps {low}-{high}"


def comparison_line(c: Comparison, control: str, score: str) -> str:
    """`variant X is better than control by ... [..] nats on test` or `no difference shown`."""
    unit = UNITS[score]
    d = c.difference
    if d is None:
        return f"{c.variant} vs {control}: not compared ({c.problem})"
    where = (f"test {score}, {c.num_seeds} seed(s) x {c.num_windows} windows, "
             f"{steps_text(c.weights_steps)}, Holm-adjusted p {c.holm_pvalue:.3g}")
    if c.shown:
        better = d.mean < 0
        return (f"{c.variant} is {'better' if better else 'worse'} than {control} by "
                f"{abs(d.mean):.4f} [{min(abs(d.low), abs(d.high)):.4f}, "
                f"{max(abs(d.low), abs(d.high)):.4f}] {unit} on test ({where})")
    why = d.reason or f"Holm-adjusted p {c.holm_pvalue:.3g} >= {1 - d.level:.2g}"
    return (f"{c.variant} vs {control}: no difference shown on test: {_fmt(d.mean)} "
            f"[{_fmt(d.low)}, {_fmt(d.high)}] {unit} ({why}; {where})")


def verdict_lines(result: ExperimentResult) -> list[str]:
    """The answer first: each variant against the control overall, then the selection."""
    spec = result.spec
    lines = [comparison_line(c, spec.control, spec.score)
             for c in result.comparisons if c.target == OVERALL]
    sel = result.selection
    if sel.variant is not None:
        lines.append(f"selected on validation (mean val {spec.score} over seeds, "
                     f"{steps_text(sel.weights_steps)}; not test): {sel.variant} "
                     f"({sel.val_means[sel.variant]:.4f}); the test differences above are "
                     f"reported for every variant, none chosen on test")
    missing = result.missing()
    if missing:
        lines.append(f"missing trials ({len(missing)} of {len(result.trials)}): "
                     + "; ".join(f"{name} ({why})" for name, why in missing))
    return lines


def per_target_lines(result: ExperimentResult) -> list[str]:
    return [f"{c.target}: {comparison_line(c, result.spec.control, result.spec.score)}"
            for c in result.comparisons if c.target != OVERALL]


RESULT_COLUMNS = ["trial", "variant", "seed", "status", "val_nll", "val_crps", "val_step",
                  "test_nll", "test_crps", "test_step", "num_test_windows", "run_folder",
                  "reason"]


def results_rows(result: ExperimentResult) -> list[dict]:
    by_name = {s.trial.name: s for s in result.scores}
    targets = [t for t in (result.scores[0].origins if result.scores else []) if t != OVERALL]
    rows = []
    for trial in result.trials:
        s, record = by_name.get(trial.name), result.records.get(trial.name, {})
        row = {"trial": trial.name, "variant": trial.variant, "seed": trial.seed,
               "status": "finished" if s else record.get("status", "not run"),
               "run_folder": str(trial.run_dir), "reason": "" if s else record.get("reason")}
        if s:
            row.update({"val_nll": s.val.get("nll"), "val_crps": s.val.get("crps"),
                        "val_step": s.val_step, "test_nll": s.test_mean("nll"),
                        "test_crps": s.test_mean("crps"), "test_step": s.test_step,
                        "num_test_windows": len(s.origins[OVERALL])})
            row.update({f"test_{result.spec.score}_{t}": s.test_mean(result.spec.score, t)
                        for t in targets})
        rows.append(row)
    return rows


def write_results_csv(result: ExperimentResult, path: Path) -> None:
    rows = results_rows(result)
    extra = sorted({k for row in rows for k in row} - set(RESULT_COLUMNS))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS + extra, restval="")
        writer.writeheader()
        writer.writerows(rows)


def experiment_json(result: ExperimentResult) -> dict:
    return {"experiment": result.spec.to_dict(),
            "splits": {"comparisons": "test", "selection": "validation"},
            "verdict": verdict_lines(result),
            "comparisons": [c.as_dict() for c in result.comparisons],
            "selection": {"split": "val", "score": result.spec.score,
                          "variant": result.selection.variant,
                          "weights_steps": result.selection.weights_steps,
                          "val_means": result.selection.val_means},
            "trials": results_rows(result),
            "missing": [{"trial": n, "reason": r} for n, r in result.missing()]}


def write_outputs(result: ExperimentResult, folder: Path) -> list[Path]:
    paths = [folder / "results.csv", folder / "experiment.json", folder / "report.html"]
    write_results_csv(result, paths[0])
    paths[1].write_text(json.dumps(experiment_json(result), indent=2, default=_json_value)
                        + "\n")
    paths[2].write_text(render_html(result))
    return paths


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# --- report.html ---------------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; } .shown { background: #e3f6e3; } .missing { background: #fdd; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def scores_figure(result: ExperimentResult) -> str:
    """Each variant's test score per seed, a line per seed across the variants."""
    spec = result.spec
    variants = list(spec.variants)
    fig, axis = plt.subplots(figsize=(max(5, 1.6 * len(variants)), 3.6))
    for seed in spec.seeds:
        points = [(i, s.test_mean(spec.score)) for i, v in enumerate(variants)
                  for s in result.scores if s.trial.variant == v and s.trial.seed == seed]
        if points:
            axis.plot(*zip(*points), marker="o", label=f"seed {seed}")
    axis.set_xticks(range(len(variants)), variants)
    axis.set_ylabel(f"test {spec.score} (mean over windows)")
    axis.set_title(f"test {spec.score} per seed (control: {spec.control})")
    axis.legend(fontsize=8)
    return _png(fig)


def differences_figure(result: ExperimentResult) -> str:
    """Paired differences (variant - control) with their intervals, per variant and target."""
    rows = [c for c in result.comparisons if c.difference is not None]
    fig, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.4))
    for y, c in enumerate(rows):
        d = c.difference
        axis.errorbar(d.mean, y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o",
                      color="tab:green" if c.shown else "tab:gray", capsize=3)
    axis.axvline(0, color="k", lw=0.8)
    axis.set_yticks(range(len(rows)), [f"{c.variant} / {c.target}" for c in rows])
    axis.invert_yaxis()
    axis.set_xlabel(f"test {result.spec.score}: variant - {result.spec.control} "
                    f"({UNITS[result.spec.score]}; < 0: variant better)")
    return _png(fig)


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(f"<tr class=\"{classes[i] if classes else ''}\">"
                   + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _comparison_table(result: ExperimentResult) -> str:
    header = ["variant", "target", "seeds", "windows", "mean difference (test)", "95% interval",
              "Holm-adjusted p", "shown", "why not"]
    rows, classes = [], []
    for c in result.comparisons:
        d = c.difference
        rows.append([c.variant, c.target, c.num_seeds, c.num_windows,
                     _fmt(d.mean) if d else "n/a",
                     f"[{_fmt(d.low)}, {_fmt(d.high)}]" if d else "n/a",
                     f"{c.holm_pvalue:.3g}" if d else "n/a", "yes" if c.shown else "no",
                     "" if c.shown else (c.problem or (d.reason if d else "") or "Holm")])
        classes.append("shown" if c.shown else "")
    return _table(header, rows, classes)


def _trials_table(result: ExperimentResult) -> str:
    header = ["trial", "status", f"val {result.spec.score} (step)",
              f"test {result.spec.score} (step)", "run folder", "reason"]
    rows, classes = [], []
    for row in results_rows(result):
        score = result.spec.score
        val, test = row.get(f"val_{score}"), row.get(f"test_{score}")
        rows.append([row["trial"], row["status"],
                     f"{val:.4f} ({row['val_step']})" if val is not None else "n/a",
                     f"{test:.4f} ({row['test_step']})" if test is not None else "n/a",
                     row["run_folder"], row["reason"] or ""])
        classes.append("" if row["status"] == "finished" else "missing")
    return _table(header, rows, classes)


def render_html(result: ExperimentResult) -> str:
    spec = result.spec
    verdict = "".join(f"<li>{escape(line)}</li>" for line in verdict_lines(result))
    images = ""
    if result.scores:
        images = (f"<h2>Test {spec.score} per seed</h2><img alt=\"scores per seed\" "
                  f"src=\"{scores_figure(result)}\">")
    if any(c.difference for c in result.comparisons):
        images += (f"<h2>Paired differences on test, with 95% intervals</h2>"
                   f"<img alt=\"paired differences\" src=\"{differences_figure(result)}\">")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Experiment {escape(spec.name)}</title>
<style>{_STYLE}</style></head><body>
<h1>Experiment {escape(spec.name)}</h1>
<p>Control: <b>{escape(spec.control)}</b>; score: {spec.score} ({UNITS[spec.score]}, lower is
better); seeds: {", ".join(map(str, spec.seeds))}. Differences are variant minus control on the
<b>test</b> split, paired on the same windows and seeds (interval over seeds and blocks of
windows, Holm across variants and targets); the selection uses the <b>validation</b> split only.
</p>
<h2>Verdict</h2><ul>{verdict}</ul>
{images}
<h2>Comparisons (test split)</h2>{_comparison_table(result)}
<h2>Trials</h2>{_trials_table(result)}
<h2>Experiment file</h2><pre>{escape(spec.to_yaml())}</pre>
</body></html>
"""
