"""Generated image files for tests: real encodings of ordinary and hostile inputs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array."""
    return encode(Image.fromarray(array), "PNG")


def product_photo(size=(300, 400), garment_value=60, seed=0) -> Image.Image:
    """A dark 'garment' (a trouser-like shape) on a white background, like a catalog shot."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), 250, np.uint8)
    x0, x1, y0, y1 = w // 4, 3 * w // 4, h // 8, 7 * h // 8
    arr[y0:y1, x0:x1] = garment_value
    arr[y0 + (y1 - y0) // 3 : y1, w // 2 - w // 40 : w // 2 + w // 40] = 250  # the gap between the legs
    arr = np.clip(arr.astype(int) + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG header declaring width × height, with a tiny (wrong) payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def animated_gif(frames: int = 3) -> bytes:
    images = [Image.new("L", (32, 32), 40 + 80 * i) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buffer.getvalue()


def jpeg_with_orientation(orientation: int = 6) -> bytes:
    """A 60×30 JPEG (left half black, right half white) with an EXIF Orientation tag."""
    arr = np.zeros((30, 60), np.uint8)
    arr[:, 30:] = 255
    image = Image.fromarray(arr, "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


HOSTILE_UPLOADS: dict[str, bytes] = {
    "empty": b"",
    "truncated_jpeg": encode(product_photo(), "JPEG")[:600],
    "truncated_png": encode(product_photo(), "PNG")[:300],
    "text": b"just some words, definitely not pixels\n" * 4,
    "html": b"<!DOCTYPE html><html><head><title>Shop</title></head><body><img src='x.jpg'></body></html>",
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "random_binary": bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)),
    "bomb": png_with_declared_size(100_000, 100_000),
    "zero_size": png_with_declared_size(0, 10),
}
