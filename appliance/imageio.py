"""Decoding image files into the uint8 arrays the classifier takes (shared by training and the line)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from appliance.inference import BadImage

MAX_PIXELS = 64_000_000
"""Larger images are refused before decoding (a decompression bomb would stall the line)."""


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/BMP/TIFF bytes to H×W (mono) or H×W×3 (colour) uint8."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(f"{name}: {im.width}×{im.height} px exceeds the {MAX_PIXELS:,} px limit")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                top = float(arr.max()) or 1.0
                return (arr * (255.0 / top)).round().astype(np.uint8)
            if im.mode in ("L", "RGB"):
                im.load()
                return np.asarray(im, dtype=np.uint8)
            colour = im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA", "RGBX")
            return np.asarray(im.convert("RGB" if colour else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, RuntimeError,
            EOFError, LookupError, TypeError, ArithmeticError, struct.error) as exc:  # any Pillow plugin's complaint
        raise BadImage(f"{name}: not a readable image ({exc})") from exc


def read_image(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror})") from exc
    return decode_image(data, str(path))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
