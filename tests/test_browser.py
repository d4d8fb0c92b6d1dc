"""The search app in a real browser: Voilà (``python -m fashsim serve``) and JupyterLab, driven by
headless Chromium through Playwright.

A small collection (2000 Fashion-MNIST test images, with a ``colour`` and a ``name`` field) and
its model are saved under a temporary FASHSIM_HOME; Voilà serves it on a free 127.0.0.1 port
with a short cull timeout. Every search is checked for freshness: the status must name the file
just uploaded with the next search number, the query caption must carry that file's SHA-256, and
the grid must hold exactly K cards. Screenshots land in reports/screenshots/.

ipywidgets 8 keeps no ``<input type=file>`` in the page: the tests click the upload button and
answer the file chooser. Playwright cannot download a browser here: it drives Debian's
/usr/bin/chromium (``make setup`` installs it as root); without it these tests are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import HOSTILE_UPLOADS, encode, product_photo
from PIL import Image

from fashsim.app import webapp

CHROMIUM, CHROMIUM_ARGS = webapp.CHROMIUM, webapp.CHROMIUM_ARGS
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "reports" / "screenshots"
COLOURS = ("red", "blue", "green")
CULL_IDLE_TIMEOUT, CULL_INTERVAL = 15, 3
K_DEFAULT = 10

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason="needs Debian's chromium at /usr/bin/chromium "
        "(make setup installs it as root: apt-get install chromium)",
    ),
]


# ---------------------------------------------------------------- servers and files
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def kernel_processes(server_pid: int) -> list:
    import psutil

    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "ipykernel_launcher" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def wait_until(condition, timeout: float, message: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(message)


@pytest.fixture(scope="session")
def web_home(tmp_path_factory, small_searcher):
    """A project folder with the default model and a 2000-item collection with colour and name fields."""
    from fashsim.data import fashion_mnist
    from fashsim.model.persistence import save_model
    from fashsim.search.collection import Collection

    home = tmp_path_factory.mktemp("webapp_home")
    model_path = home / "data" / "models" / "triplet" / "model.pt"
    model_path.parent.mkdir(parents=True)
    save_model(small_searcher.model, model_path)
    base = small_searcher.collection
    ids = base.index.ids()
    records = [
        {**r, "colour": COLOURS[r["id"] % 3], "name": f"{r['category']} no. {r['id']}"} for r in base.metadata.get(ids)
    ]
    collection = Collection.build(
        base.index.reconstruct(ids), records, kind="flat", model_fingerprint=base.model_fingerprint
    )
    collection_dir = home / "data" / "index" / "fashion-mnist"
    collection.save(collection_dir)
    env = {"FASHSIM_HOME": str(home), "FASHSIM_DATA": str(fashion_mnist.find_fashion_mnist())}
    return {"home": home, "model": model_path, "collection": collection_dir, "env": env}


@pytest.fixture(scope="session")
def upload_files(tmp_path_factory) -> dict[str, Path]:
    """Real photos and the six hostile uploads, as files for the browser's file chooser."""
    folder = tmp_path_factory.mktemp("uploads")
    files = {
        "trousers.jpg": encode(product_photo(seed=1), "JPEG", quality=90),
        "dark.jpg": encode(product_photo(garment_value=20, seed=2), "JPEG", quality=90),
        "grey.png": encode(product_photo(garment_value=120, seed=3), "PNG"),
        # hostile: an empty file, text and a web page saved as images, a cut-off JPEG, 30 MB of
        # junk (over the 25 MiB limit) and a PNG that declares 100 000 × 100 000 pixels
        "empty.jpg": HOSTILE_UPLOADS["empty"],
        "notes.jpg": HOSTILE_UPLOADS["text"],
        "cut.jpg": HOSTILE_UPLOADS["truncated_jpeg"],
        "shop.jpg": HOSTILE_UPLOADS["html"],
        "huge.jpg": bytes(np.random.default_rng(0).integers(0, 256, 30_000_000, dtype=np.uint8)),
        "bomb.png": HOSTILE_UPLOADS["bomb"],
    }
    noise = np.random.default_rng(1).integers(0, 256, (3400, 3400, 3), dtype=np.uint8)
    noise[1300:2100, 1400:2000] = 30  # a dark patch on noise: a ~22 MB JPEG, over Tornado's default 10 MiB
    files["big_photo.jpg"] = encode(Image.fromarray(noise), "JPEG", quality=100)
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    assert 20e6 < paths["big_photo.jpg"].stat().st_size < 25 * 2**20
    return paths


@pytest.fixture(scope="module")
def voila(web_home):
    """``python -m fashsim serve``'s Voilà on a free port (one preheated kernel, short culling)."""
    port = free_port()
    log = open(web_home["home"] / f"voila-{port}.log", "wb")  # noqa: SIM115 - closed in teardown
    env = {**webapp.voila_environment(web_home["collection"], web_home["model"]), **web_home["env"]}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voila",
            *webapp.voila_arguments(
                port=port, preheat=1, cull_idle_timeout=CULL_IDLE_TIMEOUT, cull_interval=CULL_INTERVAL
            ),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process)
        wait_until(lambda: len(kernel_processes(process.pid)) >= 1, 60, "the preheated kernel never started")
        yield {"url": f"http://127.0.0.1:{port}/", "process": process, "log": log.name}
    finally:
        webapp.stop_server(process, timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# ---------------------------------------------------------------- page helpers
class AppPage:
    """One visitor's page of the app, with the checks every search must pass."""

    def __init__(self, page, name: str):
        self.page = page
        self.name = name
        self.searches = 0
        self.outside: list[str] = []
        page.on("request", self._check_request)

    def _check_request(self, request) -> None:
        if not request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            self.outside.append(request.url)

    def open(self, url: str, timeout: float = 90_000) -> float:
        started = time.monotonic()
        self.page.goto(url, timeout=timeout)
        self.page.wait_for_selector("button.fashsim-random", timeout=timeout)
        return time.monotonic() - started

    def shot(self, label: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{self.name}-{label}.png"), full_page=True)

    def status(self) -> str:
        return self.page.inner_text(".fashsim-status")

    def error(self) -> str:
        return self.page.inner_text(".fashsim-error")

    def cards(self) -> int:
        return self.page.locator(".fashsim-hit").count()

    def choose_file(self, path: Path) -> None:
        with self.page.expect_file_chooser() as chooser:
            self.page.click("button.fashsim-upload")
        chooser.value.set_files(str(path))

    def wait_for_search(self, query: str, timeout: float = 30_000) -> None:
        """The next search's results for ``query``: fail on a stale or empty grid."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.searches += 1
        try:
            self.page.wait_for_function(
                "([n, query]) => { const s = document.querySelector('.fashsim-status');"
                " return s && s.innerText.includes(`(search ${n} `) && s.innerText.includes(query); }",
                arg=[self.searches, query],
                timeout=timeout,
            )
        except PlaywrightTimeout:
            self.shot(f"stale-search-{self.searches}")
            raise AssertionError(
                f"{self.name}: no fresh results for {query} (search {self.searches}); status "
                f"{self.status()!r}, error {self.error()!r}"
            ) from None
        assert self.error().strip() == ""
        assert self.cards() > 0, "empty result grid"

    def upload(self, path: Path, k: int = K_DEFAULT) -> list[str]:
        """Upload a photo; returns the categories of the K fresh results."""
        self.choose_file(path)
        self.wait_for_search(path.name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        caption = self.page.inner_text(".fashsim-query")
        assert path.name in caption and digest in caption, f"the query shown is not {path.name}: {caption!r}"
        return self.categories(k)

    def categories(self, k: int) -> list[str]:
        assert self.cards() == k
        return self.page.locator(".fashsim-hit .fs-category").all_inner_texts()

    def upload_refused(self, path: Path, timeout: float = 30_000) -> str:
        """Upload a file the app must refuse: a readable message naming it, and no results."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.choose_file(path)
        try:
            self.page.wait_for_function(
                "(name) => { const e = document.querySelector('.fashsim-error');"
                " return e && e.innerText.includes(name + ':'); }",
                arg=path.name,
                timeout=timeout,
            )
        except PlaywrightTimeout:
            self.shot(f"no-message-{path.stem}")
            raise AssertionError(f"no message for {path.name}; status {self.status()!r}") from None
        assert self.cards() == 0, "results shown next to an error"
        return self.error()

    def random_item(self) -> int:
        self.page.click("button.fashsim-random")
        self.wait_for_search("catalog item")
        return int(re.search(r"catalog item (\d+)", self.status()).group(1))


@pytest.fixture(scope="module")
def app_page(browser, voila, upload_files):
    """One visitor's page, shared by the tests below in order (closed by the three-pages test)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = AppPage(context.new_page(), "voila")
    page.files = upload_files
    page.context = context
    page.load_seconds = page.open(voila["url"])
    yield page
    assert not page.outside, f"requests outside the server: {page.outside}"
    context.close()


# ---------------------------------------------------------------- Voilà
def test_page_loads_with_only_the_app(app_page, web_home):
    page = app_page.page
    text = page.inner_text("body")
    assert "fashsim — find similar garments" in text and "Catalog: 2000 items in 10 categories" in text
    for debris in ("PosixPath", "<span", "Traceback", "open_app", "import ", "⚠"):
        assert debris not in text, f"notebook debris on the page: {debris!r}"
    assert page.title() == "fashsim — find similar garments"
    options = [o.replace("\xa0", " ") for o in page.locator(".fashsim-category select option").all_inner_texts()]
    assert options[0] == "(all categories)" and "Trouser" in options and len(options) == 11
    colours = page.locator(".fashsim-filter-colour select option").all_inner_texts()
    assert colours == ["(any)", *sorted(COLOURS)]
    assert page.locator(".fashsim-filter").count() == 1  # "name" has 2000 values: no filter
    assert page.locator("link[href^='http']").count() == 0  # no CDN stylesheet
    assert page.locator(".fashsim-hit").count() == 0 and app_page.status() == ""  # nobody searched yet
    app_page.shot("1-loaded")
    assert app_page.load_seconds < 60


def test_jpeg_upload_gives_k_results_with_categories_and_metadata(app_page):
    categories = app_page.upload(app_page.files["trousers.jpg"])
    assert len(categories) == K_DEFAULT
    known = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert set(categories) <= known
    page = app_page.page
    first = page.locator(".fashsim-hit").first.inner_text()
    assert first.startswith("#1") and "colour: " in first and "name: " in first
    scores = [float(s) for s in page.locator(".fashsim-hit .fs-score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    assert page.locator(".fashsim-query img").count() == 2  # the photo and what the model sees
    assert "as the model sees it" in page.inner_text(".fashsim-query")
    assert page.locator(".fashsim-history li").count() == 1
    app_page.shot("2-upload")


def test_k_and_filters_are_respected(app_page):
    page = app_page.page
    page.fill(".fashsim-k input", "4")
    page.press(".fashsim-k input", "Enter")
    page.select_option(".fashsim-category select", label="Trouser")
    page.select_option(".fashsim-filter-colour select", label="red")
    page.click("button.fashsim-find")  # the same photo again, now with K=4, Trouser, red
    app_page.wait_for_search("trousers.jpg")
    assert app_page.categories(4) == ["Trouser"] * 4
    assert all("colour: red" in card for card in page.locator(".fashsim-hit").all_inner_texts())
    assert "Trouser, colour = red" in app_page.status()
    app_page.shot("3-filtered")
    page.select_option(".fashsim-category select", label="(all categories)")
    page.select_option(".fashsim-filter-colour select", label="(any)")
    page.fill(".fashsim-k input", str(K_DEFAULT))
    page.press(".fashsim-k input", "Enter")


@pytest.mark.parametrize("name", ["empty.jpg", "notes.jpg", "cut.jpg", "shop.jpg", "huge.jpg", "bomb.png"])
def test_hostile_upload_shows_a_message_and_the_next_upload_works(app_page, name):
    message = app_page.upload_refused(app_page.files[name])
    assert len(message) > 30 and "⚠" in message and "<" not in message
    expected = {
        "empty.jpg": "empty",
        "notes.jpg": "text",
        "cut.jpg": "truncated",
        "shop.jpg": "HTML",
        "huge.jpg": "upload limit",
        "bomb.png": "decompression bomb",
    }[name]
    assert expected in message, message
    if name in ("huge.jpg", "bomb.png"):
        app_page.shot(f"4-refused-{Path(name).stem}")
    app_page.page.click("button.fashsim-find")  # "Find similar" must not answer with the previous photo
    app_page.page.wait_for_function(
        "(name) => document.querySelector('.fashsim-error').innerText.includes(name)",
        arg="Upload a photo first" if name == "huge.jpg" else name + ":",
    )
    assert app_page.cards() == 0
    categories = app_page.upload(app_page.files["dark.jpg"])
    assert len(categories) == K_DEFAULT


def test_a_20_mb_photo_uploads(app_page):
    """Over Tornado's default 10 MiB websocket message limit, under the app's 25 MiB."""
    assert len(app_page.upload(app_page.files["big_photo.jpg"])) == K_DEFAULT
    app_page.upload(app_page.files["grey.png"])  # and the connection is still fine


def test_random_catalog_item(app_page):
    first = app_page.random_item()
    assert app_page.cards() == K_DEFAULT
    top = app_page.page.locator(".fashsim-hit").first
    assert top.get_attribute("data-id") == str(first)  # an item's own copy comes first
    assert f"catalog item {first}" in app_page.page.inner_text(".fashsim-query")
    app_page.shot("5-random")


def test_three_pages_at_once_then_their_kernels_are_culled(browser, voila, upload_files, app_page):
    server = voila["process"].pid
    app_page.context.close()  # the first visitor leaves: only the preheated kernel should remain
    wait_until(
        lambda: len(kernel_processes(server)) <= 1, CULL_IDLE_TIMEOUT + 45, "the first page's kernel was not culled"
    )
    pages = []
    for n in range(3):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = AppPage(context.new_page(), f"visitor{n + 1}")
        page.context = context
        page.files = upload_files
        pages.append(page)
    for page in pages:  # all three load at the same time
        page.page.goto(voila["url"], wait_until="commit", timeout=90_000)
    for page in pages:
        page.page.wait_for_selector("button.fashsim-random", timeout=90_000)
    assert len(kernel_processes(server)) >= 3  # a kernel per visitor
    picks = [[page.random_item() for _ in range(2)] for page in pages]
    assert len({tuple(p) for p in picks}) == 3, f"random items are not random per visitor: {picks}"
    for page, name in zip(pages, ("trousers.jpg", "dark.jpg", "grey.png")):
        page.choose_file(upload_files[name])
    for page, name in zip(pages, ("trousers.jpg", "dark.jpg", "grey.png")):
        page.wait_for_search(name)
        assert page.cards() == K_DEFAULT and name in page.page.inner_text(".fashsim-query")
    pages[0].shot("6-three-pages")
    for page in pages:
        assert not page.outside
        page.context.close()
    # the closed pages' kernels are culled; the preheated one (and its refill) stays
    wait_until(
        lambda: len(kernel_processes(server)) <= 1,
        CULL_IDLE_TIMEOUT + 45,
        f"kernels of closed pages were not culled: {len(kernel_processes(server))} left",
    )


def test_a_kernel_without_a_page_is_culled(voila):
    server = voila["process"].pid
    wait_until(lambda: len(kernel_processes(server)) <= 1, 60, "earlier kernels were not culled")
    before = {p.pid for p in kernel_processes(server)}
    with urllib.request.urlopen(voila["url"], timeout=90) as response:  # renders a page, never connects
        assert response.status == 200 and b"fashsim" in response.read()
    wait_until(
        lambda: len(kernel_processes(server)) >= 2 or {p.pid for p in kernel_processes(server)} != before,
        60,
        "no kernel was started for the request",
    )
    wait_until(lambda: len(kernel_processes(server)) <= 1, CULL_IDLE_TIMEOUT + 45, "the idle kernel was not culled")


# ---------------------------------------------------------------- JupyterLab
def lab_kernel_idle(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernels", timeout=10) as response:
            kernels = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:  # Jupyter Server lists a kernel it is still starting with an error 500
            return False  # ('last_activity' not set yet, seen once in CI): ask again
        raise
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def test_jupyterlab_default_settings_two_searches_in_a_row(browser, web_home, upload_files, tmp_path):
    """The app in JupyterLab with its default settings (ipykernel 7 runs widget callbacks in a
    subshell thread): every search must answer, not just the first."""
    import nbformat

    root = tmp_path / "lab"
    root.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "from fashsim.app.webapp import open_app\n\n"
            f"app = open_app({str(web_home['collection'])!r}, {str(web_home['model'])!r})\napp"
        )
    ]
    nbformat.write(notebook, root / "app.ipynb")
    port = free_port()
    env = {
        **os.environ,
        **web_home["env"],
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    log = open(tmp_path / "lab.log", "wb")  # noqa: SIM115
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            "--IdentityProvider.token=",
            f"--ServerApp.root_dir={root}",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
            *webapp.lab_arguments(),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        wait_for_port(port, lab)
        page = AppPage(context.new_page(), "jupyterlab")
        page.page.goto(f"http://127.0.0.1:{port}/lab/tree/app.ipynb", timeout=90_000)
        editor = page.page.locator(".jp-Notebook .jp-Cell .cm-content").first
        editor.wait_for(timeout=90_000)
        wait_until(lambda: lab_kernel_idle(port), 90, "the notebook's kernel did not start")
        editor.click()
        page.page.keyboard.press("Shift+Enter")
        page.page.wait_for_selector("button.fashsim-upload", timeout=120_000)
        first = page.upload(upload_files["trousers.jpg"])  # search 1
        second = page.upload(upload_files["dark.jpg"])  # search 2: this one hung before the fix
        assert len(first) == len(second) == K_DEFAULT
        page.random_item()  # search 3
        page.shot("lab-three-searches")
        assert "ProgrammingError" not in Path(log.name).read_text(errors="replace")
    finally:
        context.close()
        webapp.stop_server(lab, timeout=20)
        log.close()


def test_voila_log_has_no_kernel_errors(voila):
    text = Path(voila["log"]).read_text(errors="replace")
    for bad in ("ProgrammingError", "Traceback", "Exception in callback"):
        assert bad not in text, f"{bad} in the Voilà log"
    # every kernel the pages used talked over encrypted sockets (fashsim.app.kernels)
    assert "Kernel started" in text and "without encryption" not in text
    assert json.dumps(webapp.WEBSOCKET_MAX_MESSAGE_BYTES) in " ".join(webapp.voila_arguments())
