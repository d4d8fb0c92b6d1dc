"""The "colour shop": a generated colour product-photo catalog, in the Kaggle "Fashion Product
Images" layout, for teaching and testing photo search where no colour fashion dataset can be
downloaded.

Every item is a Fashion-MNIST garment rendered as a product photo on a light studio background:
the garment's silhouette is the alpha mask, its own grey levels are kept as shading, and it is
painted in a **base colour** (:data:`COLOURS`, named as Kaggle's ``baseColour`` names them) with a
**pattern** (:data:`PATTERNS`: solid, stripes, checks, dots). Small photo-like variation follows:
scale, position, a slight tilt, background tint, soft shadow, exposure, blur, sensor noise and
JPEG compression. "The same style" is (articleType, baseColour, pattern); the styles are
balanced within each garment kind.

On disk (the Kaggle layout, so the same commands run on the real download)::

    <out>/styles.csv          id,gender,masterCategory,subCategory,articleType,baseColour,season,year,
                              usage,productDisplayName,pattern,price
    <out>/images/<id>.jpg
    <out>/colour_shop.json    the generation parameters (a second call with the same ones reuses the files)

Deterministic: item ``i`` depends only on ``(seed, i)`` and the parameters, whatever the number of
worker processes. Garments come from Fashion-MNIST's *test* split while ``size`` ≤ 10 000 (so a
model trained on Fashion-MNIST's training split has never seen them), else from its train split —
as for the default :data:`DEFAULT_SIZE`: the greyscale Fashion-MNIST baseline has then seen those
garments, in grey, and its category score on the shop is optimistic.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import FashsimError
from ..fileio import atomic_write_bytes

#: Kaggle ``baseColour`` names → sRGB. The first :data:`DEFAULT_COLOURS` are the default palette
#: (well apart in hue or lightness; none is white, which would vanish on the white background).
COLOURS: dict[str, tuple[int, int, int]] = {
    "Red": (200, 30, 35),
    "Navy Blue": (28, 38, 100),
    "Green": (30, 140, 60),
    "Yellow": (235, 200, 30),
    "Black": (30, 30, 32),
    "Pink": (240, 120, 170),
    "Purple": (115, 45, 150),
    "Orange": (240, 120, 20),
    "Brown": (115, 70, 35),
    "Grey": (135, 135, 140),
    "Teal": (20, 128, 128),
    "Beige": (215, 190, 150),
}
DEFAULT_COLOURS = 8

#: Items in the default colour shop: about the most that builds end to end within 8 minutes on
#: 2 CPU cores (``benchmarks/bench_shop.py``: 414–463 s). The default CNN learns the garments' kinds
#: from the shop's own items, so more items score better: 20 000 rather than 10 000 added about
#: 0.03 style R@1 on held-out items searched among an equally dense gallery.
DEFAULT_SIZE = 20_000

#: Pattern names as a shop would list them.
PATTERNS: tuple[str, ...] = ("Solid", "Striped", "Checked", "Polka Dot")

#: Fashion-MNIST class → (masterCategory, subCategory, articleType), in Kaggle's vocabulary.
KAGGLE_CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("Apparel", "Topwear", "Tshirts"),
    ("Apparel", "Bottomwear", "Trousers"),
    ("Apparel", "Topwear", "Sweaters"),
    ("Apparel", "Dress", "Dresses"),
    ("Apparel", "Topwear", "Jackets"),
    ("Footwear", "Sandal", "Sandals"),
    ("Apparel", "Topwear", "Shirts"),
    ("Footwear", "Shoes", "Sports Shoes"),
    ("Accessories", "Bags", "Handbags"),
    ("Footwear", "Shoes", "Boots"),
)

COLUMNS = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
    "pattern",
    "price",
)
_BRANDS = (
    "Roadster",
    "Nike",
    "Puma",
    "Mango",
    "Levis",
    "Fabindia",
    "Wrogn",
    "Vero Moda",
    "Adidas",
    "H&M",
    "Lino",
    "Northpeak",
)
_SEASONS = ("Summer", "Fall", "Winter", "Spring")
_USAGES = ("Casual", "Formal", "Sports", "Ethnic", "Party")
_PRICE_RANGE = {"Apparel": (12, 90), "Footwear": (25, 160), "Accessories": (15, 120)}
FIRST_ID = 10_000  # Kaggle's ids are five-digit numbers
MANIFEST = "colour_shop.json"


@dataclass(frozen=True)
class ShopParams:
    """Everything the generated files depend on."""

    size: int = DEFAULT_SIZE
    image_size: int = 96
    seed: int = 0
    colours: tuple[str, ...] = tuple(list(COLOURS)[:DEFAULT_COLOURS])
    patterns: tuple[str, ...] = PATTERNS
    jpeg_quality: tuple[int, int] = (72, 92)
    source_split: str = "auto"
    version: int = 1  # bump when the rendering changes

    def styles(self) -> int:
        """How many styles (article type × colour × pattern) these parameters make."""
        return len(KAGGLE_CATEGORIES) * len(self.colours) * len(self.patterns)


# ------------------------------------------------------------------ rendering
def _smooth_step(x: np.ndarray, width: float) -> np.ndarray:
    """0 → 1 around 0 over ``width`` pixels (anti-aliased pattern edges)."""
    return np.clip(0.5 + x / max(width, 1e-6), 0.0, 1.0)


def pattern_mask(pattern: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Where the pattern's second colour lies, as a float map in [0, 1] of ``(height, width)``:
    zeros for ``Solid``; bold stripes (horizontal or vertical), gingham checks (the crossings
    darkest) or a dot grid otherwise, about 5–7 repeats across the garment."""
    if pattern == "Solid":
        return np.zeros((height, width), np.float32)
    period = max(height, width) / rng.uniform(5.0, 7.0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase_y, phase_x = rng.uniform(0, period, 2)
    if pattern == "Striped":
        coord = y if rng.random() < 0.6 else x
        wave = np.abs(((coord + phase_y) % period) - period / 2) - period / 4  # > 0 inside a stripe
        return _smooth_step(wave, 1.0).astype(np.float32)
    if pattern == "Checked":
        band_y = _smooth_step(np.abs(((y + phase_y) % period) - period / 2) - period / 4, 1.0)
        band_x = _smooth_step(np.abs(((x + phase_x) % period) - period / 2) - period / 4, 1.0)
        return (0.5 * (band_y + band_x)).astype(np.float32)  # gingham: crossings full, bands half
    if pattern == "Polka Dot":
        dy = ((y + phase_y) % period) - period / 2
        dx = ((x + phase_x) % period) - period / 2
        radius = period * rng.uniform(0.22, 0.3)
        return _smooth_step(radius - np.sqrt(dx * dx + dy * dy), 1.0).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")


def _second_colour(base: np.ndarray) -> np.ndarray:
    """The pattern's other colour: the base lightened towards white (dark bases) or darkened."""
    luminance = float(base @ np.array([0.299, 0.587, 0.114]))
    if luminance < 150:
        return base + 0.7 * (245.0 - base)
    return base * 0.45


def render_item(
    garment: np.ndarray,
    colour: Sequence[int],
    pattern: str,
    image_size: int,
    rng: np.random.Generator,
    *,
    jpeg_quality: tuple[int, int] = (72, 92),
) -> bytes:
    """JPEG bytes of one product photo: a 28×28 Fashion-MNIST ``garment`` (light on black) in
    ``colour`` with ``pattern`` on a light background, ``image_size`` px square."""
    n = image_size
    scale = rng.uniform(0.70, 0.88)
    side = max(8, round(n * scale))
    tilt = rng.uniform(-4.0, 4.0)
    g = Image.fromarray(garment).resize((side, side), Image.Resampling.BICUBIC).rotate(tilt, Image.Resampling.BILINEAR)
    g = np.asarray(g, np.float32) / 255.0
    alpha = np.clip((g - 0.02) / 0.12, 0.0, 1.0)
    top = max(float(np.percentile(g[alpha > 0.5], 98)) if (alpha > 0.5).any() else 1.0, 1e-3)
    shade = 0.62 + 0.38 * np.clip(g / top, 0.0, 1.0)  # the garment's own shading, kept
    base = np.asarray(colour, np.float32) + rng.normal(0.0, 6.0, 3)  # dye lots differ a little
    base = np.clip(base, 0, 255)
    mix = pattern_mask(pattern, side, side, rng)[..., None]
    paint = (base * (1.0 - mix) + _second_colour(base) * mix) * shade[..., None]

    # studio background: light, slightly tinted, a soft vertical gradient
    tint = rng.uniform(238, 252) + rng.normal(0, 2.0, 3)
    gradient = np.linspace(1.0, rng.uniform(0.96, 1.0), n, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(tint.astype(np.float32), (n, n, 3)) * gradient
    canvas = np.array(canvas, np.float32)
    offset = (n - side) // 2
    oy = int(np.clip(offset + rng.integers(-n // 20, n // 20 + 1), 0, n - side))
    ox = int(np.clip(offset + rng.integers(-n // 20, n // 20 + 1), 0, n - side))
    # soft shadow below-right of the garment
    shadow = Image.fromarray((alpha * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(max(1.0, n / 40)))
    shadow = np.asarray(shadow, np.float32) / 255.0 * 0.12
    sy, sx = min(oy + max(1, n // 48), n - side), min(ox + max(1, n // 64), n - side)
    canvas[sy : sy + side, sx : sx + side] *= (1.0 - shadow)[..., None]
    region = canvas[oy : oy + side, ox : ox + side]
    canvas[oy : oy + side, ox : ox + side] = region * (1.0 - alpha[..., None]) + paint * alpha[..., None]

    canvas *= rng.uniform(0.95, 1.05)  # exposure
    canvas += rng.normal(0.0, 1.5, canvas.shape)  # sensor noise
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, 0.7) * n / 96
    if blur > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
    return buffer.getvalue()


# ------------------------------------------------------------------ the catalog
def _source_garments(params: ShopParams, fashion_mnist_path=None) -> tuple[np.ndarray, np.ndarray, str]:
    """``params.size`` Fashion-MNIST garments, balanced over the 10 classes, in a seeded order."""
    from .fashion_mnist import load_fashion_mnist

    split = params.source_split
    if split == "auto":
        split = "test" if params.size <= 10_000 else "train"
    data = load_fashion_mnist(split, fashion_mnist_path)
    rng = np.random.default_rng([params.seed, 1])
    per_class = -(-params.size // 10)
    chosen = []
    for c in range(10):
        members = np.flatnonzero(data.labels == c)
        if per_class > len(members):
            raise FashsimError(
                f"size={params.size} needs {per_class} garments per class; Fashion-MNIST {split} "
                f"has {len(members)}: use source_split='train' (up to 60 000 items)"
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    order = np.stack(chosen, 1).ravel()[: params.size]  # interleaved: classes stay balanced at any size
    return data.images[order], data.labels[order], split


def _style_assignment(labels: np.ndarray, params: ShopParams) -> tuple[np.ndarray, np.ndarray]:
    """Colour and pattern indices per item: every (colour, pattern) combination equally often
    within each garment class (seeded shuffles)."""
    rng = np.random.default_rng([params.seed, 2])
    n_c, n_p = len(params.colours), len(params.patterns)
    colour = np.zeros(len(labels), np.int64)
    pattern = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        combos = np.concatenate([rng.permutation(n_c * n_p) for _ in range(-(-len(members) // (n_c * n_p)))])
        combos = combos[: len(members)]
        colour[members], pattern[members] = combos // n_p, combos % n_p
    return colour, pattern


def _row(i: int, fm_label: int, colour: str, pattern: str, rng: np.random.Generator) -> dict:
    master, sub, article = KAGGLE_CATEGORIES[fm_label]
    gender = "Women" if article in ("Dresses", "Handbags") else str(rng.choice(["Men", "Women", "Unisex"]))
    low, high = _PRICE_RANGE[master]
    brand = str(rng.choice(_BRANDS))
    pattern_word = "" if pattern == "Solid" else f" {pattern}"
    return {
        "id": FIRST_ID + i,
        "gender": gender,
        "masterCategory": master,
        "subCategory": sub,
        "articleType": article,
        "baseColour": colour,
        "season": str(rng.choice(_SEASONS)),
        "year": int(rng.integers(2011, 2019)),
        "usage": str(rng.choice(_USAGES)),
        "productDisplayName": f"{brand} {gender} {colour}{pattern_word} {article}",
        "pattern": pattern,
        "price": round(float(rng.uniform(low, high)), 2),
    }


def _render_range(args) -> list[tuple[int, bytes]]:
    start, garments, colour_ids, pattern_ids, params = args
    out = []
    for offset, garment in enumerate(garments):
        i = start + offset
        rng = np.random.default_rng([params.seed, 3, i])
        colour = COLOURS[params.colours[colour_ids[offset]]]
        out.append(
            (
                i,
                render_item(
                    garment,
                    colour,
                    params.patterns[pattern_ids[offset]],
                    params.image_size,
                    rng,
                    jpeg_quality=params.jpeg_quality,
                ),
            )
        )
    return out


def generate_colour_shop(
    out_dir: str | os.PathLike,
    *,
    size: int = DEFAULT_SIZE,
    image_size: int = 96,
    seed: int = 0,
    colours: Sequence[str] | int = DEFAULT_COLOURS,
    patterns: Sequence[str] = PATTERNS,
    source_split: str = "auto",
    workers: int | None = None,
    fashion_mnist_path=None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the colour shop to ``out_dir`` (see the module docstring) and return the path of
    its ``styles.csv``. A folder already holding the same shop (same parameters, every image
    present) is reused as it is; another shop there is refused unless ``overwrite``.

    ``colours``: a number (the first ones of :data:`COLOURS`) or names; ``workers``: processes
    for rendering (default: up to 2; the result is the same for any number).
    """
    from tqdm.auto import tqdm

    if isinstance(colours, int):
        if not 1 <= colours <= len(COLOURS):
            raise ValueError(f"colours must be 1..{len(COLOURS)}, got {colours}")
        colours = list(COLOURS)[:colours]
    unknown = [c for c in colours if c not in COLOURS] + [p for p in patterns if p not in PATTERNS]
    if unknown:
        raise ValueError(
            f"unknown colours/patterns {unknown}; colours: {', '.join(COLOURS)}; patterns: {', '.join(PATTERNS)}"
        )
    if size < 1 or image_size < 16:
        raise ValueError(f"need size >= 1 and image_size >= 16, got {size}, {image_size}")
    params = ShopParams(
        size=size,
        image_size=image_size,
        seed=seed,
        colours=tuple(colours),
        patterns=tuple(patterns),
        source_split=source_split,
    )
    out = Path(out_dir)
    images_dir = out / "images"
    csv_path = out / "styles.csv"
    manifest_path = out / MANIFEST
    wanted = json.loads(json.dumps(asdict(params)))
    if manifest_path.is_file() and csv_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing.get("params") == wanted:
            if all((images_dir / f"{FIRST_ID + i}.jpg").is_file() for i in range(size)):
                return csv_path
        elif not overwrite:
            raise FashsimError(
                f"{out} already holds another colour shop ({existing.get('params')}); "
                "use another folder or overwrite=True"
            )
    elif csv_path.exists() and not overwrite:
        raise FashsimError(f"{csv_path} exists and is not a colour shop: use another folder or overwrite=True")

    garments, fm_labels, split = _source_garments(params, fashion_mnist_path)
    colour_ids, pattern_ids = _style_assignment(fm_labels, params)
    images_dir.mkdir(parents=True, exist_ok=True)
    chunk = 256
    jobs = [
        (s, garments[s : s + chunk], colour_ids[s : s + chunk], pattern_ids[s : s + chunk], params)
        for s in range(0, size, chunk)
    ]
    workers = min(workers if workers is not None else 2, os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=size, desc="rendering the colour shop", disable=not progress, leave=False)
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
            for done in pool.imap_unordered(_render_range, jobs):
                for i, data in done:
                    (images_dir / f"{FIRST_ID + i}.jpg").write_bytes(data)
                bar.update(len(done))
    else:
        for job in jobs:
            done = _render_range(job)
            for i, data in done:
                (images_dir / f"{FIRST_ID + i}.jpg").write_bytes(data)
            bar.update(len(done))
    bar.close()

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for i in range(size):
        rng = np.random.default_rng([params.seed, 4, i])
        writer.writerow(_row(i, int(fm_labels[i]), params.colours[colour_ids[i]], params.patterns[pattern_ids[i]], rng))
    atomic_write_bytes(csv_path, buffer.getvalue().encode())
    atomic_write_bytes(
        manifest_path,
        json.dumps({"params": wanted, "fashion_mnist_split": split, "styles": params.styles()}, indent=2).encode(),
    )
    return csv_path
