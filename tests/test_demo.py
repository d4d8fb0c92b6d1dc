"""Drive the ipywidgets app as a user would: set the upload widget's value, click, read the UI."""

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import HOSTILE_UPLOADS, encode, png, product_photo

from fashsim.app.demo import (
    ALL_CATEGORIES,
    ANY_VALUE,
    MAX_UPLOAD_BYTES,
    OVERSIZED_MARKER,
    SearchApp,
    png_bytes,
    read_upload,
)
from fashsim.errors import FashsimError


def upload(app, data: bytes, name="photo.png", *, size=None, click=True):
    """What the browser does: the FileUpload value arrives (the app searches at once), then a click."""
    app.upload.value = (
        {
            "name": name,
            "type": "image/png",
            "size": len(data) if size is None else size,
            "content": memoryview(data),
            "last_modified": datetime.now(timezone.utc),
        },
    )
    if click:
        app.find_button.click()


def cards(app) -> int:
    """How many result cards the page shows."""
    return app.results_html.value.count("class='fashsim-hit'") if app.results.children else 0


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
    assert cards(app) == 6
    assert "<b>#1</b> <span class='fs-score'>1.000</span>" in app.results_html.value  # the image's own copy
    assert "6</b> results for <i>photo.png</i>" in app.status.value
    assert "(search 2 · " in app.status.value  # the upload searched at once, the click again
    assert app.last_hits[0].id == 60003
    assert [h.score for h in app.last_hits] == sorted((h.score for h in app.last_hits), reverse=True)
    assert len(app.query_box.children) == 2  # the photo and what the model sees
    assert not app.find_button.disabled  # busy state cleared


def test_k_and_category_are_respected(app, fmnist_test):
    app.k.value = 4
    app.category.value = "Sneaker"
    upload(app, png(fmnist_test.images[0]))
    assert cards(app) == 4
    assert {h.category for h in app.last_hits} == {"Sneaker"}
    assert "in <i>Sneaker</i>" in app.status.value


@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_upload_shows_message_and_app_keeps_working(app, name, fmnist_test):
    upload(app, png(fmnist_test.images[1]))
    assert cards(app) == 6
    upload(app, HOSTILE_UPLOADS[name], name=f"{name}.png")
    assert "⚠" in app.error.value and len(app.error.value) > 30
    assert f"{name}.png:" in app.error.value  # the message names the file
    assert app.results.children == () and app.last_hits == []  # previous results cleared
    assert app.query_box.children == ()
    app.find_button.click()  # "Find similar" now means this file, never the previous photo
    assert f"{name}.png:" in app.error.value and app.last_hits == []
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
        assert cards(app) == 6
        assert app.last_query.shape == (28, 28) and app.last_query[:, 0].max() < 30  # inverted garment


def test_no_upload_and_random_item(app, fmnist_test):
    app.find_button.click()
    assert "Upload a photo first" in app.error.value
    upload(app, png(fmnist_test.images[1]))
    app.upload.value = ()
    hits = app.search_random()
    chosen = int(app.status.value.split("catalog item ")[1].split("<")[0])
    assert len(hits) == 6 and hits[0].id == chosen and hits[0].score > 0.99
    assert app.error.value == ""


def test_static_figure_and_helpers(app, fmnist_test):
    upload(app, png(fmnist_test.images[5]))
    fig = app.figure()
    assert len(fig.axes) == 7
    assert read_upload(()) is None
    legacy = read_upload({"a.png": {"content": b"xyz"}})  # ipywidgets 7 layout
    assert (legacy.name, legacy.data) == ("a.png", b"xyz")
    assert png_bytes(fmnist_test.images[0]).startswith(b"\x89PNG")


def test_upload_is_consumed_and_find_similar_reuses_it(app, fmnist_test):
    upload(app, png(fmnist_test.images[7]), name="seven.png", click=False)
    assert app.upload.value == ()  # taken out of the widget at once
    assert app.last_hits[0].id == 60007 and "seven.png" in app.status.value
    assert "seven.png" in app.query_caption.value and "sha256" in app.query_caption.value
    app.k.value = 3
    app.find_button.click()  # e.g. after changing K: the same photo again
    assert cards(app) == 3 and app.last_hits[0].id == 60007 and "(search 2 · " in app.status.value


def test_no_upload_message_clears_old_results(app, fmnist_test):
    app.search_random()
    assert cards(app) == 6
    app.find_button.click()
    assert "Upload a photo first" in app.error.value
    assert app.results.children == () and app.query_box.children == () and app.status.value == ""


@pytest.mark.parametrize("how", ["reported_size", "placeholder", "content"])
def test_oversized_upload_is_refused_with_its_name_and_never_searches_the_previous_photo(app, fmnist_test, how):
    upload(app, png(fmnist_test.images[4]), name="small.png")
    assert app.last_hits[0].id == 60004
    big = 30_000_000
    if how == "reported_size":  # the browser's size says it (the kernel got the whole file in JupyterLab)
        upload(app, png(fmnist_test.images[5]), name="big.jpg", size=big, click=False)
    elif how == "placeholder":  # the Voila page sent a placeholder instead of the file
        upload(app, OVERSIZED_MARKER + str(big).encode(), name="big.jpg", size=big, click=False)
    else:
        upload(app, bytes(MAX_UPLOAD_BYTES + 1), name="big.jpg", click=False)
    assert "big.jpg:" in app.error.value and "upload limit" in app.error.value
    assert app.results.children == () and app.last_hits == []
    app.find_button.click()  # "Find similar" must not answer with small.png
    assert "Upload a photo first" in app.error.value and app.last_hits == []
    upload(app, png(fmnist_test.images[6]), name="next.png")  # and the next upload works
    assert app.error.value == "" and app.last_hits[0].id == 60006


def test_read_upload_identity():
    data = b"\x89PNG fake"
    upload_ = read_upload(({"name": "a.png", "size": len(data), "content": memoryview(data)},))
    assert upload_.name == "a.png" and upload_.size == len(data) and not upload_.oversized
    assert upload_.sha256 == __import__("hashlib").sha256(data).hexdigest()
    assert "a.png" in upload_.label() and upload_.sha256[:8] in upload_.label()
    placeholder = read_upload(({"name": "b.jpg", "content": OVERSIZED_MARKER + b"31000000"},))
    assert placeholder.size == 31_000_000 and placeholder.oversized


def test_random_items_differ_per_app_unless_seeded(small_searcher):
    picks = [SearchApp(small_searcher, k=1).rng.integers(1 << 30) for _ in range(4)]
    assert len(set(picks)) == 4
    seeded = [SearchApp(small_searcher, k=1, seed=3).rng.integers(1 << 30) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_metadata_fields_shown_and_filterable(small_searcher):
    """A collection with further metadata (colour, name): cards show every field, and a field
    with few values becomes a filter."""
    from fashsim.search.collection import Collection
    from fashsim.search.searcher import Searcher

    base = small_searcher.collection
    ids = base.index.ids()[:300]
    records = [
        {
            **r,
            "colour": ("red", "blue", "green")[r["id"] % 3],
            "name": f"item <{r['id']}>",
            "Stock Level": ("low", "high")[r["id"] % 2],
        }
        for r in base.metadata.get(ids)
    ]
    collection = Collection.build(
        base.index.reconstruct(ids), records, kind="flat", model_fingerprint=base.model_fingerprint
    )
    app = SearchApp(Searcher(small_searcher.model, collection), k=5)
    assert set(app.filters) == {"colour", "Stock Level"}  # "name" has 300 values: no filter
    assert app.filters["colour"].options == (ANY_VALUE, "blue", "green", "red")
    assert app.filters["colour"].description == "Colour" and app.filters["Stock Level"].description == "Stock Level"
    app.filters["colour"].value = "green"
    app.category.value = "Trouser"
    assert app._where() == {"colour": "green"}  # the portable form: a filter expression on Milvus
    hits = app.search_random()
    assert hits and all(h.extra["colour"] == "green" and h.category == "Trouser" for h in hits)
    app.filters["Stock Level"].value = "high"  # a column name a Milvus expression cannot hold: still a dict
    assert app._where() == {"colour": "green", "Stock Level": "high"}
    hits = app.search_random()
    assert hits and all(h.extra["colour"] == "green" and h.extra["Stock Level"] == "high" for h in hits)
    app.filters["Stock Level"].value = ANY_VALUE
    assert "colour</i>: green" in app.results_html.value and "item &lt;" in app.results_html.value
    assert "colour = green" in app.status.value
    assert "colour=green" in app.history_panel.value


def test_history_panel_and_log(app):
    app.search_random()
    app.search_random()
    assert app.history_panel.value.count("<li>") == 2
    assert app.searcher.collection.metadata.history() == [] or not app.log_box.value
    before = len(app.searcher.collection.metadata.history(limit=10_000))
    app.log_box.value = True
    app.search_random()
    assert len(app.searcher.collection.metadata.history(limit=10_000)) == before + 1
    assert "logged" in app.history_panel.value


def test_a_second_search_waits_for_the_first(app):
    import threading

    assert app._busy.acquire(blocking=False)  # a search is running (on another thread)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("hits", app.search_random()))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive()  # waiting, not dropped
    app._busy.release()
    worker.join(30)
    assert len(result["hits"]) == 6 and not app.find_button.disabled


def test_unexpected_error_in_a_button_becomes_a_message(app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.searcher, "search_prepared", broken)
    app.random_button.click()
    assert "internal error" in app.error.value and "boom" in app.error.value
    assert not app.find_button.disabled and not app.random_button.disabled


# ---------------------------------------------------------------- the web page's configuration
def test_page_template_and_servers_agree_with_the_upload_limit():
    import re

    from fashsim.app import webapp

    template = (webapp.JUPYTER_DATA / "voila" / "templates" / webapp.TEMPLATE / "index.html.j2").read_text()
    assert f"var MAX_UPLOAD_BYTES = {MAX_UPLOAD_BYTES};" in template
    assert f'"{OVERSIZED_MARKER.decode()}"' in template
    assert "http://" not in template and "https://" not in template  # nothing from outside the server
    assert webapp.WEBSOCKET_MAX_MESSAGE_BYTES >= MAX_UPLOAD_BYTES + 2**20
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert re.search(rf"^WS_MAX\s*:=\s*{webapp.WEBSOCKET_MAX_MESSAGE_BYTES}$", makefile, re.M)
    assert "--ServerApp.tornado_settings=\"{'websocket_max_message_size': $(WS_MAX)}\"" in makefile
    assert re.search(r"^EXTRAS\s*\?=.*\bapp\b", makefile, re.M)
    assert str(webapp.WEBSOCKET_MAX_MESSAGE_BYTES) in webapp.lab_arguments()[0]


def test_voila_arguments():
    from fashsim.app import webapp

    args = webapp.voila_arguments(port=9999, preheat=2, refill_delay=2.5, cull_idle_timeout=40, cull_interval=7)
    assert args[0] == str(webapp.APP_NOTEBOOK) and webapp.APP_NOTEBOOK.is_file()
    for expected in (
        "--port=9999",
        "--Voila.ip=127.0.0.1",
        "--template=fashsim",
        "--no-browser",
        "--MappingKernelManager.cull_idle_timeout=40",
        "--MappingKernelManager.cull_interval=7",
        "--MappingKernelManager.cull_connected=False",
        "--VoilaConfiguration.preheat_kernel=True",
        "--VoilaConfiguration.default_pool_size=2",
        "--VoilaKernelManager.fill_delay=2.5",
        "--VoilaConfiguration.multi_kernel_manager_class=fashsim.app.webapp.AppKernelManager",
        f"--Voila.tornado_settings={{'websocket_max_message_size': {webapp.WEBSOCKET_MAX_MESSAGE_BYTES}}}",
        "--KernelManager.transport_encryption=auto",  # the kernels' sockets encrypted
    ):
        assert expected in args
    assert not any("preheat" in a for a in webapp.voila_arguments(preheat=0))
    defaults = webapp.voila_arguments()  # what `fashsim serve` runs: a pool for a burst of visitors
    assert f"--VoilaConfiguration.default_pool_size={webapp.PRELOADED_KERNELS}" in defaults
    assert f"--VoilaKernelManager.fill_delay={webapp.POOL_REFILL_DELAY:g}" in defaults
    env = webapp.voila_environment(Path("/c"), Path("/m.pt"), base={"JUPYTER_PATH": "/x"})
    assert env[webapp.ENV_COLLECTION] == "/c" and env[webapp.ENV_MODEL] == "/m.pt"
    assert env["JUPYTER_PATH"].split(os.pathsep) == [str(webapp.JUPYTER_DATA), "/x"]


def test_app_notebook_is_only_the_app():
    import nbformat

    from fashsim.app import webapp

    notebook = nbformat.read(webapp.APP_NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(code) == 1 and not code[0].outputs and code[0].source.rstrip().endswith("open_app()")
    assert notebook.metadata["title"] == "fashsim — find similar garments"


def test_kernel_manager_is_built_lazily_and_refreshes_pool_kernels():
    import asyncio
    import subprocess
    import sys

    code = (
        "import sys; import fashsim.app.webapp as w; assert 'jupyter_server' not in sys.modules; "
        "K = w.AppKernelManager; assert K is w.AppKernelManager; print(K.__mro__[1].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "AsyncMappingKernelManager"

    from datetime import datetime, timedelta, timezone

    from fashsim.app import webapp

    class Kernel:
        last_activity = datetime.now(timezone.utc) - timedelta(hours=1)  # waited in the pool for an hour

    manager = webapp.AppKernelManager.__new__(webapp.AppKernelManager)
    manager._kernels = {"k1": Kernel()}
    asyncio.run(manager.cull_kernel_if_idle("k1"))  # first seen outside the pool: not culled, clock reset
    assert datetime.now(timezone.utc) - manager._kernels["k1"].last_activity < timedelta(seconds=5)


def test_resolve_paths_and_open_app_errors(tmp_path, monkeypatch):
    from fashsim.app import webapp

    monkeypatch.setenv("FASHSIM_HOME", str(tmp_path))
    monkeypatch.delenv(webapp.ENV_COLLECTION, raising=False)
    monkeypatch.delenv(webapp.ENV_MODEL, raising=False)
    collection, model = webapp.resolve()
    assert collection == tmp_path / "data" / "index" / "fashion-mnist"
    assert model == tmp_path / "data" / "models" / "triplet" / "model.pt"
    own = tmp_path / "shop"
    own.mkdir()
    (own / "model.pt").write_bytes(b"x")
    assert webapp.resolve(own) == (own, own / "model.pt")  # a collection folder with its own model
    monkeypatch.setenv(webapp.ENV_COLLECTION, str(own))
    monkeypatch.setenv(webapp.ENV_MODEL, str(tmp_path / "other.pt"))
    assert webapp.resolve() == (own, tmp_path / "other.pt")
    message = webapp.open_app()  # the model file is junk: a readable message, not a traceback
    assert "cannot start" in message.data and "other.pt" in message.data
    with pytest.raises(FashsimError, match="no model"):
        webapp.prepare_default(own, tmp_path / "missing.pt")


def test_cli_serve_arguments(monkeypatch):
    from fashsim.app import cli, webapp

    seen = {}
    monkeypatch.setattr(webapp, "serve", lambda *a, **kw: seen.update(args=a, kwargs=kw) or 0)
    assert cli.main(["serve", "--collection", "shop", "--model", "m.pt", "--port", "9000", "--preheat", "0"]) == 0
    assert seen["args"] == ("shop", "m.pt")
    assert seen["kwargs"] == {"port": 9000, "preheat": 0, "cull_idle_timeout": 60, "open_browser": False}
    assert cli.main(["serve"]) == 0
    assert seen["kwargs"]["preheat"] == webapp.PRELOADED_KERNELS  # the default pool


def test_open_app_serves_a_saved_collection(small_searcher, tmp_path, monkeypatch):
    from fashsim.app import webapp
    from fashsim.model.persistence import save_model

    small_searcher.collection.save(tmp_path / "c")
    save_model(small_searcher.model, tmp_path / "c" / "model.pt")
    monkeypatch.setenv(webapp.ENV_COLLECTION, str(tmp_path / "c"))
    monkeypatch.delenv(webapp.ENV_MODEL, raising=False)
    app = webapp.open_app(k=3)
    assert isinstance(app, SearchApp) and len(app.search_random()) == 3
