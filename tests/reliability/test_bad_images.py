"""Corrupt, empty, huge and wrong-format files in a replay folder: one failed part each, nothing else.

A finite replay (no loop) of good images with the bad ones mixed in.  Every file must give exactly
one result: the unreadable ones ``status failed``, ``disposition hold``, ``rule image_error`` with
an error message; every good image judged as usual; the camera must not reconnect (a
reconnect replays the folder from the start: parts judged twice) and the line must finish the
folder.  Formats the appliance deliberately reads (16-bit TIFF, RGBA PNG, a 50 MB but valid BMP)
are judged like any other image.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.daemon import Daemon
from appliance.store import ResultFilter
from tests.brightness_model import GRADES, brightness_for
from tests.conftest import write_grade_images
from tests.reliability.conftest import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

EXPECTED = {"0": "pass", "1/3": "rework", "2/3": "reject", "1": "reject"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR (valid CRC) claims ``width``×``height`` 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def png_bomb(side: int) -> bytes:
    """A real, complete PNG of side² black pixels: a few hundred kB that would decode to side² bytes."""
    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_claiming(side, side, idat)


def dds_unknown_pixel_format() -> bytes:
    """A DDS header with pixel-format flags Pillow does not know (its plugin raises NotImplementedError)."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44)
    header += struct.pack("<8I", 32, 0x1000, 0, 8, 0, 0, 0, 0) + bytes(20)
    return b"DDS " + header + bytes(64 * 64)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def bad_files(folder: Path, rng: np.random.Generator) -> tuple[dict[str, bytes], dict[str, str | None]]:
    """(unreadable files by name, readable odd formats by name → expected disposition)."""
    good_png = encoded(Image.fromarray(np.full((48, 64), brightness_for("0"), np.uint8)), "PNG")
    bad = {
        "b00-empty.png": b"",
        "b01-text.png": b"this is a text file, not an image\n" * 20,
        "b02-pdf.png": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 10,
        "b03-truncated.png": good_png[: len(good_png) // 2],
        "b04-claims-100000x100000.png": png_claiming(100_000, 100_000),
        "b05-bomb-9000x9000.png": png_bomb(9000),
        "b06-random-50MB.tif": b"II*\x00" + rng.integers(0, 256, 50 << 20, dtype=np.uint8).tobytes(),
        "b07-tiny-4x4.png": encoded(Image.fromarray(np.full((4, 4), 32, np.uint8)), "PNG"),
        "b08-jpeg-soi-only.jpg": b"\xff\xd8\xff",
        "b09-unknown-dds-format.png": dds_unknown_pixel_format(),
        "b10-bit-flipped.png": bytes(b ^ 0x10 if 40 < i < 80 else b for i, b in enumerate(good_png)),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / "b11-a-folder.png").mkdir()  # a directory with an image name: cannot be read
    bad["b11-a-folder.png"] = b""
    grey16 = (np.full((48, 64), brightness_for("1"), np.uint16) * 256 + 255).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "o00-16bit.tif")
    rgba = np.dstack([np.full((48, 64), brightness_for("1/3"), np.uint8)] * 3 + [np.full((48, 64), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "o01-rgba.png")
    Image.fromarray(np.full((4096, 4096, 3), brightness_for("2/3"), np.uint8)).save(folder / "o02-50MB.bmp")
    odd = {"o00-16bit.tif": None, "o01-rgba.png": "rework", "o02-50MB.bmp": "reject"}  # None: any
    return bad, odd


async def test_bad_files_fail_one_part_each_and_nothing_else(tmp_path: Path, line_config) -> None:
    images = tmp_path / "images"
    good_grades = [GRADES[i % len(GRADES)] for i in range(24)]
    good = write_grade_images(images, good_grades)
    bad, odd = bad_files(images, np.random.default_rng(5))
    total = len(good) + len(bad) + len(odd)
    cfg = line_config(images, camera={"view": "top", "source": "replay", "queue_size": 64,
                                      "replay": {"path": str(images), "rate_hz": 20, "loop": False}},
                      store={"retention": {"pass": 0.0, "rework": 0.0, "reject": 0.0, "min_free_mb": 0}})
    daemon = Daemon(cfg)
    await daemon.start()
    started = time.monotonic()
    try:
        await daemon.wait_for_results(total, timeout=120)
        deadline = time.monotonic() + 10
        while not daemon.source_done and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        finished_s = time.monotonic() - started
        await asyncio.sleep(1.0)  # anything judged twice would show up now
        daemon.store.flush()
        rows = daemon.store.query(ResultFilter(limit=10_000))
        health = daemon.health()
    finally:
        await daemon.stop()

    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(Path(r["source_ref"]).name, []).append(r)
    figures = record("bad_images", files=total, bad=len(bad), odd_but_readable=len(odd), good=len(good),
                     results=len(rows), failed=health["failed"], frames=health["frames"],
                     dropped=health["dropped"], finished_s=round(finished_s, 1),
                     errors={n: by_name[n][0]["error"][:90] for n in bad if by_name.get(n)})
    assert daemon.source_done, f"the replay did not reach the end of the folder: {figures}"
    twice = {n: len(v) for n, v in by_name.items() if len(v) != 1}
    assert not twice, f"files judged more than once (the camera reconnected and replayed): {twice}"
    assert len(rows) == total and health["dropped"] == 0, figures
    for name in bad:
        (r,) = by_name[name]
        assert (r["status"], r["disposition"], r["rule"], r["review"]) == ("failed", "hold", "image_error",
                                                                           "hold"), r
        assert r["error"] and r["predictions"] == [], r
    for path, grade in zip(good, good_grades, strict=True):
        (r,) = by_name[path.name]
        assert r["status"] == "ok" and r["disposition"] == EXPECTED[grade], r
    for name, disposition in odd.items():
        (r,) = by_name[name]
        assert r["status"] == "ok" and disposition in (None, r["disposition"]), r
    assert health["failed"] == len(bad) and health["state"] == "operational"
