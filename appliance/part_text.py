"""Text a PLC writes about a part (part id, batch): a small, documented character set.

A part id travels from the PLC into the store, the dashboard, CSV exports, logs and the OPC UA
and Modbus result registers.  Rather than trust every one of those sinks to escape it, the wire
refuses anything outside :data:`SAFE_TEXT` (each channel with its own refusal: OPC UA
BadOutOfRange, Modbus exception 03, HTTP 422) — and the sinks still escape what they show.
"""

from __future__ import annotations

import re

MAX_PART_TEXT = 128
SAFE_CHARACTERS = "letters A-Z a-z, digits 0-9, space and - _ . : / # +"
SAFE_TEXT = re.compile(r"[A-Za-z0-9 _.:/#+-]*")


class UnsafeText(ValueError):
    """Part text outside the safe character set or too long; the message says which and why."""


def check_part_text(value: str, what: str, max_length: int = MAX_PART_TEXT) -> str:
    """``value`` stripped of surrounding spaces, or UnsafeText naming ``what`` and the first bad character.

    Spreadsheet formulas begin with '=', '+', '-' or '@'; '+' and '-' are allowed inside a part
    id (``A-17``, ``+5V``) but not as its first character, so no export cell can start a formula.
    """
    text = value.strip()
    if len(text) > max_length:
        raise UnsafeText(f"{what}: longer than {max_length} characters")
    if not SAFE_TEXT.fullmatch(text):
        bad = next(c for c in text if not SAFE_TEXT.fullmatch(c))
        raise UnsafeText(f"{what}: character {bad!r} is not allowed (allowed: {SAFE_CHARACTERS})")
    if text[:1] in ("+", "-"):
        raise UnsafeText(f"{what}: must not start with {text[0]!r} (a spreadsheet would read a formula)")
    return text


def loggable(value: object, max_length: int = 64) -> str:
    """Untrusted text (a login name, a peer's string) made safe for one log line: control
    characters and newlines escaped, cut to ``max_length``, so nobody can forge a line."""
    text = str(value)
    cut = text[:max_length]
    safe = cut.encode("unicode_escape").decode("ascii")
    return safe + ("…" if len(text) > max_length else "")
