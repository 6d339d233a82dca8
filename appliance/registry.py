"""Model versions in the daemon's state directory, and which one is the champion (served).

Layout: ``<state>/models/<version>/{model.onnx, model.json}`` and ``<state>/models/champion``
(a one-line text file naming the served version, replaced atomically).  A package is admitted
only after it loads, passes its checksum and output contract, and runs on a blank image.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import ModelRejected, UnknownModel
from appliance.inference import Classifier
from appliance.model_package import ModelCard, read_card

CHAMPION_FILE = "champion"
HISTORY_FILE = "history.jsonl"


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, version: str) -> Path:
        if "/" in version or version.startswith("."):
            raise ModelRejected(f"invalid model version '{version}'")
        return self.root / version

    def versions(self) -> list[ModelCard]:
        """All admitted versions, oldest first; damaged or misnamed folders are left out."""
        cards = []
        for child in sorted(self.root.glob("*/model.json")):
            try:
                card = read_card(child.parent)
            except ModelRejected:
                continue
            if card.version == child.parent.name:  # a copied folder is not a version of its own
                cards.append(card)
        return sorted(cards, key=lambda c: c.created_at)

    def card(self, version: str) -> ModelCard:
        """The card of a registered version: its folder exists, its package is sound, and it holds the
        version it is named after (a copied folder would otherwise serve under another name)."""
        path = self.path(version)
        if not path.is_dir():
            raise UnknownModel(f"no model version '{version}' in the registry ({self.root})")
        card = read_card(path)
        if card.version != version:
            raise ModelRejected(f"{path} holds model {card.version}: a registry folder must be named after its "
                                "version (`appliance train --register` copies a package in)")
        return card

    def register(self, package_dir: Path) -> ModelCard:
        """Check a package fully (load + warm) and copy it in; returns its card."""
        card = Classifier(package_dir, warmup_runs=1).card
        target = self.path(card.version)
        if target.exists():
            if read_card(target).onnx_sha256 != card.onnx_sha256:
                raise ModelRejected(f"version {card.version} is already registered with other contents")
            return card
        tmp = self.root / f".{card.version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(package_dir, tmp)
        tmp.rename(target)
        return card

    def champion(self) -> str | None:
        try:
            version = (self.root / CHAMPION_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return version or None

    def champion_path(self) -> Path | None:
        version = self.champion()
        return self.path(version) if version else None

    def set_champion(self, version: str, action: str = "promote", by: str | None = None) -> None:
        """Make ``version`` the served model and record who did it (the rollback history)."""
        read_card(self.path(version))  # refuses a missing or damaged package
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.champion()
        tmp = self.root / f".{CHAMPION_FILE}.tmp"
        tmp.write_text(version + "\n", encoding="utf-8")
        os.replace(tmp, self.root / CHAMPION_FILE)
        entry = {"at": datetime.now(UTC).isoformat(), "action": action, "version": version,
                 "previous": previous, "by": by}
        with (self.root / HISTORY_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict[str, Any]]:
        try:
            lines = (self.root / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def rollback_target(self) -> str | None:
        """The champion the current one replaced when it was promoted (rollbacks walk further back)."""
        current = self.champion()
        for entry in reversed(self.history()):
            if entry["action"] == "promote" and entry["version"] == current:
                return str(entry["previous"]) if entry["previous"] else None
        return None
