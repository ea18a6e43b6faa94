"""From run folders to findings and files: one run (`analyze_run`) or several (`compare_runs`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diagnostics.analysis import plots
from diagnostics.analysis.calibration import calibration
from diagnostics.analysis.compare import (
    Comparison,
    compare_on_test,
    config_differences,
    unique_names,
)
from diagnostics.analysis.errors import AnalysisError
from diagnostics.analysis.findings import SEVERITIES, Finding
from diagnostics.analysis.kept import best_validation, finite, kept_line
from diagnostics.analysis.load import RunData, load_run
from diagnostics.analysis.report import render_compare, render_report
from diagnostics.analysis.rules import run_rules
from diagnostics.analysis.summary import (
    ComponentStats,
    component_stats,
    occlusion_ranking,
    run_summary,
    write_gradient_csv,
)
from diagnostics.analysis.thresholds import Thresholds, build_thresholds
from diagnostics.analysis.verdict import Verdict, verdict


@dataclass
class RunAnalysis:
    run: RunData
    thresholds: Thresholds
    findings: list[Finding]
    stats: list[ComponentStats]
    verdict: Verdict


def analyze(log_dir: Path, overrides: list[tuple[str, float]]) -> RunAnalysis:
    """Load a run and apply every rule (writes nothing); a run without steps is an error."""
    run = load_run(log_dir)
    if not run.has_steps:
        raise AnalysisError(f"{log_dir}: no steps logged yet (no metrics.jsonl lines, no "
                            "diagnostics records): nothing to analyse")
    thresholds = build_thresholds(run.config, overrides)
    stats = component_stats(run.gradients, thresholds) if run.gradients is not None else []
    findings = run_rules(run, thresholds)
    return RunAnalysis(run, thresholds, findings, stats, verdict(run, thresholds, findings))


def _output_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AnalysisError(f"{path}: cannot create the output folder "
                        f"({err.strerror or err})") from None
    return path


def _plots(a: RunAnalysis, out: Path) -> dict[str, Path]:
    """Title -> PNG for every plot the run has records for."""
    run, t = a.run, a.thresholds
    images = {}
    if run.train or run.val:
        images["Loss and validation"] = plots.training_curves(run, t, out / "training_curves.png")
    if any(v.get("skill") is not None for v in run.val + run.test):
        images["Skill and celestial inputs"] = plots.skill_curve(run, out / "skill.png")
    calibrated = calibration(kept_line(run), t)
    if calibrated is not None and calibrated.steps:
        images["Calibration per horizon step"] = plots.pit_histogram(
            calibrated, out / "pit_histogram.png")
    if run.gradients is not None:
        images["Gradient flow"] = plots.gradient_flow(run.gradients, t, out / "gradient_flow.png")
    if run.attention:
        images["Fusion attention entropy"] = plots.fusion_attention_entropy(
            run.attention, t, out / "fusion_attention_entropy.png")
        images["C->T attention (targets x bodies)"] = plots.c2t_heatmap(
            run.attention[-1], out / "c2t_attention_heatmap.png")
    ranking = occlusion_ranking(run)
    if ranking is not None:
        images["Occlusion ranking (bodies per target)"] = plots.occlusion_plot(
            ranking, out / "occlusion_ranking.png")
    return images


def write_outputs(a: RunAnalysis, out: Path) -> list[Path]:
    """The analysis folder: CSV, plots, recommendations.json, report.html."""
    _output_folder(out)
    try:
        written = []
        if a.run.gradients is not None:
            write_gradient_csv(a.run.gradients, out / "gradient_norms.csv")
            written.append(out / "gradient_norms.csv")
        images = _plots(a, out)
        written += images.values()
        recommendations = out / "recommendations.json"
        recommendations.write_text(json.dumps([f.to_dict() for f in a.findings], indent=2) + "\n")
        report = out / "report.html"
        report.write_text(render_report(a.run, a.verdict, run_summary(a.run), a.stats,
                                        a.findings, images))
        return [*written, recommendations, report]
    except OSError as err:
        raise AnalysisError(f"{out}: cannot write the analysis ({err.strerror or err})") from None


def analyze_run(log_dir: Path, out: Path | None, overrides: list[tuple[str, float]]
                ) -> tuple[RunAnalysis, list[Path]]:
    analysis = analyze(Path(log_dir), overrides)
    return analysis, write_outputs(analysis, Path(out) if out else Path(log_dir) / "analysis")


COMPARE_HEADER = ["run", "last step", "last train loss", "best val NLL (step)",
                  "kept weights (step)", "90% coverage (kept weights)", "test NLL",
                  "test skill [95%]", "findings (critical/error/warning/info)"]


def _last(lines: list[dict], key: str) -> str:
    value = lines[-1].get(key) if lines else None
    return "n/a" if value is None else f"{value:.4g}"


def compare_row(a: RunAnalysis) -> list[str]:
    run = a.run
    best = best_validation(run)
    kept = kept_line(run)
    test = kept.line if kept is not None and kept.split == "test" else {}
    counts = "/".join(str(sum(f.severity == s for f in a.findings)) for s in SEVERITIES)
    return [str(run.log_dir), str(run.train[-1]["step"]) if run.train else "n/a",
            _last(run.train, "loss"), f"{best['nll']:.4f} ({best['step']})" if best else "n/a",
            kept.label if kept else "n/a", _last([kept.line] if kept else [], "coverage_90"),
            _last([test] if test else [], "nll"), _skill_cell(test), counts]


def _skill_cell(line: dict) -> str:
    if not finite(line, "skill", "skill_low", "skill_high"):
        return "n/a"
    return (f"{line['skill']:+.4f} [{line['skill_low']:+.4f}, {line['skill_high']:+.4f}] vs "
            f"{line.get('best_baseline', '?')}")


@dataclass
class RunComparison:
    analyses: list[RunAnalysis]
    on_test: list[Comparison]          # every run after the first against the first
    config_rows: list[list[str]]       # [dotted key, value per run]
    names: list[str]


def _overlays(c: RunComparison, out: Path) -> dict[str, Path]:
    runs = [a.run for a in c.analyses]
    images = {"Loss, validation NLL and gradient norm": plots.compare_curves(
        runs, out / "compare_curves.png")}
    if any(r.gradients is not None for r in runs):
        images["Gradient norms per component"] = plots.compare_gradient_norms(
            runs, c.analyses[0].thresholds, out / "compare_gradient_norms.png")
    return images


def compare_runs(log_dirs: list[Path], out: Path | None, overrides: list[tuple[str, float]]
                 ) -> tuple[RunComparison, list[Path]]:
    """Several runs in one report (default folder: <first run>/analysis/compare): which is
    better on test, how the configs differ, the overlays, and every run's own panels (in a
    subfolder per run)."""
    analyses = [analyze(Path(d), overrides) for d in log_dirs]
    runs = [a.run for a in analyses]
    c = RunComparison(analyses, compare_on_test(runs), config_differences(runs),
                      unique_names(runs))
    out = _output_folder(Path(out) if out else Path(log_dirs[0]) / "analysis" / "compare")
    try:
        images = _overlays(c, out)
        panels = {name: _plots(a, _output_folder(out / name))
                  for name, a in zip(c.names, analyses)}
        report = out / "report.html"
        report.write_text(render_compare(
            [compare_row(a) for a in analyses], COMPARE_HEADER, images,
            [x.sentence() for x in c.on_test], ["key", *c.names], c.config_rows,
            {name: (a.verdict, panels[name]) for name, a in zip(c.names, analyses)}))
    except OSError as err:
        raise AnalysisError(f"{out}: cannot write the comparison ({err.strerror or err})") from None
    written = [*images.values(), *(p for group in panels.values() for p in group.values())]
    return c, [*written, report]
