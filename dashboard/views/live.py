"""Live: what the line is doing now.  Refreshes every few seconds inside a fragment, so only this
part of the page is redrawn (no flicker, no full rerun, filters elsewhere keep their state)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import streamlit as st
from PIL import Image

from dashboard import charts, ui

REFRESH_S = 5
THUMBNAILS = 8


def thumbnail(result_id: str) -> bytes | None:
    """The archived image, fetched once per result and kept for this session (images never change)."""
    cache: dict[str, bytes | None] = st.session_state.setdefault("thumbs", {})
    if result_id not in cache:
        try:
            cache[result_id] = ui.api().content(f"/results/{result_id}/image")
        except ui.ApiError:
            cache[result_id] = None
        if len(cache) > 200:
            cache.pop(next(iter(cache)))
    return cache[result_id]


def aspect_ratio(images: list[bytes | None]) -> float:
    """Width / height of the first archived image (the line's camera), else square."""
    for image in images:
        if image:
            with contextlib.suppress(OSError):
                width, height = Image.open(io.BytesIO(image)).size
                return width / height
    return 1.0


def plc_status(health: dict[str, Any]) -> tuple[str, bool | None]:
    """The PLC links the daemon reports (OPC UA / Modbus), if its /health says anything about them."""
    plc = health.get("plc")
    if isinstance(plc, dict) and plc:
        parts, ok = [], True
        for name, info in plc.items():
            up = info.get("online", info.get("running")) if isinstance(info, dict) else bool(info)
            clients = info.get("clients") if isinstance(info, dict) else None
            parts.append(f"{name} {'up' if up else 'down'}" + (
                "" if clients is None else f" ({clients} client{'' if clients == 1 else 's'})"))
            ok = ok and bool(up)
        return ", ".join(parts), ok
    return "not reported", None


def head_order(version: str | None) -> list[str]:
    """The serving model's heads in its card's order (severity before type for ELPV), fetched once
    per version: the API lists a part's predictions by head name."""
    orders: dict[str, list[str]] = st.session_state.setdefault("head_order", {})
    if version and version not in orders:
        card = ui.call(lambda: ui.api().get("/model"), "read the model's heads")
        orders[version] = [h["name"] for h in card["heads"]] if card and card.get("version") == version else []
    return orders.get(version or "", [])


def prediction_lines(result: dict[str, Any], order: list[str]) -> str:
    """One line per head, 'label · confidence', the head's name on hover; the error of a failed part."""
    if not result["predictions"]:
        return ui.esc(result.get("error") or "")
    rank = {name: i for i, name in enumerate(order)}
    heads = sorted(result["predictions"], key=lambda p: rank.get(p["head"], len(rank)))
    return "<br>".join(f"<span title='{ui.esc(p['head'])}'>{ui.esc(p['label'])} · "
                       f"{p['confidence']:.0%}</span>" for p in heads)


def status_line(label: str, text: str, ok: bool | None) -> None:
    """A figure under its label; both are shown as text (they carry names the daemon reports)."""
    css = "status-ok" if ok else "status-bad" if ok is False else "muted"
    st.markdown(f"{ui.esc(label)}<br><span class='{css} big-label'>{ui.esc(text)}</span>", unsafe_allow_html=True)


@st.fragment(run_every=REFRESH_S)
def live() -> None:
    api = ui.api()
    health = ui.call(lambda: api.get("/health"), "read the line status")
    summary = ui.call(lambda: api.get("/analytics/live", minutes=15), "read the live figures")
    if health is None or summary is None:
        return
    cols = st.columns(5)
    cols[0].metric("Parts / min", f"{summary['parts_per_min']:.0f}", border=True,
                   help="Average of the last complete minutes (15-minute window)")
    cols[1].metric("Defect rate", ui.pct(summary["defect_rate"]), border=True,
                   help="(rework + reject) / decided parts, last 15 minutes")
    cols[2].metric("Holds waiting", summary["holds_waiting"], border=True,
                   help="Held parts nobody has labelled yet")
    cols[3].metric("Parts, 15 min", summary["parts"], border=True)
    cols[4].metric("Audit samples", summary["audits_waiting"], border=True,
                   help="Confident passes sampled for review, to measure the escape rate")
    camera = health.get("camera", {})
    state = health.get("state", "?")
    plc_text, plc_ok = plc_status(health)
    s = st.columns([1, 1, 1.3, 0.8, 1.3])
    with s[0]:
        status_line("Line state", state, state == "operational")
    with s[1]:
        cam_ok = bool(camera.get("online"))
        status_line(f"Camera '{camera.get('view', '?')}'", "online" if cam_ok else "offline", cam_ok)
    with s[2]:
        status_line("PLC", plc_text, plc_ok)
    with s[3]:
        latency = health.get("decided_latency_ms", {}).get("p99")
        status_line("Latency p99", "—" if latency is None else f"{latency:.0f} ms", None)
    with s[4]:
        shadow = health.get("shadow")
        status_line("Model" + (f" · shadow {shadow['version']}" if shadow else ""),
                    health.get("model_version") or "none", health.get("model_version") is not None)

    left, right = st.columns([1, 1])
    with left:
        st.subheader("Disposition mix · last 15 min")
        st.altair_chart(charts.disposition_mix(summary["mix"]), width="stretch")
        st.markdown(" ".join(f"{ui.badge(d)} {summary['mix'].get(d, 0)}" for d in ui.DISPOSITIONS),
                    unsafe_allow_html=True)
    with right:
        st.subheader("Parts per minute")
        st.altair_chart(charts.throughput(summary["per_minute"]), width="stretch")

    st.subheader("Last parts")
    page = ui.call(lambda: api.get("/results", limit=THUMBNAILS), "read the last parts")
    if not page or not page["results"]:
        st.info("No parts yet.")
        return
    order = head_order(health.get("model_version"))
    grid = st.columns(THUMBNAILS)
    images = [thumbnail(r["result_id"]) if r.get("image_ref") else None for r in page["results"]]
    ratio = aspect_ratio(images)
    for col, r, image in zip(grid, page["results"], images, strict=False):
        with col:
            if image:
                st.image(image, width="stretch")
            else:  # a box the size of the others, so the rows below stay aligned
                st.markdown(f"<div class='no-image' style='aspect-ratio: {ratio}'>image not kept"
                            f"{' (passes are sampled)' if r['disposition'] == 'pass' else ''}</div>",
                            unsafe_allow_html=True)
            st.markdown(f"{ui.badge(r['disposition'])}<br><span class='muted'>{ui.esc(r.get('part_id') or '')}"
                        f"<br>{prediction_lines(r, order)}<br>{ui.esc(ui.when(r['acquired_at'])[11:])}</span>",
                        unsafe_allow_html=True)


st.title("Live")
live()
