"""Image decoding and transforms: from whatever a user uploads to what the model saw in training.

Two steps, kept apart so the demo can show the second one:

* :func:`load_image` decodes a path, bytes, file object, PIL image or numpy array into an 8-bit
  ``RGB`` or ``L`` PIL image — safely: EXIF orientation applied, alpha composited on white,
  palette/CMYK/16-bit/float converted, animated images reduced to their first frame, huge photos
  downscaled right after decoding, and every kind of bad input turned into an
  :class:`~fashsim.errors.InvalidImageError` with a readable message.
* :func:`prepare_image` turns that picture into the model's input format, described by an
  :class:`InputSpec`. For a Fashion-MNIST model this mirrors how the dataset was made
  (Xiao et al. 2017): greyscale, garment light on a dark background (a product shot on white is
  inverted), trimmed to the garment, longest side resized to 28 px, centred on a 28×28 canvas.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError

#: refuse to decode images that declare more pixels than this (decompression-bomb guard).
MAX_PIXELS = 64_000_000
#: refuse files larger than this many bytes.
MAX_BYTES = 64 * 1024 * 1024
#: photos are downscaled to at most this longest side right after decoding.
WORKING_SIZE = 1024


@dataclass(frozen=True)
class InputSpec:
    """What a model takes as input: square size, channels, normalisation, background polarity."""

    size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    #: True for Fashion-MNIST-style data (light garment on black): light-background photos are inverted.
    dark_background: bool = True

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "dark_background": self.dark_background,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(
            size=int(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            dark_background=bool(data["dark_background"]),
        )


#: Fashion-MNIST models: 28×28 greyscale, dataset mean/std, garment light on dark.
FASHION_MNIST_SPEC = InputSpec()
#: ImageNet-pretrained torchvision backbones on product photos.
IMAGENET_SPEC = InputSpec(
    size=224, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dark_background=False
)


# --------------------------------------------------------------------------------------------
# decoding

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
        if not path.is_file():
            raise InvalidImageError(f"{path}: no such file")
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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError(f"{name}: this is {_describe_non_image(data)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImageError(
            f"{name}: refused, it declares more than {Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
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
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: refused, it declares {width}×{height} = {width * height / 1e6:.0f} megapixels, "
            f"more than the {max_pixels / 1e6:.0f} MP limit (possible decompression bomb)"
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


# --------------------------------------------------------------------------------------------
# model input


def _trim_box(arr: np.ndarray, threshold: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the rows/columns with more than 1 % of their pixels above ``threshold``
    (at least one: a 28-px row counts a single pixel; a photo's stray noise pixels do not)."""
    above = arr > threshold
    rows = np.flatnonzero(above.sum(axis=1) > 0.01 * arr.shape[1])
    cols = np.flatnonzero(above.sum(axis=0) > 0.01 * arr.shape[0])
    if rows.size == 0 or cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _background_level(grey: np.ndarray) -> int:
    """Brightest value still counted as background. A clean black background (Fashion-MNIST itself,
    a lossless render on white) has no noise: 0. A photo's background does: its border median plus
    4 robust standard deviations, and at least 10 grey levels (JPEG noise)."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).astype(float)
    median = np.median(border)
    if median == 0:
        return 0
    return int(median + max(4 * 1.4826 * np.median(np.abs(border - median)), 10))


def has_light_background(grey: np.ndarray) -> bool:
    """True when the image border is mostly light (a product shot on white)."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return float(np.median(border)) > 127


def prepare_image(image: Image.Image, spec: InputSpec = FASHION_MNIST_SPEC) -> np.ndarray:
    """The model's view of an image: uint8 ``(size, size)`` for 1 channel, ``(size, size, 3)`` for 3.

    ``dark_background`` specs (Fashion-MNIST) get the dataset's own recipe: greyscale, inverted
    if the background is light, trimmed to the garment, longest side resized to ``size``, centred
    on a black square. Other specs: resize the shorter side and centre-crop (ImageNet style).
    """
    if spec.dark_background:
        grey = np.asarray(image.convert("L"))
        if has_light_background(grey):
            grey = 255 - grey
        box = _trim_box(grey, threshold=_background_level(grey))
        garment = Image.fromarray(grey).crop(box) if box else Image.fromarray(grey)
        scale = spec.size / max(garment.size)
        new_size = (max(1, round(garment.width * scale)), max(1, round(garment.height * scale)))
        garment = garment.resize(new_size, Image.Resampling.LANCZOS)
        canvas = Image.new("L", (spec.size, spec.size), 0)
        canvas.paste(garment, ((spec.size - new_size[0] + 1) // 2, (spec.size - new_size[1] + 1) // 2))  # as the dataset centres
        out = np.asarray(canvas)
        return np.repeat(out[..., None], 3, axis=-1) if spec.channels == 3 else out
    mode = "L" if spec.channels == 1 else "RGB"
    resized = ImageOps.fit(image.convert(mode), (spec.size, spec.size), Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return np.asarray(resized)


def to_tensor(images: np.ndarray, spec: InputSpec):
    """A batch of uint8 images, ``(N, H, W)`` or ``(N, H, W, C)``, → normalised float tensor
    ``(N, spec.channels, spec.size, spec.size)`` (see :func:`normalise_batch`)."""
    import torch

    arr = np.asarray(images)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a batch of images (N, H, W[, C]), got shape {arr.shape}")
    return normalise_batch(torch.from_numpy(np.array(arr, copy=True)), spec)


def normalise_batch(images, spec: InputSpec):
    """A uint8 tensor batch ``(N, H, W)`` or ``(N, H, W, C)``, on any device → normalised float
    ``(N, spec.channels, spec.size, spec.size)``: greyscale is repeated to RGB or RGB averaged to
    grey as the spec asks, and images of another size are resized (e.g. 28×28 Fashion-MNIST for
    a 224 px pretrained backbone)."""
    import torch

    x = images.unsqueeze(-1) if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected a batch of images (N, H, W[, C]), got shape {tuple(images.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1 and spec.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and spec.channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return resize_batch((x - mean) / std, spec.size)


def resize_batch(x, size: int):
    """A float batch ``(N, C, H, W)`` resized to ``size``×``size`` (bilinear, antialiased), or
    returned as it is when it already has that size."""
    import torch.nn.functional as F

    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def augment_batch(x, generator=None, *, max_shift: int = 2, flip: bool = True):
    """Light train-time augmentation on a batch ``(N, C, H, W)``, on any device: random horizontal
    flips and random translations of up to ``max_shift`` pixels (zero padding)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.to(x.device).view(n, 1, 1, 1), x.flip(-1), x)
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return x


def photo_transforms(spec: InputSpec = IMAGENET_SPEC, *, train: bool = False):
    """torchvision transforms for RGB photo catalogs (PIL image → normalised tensor)."""
    import torch
    from torchvision.transforms import v2

    steps = (
        [v2.RandomResizedCrop(spec.size, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip(),
         v2.ColorJitter(0.2, 0.2, 0.1)]
        if train
        else [v2.Resize(int(spec.size * 256 / 224), antialias=True), v2.CenterCrop(spec.size)]
    )
    if spec.channels == 1:
        steps.append(v2.Grayscale(1))
    return v2.Compose(
        [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    )
