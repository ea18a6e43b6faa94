"""An experiment that tests a run's advice: its config as the control, one variant per finding
of its analysis that suggests a config change (`analysis/recommendations.json`, written by
`celestial-analyze`; the analysis is computed here when the file is absent)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from diagnostics.analysis.errors import AnalysisError
from diagnostics.analysis.run import analyze
from experiments.spec import ExperimentSpec, check_spec, is_window_key
from trainer.errors import UserError

CONTROL = "control"


def read_findings(run_dir: Path) -> list[dict]:
    path = run_dir / "analysis" / "recommendations.json"
    if path.is_file():
        try:
            findings = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read the recommendations ({err})") from None
        if not isinstance(findings, list):
            raise UserError(f"{path}: expected a list of findings")
        return [f for f in findings if isinstance(f, dict)]
    try:
        return [f.to_dict() for f in analyze(run_dir, []).findings]
    except AnalysisError as err:
        raise UserError(f"--from-analysis {run_dir}: {err}") from None


def advice_variants(findings: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """Variant name -> overrides for each finding with a testable config change; and notes on
    the findings left out (no change suggested, or a change of the test windows)."""
    variants: dict[str, dict] = {}
    notes = []
    for finding in findings:
        change, issue = finding.get("config_change") or {}, str(finding.get("issue", "finding"))
        if not change:
            continue
        moved = [k for k in change if is_window_key(k)]
        if moved:
            notes.append(f"{issue}: not tested, {moved[0]} changes the test windows")
            continue
        variants[_unique(re.sub(r"[^A-Za-z0-9_.-]", "_", issue), variants)] = dict(change)
    return variants, notes


def _unique(name: str, taken: dict) -> str:
    candidate, i = name, 2
    while candidate in taken or candidate == CONTROL:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def spec_from_analysis(run_dir: Path, seeds: list[int], name: str | None
                       ) -> tuple[ExperimentSpec, list[str]]:
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"--from-analysis {run_dir}: no config.yaml (not a run folder?)")
    variants, notes = advice_variants(read_findings(run_dir))
    if not variants:
        raise UserError(f"--from-analysis {run_dir}: no finding suggests a config change to test"
                        + (f" ({'; '.join(notes)})" if notes else ""))
    data = {"name": name or f"advice_{run_dir.name}", "base_config": str(config),
            "control": CONTROL, "variants": {CONTROL: {}, **variants}, "seeds": seeds}
    return check_spec(data, f"--from-analysis {run_dir}"), notes
