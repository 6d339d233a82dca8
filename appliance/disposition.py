"""From a prediction to what happens to the part: pass, rework, reject or hold (human review).

Order of decision:
1. any head (of those configured) below its confidence threshold → ``hold`` (rule
   ``low_confidence:<head>=<class>``); the model is unsure, so a person decides;
2. otherwise the first rule in the table whose classes match decides;
3. no rule matches → ``hold`` (rule ``no_rule``), so a gap in the table is visible, never a pass.

A random share of confident passes is flagged for audit review, so the escape rate (defects the
model passed) can be measured.  The sampling uses its own seeded generator for repeatable tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.config import DispositionConfig
from appliance.errors import UserError
from appliance.inference import Prediction
from appliance.model_package import ModelCard
from appliance.yamlio import Loc


@dataclass(slots=True, frozen=True)
class Decision:
    disposition: str
    rule: str
    review: str | None = None
    """Why the part goes to the review queue: 'hold' or 'audit'; None if it does not."""


IMAGE_ERROR = Decision("hold", "image_error", "hold")
"""A part whose image could not be classified is held for a person: it must never pass unseen."""


class Disposer:
    def __init__(self, config: DispositionConfig, seed: int | None = None) -> None:
        self.config = config
        self._rng = random.Random(seed)

    def misfits(self, card: ModelCard) -> list[tuple[Loc, str]]:
        """Where the disposition table names a head or class the model does not have: (key path in
        the config, problem)."""
        heads = {h.name: set(h.classes) for h in card.heads}
        problems: list[tuple[Loc, str]] = []

        def check(loc: Loc, head: str, classes: Iterable[str], where: str = "") -> None:
            if head not in heads:
                problems.append((loc, f"{where}head '{head}' is not in the model, which has {sorted(heads)}"))
            elif unknown := sorted(set(classes) - heads[head]):
                problems.append((loc, f"{where}head '{head}' has no class {unknown}; it has {sorted(heads[head])}"))

        for i, rule in enumerate(self.config.rules):
            for head, classes in rule.when.items():
                check(("disposition", "rules", i, "when", head), head, classes, f"rule '{rule.name}': ")
        for head, thresholds in self.config.class_min_confidence.items():
            check(("disposition", "class_min_confidence", head), head, thresholds)
        for i, head in enumerate(self.config.heads or []):
            check(("disposition", "heads", i), head, [])
        return problems

    def check_against(self, card: ModelCard) -> None:
        """Refuse a model whose heads or classes the disposition table does not know."""
        if problems := self.misfits(card):
            raise UserError(f"model {card.version} does not fit the disposition table:\n  "
                            + "\n  ".join(f"{'.'.join(map(str, loc))}: {problem}" for loc, problem in problems))

    def threshold(self, head: str, label: str) -> float:
        return self.config.class_min_confidence.get(head, {}).get(label, self.config.min_confidence)

    def decide(self, prediction: Prediction) -> Decision:
        watched = self.config.heads or list(prediction)
        for head in watched:
            p = prediction[head]
            limit = self.threshold(head, p.label)
            if p.confidence < limit:
                return Decision("hold", f"low_confidence:{head}={p.label}", "hold")
        for rule in self.config.rules:
            if all(prediction[head].label in classes for head, classes in rule.when.items()):
                review = None
                if rule.disposition == "pass" and self._rng.random() < self.config.audit_rate:
                    review = "audit"
                return Decision(rule.disposition, rule.name, review)
        return Decision("hold", "no_rule", "hold")
