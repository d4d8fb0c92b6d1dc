"""Model input: from a decoded picture to what the model saw in training, and batches to tensors.

:func:`prepare_image` turns a picture (from :func:`fashsim.data.uploads.load_image`) into the
model's input format, described by an :class:`InputSpec`. For a Fashion-MNIST model this mirrors
how the dataset was made (Xiao et al. 2017): greyscale, garment light on a dark background (a
product shot on white is inverted), trimmed to the garment, longest side resized to 28 px,
centred on a 28×28 canvas. A photo model keeps the colour: the photo is centre-cropped to a square
(ImageNet style) or, with ``trim_background``, cropped to the product on its plain background
(:func:`product_box`). :func:`default_input_spec` and :func:`training_input_spec` say which
format a backbone, its weights and its training images call for; :func:`to_tensor`,
:func:`normalise_batch` and :func:`augment_batch` work on whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class InputSpec:
    """What a model takes as input: square size, channels, normalisation, background polarity."""

    size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    #: True for Fashion-MNIST-style data (light garment on black): light-background photos are inverted.
    dark_background: bool = True
    #: Photos only (``dark_background=False``): crop the plain background around the product, so
    #: the product fills the square whatever its size and place in the photo (see :func:`prepare_image`).
    trim_background: bool = False

    def __post_init__(self) -> None:
        if self.trim_background and self.dark_background:
            raise ValueError(
                "trim_background is for photo input (dark_background=False); Fashion-MNIST input is always trimmed"
            )

    def to_dict(self) -> dict:
        """The spec as JSON-ready values (saved with a model)."""
        data = {
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "dark_background": self.dark_background,
        }
        if self.trim_background:  # only when set, so existing models keep their fingerprints
            data["trim_background"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        """The spec saved by :meth:`to_dict`."""
        return cls(
            size=int(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            dark_background=bool(data["dark_background"]),
            trim_background=bool(data.get("trim_background", False)),
        )


#: Fashion-MNIST models: 28×28 greyscale, dataset mean/std, garment light on dark.
FASHION_MNIST_SPEC = InputSpec()
#: ImageNet-pretrained torchvision backbones on product photos.
IMAGENET_SPEC = InputSpec(
    size=224, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dark_background=False
)


def _trim_box(arr: np.ndarray, threshold: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the rows/columns with more than 1 % of their pixels above ``threshold``
    (at least one: a 28-px row counts a single pixel; a photo's stray noise pixels do not)."""
    above = arr > threshold
    rows = np.flatnonzero(above.sum(axis=1) > 0.01 * arr.shape[1])
    cols = np.flatnonzero(above.sum(axis=0) > 0.01 * arr.shape[0])
    if rows.size == 0 or cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _border(arr: np.ndarray) -> np.ndarray:
    """The pixels of an image's outermost rows and columns, one after the other."""
    return np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])


def _robust_spread(values: np.ndarray) -> float:
    """4 robust standard deviations (1.4826 × the median absolute deviation) of ``values``."""
    return 4 * 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _background_level(grey: np.ndarray) -> int:
    """Brightest value still counted as background. A clean black background (Fashion-MNIST itself,
    a lossless render on white) has no noise: 0. A photo's background does: its border median plus
    4 robust standard deviations, and at least 10 grey levels (JPEG noise)."""
    border = _border(grey).astype(float)
    median = np.median(border)
    if median == 0:
        return 0
    return int(median + max(_robust_spread(border), 10))


def has_light_background(grey: np.ndarray) -> bool:
    """True when the image border is mostly light (a product shot on white)."""
    return float(np.median(_border(grey))) > 127


def product_box(rgb: np.ndarray, margin: float = 0.04) -> tuple[tuple[int, int, int, int], tuple[int, ...]]:
    """Where the product is in a photo on a plain background, and that background's colour.

    The background is the border's median colour; a pixel belongs to the product when one of its
    channels differs from it by more than the border's own spread (median + 4 robust standard
    deviations, so a product touching up to half of the border does not count as background
    noise; at least 24 levels for JPEG noise and a soft gradient). The box is the square around
    those rows and columns, centred on them, widened by ``margin`` of its side on each side; it
    may reach outside the photo (the caller pads with the colour). A photo with nothing on its
    background gives the square centred on the whole photo."""
    height, width = rgb.shape[:2]
    border = _border(rgb).astype(np.int16)
    colour = np.round(np.median(border, axis=0)).astype(np.int16)
    diff = np.abs(rgb.astype(np.int16) - colour).max(axis=-1)
    border_diff = np.abs(border - colour).max(axis=-1).astype(float)
    threshold = max(float(np.median(border_diff)) + _robust_spread(border_diff), 24.0)
    box = _trim_box(diff, threshold=int(threshold))
    left, top, right, bottom = box if box is not None else (0, 0, width, height)
    side = max(right - left, bottom - top) * (1 + 2 * (margin if box is not None else 0))
    left, top = round((left + right - side) / 2), round((top + bottom - side) / 2)
    return (left, top, left + round(side), top + round(side)), tuple(int(c) for c in colour)


def prepare_image(image: Image.Image, spec: InputSpec = FASHION_MNIST_SPEC) -> np.ndarray:
    """The model's view of an image: uint8 ``(size, size)`` for 1 channel, ``(size, size, 3)`` for 3.

    ``dark_background`` specs (Fashion-MNIST) get the dataset's own recipe: greyscale, inverted
    if the background is light, trimmed to the garment, longest side resized to ``size``, centred
    on a black square. ``trim_background`` specs: the square :func:`product_box` around the product
    (padded with the background colour where it reaches past the photo's edge), resized. Other
    specs: resize the shorter side and centre-crop (ImageNet style).
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
        offset = ((spec.size - new_size[0] + 1) // 2, (spec.size - new_size[1] + 1) // 2)  # as the dataset centres
        canvas.paste(garment, offset)
        out = np.asarray(canvas)
        return np.repeat(out[..., None], 3, axis=-1) if spec.channels == 3 else out
    mode = "L" if spec.channels == 1 else "RGB"
    if spec.trim_background:
        rgb = image.convert("RGB")
        factor = -(-max(rgb.size) // 256)  # find the product on a copy of at most 256 px (uploads: up to 1024 px)
        box, fill = product_box(np.asarray(rgb.reduce(factor) if factor > 1 else rgb))
        left, top, right, bottom = (v * factor for v in box)
        scale = spec.size / max(1, right - left)  # the box is square
        # the part of the box inside the photo, resized, on a canvas of the background colour: the
        # memory it takes follows the photo and the model's size, not the box
        inside = (max(left, 0), max(top, 0), min(right, rgb.width), min(bottom, rgb.height))
        canvas = Image.new("RGB", (spec.size, spec.size), fill)
        if inside[2] > inside[0] and inside[3] > inside[1]:
            part_size = (max(1, round((inside[2] - inside[0]) * scale)), max(1, round((inside[3] - inside[1]) * scale)))
            part = rgb.resize(part_size, Image.Resampling.BILINEAR, box=inside)
            canvas.paste(part, (round((inside[0] - left) * scale), round((inside[1] - top) * scale)))
        return np.asarray(canvas.convert(mode))
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
    if x.shape[1] == 3 and spec.channels == 1:
        x = x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114
    source = [min(c, x.shape[1] - 1) for c in range(spec.channels)]  # greyscale is repeated to RGB
    # per-channel arithmetic with Python numbers: a mean/std tensor made here would be a copy from the
    # host, and such a copy waits for everything queued on the GPU (at every training step)
    planes = [(x[:, c : c + 1] - m) / s for c, m, s in zip(source, spec.mean, spec.std)]
    return resize_batch(planes[0] if len(planes) == 1 else torch.cat(planes, dim=1), spec.size)


def resize_batch(x, size: int):
    """A float batch ``(N, C, H, W)`` resized to ``size``×``size`` (bilinear, antialiased), or
    returned as it is when it already has that size."""
    import torch.nn.functional as F

    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


#: columns of :func:`augment_draws`: one uniform number in [0, 1) per image and decision
AUGMENT_DRAWS = ("flip", "shift_x", "shift_y", "erase", "erase_area", "erase_aspect", "erase_top", "erase_left")


def augment_draws(n: int, generator=None):
    """The random numbers :func:`augment_batch` needs for ``n`` images, ``(n, 8)`` uniform in [0, 1)
    (columns: :data:`AUGMENT_DRAWS`). Drawing a whole epoch's at once on the CPU and moving them to
    the GPU in one copy keeps the training loop from waiting on the device at every step."""
    import torch

    return torch.rand(n, len(AUGMENT_DRAWS), generator=generator)


def augment_batch(
    x, generator=None, *, draws=None, max_shift: int = 2, flip: bool = True, erase: float = 0.0, fill: str = "min"
):
    """Train-time augmentation of a batch ``(N, C, H, W)``, on any device: random horizontal flips,
    random translations of up to ``max_shift`` pixels, and with probability ``erase`` a random
    rectangle of 2–20 % of the image set to the background (random erasing, Zhong et al. 2020).

    ``fill`` says what the background is: ``"min"`` — the batch minimum (dark backgrounds, as in
    Fashion-MNIST): uncovered and erased pixels take it; ``"edge"`` — whatever surrounds the
    object (e.g. a light studio background): uncovered pixels repeat the nearest border pixel and
    erased ones take the input image's top-left pixel.

    The random numbers are ``draws`` (see :func:`augment_draws`) or drawn from ``generator``. The
    whole batch is transformed at once, with no per-image loop; with ``draws`` already on the batch's
    device nothing waits for the device."""
    import torch

    n, _, h, w = x.shape
    if draws is None:
        draws = augment_draws(n, generator)
    if fill not in ("min", "edge"):
        raise ValueError(f"fill must be 'min' or 'edge', got {fill!r}")
    u = draws.to(device=x.device, dtype=torch.float32)
    background = x.amin() if fill == "min" else x[:, :, :1, :1]
    if flip:
        x = torch.where((u[:, 0] < 0.5).view(n, 1, 1, 1), x.flip(-1), x)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    if max_shift > 0:
        span = 2 * max_shift + 1
        dx = (u[:, 1] * span).long().clamp_max(span - 1) - max_shift  # output (i, j) shows input (i + dy, j + dx)
        dy = (u[:, 2] * span).long().clamp_max(span - 1) - max_shift
        src_r = rows[None, :] + dy[:, None]  # (N, H)
        src_c = cols[None, :] + dx[:, None]  # (N, W)
        inside = ((src_r >= 0) & (src_r < h))[:, :, None] & ((src_c >= 0) & (src_c < w))[:, None, :]
        picked = x[
            torch.arange(n, device=x.device)[:, None, None],
            :,
            src_r.clamp(0, h - 1)[:, :, None],
            src_c.clamp(0, w - 1)[:, None, :],
        ]  # (N, H, W, C)
        picked = picked.permute(0, 3, 1, 2)
        x = torch.where(inside[:, None], picked, background) if fill == "min" else picked
    if erase > 0:
        area = (u[:, 4] * 0.18 + 0.02) * h * w
        aspect = torch.exp(u[:, 5] * 2.4 - 1.2)
        eh = torch.sqrt(area * aspect).round().clamp(1, h)
        ew = torch.sqrt(area / aspect).round().clamp(1, w)
        top = (u[:, 6] * (h - eh + 1)).floor()
        left = (u[:, 7] * (w - ew + 1)).floor()
        in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + eh)[:, None])
        in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < (left + ew)[:, None])
        box = (u[:, 3] < erase)[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
        x = torch.where(box[:, None], background, x)
    return x.contiguous()
