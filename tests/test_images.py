import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from image_fixtures import (
    HOSTILE_UPLOADS,
    animated_gif,
    encode,
    jpeg_with_orientation,
    png_with_declared_size,
    product_photo,
)
from PIL import Image

from fashsim.data import transforms as images
from fashsim.data import uploads
from fashsim.errors import FashsimError, InvalidImageError

EXPECTED_WORDS = {
    "empty": "empty",
    "truncated_jpeg": "truncated",
    "truncated_png": "truncated",
    "text": "text, not an image",
    "html": "HTML",
    "svg": "SVG",
    "pdf": "PDF",
    "random_binary": "not an image format",
    "bomb": "decompression bomb",
    "zero_size": "zero size",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_uploads_raise_clear_fashsim_errors(name):
    with pytest.raises(InvalidImageError) as info:
        uploads.load_image(HOSTILE_UPLOADS[name])
    assert EXPECTED_WORDS[name] in str(info.value)
    assert isinstance(info.value, FashsimError)
    assert info.value.__cause__ is None  # no PIL traceback chained under it


def test_hostile_file_on_disk_names_the_file(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_bytes(HOSTILE_UPLOADS["html"])
    with pytest.raises(InvalidImageError, match="page.jpg.*HTML"):
        uploads.load_image(path)
    with pytest.raises(InvalidImageError, match="no such file"):
        uploads.load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="a folder, not an image file"):
        uploads.load_image(tmp_path)
    with pytest.raises(InvalidImageError, match="not a regular file"):
        uploads.load_image("/dev/null")


def test_pixel_limit_below_pil_bomb_threshold():
    declared = encode(Image.new("L", (300, 200)), "PNG")
    with pytest.raises(InvalidImageError, match="megapixels"):
        uploads.load_image(declared, max_pixels=50_000)


def test_a_camera_sized_jpeg_is_read_at_reduced_scale_and_a_png_that_large_is_refused():
    # 99 MP: over PIL's own 89 MP warning and fashsim's 64 MP limit, which a JPEG may pass (it is
    # decoded at 1/8 of each side), a PNG may not (it would be decoded in full)
    photo = Image.new("L", (11_000, 9_000), 200)
    image = uploads.load_image(encode(photo, "JPEG", quality=50))
    assert image.size == (1024, 838) and np.asarray(image)[400, 500] == 200
    with pytest.raises(InvalidImageError, match=r"11000×9000 = 99 megapixels, more than the 64 MP limit for PNG"):
        uploads.load_image(png_with_declared_size(11_000, 9_000))


def test_animated_gif_gives_first_frame():
    image = uploads.load_image(animated_gif())
    assert image.size == (32, 32)
    assert np.asarray(image.convert("L"))[0, 0] == 40


def test_exif_orientation_is_applied():
    image = uploads.load_image(jpeg_with_orientation(6))  # rotate 90° clockwise on display
    assert image.size == (30, 60)
    arr = np.asarray(image.convert("L"))
    assert arr[5, 15] < 60 and arr[-5, 15] > 200  # left half black -> top after rotation


@pytest.mark.parametrize(
    "mode_maker",
    [
        lambda: product_photo().convert("CMYK"),
        lambda: product_photo().convert("P"),
        lambda: product_photo().convert("LA"),
        lambda: product_photo().convert("1"),
    ],
    ids=["CMYK", "P", "LA", "1bit"],
)
def test_modes_become_8bit(mode_maker):
    source = mode_maker()
    fmt = "JPEG" if source.mode == "CMYK" else "PNG"
    image = uploads.load_image(encode(source, fmt))
    assert image.mode in ("RGB", "L")


def test_16bit_greyscale_is_rescaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    image = uploads.load_image(encode(Image.fromarray(ramp), "PNG"))
    arr = np.asarray(image)
    assert image.mode == "L" and arr.min() == 0 and arr.max() == 255
    assert 100 < arr[32, 0] < 155  # the middle of the ramp is mid-grey, not saturated


def test_transparent_background_becomes_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (20, 20, 20, 255)
    image = uploads.load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((20, 20)) == (20, 20, 20)


def test_huge_photo_is_downscaled_on_decode():
    image = uploads.load_image(encode(product_photo((4000, 3000)), "JPEG"))
    assert max(image.size) == uploads.WORKING_SIZE
    assert image.size == (1024, 768)


def test_inputs_of_every_kind(tmp_path):
    photo = product_photo()
    data = encode(photo, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    for source in (
        data,
        memoryview(data),
        bytearray(data),
        io.BytesIO(data),
        path,
        str(path),
        photo,
        np.asarray(photo),
    ):
        assert uploads.load_image(source).size == photo.size
    with pytest.raises(InvalidImageError, match="cannot read an image"):
        uploads.load_image(12345)
    with pytest.raises(InvalidImageError, match="not an image"):
        uploads.load_image(np.zeros((4, 4, 7)))


def test_product_photo_becomes_fashion_mnist_like():
    prepared = images.prepare_image(uploads.load_image(encode(product_photo(), "JPEG")))
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8
    # inverted: dark background, bright garment; trimmed and resized so the garment spans 28 px tall
    assert prepared[:, 0].max() < 30 and prepared[:, -1].max() < 30
    assert prepared[:, 14].max() > 150
    rows = np.flatnonzero(prepared.max(axis=1) > 50)
    assert rows[0] <= 1 and rows[-1] >= 26


def test_fashion_mnist_image_survives_preparation(fmnist_test):
    """A dataset image already is what the model saw: preparing it again leaves it unchanged."""
    same = [np.array_equal(images.prepare_image(Image.fromarray(img)), img) for img in fmnist_test.images[:300]]
    assert np.mean(same) > 0.95


def test_imagenet_spec_centre_crops():
    prepared = images.prepare_image(uploads.load_image(encode(product_photo((300, 400)), "PNG")), images.IMAGENET_SPEC)
    assert prepared.shape == (224, 224, 3)


def test_to_tensor_normalises_and_adapts_channels(fmnist_test):
    batch = fmnist_test.images[:4]
    x = images.to_tensor(batch, images.FASHION_MNIST_SPEC)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    whole = images.to_tensor(fmnist_test.images[:2000], images.FASHION_MNIST_SPEC)
    assert abs(whole.mean().item()) < 0.1 and abs(whole.std().item() - 1) < 0.1  # dataset mean/std
    rgb = images.to_tensor(batch, images.IMAGENET_SPEC)  # grey → RGB, 28 → 224 px
    assert rgb.shape == (4, 3, 224, 224)
    assert torch.allclose(rgb[:, 0] * 0.229 + 0.485, rgb[:, 2] * 0.225 + 0.406, atol=1e-5)
    native = images.to_tensor(batch, replace(images.IMAGENET_SPEC, size=28))
    assert images.resize_batch(native, 28) is native
    assert torch.allclose(rgb.mean((2, 3)), native.mean((2, 3)), atol=0.02)  # resizing keeps the brightness
    with pytest.raises(ValueError, match="batch"):
        images.to_tensor(np.zeros((2, 3, 4, 5, 6), np.uint8), images.FASHION_MNIST_SPEC)


def test_normalise_batch_matches_a_numpy_reference_for_every_channel_conversion():
    rgb = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    imagenet28 = replace(images.IMAGENET_SPEC, size=28)
    for batch, spec, planes in (
        (rgb, imagenet28, rgb / 255.0),
        (grey, imagenet28, np.repeat(grey[..., None], 3, axis=-1) / 255.0),
        (rgb, images.FASHION_MNIST_SPEC, (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])[:, None]),
        (grey, images.FASHION_MNIST_SPEC, grey[..., None] / 255.0),
    ):
        expected = ((planes - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
        ours = images.normalise_batch(torch.from_numpy(batch), spec)
        assert ours.shape == expected.shape and np.allclose(ours.numpy(), expected, atol=1e-5)


def test_augment_batch_is_seeded_and_keeps_shape(fmnist_test):
    x = images.to_tensor(fmnist_test.images[:16], images.FASHION_MNIST_SPEC)
    a = images.augment_batch(x, torch.Generator().manual_seed(1))
    b = images.augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)


def test_random_erasing_blanks_a_rectangle_with_the_background(fmnist_test):
    x = images.to_tensor(fmnist_test.images[:64], images.FASHION_MNIST_SPEC)
    erased = images.augment_batch(x, torch.Generator().manual_seed(2), max_shift=0, flip=False, erase=1.0)
    background = x.min()
    changed = (erased != x).flatten(1).sum(1)
    assert (changed > 0).float().mean() > 0.5  # a rectangle over a dark area may change nothing
    assert torch.all(erased[erased != x] == background)
    assert (changed <= 0.2 * 28 * 28 + 28).all()
    untouched = images.augment_batch(x, torch.Generator().manual_seed(2), max_shift=0, flip=False, erase=0.0)
    assert torch.equal(untouched, x)


def test_edge_fill_keeps_a_light_background_light():
    """A product photo on a light background, shifted: with fill="edge" the uncovered border
    repeats the background (no dark strip, which "min" would paint with the garment's darkest
    pixel); erased rectangles take the background too."""
    x = torch.full((8, 3, 16, 16), 0.9)
    x[:, :, 5:11, 5:11] = 0.1  # a dark garment in the middle
    draws = torch.rand(8, len(images.AUGMENT_DRAWS), generator=torch.Generator().manual_seed(0))
    draws[:, 1:3] = torch.tensor([0.0, 0.99])  # every image shifted by 2 px in x and y
    draws[:, 3] = 0.0  # and erased
    edge = images.augment_batch(x, draws=draws, flip=False, erase=1.0, fill="edge")
    # shifted 2 px left-to-right and bottom-to-top: the uncovered left columns and bottom rows stay background
    assert torch.equal(edge[:, :, -2:, :], torch.full_like(edge[:, :, -2:, :], 0.9))
    assert torch.equal(edge[:, :, :, :2], torch.full_like(edge[:, :, :, :2], 0.9))
    assert set(edge.unique().tolist()) <= set(x.unique().tolist())  # nothing but garment and background
    garment = (edge < 0.5).flatten(1).sum(1)
    assert (garment < 36).any()  # some garments partly erased, with the background
    dark = images.augment_batch(x, draws=draws, flip=False, erase=0.0, fill="min")
    assert (dark[:, :, -2:, :] == 0.1).all()  # what "edge" avoids: the shifted-in rows take the batch minimum
    with pytest.raises(ValueError, match="fill"):
        images.augment_batch(x, draws=draws, fill="mean")


def _augment_reference(x, draws, max_shift, erase):
    """The augmentation written image by image, as pad-and-crop and slice assignment (the
    implementation :func:`augment_batch` replaced), from the same random numbers."""
    n, _, h, w = x.shape
    background = float(x.min())
    out = []
    for i in range(n):
        img = x[i].flip(-1) if draws[i, 0] < 0.5 else x[i]
        if max_shift:
            span = 2 * max_shift + 1
            dx, dy = (min(int(draws[i, c] * span), span - 1) for c in (1, 2))
            padded = torch.nn.functional.pad(img, (max_shift,) * 4, value=background)
            img = padded[:, dy : dy + h, dx : dx + w]
        img = img.clone()
        if draws[i, 3] < erase:
            area = (float(draws[i, 4]) * 0.18 + 0.02) * h * w
            aspect = math.exp(float(draws[i, 5]) * 2.4 - 1.2)
            eh = max(1, min(h, round((area * aspect) ** 0.5)))
            ew = max(1, min(w, round((area / aspect) ** 0.5)))
            top, left = int(float(draws[i, 6]) * (h - eh + 1)), int(float(draws[i, 7]) * (w - ew + 1))
            img[:, top : top + eh, left : left + ew] = background
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("max_shift, erase", [(2, 0.0), (6, 0.5), (0, 1.0), (3, 1.0)])
def test_augment_batch_matches_the_image_by_image_reference(fmnist_test, max_shift, erase):
    x = images.to_tensor(fmnist_test.images[:48], images.FASHION_MNIST_SPEC)
    draws = images.augment_draws(len(x), torch.Generator().manual_seed(max_shift))
    ours = images.augment_batch(x, draws=draws, max_shift=max_shift, erase=erase)
    reference = _augment_reference(x, draws, max_shift, erase)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours.is_contiguous()
    shifted = images.augment_batch(x, draws=draws, max_shift=max_shift, flip=False)
    if max_shift:  # the shifts of both directions and sizes all occur
        assert not torch.equal(shifted, x)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_arrays_with_nan_or_inf_are_refused(bad):
    arr = np.full((28, 28), 0.5)
    arr[3, 4] = bad
    with pytest.raises(InvalidImageError, match="NaN or infinite"):
        uploads.load_image(arr)


def test_input_spec_round_trip():
    assert images.InputSpec.from_dict(images.IMAGENET_SPEC.to_dict()) == images.IMAGENET_SPEC


def _photo_with_square(canvas: int, side: int, left: int, top: int, seed: int = 0) -> Image.Image:
    """A red square of ``side`` px at (left, top) on a slightly noisy light-grey background."""
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(236, 2, (canvas, canvas, 3)), 0, 255).astype(np.uint8)
    arr[top : top + side, left : left + side] = (200, 30, 40)
    return Image.fromarray(arr, "RGB")


def test_product_box_frames_the_product_and_names_the_background():
    box, fill = images.product_box(np.asarray(_photo_with_square(96, 40, 10, 30)), margin=0.05)
    left, top, right, bottom = box
    assert right - left == bottom - top == 44  # square: the product's 40 px plus 5 % each side
    assert left <= 10 and top <= 30 and right >= 50 and bottom >= 70
    assert all(abs(c - 236) <= 2 for c in fill)
    plain = np.full((50, 60, 3), 240, np.uint8)  # nothing on the background: the square on the whole photo
    assert images.product_box(plain)[0] == (0, -5, 60, 55)


def test_product_box_keeps_a_product_that_fills_part_of_the_border():
    """A striped garment cut by the photo's bottom edge (a model shot cut at the hips): its
    pixels on the border are not mistaken for background noise, so the box keeps all of it."""
    arr = np.full((120, 100, 3), 238, np.uint8)
    arr[40:120, 20:80] = (200, 30, 40)
    arr[40:120:4, 20:80] = (150, 150, 225)  # stripes of a lighter, low-contrast colour
    (left, top, right, bottom), _ = images.product_box(arr)
    assert left <= 20 and right >= 80 and top <= 40 and bottom >= 120
    assert right - left == bottom - top


def test_a_product_in_a_corner_is_padded_with_the_background_and_centred():
    spec = replace(images.IMAGENET_SPEC, size=32, trim_background=True)
    corner = images.prepare_image(_photo_with_square(1001, 300, 0, 0), spec).astype(float)  # 1001 px: a partial block
    centred = images.prepare_image(_photo_with_square(128, 60, 34, 34, seed=1), spec).astype(float)
    assert np.abs(corner - centred).mean() < 8
    assert corner[16, 16, 0] > 180 and np.abs(corner[0, 0] - 236).max() < 30  # padding: the background colour


def test_a_wide_product_is_centred_between_bands_of_background():
    """A panorama's product: its square box reaches far past the photo's top and bottom, which
    become background-coloured bands (only the part inside the photo is resized)."""
    arr = np.full((600, 2000, 3), 236, np.uint8)
    arr[100:500, 50:1950] = (200, 30, 40)
    out = images.prepare_image(Image.fromarray(arr), replace(images.IMAGENET_SPEC, size=32, trim_background=True))
    assert out.shape == (32, 32, 3)
    assert out[16, 16, 0] > 180 and out[16, 16, 1] < 60  # the product, 6 px tall, in the middle
    assert np.abs(out[[3, 28], 16].astype(int) - 236).max() < 4  # background above and below it


def test_trimmed_spec_sees_the_product_the_same_wherever_it_stands():
    """Trimming makes a product fill the square: the same product small in a corner or large in
    the middle of a photo gives nearly the same model input; without trimming it does not."""
    spec = replace(images.IMAGENET_SPEC, size=32, trim_background=True)
    small = images.prepare_image(_photo_with_square(128, 40, 8, 70), spec).astype(float)
    large = images.prepare_image(_photo_with_square(128, 100, 14, 14, seed=1), spec).astype(float)
    assert small.shape == (32, 32, 3)
    assert np.abs(small - large).mean() < 8
    phone_photo = _photo_with_square(1000, 300, 650, 80, seed=2)  # its product is found at 1/4 size
    phone = images.prepare_image(phone_photo, spec).astype(float)
    assert np.abs(small - phone).mean() < 8
    assert small[16, 16, 0] > 180 and small[16, 16, 1] < 60  # the red product at the centre
    untrimmed = replace(spec, trim_background=False)
    apart = np.abs(
        images.prepare_image(_photo_with_square(128, 40, 8, 70), untrimmed).astype(float)
        - images.prepare_image(_photo_with_square(128, 100, 14, 14, seed=1), untrimmed).astype(float)
    )
    assert apart.mean() > 30


def test_trimmed_spec_round_trips_and_keeps_old_fingerprints():
    trimmed = replace(images.IMAGENET_SPEC, trim_background=True)
    assert images.InputSpec.from_dict(trimmed.to_dict()) == trimmed
    assert "trim_background" not in images.IMAGENET_SPEC.to_dict()  # models saved before the option
    with pytest.raises(ValueError, match="photo input"):
        images.InputSpec(trim_background=True)  # Fashion-MNIST input: trimmed its own way
    for tiny in (Image.new("RGB", (1, 1), (9, 9, 9)), Image.new("RGB", (5, 2), (250, 250, 250))):
        assert images.prepare_image(tiny, replace(trimmed, size=16)).shape == (16, 16, 3)
