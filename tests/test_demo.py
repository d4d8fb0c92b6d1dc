"""Drive the ipywidgets app as a user would: set the upload widget's value, click, read the UI."""

from datetime import datetime, timezone

import numpy as np
import pytest
from image_fixtures import HOSTILE_UPLOADS, encode, png, product_photo

from fashsim.app.demo import ALL_CATEGORIES, SearchApp, png_bytes, uploaded_file


def upload(app, data: bytes, name="photo.png"):
    app.upload.value = ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                         "last_modified": datetime.now(timezone.utc)},)
    app.find_button.click()


@pytest.fixture
def app(small_searcher):
    return SearchApp(small_searcher, k=6)


def test_widgets_and_categories(app):
    assert app.category.options[0] == ALL_CATEGORIES
    assert "Trouser" in app.category.options and len(app.category.options) == 11
    assert app.find_button.description == "Find similar"


def test_upload_and_find_shows_ranked_results(app, fmnist_test):
    upload(app, png(fmnist_test.images[3]))
    assert app.error.value == ""
    assert len(app.results.children) == 6
    first_caption = app.results.children[0].children[1].value
    assert first_caption.startswith("<b>#1</b> 1.000")  # the image's own catalog copy
    assert "6</b> results for <i>photo.png</i>" in app.status.value
    assert app.last_hits[0].id == 60003
    assert [h.score for h in app.last_hits] == sorted((h.score for h in app.last_hits), reverse=True)
    assert len(app.query_box.children) == 2  # the photo and what the model sees
    assert not app.find_button.disabled  # busy state cleared


def test_k_and_category_are_respected(app, fmnist_test):
    app.k.value = 4
    app.category.value = "Sneaker"
    upload(app, png(fmnist_test.images[0]))
    assert len(app.results.children) == 4
    assert {h.category for h in app.last_hits} == {"Sneaker"}
    assert "in <i>Sneaker</i>" in app.status.value


@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_upload_shows_message_and_app_keeps_working(app, name, fmnist_test):
    upload(app, png(fmnist_test.images[1]))
    assert len(app.results.children) == 6
    upload(app, HOSTILE_UPLOADS[name], name=f"{name}.png")
    assert "⚠" in app.error.value and len(app.error.value) > 30
    assert app.results.children == () and app.last_hits == []  # previous results cleared
    assert not app.find_button.disabled
    upload(app, png(fmnist_test.images[2]))  # the next upload works
    assert app.error.value == "" and app.last_hits[0].id == 60002


def test_real_world_photos_cmyk_16bit_alpha_huge(app):
    from PIL import Image

    photos = {
        "cmyk.jpg": encode(product_photo().convert("CMYK"), "JPEG"),
        "16bit.png": encode(Image.fromarray(np.asarray(product_photo().convert("L")).astype(np.uint16) * 257), "PNG"),
        "alpha.png": encode(product_photo().convert("RGBA"), "PNG"),
        "huge.jpg": encode(product_photo((5000, 4000)), "JPEG", quality=70),
    }
    for name, data in photos.items():
        upload(app, data, name=name)
        assert app.error.value == "", name
        assert len(app.results.children) == 6
        assert app.last_query.shape == (28, 28) and app.last_query[:, 0].max() < 30  # inverted garment


def test_no_upload_and_random_item(app):
    app.find_button.click()
    assert "Upload a photo first" in app.error.value
    hits = app.search_random()
    chosen = int(app.status.value.split("catalog item ")[1].split("<")[0])
    assert len(hits) == 6 and hits[0].id == chosen and hits[0].score > 0.99
    assert app.error.value == ""


def test_static_figure_and_helpers(app, fmnist_test):
    upload(app, png(fmnist_test.images[5]))
    fig = app.figure()
    assert len(fig.axes) == 7
    assert uploaded_file(()) is None
    assert uploaded_file({"a.png": {"content": b"xyz"}}) == ("a.png", b"xyz")  # ipywidgets 7 layout
    assert png_bytes(fmnist_test.images[0]).startswith(b"\x89PNG")
