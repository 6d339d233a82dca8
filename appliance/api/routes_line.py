"""The line's state machine for engineers: Halt and Reset over the HTTP API.

A PLC halts and resets over OPC UA (or resets over Modbus); a halt can only be cleared over the
channel that set it (see :meth:`appliance.daemon.Daemon.check_reset`) — or here, by an engineer,
who may always reset.  The daemon audits both with channel ``api`` and the engineer's name.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from appliance.api.deps import Engineer, daemon_of
from appliance.daemon import ENGINEER_CHANNEL

router = APIRouter(tags=["line"])


def _state(daemon: Any) -> dict[str, Any]:
    return {"state": daemon.state, "halted_by": daemon.halted_by[0] if daemon.halted_by else None}


@router.post("/line/halt")
async def halt(who: Engineer, request: Request) -> dict[str, Any]:
    """Stop acquiring (vision state Halted) until a Reset; parts already acquired are finished."""
    daemon = daemon_of(request)
    await daemon.halt(ENGINEER_CHANNEL, who.name)
    return _state(daemon)


@router.post("/line/reset")
async def reset(who: Engineer, request: Request) -> dict[str, Any]:
    """Leave Halted/Error, whichever channel halted the line."""
    daemon = daemon_of(request)
    await daemon.reset(ENGINEER_CHANNEL, who.name)
    return _state(daemon)
