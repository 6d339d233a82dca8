"""The validation gate: a candidate replaces the champion only if it is not worse where it matters.

Both models are evaluated on the same fixed held-out set (a dataset folder's test split).  The
candidate fails if any head's accuracy, or any class's recall, is more than ``margin`` below the
champion's — a better average must not hide a class that got worse.  The verdict is stored next
to the candidate (``gate.json``) and shown by the CLI, API and dashboard.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.model_package import read_card
from appliance.training.evaluate import evaluate_model

VERDICT_FILE = "gate.json"


@dataclass(slots=True)
class GateVerdict:
    candidate: str
    champion: str | None
    passed: bool
    margin: float
    holdout: str
    reasons: list[str] = field(default_factory=list)
    candidate_metrics: dict[str, Any] = field(default_factory=dict)
    champion_metrics: dict[str, Any] = field(default_factory=dict)
    evaluated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, package_dir: Path) -> None:
        (package_dir / VERDICT_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, package_dir: Path) -> GateVerdict | None:
        try:
            return cls(**json.loads((package_dir / VERDICT_FILE).read_text()))
        except FileNotFoundError:
            return None


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """What the gate decides on (accuracy, per-class recall) and what a person checks it with,
    including calibration on the held-out set and the hold curve an engineer sets
    ``disposition.min_confidence`` from."""
    keep = ("accuracy", "macro_f1", "recall", "n", "classes", "confusion", "ece", "ece_uncalibrated", "hold_curve")
    return {head: {k: m[k] for k in keep} for head, m in summary["heads"].items()}


def compare(candidate: dict[str, Any], champion: dict[str, Any], margin: float) -> list[str]:
    """Why the candidate is worse than the champion (empty: it is not)."""
    reasons = []
    for head, champ in champion.items():
        cand = candidate.get(head)
        if cand is None:
            reasons.append(f"head '{head}' is missing from the candidate")
            continue
        if cand["accuracy"] < champ["accuracy"] - margin:
            reasons.append(f"{head}: accuracy {cand['accuracy']:.3f} < champion {champ['accuracy']:.3f} "
                           f"- {margin}")
        for cls, recall in champ["recall"].items():
            new = cand["recall"].get(cls)
            if recall is not None and new is not None and new < recall - margin:
                reasons.append(f"{head}={cls}: recall {new:.3f} < champion {recall:.3f} - {margin}")
    return reasons


def run_gate(candidate: Path, champion: Path | None, holdout: Path, margin: float) -> GateVerdict:
    """Evaluate both on ``holdout``'s test split, decide, and save the verdict with the candidate."""
    cand_card = read_card(candidate)
    cand = _brief(evaluate_model(candidate, holdout, "test").summary())
    verdict = GateVerdict(candidate=cand_card.version, champion=None, passed=True, margin=margin,
                          holdout=str(holdout), candidate_metrics=cand)
    if champion is not None:
        champ = _brief(evaluate_model(champion, holdout, "test").summary())
        verdict.champion = read_card(champion).version
        verdict.champion_metrics = champ
        verdict.reasons = compare(cand, champ, margin)
        verdict.passed = not verdict.reasons
    verdict.save(candidate)
    return verdict
