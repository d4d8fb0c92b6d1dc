"""The upload-and-search app: an ipywidgets front end over a :class:`~fashsim.search.searcher.Searcher`.

    app = SearchApp(searcher)
    app            # in a notebook cell: upload a photo, see the most similar catalog items

The same app is the web page that ``python -m fashsim serve`` serves with Voilà
(:mod:`fashsim.app.webapp`). What it shows: the visitor's photo and the query "as the model sees
it", then the K best catalog items with rank, score, category and every further metadata field
the collection holds; filters on the category and on each metadata field with few distinct
values; a "Random catalog item" button (random per app, so per visitor); and the session's
search history, also logged in the collection's metadata store when ``log`` is on.

Uploads: choosing a file searches with it at once ("Find similar" searches again with the same
photo, e.g. after changing K or a filter). The upload is taken out of the widget as soon as it
arrives and kept with its identity (name, size, SHA-256), so a search can never silently use an
earlier photo. Files over :data:`MAX_UPLOAD_BYTES` and anything that
:func:`fashsim.data.uploads.load_image` refuses (empty, truncated, HTML, SVG, PDF, decompression
bombs ...) end as a readable line naming the file, with the previous results cleared, and the app
keeps working for the next upload. Everything the buttons do is also callable from code
(:meth:`SearchApp.search_bytes`, :meth:`SearchApp.search_random`), which is how a notebook runs a
scripted search headless and how the tests drive the app.

The widgets use plain text labels (no Font Awesome icons), so the page needs nothing from outside
the server it comes from.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.sources import FMNIST_PREFIX, load_source_image
from ..data.uploads import load_image
from ..errors import FashsimError
from ..search.searcher import Searcher

ALL_CATEGORIES = "(all categories)"
ANY_VALUE = "(any)"
#: the largest upload the app accepts (the web page and the servers are configured above it).
MAX_UPLOAD_BYTES = 25 * 2**20
#: what the Voilà page sends instead of a file over the limit (see the page template).
OVERSIZED_MARKER = b"fashsim:oversized-upload:"
#: a metadata field becomes a filter when it has at most this many distinct values.
FILTER_MAX_VALUES = 12
THUMB_SIZE = 84

CSS = """<style>
.fashsim-app .fashsim-grid { width: 100%; display: grid; grid-template-columns: repeat(auto-fill, 150px); gap: 6px; }
.fashsim-app .fashsim-hit { border: 1px solid #ddd; border-radius: 4px; padding: 4px; background: #fff; }
.fashsim-app .fashsim-hit img { image-rendering: pixelated; display: block; margin: 0 auto 2px auto; }
.fashsim-app .fashsim-hit .fs-meta { font-size: 11px; line-height: 1.25; color: #333; overflow-wrap: anywhere; }
.fashsim-app .fashsim-error { color: #b00020; }
.fashsim-app .fashsim-history { font-size: 12px; }
</style>"""


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


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI for an ``<img>`` tag."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def human_size(n: int) -> str:
    """A byte count as people read it: ``512 bytes``, ``3.4 KiB``, ``1.2 MiB``."""
    return f"{n / 2**20:.1f} MiB" if n >= 100 * 2**10 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its bytes and its identity (what the browser said and what arrived)."""

    name: str
    data: bytes
    size: int  # the size the browser reported (larger than len(data) for a refused oversized file)
    sha256: str

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "upload", size: int | None = None) -> Upload:
        """An upload of ``data`` (``size``: what the browser reported, if known)."""
        return cls(name, data, len(data) if size is None else int(size), hashlib.sha256(data).hexdigest())

    @property
    def oversized(self) -> bool:
        """Larger than :data:`MAX_UPLOAD_BYTES`, or cut short by the page for being so."""
        return (
            self.size > MAX_UPLOAD_BYTES or len(self.data) > MAX_UPLOAD_BYTES or self.data.startswith(OVERSIZED_MARKER)
        )

    def label(self) -> str:
        """How the status line names the upload: name, size and hash prefix."""
        return f"{self.name} ({human_size(self.size)}, sha256 {self.sha256[:8]})"


def read_upload(value) -> Upload | None:
    """The :class:`Upload` in a FileUpload value (ipywidgets 8 or 7); None when it is empty."""
    if not value:
        return None
    if isinstance(value, dict):  # ipywidgets 7
        name, item = next(iter(value.items()))
    else:
        item = value[0]
        name = item.get("name") or "upload"
    data = bytes(item["content"])
    size = item.get("size")
    if data.startswith(OVERSIZED_MARKER):  # the page kept the file back and sent its size instead
        try:
            size = max(int(size or 0), int(data[len(OVERSIZED_MARKER) :].decode("ascii")))
        except ValueError:
            size = MAX_UPLOAD_BYTES + 1
    return Upload.from_bytes(data, str(name), size if size is not None else len(data))


def _named_bytes(data: bytes, name: str) -> io.BytesIO:
    """A file object that :func:`load_image` names ``name`` in its messages."""
    buffer = io.BytesIO(data)
    buffer.name = name
    return buffer


class SearchApp:
    """The widget app (see the module docstring); ``app.widget`` is the root VBox."""

    def __init__(
        self,
        searcher: Searcher,
        *,
        k: int = 10,
        max_k: int = 30,
        seed: int | None = None,
        log: bool = False,
        history_size: int = 20,
        title: str = "fashsim — find similar garments",
    ) -> None:
        """``seed``: of the "Random catalog item" choices (None: different for every app, so for
        every visitor of the web page); ``log``: also log each search in the collection's
        metadata store (``search_history`` table); the page has a checkbox for it."""
        import ipywidgets as w

        self.searcher = searcher
        self.rng = np.random.default_rng(seed)
        self.last_hits = []
        self.last_query: np.ndarray | None = None
        self.current_upload: Upload | None = None
        self.history: list[dict] = []
        self.history_size = history_size
        self.searches = 0
        self._busy = threading.Lock()
        self._thumbs: OrderedDict[str, str] = OrderedDict()
        self._field_values: dict[str, dict[str, object]] = {}

        metadata = searcher.collection.metadata
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload photo", icon="")
        self.k = w.BoundedIntText(value=k, min=1, max=max_k, description="K", layout=w.Layout(width="140px"))
        self.category = w.Dropdown(options=[ALL_CATEGORIES, *searcher.categories()], description="Category")
        self.filters: dict[str, object] = {}
        for field, values in metadata.field_values(FILTER_MAX_VALUES).items():
            labels = {str(v): v for v in values}
            self._field_values[field] = labels
            self.filters[field] = w.Dropdown(
                options=[ANY_VALUE, *labels],
                description=field[:1].upper() + field[1:],
                style={"description_width": "initial"},  # long column names in full, not cut to "MasterCat…"
            )
        self.find_button = w.Button(description="Find similar", button_style="primary", icon="")
        self.random_button = w.Button(description="Random catalog item", icon="", layout=w.Layout(width="auto"))
        self.log_box = w.Checkbox(
            value=log,
            description="log searches in the collection's metadata store",
            indent=False,
            layout=w.Layout(width="auto"),
        )
        self.status = w.HTML("")
        self.error = w.HTML("")
        self.last_error = ""  # the last failure as plain text (what self.error shows)
        self.query_original = w.Image(format="png", width=160)
        self.query_model_view = w.Image(format="png", width=96)
        self.query_caption = w.HTML("")
        self._query_panels = (
            w.VBox([w.HTML("your photo"), self.query_original, self.query_caption]),
            w.VBox([w.HTML("as the model sees it"), self.query_model_view]),
        )
        self.query_box = w.HBox([])
        # the hits: one HTML widget (a CSS grid of cards), shown while there are results; one
        # widget whose value changes is much cheaper than a widget per card for every search
        self.results_html = w.HTML("", layout=w.Layout(width="100%"))
        self.results = w.Box([], layout=w.Layout(width="100%"))
        self.history_panel = w.HTML("")
        for widget, name in (
            (self.upload, "upload"),
            (self.find_button, "find"),
            (self.random_button, "random"),
            (self.k, "k"),
            (self.category, "category"),
            (self.status, "status"),
            (self.error, "error"),
            (self.query_box, "query"),
            (self.results, "results"),
            (self.history_panel, "history"),
            (self.log_box, "log"),
        ):
            widget.add_class(f"fashsim-{name}")
        for field, dropdown in self.filters.items():
            dropdown.add_class("fashsim-filter")
            dropdown.add_class(f"fashsim-filter-{field}")

        self.upload.observe(self._on_upload, "value")
        self.find_button.on_click(lambda _: self._guarded(self.search_upload))
        self.random_button.on_click(lambda _: self._guarded(self.search_random))
        categories = metadata.categories()
        self.widget = w.VBox(
            [
                w.HTML(
                    CSS + f"<h2>{html.escape(title)}</h2><div>Catalog: {len(searcher.collection)} items in "
                    f"{len(categories)} categories. Upload a garment photo (JPEG, PNG, WebP, GIF, BMP or TIFF, "
                    f"up to {MAX_UPLOAD_BYTES // 2**20} MiB) or start from a random catalog item.</div>"
                ),
                w.HBox([self.upload, self.find_button, self.random_button]),
                w.HBox([self.k, self.category, *self.filters.values()], layout=w.Layout(flex_flow="row wrap")),
                self.status,
                self.error,
                self.query_box,
                self.results,
                w.HTML("<h4>Search history (this session)</h4>"),
                self.log_box,
                self.history_panel,
            ]
        )
        self.widget.add_class("fashsim-app")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------ actions
    def _selected_category(self) -> str | None:
        return None if self.category.value == ALL_CATEGORIES else self.category.value

    def selected_filters(self) -> dict[str, object]:
        """The metadata filters in use: field → value (the category is separate)."""
        return {
            field: self._field_values[field][dropdown.value]
            for field, dropdown in self.filters.items()
            if dropdown.value != ANY_VALUE
        }

    def _where(self):
        """The selected filters in the portable dict form (a filter expression on Milvus, not a
        scan of every record)."""
        return self.selected_filters() or None

    def _guarded(self, action):
        """Run a button's action; an unexpected error becomes a message, never a hung page."""
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - a widget callback must leave the app usable
            self._fail(f"internal error ({type(exc).__name__}: {exc})")
            return []

    def _on_upload(self, change) -> None:
        if not change["new"]:
            return  # our own reset below

        def consume():
            self.upload.value = ()  # consumed: the widget never holds on to an earlier photo
            self.current_upload = None  # until this one is read
            return self.search_with(read_upload(change["new"]))

        self._guarded(consume)

    def search_with(self, upload: Upload):
        """Search with an uploaded file (what choosing a file does); it becomes the current upload."""
        self.current_upload = None if upload.oversized else upload
        if upload.oversized:
            self._clear()
            self._fail(
                f"{upload.name}: {human_size(upload.size)} is larger than the "
                f"{MAX_UPLOAD_BYTES // 2**20} MiB upload limit (send a smaller or more compressed photo)"
            )
            return []
        return self.search_bytes(upload.data, name=upload.name, identity=upload.label())

    def search_upload(self):
        """The "Find similar" button: search (again) with the current upload."""
        pending = read_upload(self.upload.value)  # a value no observer has taken yet
        if pending is not None:
            self.upload.value = ()
            return self.search_with(pending)
        if self.current_upload is None:
            self._clear()
            self._fail(
                "Upload a photo first (JPEG, PNG, WebP, GIF, BMP or TIFF, up to "
                f"{MAX_UPLOAD_BYTES // 2**20} MiB); a larger file is refused."
            )
            return []
        return self.search_bytes(
            self.current_upload.data, name=self.current_upload.name, identity=self.current_upload.label()
        )

    def search_random(self):
        """The "Random catalog item" button: search with a random item of the catalog as it was
        indexed: a photo prepared for the model, as the build prepared it; a Fashion-MNIST item of
        the model's own size as it is (the dataset's images are the model's format already)."""
        ids = self.searcher.collection.index.ids()
        record = self.searcher.collection.metadata.get([int(self.rng.choice(ids))])[0]
        pixels = load_source_image(record["source"])
        spec = self.searcher.spec
        model_shape = (spec.size, spec.size) if spec.channels == 1 else (spec.size, spec.size, 3)
        in_model_format = record["source"].startswith(FMNIST_PREFIX) and pixels.shape == model_shape
        fields = ", ".join(f"{k}: {v}" for k, v in record.items() if k not in ("id", "source"))
        return self._search(
            lambda: (pixels, pixels if in_model_format else self.searcher.prepare(pixels)),
            f"catalog item {record['id']}",
            f"catalog item {record['id']} ({fields})",
        )

    def search_bytes(self, data: bytes, *, name: str = "upload", identity: str | None = None):
        """Search with raw file bytes; shows the results (or a readable error naming ``name``) and
        returns the hits."""

        def prepare():
            image = load_image(_named_bytes(data, name))
            return np.asarray(image), self.searcher.prepare(image)

        return self._search(prepare, name, identity or Upload.from_bytes(data, name).label())

    def _search(self, prepare, name: str, identity: str):
        # one search at a time (widget callbacks may come from more than one thread): a second
        # one waits for the first, it is not dropped
        if not self._busy.acquire(timeout=60):
            self._fail("the app is busy with another search; try again")
            return []
        try:
            self._clear()
            self._set_busy(True, name)
            started = time.perf_counter()
            try:
                original, prepared = prepare()
                hits = self.searcher.search_prepared(
                    prepared,
                    k=self.k.value,
                    category=self._selected_category(),
                    where=self._where(),
                    log=self.log_box.value,
                )
            except FashsimError as exc:
                self._fail(str(exc))
                return []
            self.searches += 1
            self.last_query = prepared
            self.last_hits = hits
            self._show_query(original, prepared, identity)
            self._show_hits(hits)
            self._record(name, hits, time.perf_counter() - started)
            where = [self.category.value] if self._selected_category() else []
            where += [f"{field} = {value}" for field, value in self.selected_filters().items()]
            self._set_busy(False)  # before the status line: a page that sees the results can click again
            self.status.value = (
                f"<b>{len(hits)}</b> results for <i>{html.escape(name)}</i>"
                + (f" in <i>{html.escape(', '.join(where))}</i>" if where else "")
                + f" <span class='fashsim-search-no'>(search {self.searches} · "
                f"{1000 * (time.perf_counter() - started):.0f} ms)</span>"
            )
            return hits
        finally:
            self._set_busy(False)
            self._busy.release()

    # ------------------------------------------------------------ rendering
    def _clear(self) -> None:
        """Forget the previous search on the page (results, query, messages)."""
        self.results.children = ()
        self.results_html.value = ""
        self.query_box.children = ()
        self.error.value = ""
        self.last_error = ""  # the message of the last failure, as plain text
        self.status.value = ""
        self.last_hits = []

    def _set_busy(self, busy: bool, name: str = "") -> None:
        self.find_button.disabled = self.random_button.disabled = busy
        if busy:
            self.status.value = f"⏳ searching for <i>{html.escape(name)}</i> …"

    def _fail(self, message: str) -> None:
        self._clear()
        self.last_error = message
        self.error.value = f"<div class='fashsim-error'>⚠ {html.escape(message)}</div>"

    def _show_query(self, original: np.ndarray, prepared: np.ndarray, identity: str) -> None:
        self.query_original.value = png_bytes(original, size=160)
        self.query_model_view.value = png_bytes(prepared, size=96)
        self.query_caption.value = f"<small>{html.escape(identity)}</small>"
        self.query_box.children = self._query_panels

    def _thumbnail(self, source: str) -> str:
        uri = self._thumbs.get(source)
        if uri is None:
            try:
                uri = data_uri(png_bytes(load_source_image(source), size=THUMB_SIZE))
            except (FashsimError, OSError):
                uri = ""
            self._thumbs[source] = uri
            if len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return uri

    def card_html(self, hit) -> str:
        """One result card: thumbnail, rank, score, category and every further metadata field."""
        uri = self._thumbnail(hit.source)
        image = (
            f"<img src='{uri}' width='{THUMB_SIZE}' height='{THUMB_SIZE}' alt='{html.escape(hit.category)}'>"
            if uri
            else "<div>(no image)</div>"
        )
        fields = "".join(
            f"<div><i>{html.escape(str(k))}</i>: {html.escape(str(v))[:60]}</div>" for k, v in hit.extra.items()
        )
        return (
            f"<div class='fashsim-hit' data-id='{hit.id}'>{image}<div class='fs-meta'><b>#{hit.rank}</b> "
            f"<span class='fs-score'>{hit.score:.3f}</span><br>"
            f"<span class='fs-category'>{html.escape(hit.category)}</span>{fields}</div></div>"
        )

    def _show_hits(self, hits) -> None:
        self.results_html.value = f"<div class='fashsim-grid'>{''.join(self.card_html(h) for h in hits)}</div>"
        self.results.children = (self.results_html,) if hits else ()

    def _record(self, name: str, hits, seconds: float) -> None:
        entry = {
            "at": time.strftime("%H:%M:%S"),
            "query": name,
            "k": self.k.value,
            "category": self._selected_category(),
            "filters": self.selected_filters(),
            "top": [(h.category, h.score) for h in hits[:3]],
            "seconds": seconds,
            "logged": bool(self.log_box.value),
        }
        self.history.insert(0, entry)
        del self.history[self.history_size :]
        rows = []
        for e in self.history:
            scope = ", ".join([e["category"] or "all"] + [f"{k}={v}" for k, v in e["filters"].items()])
            top = ", ".join(f"{html.escape(c)} {s:.2f}" for c, s in e["top"])
            rows.append(
                f"<li>{e['at']} · <i>{html.escape(e['query'])}</i> · K={e['k']} · {html.escape(scope)}"
                f" → {top}{' · logged' if e['logged'] else ''}</li>"
            )
        logged = len(self.searcher.collection.metadata.history(limit=10_000)) if self.log_box.value else None
        note = f"<div>{logged} searches logged in the collection's metadata store</div>" if logged else ""
        self.history_panel.value = f"<ol class='fashsim-history'>{''.join(rows)}</ol>{note}"

    def figure(self):
        """The last search as a static matplotlib figure (visible in executed notebooks too)."""
        from .viz import retrieval_grid

        if self.last_query is None:
            raise FashsimError("no search has run yet")
        return retrieval_grid([self.last_query], [self.last_hits], lambda hit: load_source_image(hit.source))
