"""The upload-and-search app: an ipywidgets front end over a :class:`~fashsim.searcher.Searcher`.

    app = SearchApp(searcher)
    app            # in a notebook cell: upload a photo, pick K and a category, click "Find similar"

Any upload is handled: what :func:`fashsim.images.load_image` refuses (empty, truncated, HTML,
SVG, PDF, decompression bombs ...) ends as a readable line in the app, which keeps working for
the next upload. Everything the buttons do is also callable from code (:meth:`SearchApp.search_bytes`,
:meth:`SearchApp.search_random`), which is how the notebook runs a scripted search headless and
how the tests drive the app.
"""

from __future__ import annotations

import html
import io

import numpy as np
from PIL import Image

from ..data.sources import load_source_image
from ..errors import FashsimError
from ..search.searcher import Searcher

ALL_CATEGORIES = "(all categories)"


def png_bytes(pixels: np.ndarray, *, size: int = 96) -> bytes:
    """PNG of an image array, upscaled (nearest neighbour) so small images stay crisp."""
    image = Image.fromarray(np.asarray(pixels))
    scale = max(1, size // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    elif max(image.size) > size:
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def uploaded_file(value) -> tuple[str, bytes] | None:
    """``(name, bytes)`` of the file in a FileUpload value: ipywidgets 8 (tuple of dicts with a
    ``content`` memoryview) or 7 (dict of name → dict); None when nothing is uploaded."""
    if not value:
        return None
    if isinstance(value, dict):  # ipywidgets 7
        name, item = next(iter(value.items()))
        return name, bytes(item["content"])
    item = value[0]
    return item.get("name", "upload"), bytes(item["content"])


class SearchApp:
    """The widget app (see the module docstring); ``app.widget`` is the root VBox."""

    def __init__(self, searcher: Searcher, *, k: int = 10, max_k: int = 30, seed: int = 0) -> None:
        import ipywidgets as w

        self.searcher = searcher
        self.rng = np.random.default_rng(seed)
        self.last_hits = []
        self.last_query: np.ndarray | None = None
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload photo")
        self.k = w.IntSlider(value=k, min=1, max=max_k, description="K")
        self.category = w.Dropdown(options=[ALL_CATEGORIES, *searcher.categories()], description="Category")
        self.find_button = w.Button(description="Find similar", button_style="primary", icon="search")
        self.random_button = w.Button(description="Random catalog item", icon="random")
        self.status = w.HTML("")
        self.error = w.HTML("")
        self.query_original = w.Image(format="png", width=160)
        self.query_model_view = w.Image(format="png", width=96)
        self.query_box = w.HBox([])
        self.results = w.GridBox([], layout=w.Layout(grid_template_columns="repeat(5, 120px)", grid_gap="6px"))
        self.find_button.on_click(lambda _: self.search_upload())
        self.random_button.on_click(lambda _: self.search_random())
        self.widget = w.VBox([
            w.HTML("<h3>fashsim — find similar garments</h3>"),
            w.HBox([self.upload, self.find_button, self.random_button]),
            w.HBox([self.k, self.category]),
            self.status, self.error, self.query_box, self.results,
        ])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------ actions
    def _selected_category(self) -> str | None:
        return None if self.category.value == ALL_CATEGORIES else self.category.value

    def search_upload(self):
        """The "Find similar" button: search with the uploaded file."""
        upload = uploaded_file(self.upload.value)
        if upload is None:
            self._fail("Upload a photo first (JPEG, PNG, WebP, GIF, BMP or TIFF).")
            return []
        name, data = upload
        return self.search_bytes(data, name=name)

    def search_random(self):
        """The "Random catalog item" button: search with a random item of the catalog (as stored:
        a catalog image already in the model's format is not prepared a second time)."""
        ids = self.searcher.collection.index.ids()
        record = self.searcher.collection.metadata.get([int(self.rng.choice(ids))])[0]
        pixels = load_source_image(record["source"])
        size = self.searcher.spec.size
        in_model_format = pixels.shape == ((size, size) if self.searcher.spec.channels == 1 else (size, size, 3))
        return self._search(lambda: pixels if in_model_format else self.searcher.prepare(pixels),
                            png_bytes(pixels, size=max(pixels.shape[:2])), f"catalog item {record['id']}")

    def search_bytes(self, data: bytes, *, name: str = "upload"):
        """Search with raw file bytes; shows the results (or a readable error) and returns the hits."""
        return self._search(lambda: self.searcher.prepare(data), data, name)

    def _search(self, prepare, data: bytes, name: str):
        self.results.children = ()  # a new search clears the previous one
        self.query_box.children = ()
        self.error.value = ""
        self.last_hits = []
        self._set_busy(True, name)
        try:
            try:
                prepared = prepare()
                hits = self.searcher.search_prepared(prepared, k=self.k.value, category=self._selected_category(),
                                                     log=True)
            except FashsimError as exc:
                self._fail(str(exc))
                return []
            self.last_query = prepared
            self.last_hits = hits
            self._show_query(data, prepared)
            self._show_hits(hits)
            self.status.value = (f"<b>{len(hits)}</b> results for <i>{html.escape(name)}</i>"
                                 + (f" in <i>{html.escape(self.category.value)}</i>" if self._selected_category() else ""))
            return hits
        finally:
            self._set_busy(False)

    # ------------------------------------------------------------ rendering
    def _set_busy(self, busy: bool, name: str = "") -> None:
        self.find_button.disabled = self.random_button.disabled = busy
        if busy:
            self.status.value = f"⏳ searching for <i>{html.escape(name)}</i> …"

    def _fail(self, message: str) -> None:
        self.status.value = ""
        self.error.value = f"<span style='color:#b00020'>⚠ {html.escape(message)}</span>"

    def _show_query(self, data: bytes, prepared: np.ndarray) -> None:
        import ipywidgets as w

        from ..data.uploads import load_image

        original = np.asarray(load_image(data, working_size=320))
        self.query_original.value = png_bytes(original, size=160)
        self.query_model_view.value = png_bytes(prepared, size=96)
        self.query_box.children = (
            w.VBox([w.HTML("your photo"), self.query_original]),
            w.VBox([w.HTML("as the model sees it"), self.query_model_view]),
        )

    def _show_hits(self, hits) -> None:
        import ipywidgets as w

        cards = []
        for hit in hits:
            thumb = w.Image(value=png_bytes(load_source_image(hit.source)), format="png", width=96)
            caption = w.HTML(f"<b>#{hit.rank}</b> {hit.score:.3f}<br>{html.escape(hit.category)}")
            cards.append(w.VBox([thumb, caption]))
        self.results.children = tuple(cards)

    def figure(self):
        """The last search as a static matplotlib figure (visible in executed notebooks too)."""
        from .viz import retrieval_grid

        if self.last_query is None:
            raise FashsimError("no search has run yet")
        return retrieval_grid([self.last_query], [self.last_hits], lambda hit: load_source_image(hit.source))
