"""The console summary, in the spirit of the reference card's example analysis output."""
from __future__ import annotations

from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import RunData
from diagnostics.analysis.summary import ComponentStats, occlusion_ranking, top_bodies
from diagnostics.analysis.verdict import Verdict

HEALTHY_LINE = "[ok] No major issues detected. Training appears healthy!"


def gradient_lines(stats: list[ComponentStats]) -> list[str]:
    lines = []
    for s in stats:
        lines += [f"{s.name}:",
                  f"  Mean norm: {s.mean_norm:<12.6f} {s.mean_verdict}",
                  f"  Max norm:  {s.max_norm:<12.6f} {s.max_verdict}"]
    return lines


def occlusion_lines(run: RunData) -> list[str]:
    """The occlusion ranking as an aligned table."""
    ranking = occlusion_ranking(run)
    if ranking is None:
        return []
    header, rows = ranking.table()
    widths = [max(len(row[i]) if i < len(row) else 0 for row in [header, *rows])
              for i in range(len(header))]
    return [f"{ranking.title}:", *("  " + "  ".join(cell.ljust(w) for cell, w in
                                                    zip(row, widths)).rstrip()
                                   for row in [header, *rows])]


def top_body_lines(run: RunData) -> list[str]:
    top = top_bodies(run)
    if top is None:
        return []
    step, per_target = top
    lines = [f"Top celestial bodies per target by C->T attention weight (step {step}; what the "
             "network attends to, not what it uses: see the occlusion ranking):"]
    for target, bodies in per_target.items():
        names = ", ".join(f"{body} ({weight:.3f})" if weight is not None else body
                          for body, weight in bodies)
        lines.append(f"  Top celestial ({target}): {names}")
    return lines


def finding_lines(finding: Finding) -> list[str]:
    mark = "[ok]" if not finding.is_problem else "[!]"
    lines = [f"  {mark} {finding.severity.upper()} {finding.component}: {finding.issue}",
             f"      {finding.message}", f"      -> {finding.suggestion}"]
    if finding.config_change:
        change = ", ".join(f"{k}: {v}" for k, v in finding.config_change.items())
        lines.append(f"      config: {change}")
    return lines


def recommendation_lines(findings: list[Finding]) -> list[str]:
    lines = ["Recommendations:"]
    if not any(f.is_problem for f in findings):
        lines.append(f"  {HEALTHY_LINE}")
    for finding in findings:
        lines += finding_lines(finding)
    return lines


def verdict_lines(verdict: Verdict, findings: list[Finding]) -> list[str]:
    """The verdict first: the headline, then skill, calibration, inputs, overfitting, and how
    many problems."""
    lines = [f"Verdict: {verdict.headline}"]
    lines += [f"  {question}: {answer}" for question, answer in verdict.rows]
    problems = [f for f in findings if f.severity in ("critical", "error")]
    if problems:
        lines.append(f"  [!] {len(problems)} critical/error finding(s): "
                     + ", ".join(f.issue for f in problems))
    return lines


def console_summary(run: RunData, verdict: Verdict, stats: list[ComponentStats],
                    findings: list[Finding]) -> str:
    lines = [f"Analysis of {run.log_dir}", "", *verdict_lines(verdict, findings), ""]
    if run.notes:
        lines += ["Not analysed / tolerated:", *(f"  - {note}" for note in run.notes)]
    if stats:
        steps = run.gradients.steps
        header = f"Gradient flow ({len(steps)} records, steps {steps[0]}-{steps[-1]}):"
        lines += ["", header, *gradient_lines(stats)]
    for body_lines in (occlusion_lines(run), top_body_lines(run)):
        if body_lines:
            lines += ["", *body_lines]
    return "\n".join(lines + ["", *recommendation_lines(findings)])
