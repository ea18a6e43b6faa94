"""A finding: what a rule saw, the evidence for it, and what to change.

`recommendations.json` is a list of findings (FINDINGS_SCHEMA), most severe first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SEVERITIES = ("critical", "error", "warning", "info")   # info: worth knowing, not a problem
# critical: training itself is broken; error: the result is not usable (e.g. no skill over a
# naive forecast); warning: worth fixing; info: worth knowing.

_EVIDENCE = {"type": "object", "required": ["metric", "steps", "values"],
             "properties": {"metric": {"type": "string"},
                            "steps": {"type": "array", "items": {"type": "integer"}},
                            "values": {"type": "array"}}}
FINDING_SCHEMA = {
    "type": "object",
    "required": ["component", "issue", "severity", "message", "evidence", "suggestion",
                 "config_change"],
    "properties": {"component": {"type": "string"}, "issue": {"type": "string"},
                   "severity": {"enum": list(SEVERITIES)}, "message": {"type": "string"},
                   "evidence": _EVIDENCE, "suggestion": {"type": "string"},
                   "config_change": {"type": "object"}},
    "additionalProperties": False,
}
FINDINGS_SCHEMA = {"type": "array", "items": FINDING_SCHEMA}


@dataclass
class Finding:
    component: str           # a model component, "optimizer", "data", "ranks", "decoder", ...
    issue: str               # a stable identifier, e.g. "vanishing_gradients"
    severity: str
    message: str             # what was seen, in one sentence
    evidence: dict           # metric, steps and values that triggered it (plus context)
    suggestion: str          # what to do, naming config keys
    config_change: dict = field(default_factory=dict)   # dotted key -> proposed value

    def __post_init__(self) -> None:
        assert self.severity in SEVERITIES, self.severity
        assert {"metric", "steps", "values"} <= set(self.evidence), self.evidence

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_problem(self) -> bool:
        return self.severity != "info"


def by_severity(findings: list[Finding]) -> list[Finding]:
    """Most severe first; the rules' order within a severity."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
