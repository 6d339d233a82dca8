"""What keeps PLC and user text inert in the dashboard and its exports, without a server: the escape
helper (checked by a CommonMark renderer), formula neutralisation, the headers middleware and the
dashboard's script hashes."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import re
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest
from markdown_it import MarkdownIt
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appliance.http_headers import API_HEADERS, SecurityHeaders, api_headers
from appliance.spreadsheet import neutralise_formulas
from dashboard import headers, ui

HOSTILE = [
    '<iframe srcdoc="<script>document.title=\'pwned\'</script>">',
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "![x](http://attacker.example/pixel.png)",
    "<img src=x onerror=alert(1)>",
    "**bold** _em_ `code` ~~gone~~ $x^2$ :red[red] # heading",
    "P-1\n\n<div onclick=alert(1)>block</div>",
    "' onmouseover='alert(1)",
    "&lt;script&gt; \\<b>",
]
RENDERER = MarkdownIt("commonmark", {"html": True})  # raw HTML passes, as with unsafe_allow_html


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_itself_in_markdown_and_in_html(text: str) -> None:
    inert = ui.esc(text)
    assert not re.search(r"[<>\[\]()`*_~$\\'\"\n]", inert), "no character that Markdown or HTML would read"
    for page in (inert, f"<span class='muted' title='{inert}'>{inert}</span>", f"<div>{inert}</div>"):
        rendered = RENDERER.render(page)
        assert not re.search(r"<(?!/?(p|span|div)\b)", rendered), f"a tag formed: {rendered}"
        shown = re.sub(r"<[^>]+>", "", rendered)
        assert html.unescape(shown).strip() == text.strip(), "the reader sees the text as it was stored"


def test_plain_names_stay_readable() -> None:
    assert ui.esc("olga") == "olga"
    assert html.unescape(ui.esc("P-0031 · 1/3")) == "P-0031 · 1/3"


def csv_cells(batch: pa.RecordBatch) -> list[dict[str, str]]:
    sink = io.BytesIO()
    with pa_csv.CSVWriter(sink, batch.schema) as writer:
        writer.write_batch(neutralise_formulas(batch))
    return list(csv.DictReader(io.StringIO(sink.getvalue().decode(), newline="")))


def test_formula_cells_are_neutralised_numbers_are_not() -> None:
    batch = pa.record_batch({
        "part_id": ['=HYPERLINK("http://x","y")', "@SUM(A1)", "+1", "-1", "\t=1", "\r=1", "P-0001", None],
        "total_ms": [-1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        "seq": pa.array([-1, 2, 3, 4, 5, 6, 7, 8], pa.int64()),
    })
    rows = csv_cells(batch)
    assert [r["part_id"] for r in rows] == ['\'=HYPERLINK("http://x","y")', "'@SUM(A1)", "'+1", "'-1", "'\t=1",
                                            "'\r=1", "P-0001", ""]
    assert rows[0]["total_ms"] == "-1.5" and rows[0]["seq"] == "-1", "numbers stay numbers"


def test_large_strings_are_neutralised_too() -> None:
    for kind in (pa.string(), pa.large_string()):
        batch = pa.record_batch({"batch": pa.array(["=1+1", "ok"], kind)})
        assert neutralise_formulas(batch).column(0).to_pylist() == ["'=1+1", "ok"]


async def get(app: Any, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path)


def test_headers_are_added_without_replacing_a_routes_own() -> None:
    async def route(request: object) -> PlainTextResponse:
        return PlainTextResponse("hi", headers={"Cache-Control": "max-age=60"})

    app = Starlette(routes=[Route("/page", route), Route("/docs", route)])
    app.add_middleware(SecurityHeaders, headers_for=api_headers)
    page, docs = asyncio.run(get(app, "/page")), asyncio.run(get(app, "/docs"))
    assert page.headers["content-security-policy"] == API_HEADERS["Content-Security-Policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "max-age=60", "a route's own header wins"
    assert docs.headers["content-security-policy"] == "frame-ancestors 'none'", "Swagger UI loads its CDN script"


def test_websockets_pass_untouched() -> None:
    seen: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(send)

    async def receive() -> dict[str, Any]:
        raise AssertionError("not called")

    async def send(message: Any) -> None:
        raise AssertionError("not called")

    asyncio.run(SecurityHeaders(inner, headers_for=api_headers)({"type": "websocket", "path": "/ws"}, receive, send))
    assert seen == [send], "the WebSocket's own send, not a wrapper"


def test_the_dashboard_policy_hashes_streamlits_inline_script() -> None:
    index = headers.INDEX_HTML.read_text(encoding="utf-8")
    hashes = headers.inline_script_hashes(index)
    assert len(hashes) == index.count("<script>"), "one hash per inline script, none for <script src=…>"
    policy = dict(d.split(" ", 1) for d in headers.HEADERS["Content-Security-Policy"].split("; "))
    assert all(h in policy["script-src"] for h in hashes)
    assert "'unsafe-inline'" not in policy["script-src"] and "'unsafe-eval'" not in policy["script-src"]
    assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"
    assert headers.inline_script_hashes("<script>a</script><script src='x.js'></script>") == [
        "'sha256-ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs='"]
