"""GenICamSource against real harvesters and real simulated GenTL producers (no mocks).

viky.cti (genicam 1.6.0): 3 free-running devices, serials "0".."2", 400×400 RGBa8 or Mono8, no
offsets, no trigger.  TLSimu.cti (genicam 1.5.0, fetched once): 4 devices, TriggerMode/TriggerSoftware,
mono devices deliver Mono8 and colour devices RGB8 whatever PixelFormat says.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from appliance.camera.base import Frame, TriggerNotSupported
from appliance.camera.genicam import GenICamError, GenICamSource, to_image
from appliance.config import GenICamConfig, RoiConfig
from appliance.errors import UserError
from tests.genicam_producers import VIKY_CTI, ProducerUnavailable, tlsimu_cti


@pytest.fixture(scope="session")
def tlsimu() -> Path:
    try:
        return tlsimu_cti()
    except ProducerUnavailable as exc:
        pytest.fail(f"TLSimu.cti is unavailable, so triggered acquisition cannot be tested: {exc}")


def viky(**settings: object) -> GenICamSource:
    return GenICamSource(GenICamConfig(cti=VIKY_CTI, **settings), camera_view="top")


async def take(source: GenICamSource, count: int, timeout: float = 5.0) -> list[Frame]:
    frames = source.frames()
    return [await asyncio.wait_for(anext(frames), timeout) for _ in range(count)]


async def drain(frames: AsyncIterator[Frame]) -> list[Frame]:
    return [frame async for frame in frames]


async def drain_queued(source: GenICamSource) -> None:
    """Take whatever frames are already waiting (a frame arrives well within 0.1 s when one is queued)."""
    while not await nothing_within(source, 0.1):
        pass


async def nothing_within(source: GenICamSource, seconds: float) -> bool:
    try:
        await asyncio.wait_for(anext(source.frames()), seconds)
    except TimeoutError:
        return True
    return False


async def test_free_running_frames_have_shape_ids_and_chunk_data() -> None:
    async with viky() as source:
        frames = await take(source, 5)
        assert source.online
    for frame in frames:
        assert frame.error is None
        assert frame.image is not None and frame.image.dtype == np.uint8
        assert frame.image.shape == (400, 400, 3)  # RGBa8 with the alpha dropped
        assert frame.camera_view == "top"
        assert frame.source_ref == f"0#{frame.meta['frame_id']}"
        assert frame.meta["pixel_format"] == "RGBa8"
        assert "ChunkNrBounces" in frame.meta["chunk"]
    ids = [frame.meta["frame_id"] for frame in frames]
    assert len(set(ids)) == 5 and ids == sorted(ids)


@pytest.mark.parametrize(("pixel_format", "shape"), [("Mono8", (112, 128)), ("RGBa8", (112, 128, 3))])
async def test_pixel_format_and_roi_are_applied(pixel_format: str, shape: tuple[int, ...]) -> None:
    roi = RoiConfig(width=128, height=112)
    async with viky(device="2", pixel_format=pixel_format, roi=roi, frame_rate=100.0) as source:
        frames = await take(source, 3)
    assert all(f.image is not None and f.image.shape == shape for f in frames)
    assert all(f.meta["pixel_format"] == pixel_format and f.source_ref.startswith("2#") for f in frames)


async def test_frame_rate_is_applied() -> None:
    async with viky(frame_rate=200.0) as source:  # viky runs at 20 fps unless told otherwise
        frames = await take(source, 11)
    elapsed_s = (frames[-1].acquired_ns - frames[0].acquired_ns) / 1e9
    assert elapsed_s < 0.3, f"10 frame intervals took {elapsed_s:.3f} s; 200 fps needs 0.05 s, 20 fps 0.5 s"


async def test_a_missing_device_names_the_devices_found() -> None:
    for device in ("no-such-serial", 7):
        with pytest.raises(UserError, match=r"camera\.genicam\.device") as caught:
            await viky(device=device).open()
        assert "serial '0'" in str(caught.value) and "serial '2'" in str(caught.value)


async def test_a_missing_cti_is_a_clear_error(tmp_path: Path) -> None:
    source = GenICamSource(GenICamConfig(cti=tmp_path / "nope.cti"), camera_view="top")
    with pytest.raises(UserError, match=r"camera.genicam.cti: .*nope.cti does not exist"):
        await source.open()
    assert not source.online
    (tmp_path / "garbage.cti").write_bytes(b"not a shared library")
    source = GenICamSource(GenICamConfig(cti=tmp_path / "garbage.cti"), camera_view="top")
    with pytest.raises(UserError, match=r"no device 0 via .*garbage.cti; found: none \(is the camera"):
        await source.open()


@pytest.mark.parametrize(("settings", "message"), [
    ({"triggered": True}, "no TriggerMode feature"),
    ({"roi": RoiConfig(offset_x=8, width=128, height=128)}, "no OffsetX feature"),
    ({"pixel_format": "Mono16"}, r"refused PixelFormat = 'Mono16' \(it offers RGBa8, Mono8\)"),
    ({"roi": RoiConfig(width=4000, height=128)}, "refused Width = 4000.*Max = 800"),
])
async def test_settings_the_device_cannot_honour_are_clear_errors(settings: dict, message: str) -> None:
    source = viky(**settings)
    with pytest.raises(UserError, match=message):
        await source.open()
    assert not source.online
    async with viky() as again:  # the failed open released the producer
        assert len(await take(again, 1)) == 1


async def test_free_running_source_refuses_a_trigger() -> None:
    async with viky() as source:
        with pytest.raises(TriggerNotSupported):
            await source.trigger()


async def test_triggered_mode_delivers_exactly_one_frame_per_trigger(tlsimu: Path) -> None:
    roi = RoiConfig(width=64, height=32)
    async with GenICamSource(GenICamConfig(cti=tlsimu, triggered=True, roi=roi), "side") as source:
        assert source.online
        assert await nothing_within(source, 0.5)
        ids = []
        for _ in range(3):
            await source.trigger()
            (frame,) = await take(source, 1, timeout=2.0)
            assert frame.error is None and frame.image is not None and frame.image.shape == (32, 64)
            ids.append(frame.meta["frame_id"])
            assert await nothing_within(source, 0.3)
        assert len(set(ids)) == 3


async def test_triggered_colour_device_delivers_rgb(tlsimu: Path) -> None:
    config = GenICamConfig(cti=tlsimu, device="SN_InterfaceA_1", triggered=True, pixel_format="RGB8",
                           roi=RoiConfig(width=64, height=32))
    async with GenICamSource(config, "side") as source:
        await source.trigger()
        (frame,) = await take(source, 1)
    assert frame.image is not None and frame.image.shape == (32, 64, 3)
    assert frame.meta["pixel_format"] == "RGB8"


async def test_the_mode_switches_between_free_running_and_triggered(tlsimu: Path) -> None:
    config = GenICamConfig(cti=tlsimu, roi=RoiConfig(width=64, height=32))
    async with GenICamSource(config, "side") as source:
        assert len(await take(source, 3)) == 3  # runs free as configured
        with pytest.raises(TriggerNotSupported):
            await source.trigger()
        await source.set_continuous(False)
        await asyncio.wait_for(drain_queued(source), 1.0)  # frames acquired before the switch
        assert await nothing_within(source, 0.3)
        await source.trigger()
        (frame,) = await take(source, 1)
        assert frame.image is not None and await nothing_within(source, 0.3)
        await source.set_continuous(True)
        assert len(await take(source, 3)) == 3


async def test_a_device_without_trigger_cannot_leave_free_running() -> None:
    async with viky() as source:
        with pytest.raises(TriggerNotSupported, match="no software trigger"):
            await source.set_continuous(False)
        assert source.online and len(await take(source, 1)) == 1


async def test_a_device_without_a_frame_rate_feature_says_so(tlsimu: Path) -> None:
    with pytest.raises(UserError, match=r"camera\.genicam\.frame_rate: .* no AcquisitionFrameRate feature"):
        await GenICamSource(GenICamConfig(cti=tlsimu, frame_rate=10.0), "side").open()


async def test_close_is_idempotent_and_the_source_reopens() -> None:
    source = viky()
    await source.open()
    first = await take(source, 2)
    frames = source.frames()
    await source.close()
    await source.close()
    assert not source.online
    # A consumer gets the frames acquired before close, then the iteration ends.
    leftover = await asyncio.wait_for(drain(frames), 1.0)
    assert len(leftover) <= 16
    async with source:  # the daemon reconnects by opening the same source again
        again = await take(source, 2)
        assert source.online
    assert not source.online
    assert all(f.image is not None for f in first + again)


async def test_a_hung_driver_call_never_blocks_the_loop_and_close_is_bounded() -> None:
    source = viky()
    source.close_timeout_s = 0.5
    await source.open()
    thread = source._thread
    assert thread is not None
    release = threading.Event()
    thread.submit(release.wait)  # as if the producer hung inside a C call
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    await source.close()
    elapsed = time.monotonic() - started
    ticker.cancel()
    assert elapsed < 1.5 and ticks >= 20  # the loop kept running while close waited
    assert not source.online
    with pytest.raises(GenICamError, match="seems hung"):
        await asyncio.wait_for(drain(source.frames()), 1.0)
    release.set()  # the old thread then finishes its teardown and releases the producer
    await asyncio.wait_for(asyncio.wrap_future(thread.exited), 5.0)
    async with source:
        assert len(await take(source, 1)) == 1


async def test_a_trigger_the_driver_never_answers_takes_the_source_offline(tlsimu: Path) -> None:
    source = GenICamSource(GenICamConfig(cti=tlsimu, triggered=True, fetch_timeout_s=0.3), "side")
    await source.open()
    thread = source._thread
    assert thread is not None
    release = threading.Event()
    thread.submit(release.wait)  # as if the producer hung inside a C call
    with pytest.raises(GenICamError, match=r"TriggerSoftware did not return within 0\.35 s"):
        await source.trigger()
    assert not source.online
    started = time.monotonic()
    await source.close()  # known to be stuck: close does not wait again
    assert time.monotonic() - started < 0.2
    release.set()  # the old thread then releases the producer for the next test
    await asyncio.wait_for(asyncio.wrap_future(thread.exited), 5.0)


def test_conversion_to_rgb_drops_alpha_swaps_bgr_and_line_padding() -> None:
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8)
    rgba = to_image(pixels, 3, 2, "RGBa8")
    assert rgba.shape == (2, 3, 3)
    assert rgba[0, 0].tolist() == [0, 1, 2] and rgba[1, 2].tolist() == [20, 21, 22]
    bgr = to_image(np.arange(2 * 3 * 3, dtype=np.uint8), 3, 2, "BGR8")
    assert bgr[0, 0].tolist() == [2, 1, 0]
    padded = np.arange(2 * 5, dtype=np.uint8)  # Mono8 3×2 with 2 bytes of padding per line
    assert to_image(padded, 3, 2, "Mono8").tolist() == [[0, 1, 2], [5, 6, 7]]
    assert not np.shares_memory(to_image(pixels, 3, 2, "RGBa8"), pixels)  # owns its memory
    assert not np.shares_memory(to_image(padded, 3, 2, "Mono8"), padded)


def test_unsupported_pixel_formats_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="pixel format Mono12 is not supported"):
        to_image(np.zeros(12, dtype=np.uint8), 2, 2, "Mono12")
    with pytest.raises(ValueError, match="needs 12 bytes; got 8"):
        to_image(np.zeros(8, dtype=np.uint8), 2, 2, "RGB8")
