"""Safe decoding of untrusted images: whatever a user uploads becomes an 8-bit PIL image or a clear error.

:func:`load_image` decodes a path, bytes, file object, PIL image or numpy array into an 8-bit
``RGB`` or ``L`` PIL image: EXIF orientation applied, alpha composited on white,
palette/CMYK/16-bit/float converted, animated images reduced to their first frame, huge photos
downscaled right after decoding, and every kind of bad input (empty, truncated, text, HTML, SVG,
PDF, archives, NaN arrays, decompression bombs) turned into an
:class:`~fashsim.errors.InvalidImageError` with a readable message.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidImageError

#: refuse to decode images that declare more pixels than this (decompression-bomb guard) ...
MAX_PIXELS = 64_000_000
#: ... except JPEG photos, up to 4× that (a 108 MP phone camera's): they are decoded at reduced
#: scale (``draft``, 1/8 of each side at most), so they never take their full size in memory.
JPEG_PIXELS_FACTOR = 4
#: refuse files larger than this many bytes.
MAX_BYTES = 64 * 1024 * 1024
#: photos are downscaled to at most this longest side right after decoding.
WORKING_SIZE = 1024


_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _describe_non_image(data: bytes) -> str:
    """A guess at what non-image bytes are, for the error message."""
    for magic, kind in _IMAGE_MAGIC:
        if data.startswith(magic):
            return f"a {kind} file whose header is invalid (damaged, or an image of zero size)"
    head = data[:512].lstrip().lower()
    if head.startswith(b"%pdf"):
        return "a PDF document, not an image (export the page as PNG or JPEG)"
    if b"<svg" in head or (head.startswith(b"<?xml") and b"svg" in data[:4096].lower()):
        return "an SVG vector drawing, which fashsim cannot rasterise (export it as PNG or JPEG)"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "an HTML web page, not an image (save the image itself, not the page)"
    if head.startswith((b"pk\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf")):
        return "an archive (zip/gzip/7z), not an image"
    try:
        data[:4096].decode("utf-8")
        return "text, not an image"
    except UnicodeDecodeError:
        return "not an image format fashsim can read (use JPEG, PNG, WebP, GIF, BMP or TIFF)"


def _open(source) -> tuple[Image.Image, str]:
    """Open ``source`` lazily (header only); returns the image and a name for messages."""
    if isinstance(source, Image.Image):
        return source, "image"
    if isinstance(source, np.ndarray):
        return _from_array(source), "array"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise InvalidImageError(f"{path}: a folder, not an image file")
        if not path.is_file():
            raise InvalidImageError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        size = path.stat().st_size
        name = str(path)
        if size > MAX_BYTES:
            raise InvalidImageError(f"{name}: {size / 2**20:.0f} MiB is larger than the {MAX_BYTES // 2**20} MiB limit")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "upload"
    elif hasattr(source, "read"):
        data, name = source.read(MAX_BYTES + 1), getattr(source, "name", "upload")
    else:
        raise InvalidImageError(f"cannot read an image from a {type(source).__name__}")
    if len(data) == 0:
        raise InvalidImageError(f"{name}: the file is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise InvalidImageError(f"{name}: larger than the {MAX_BYTES // 2**20} MiB limit")
    try:
        with warnings.catch_warnings():  # load_image applies its own, stricter limit (PIL's warns above 89 MP)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError(f"{name}: this is {_describe_non_image(data)}") from None
    except Image.DecompressionBombError:
        raise InvalidImageError(
            f"{name}: refused, it declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
            " (possible decompression bomb)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: the image data is damaged or truncated ({exc})") from None
    return image, name


def _from_array(array: np.ndarray) -> Image.Image:
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InvalidImageError(f"array of shape {arr.shape} is not an image (H×W, H×W×3 or H×W×4)")
    if arr.size == 0:
        raise InvalidImageError(f"array of shape {arr.shape} is empty")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise InvalidImageError(f"array of shape {arr.shape} holds NaN or infinite values, not pixel values")
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any PIL mode → ``RGB`` or ``L``, alpha composited on white, high bit depths rescaled."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            peak = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
            arr = arr * (255.0 / peak)
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba).convert("RGB")
        return out.convert("L") if mode.startswith("L") else out
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX ...


def load_image(source, *, max_pixels: int = MAX_PIXELS, working_size: int | None = WORKING_SIZE) -> Image.Image:
    """Decode ``source`` (path, bytes, file object, PIL image or array) into an 8-bit RGB/L image.

    Raises :class:`InvalidImageError` with a readable message for empty, truncated, non-image
    (text, HTML, SVG, PDF, archives), zero-size or oversized ("decompression bomb") input.
    Animated images give their first frame; photos larger than ``working_size`` are downscaled.
    """
    image, name = _open(source)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: the image has zero size ({width}×{height})")
    limit = max_pixels * (JPEG_PIXELS_FACTOR if working_size and image.format == "JPEG" else 1)
    if width * height > limit:
        raise InvalidImageError(
            f"{name}: refused, it declares {width}×{height} = {width * height / 1e6:.0f} megapixels, "
            f"more than the {limit / 1e6:.0f} MP limit for {image.format or 'such'} images (possible decompression bomb)"
        )
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP/APNG: the first frame
        if working_size and image.format == "JPEG":
            image.draft("RGB" if image.mode != "L" else "L", (working_size, working_size))
        image.load()
        image = ImageOps.exif_transpose(image) or image
        image = _to_8bit(image)
    except InvalidImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise InvalidImageError(f"{name}: the image data is damaged or truncated ({exc})") from None
    if working_size and max(image.size) > working_size:
        image = image.copy()
        image.thumbnail((working_size, working_size), Image.Resampling.LANCZOS)
    return image
