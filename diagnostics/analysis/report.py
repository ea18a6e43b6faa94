"""report.html: one self-contained page (PNGs embedded as base64, CSS inline, no links out)."""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import yaml

from diagnostics.analysis.console import HEALTHY_LINE
from diagnostics.analysis.findings import Finding
from diagnostics.analysis.load import RunData
from diagnostics.analysis.summary import ComponentStats, occlusion_ranking, top_bodies
from diagnostics.analysis.verdict import Verdict

VERDICT_IMAGES = ("Skill and celestial inputs", "Calibration per horizon step")

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.critical { background: #fdd; } .error { background: #fdd; }
.warning { background: #ffe9c6; } .info { background: #e8f0ff; }
.ok { color: #176f2c; font-weight: bold; }
.headline { font-size: 1.2em; font-weight: bold; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def embedded_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class=\"{row_classes[i] if row_classes else ''}\">"
        + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_short(v)}" for k, v in value.items())
    return str(value)


def _evidence_html(evidence: dict) -> str:
    """The metric, its values by step as a two-row table, and the context as short lines."""
    html = f"<b>{escape(str(evidence.get('metric', '')))}</b>"
    steps, values = evidence.get("steps") or [], evidence.get("values") or []
    if steps and len(steps) == len(values):
        html += ("<table><tr><th>step</th>" + "".join(f"<td>{s}</td>" for s in steps)
                 + "</tr><tr><th>value</th>"
                 + "".join(f"<td>{escape(_short(v))}</td>" for v in values) + "</tr></table>")
    elif values:
        html += f"<br>{escape(_short(values))}"
    context = {k: v for k, v in evidence.items() if k not in ("metric", "steps", "values")}
    return html + "".join(f"<br>{escape(k)}: {escape(_short(v))}" for k, v in context.items())


def _findings_section(findings: list[Finding]) -> str:
    healthy = "" if any(f.is_problem for f in findings) else \
        f"<p class=\"ok\">{escape(HEALTHY_LINE)}</p>"
    if not findings:
        return healthy
    rows = [[escape(f.severity), escape(f.component), escape(f.issue), escape(f.message),
             escape(f.suggestion) + ("<br><code>" + escape(", ".join(
                 f"{k}: {v}" for k, v in f.config_change.items())) + "</code>"
                                     if f.config_change else ""),
             _evidence_html(f.evidence)] for f in findings]
    return healthy + _table(["severity", "component", "issue", "what", "suggestion", "evidence"],
                            rows, [f.severity for f in findings])


def _gradient_section(stats: list[ComponentStats]) -> str:
    rows = [[escape(s.name), f"{s.mean_norm:.6g}", escape(s.mean_verdict), f"{s.max_norm:.6g}",
             escape(s.max_verdict)] for s in stats]
    return _table(["component", "mean norm", "verdict", "max norm", "verdict"], rows)


def _bodies_section(run: RunData) -> str:
    top = top_bodies(run)
    if top is None:
        return ""
    step, per_target = top
    rows = [[escape(target), escape(", ".join(f"{b} ({w:.3f})" if w is not None else b
                                              for b, w in bodies))]
            for target, bodies in per_target.items()]
    return (f"<h3>Top celestial bodies per target by C->T attention weight (step {step}; what "
            "the network attends to, not what it uses)</h3>"
            + _table(["target", "bodies by C->T weight"], rows))


def _occlusion_section(run: RunData) -> str:
    ranking = occlusion_ranking(run)
    if ranking is None:
        return ""
    header, rows = ranking.table()
    return f"<h3>{escape(ranking.title)}</h3>" + _table(header, [[escape(c) for c in row]
                                                                 for row in rows])


def _images(images: dict[str, Path]) -> str:
    return "".join(f"<h3>{escape(title)}</h3>"
                   f"<img alt=\"{escape(title)}\" src=\"{embedded_png(path)}\">"
                   for title, path in images.items())


def _page(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"
            + "".join(sections) + "</body></html>")


def _verdict_section(verdict: Verdict, images: dict[str, Path]) -> str:
    shown = {k: v for k, v in images.items() if k in VERDICT_IMAGES}
    return (f"<h2>Verdict</h2><p class=\"headline\">{escape(verdict.headline)}</p>"
            + _table(["question", "answer"], [[escape(q), escape(a)] for q, a in verdict.rows])
            + _images(shown))


def render_report(run: RunData, verdict: Verdict, summary: list[tuple[str, str]],
                  stats: list[ComponentStats], findings: list[Finding],
                  images: dict[str, Path]) -> str:
    notes = "".join(f"<li>{escape(n)}</li>" for n in run.notes)
    verdict_html = _verdict_section(verdict, images)
    images = {k: v for k, v in images.items() if k not in VERDICT_IMAGES}
    sections = [
        verdict_html,
        "<h2>Summary</h2>", _table(["", ""], [[escape(k), escape(v)] for k, v in summary]),
        "<h2>Findings</h2>", _findings_section(findings),
        f"<h2>Not analysed / tolerated</h2><ul>{notes}</ul>" if notes else "",
        "<h2>Plots</h2>", _images(images),
        "<h2>Gradient flow per component</h2>" + _gradient_section(stats) if stats else "",
        _occlusion_section(run),
        _bodies_section(run),
        "<h2>Config</h2><pre>" + escape(yaml.safe_dump(run.config, sort_keys=False)) + "</pre>",
    ]
    return _page(f"Training analysis: {run.name}", sections)


def _run_panels(name: str, verdict: Verdict, images: dict[str, Path]) -> str:
    rows = [[escape(q), escape(a)] for q, a in verdict.rows]
    return (f"<h2>{escape(name)}</h2><p class=\"headline\">{escape(verdict.headline)}</p>"
            + _table(["question", "answer"], rows) + _images(images))


def render_compare(rows: list[list[str]], header: list[str], images: dict[str, Path],
                   on_test: list[str], config_header: list[str], config_rows: list[list[str]],
                   per_run: dict[str, tuple[Verdict, dict[str, Path]]]) -> str:
    """The runs' table, which is better on test, config differences, overlays, each run."""
    tested = "".join(f"<li>{escape(line)}</li>" for line in on_test) or \
        "<li>not compared: fewer than two runs have a scored test line</li>"
    config = (_table(config_header, [[escape(c) for c in row] for row in config_rows])
              if config_rows else "<p>The configs are identical.</p>")
    sections = ["<h2>Runs</h2>", _table(header, [[escape(c) for c in row] for row in rows]),
                f"<h2>Which run is better on test</h2><ul>{tested}</ul>",
                "<h2>Config differences</h2>", config,
                "<h2>Overlays</h2>", _images(images),
                *(_run_panels(name, v, imgs) for name, (v, imgs) in per_run.items())]
    return _page("Training comparison", sections)
