"""The search app as a web page: Voilà serves ``fashsim/app/search_app.ipynb`` on 127.0.0.1.

    python -m fashsim serve                       # the Fashion-MNIST collection of the course
    python -m fashsim serve --collection DIR --model PATH --port 8866

Each visitor gets a kernel of their own that runs the app notebook: :func:`open_app` loads the
model and the collection named by ``$FASHSIM_COLLECTION`` / ``$FASHSIM_MODEL`` (set by
:func:`serve`; the course defaults otherwise) and shows :class:`~fashsim.app.demo.SearchApp`,
nothing else. The server is configured so that the page holds up in a real browser:

* uploads up to :data:`~fashsim.app.demo.MAX_UPLOAD_BYTES` reach the kernel: Tornado's 10 MiB
  websocket message limit is raised to :data:`WEBSOCKET_MAX_MESSAGE_BYTES` (the same setting
  is given to JupyterLab by ``make lab``, see :func:`lab_arguments`); the page's template sends
  a placeholder instead of a larger file, so the visitor reads a message and nothing stale;
* kernels do not pile up: a kernel whose page is gone (closed, reloaded, a crashed browser) has
  no connection left and is shut down after :data:`CULL_IDLE_TIMEOUT` seconds (checked every
  :data:`CULL_INTERVAL` s); a kernel whose page is open stays, however long it idles;
* nothing is loaded from outside the server (the ``fashsim`` Voilà template leaves out the
  CDN stylesheets of Voilà's ``lab`` template; the app uses plain text labels).
"""

from __future__ import annotations

import functools
import html
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..errors import FashsimError
from .kernels import kernel_arguments

APP_NOTEBOOK = Path(__file__).with_name("search_app.ipynb")
#: a Jupyter data folder holding the ``fashsim`` Voilà template (put on ``JUPYTER_PATH``).
JUPYTER_DATA = Path(__file__).with_name("jupyter_data")
TEMPLATE = "fashsim"
ENV_COLLECTION = "FASHSIM_COLLECTION"
ENV_MODEL = "FASHSIM_MODEL"
DEFAULT_PORT = 8866
#: Tornado's websocket message limit for Voilà and JupyterLab: an upload travels in one message,
#: so this is above the app's 25 MiB upload limit with room for the message's framing.
WEBSOCKET_MAX_MESSAGE_BYTES = 64 * 2**20
#: seconds a kernel without a connected page may idle before it is shut down, and how often
#: the server looks for such kernels.
CULL_IDLE_TIMEOUT = 60
CULL_INTERVAL = 15
#: kernels kept ready with the app already run in them (Voilà's preheated pool): that many
#: visitors arriving together get their page at once. Each costs a kernel's memory (README).
PRELOADED_KERNELS = 3
#: seconds Voilà waits, after pages took kernels from the pool, before it starts new ones: a kernel
#: start imports PyTorch (about 2 s of CPU), and on a small machine the pages that just took their
#: kernels render first instead of sharing the cores with the refill.
POOL_REFILL_DELAY = 4.0

#: Debian's Chromium and the flags that keep it headless and off the network: how the browser tests
#: and the web-app benchmark open the page (Playwright cannot download a browser of its own here).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@functools.cache
def _kernel_manager_class():
    """Jupyter server's kernel manager, with one change to culling (see :data:`AppKernelManager`)."""
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    class AppKernelManager(AsyncMappingKernelManager):
        """Counts a kernel's idle time from when the culler first sees it outside Voilà's pool.

        A preheated kernel idles in the pool until a page takes it; without this, a kernel that
        waited there longer than the cull timeout is shut down at the next cull pass if the new
        page has not connected its websocket yet (a slow page load), and the page is left dead.
        """

        async def cull_kernel_if_idle(self, kernel_id):
            seen = self.__dict__.setdefault("_fashsim_seen", set())
            seen.intersection_update(self._kernels)  # forget kernels that are gone
            kernel = self._kernels.get(kernel_id)
            if kernel is not None and kernel_id not in seen:
                seen.add(kernel_id)
                kernel.last_activity = datetime.now(timezone.utc)  # leaving the pool counts as activity
                return None
            return await super().cull_kernel_if_idle(kernel_id)

    return AppKernelManager


def __getattr__(name: str):
    # ``AppKernelManager`` is built on first use: jupyter_server is slow to import, and the app's
    # kernels import this module too (for :func:`open_app`) but never need it.
    if name == "AppKernelManager":
        return _kernel_manager_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_paths() -> tuple[Path, Path]:
    """``(collection dir, model path)`` of the course: data/index/fashion-mnist, data/models/triplet/model.pt."""
    from ..paths import default_model_path
    from .course import default_index_dir

    return default_index_dir(), default_model_path()


def resolve(collection: str | os.PathLike | None = None, model: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The collection folder and model file to serve: as given, else from ``$FASHSIM_COLLECTION`` /
    ``$FASHSIM_MODEL``, else a ``model.pt`` inside the collection folder (or beside it, for a shop
    built with ``fashsim shop build --out OUT``: ``OUT/collection``, also found from ``OUT``), else
    the course defaults."""
    default_collection, default_model = default_paths()
    collection = collection or os.environ.get(ENV_COLLECTION) or default_collection
    if "://" in str(collection):  # a Milvus server (store "milvus"): a model must be given
        if not (model or os.environ.get(ENV_MODEL)):
            raise FashsimError(f"serving {collection} needs --model (there is no folder to find model.pt in)")
        return str(collection), Path(model or os.environ[ENV_MODEL]).expanduser().resolve()
    from .shop import BUILD_FILE, COLLECTION_DIR, MODEL_FILE

    collection = Path(collection).expanduser().resolve()
    if (collection / BUILD_FILE).is_file() and (collection / COLLECTION_DIR).is_dir():  # a shop's OUT itself
        collection = collection / COLLECTION_DIR
    model = model or os.environ.get(ENV_MODEL)
    if model is None:
        shop_model = collection.parent / MODEL_FILE  # `fashsim shop build --out OUT`: OUT/model.pt + OUT/collection
        if (collection / MODEL_FILE).is_file():
            model = collection / MODEL_FILE
        elif shop_model.is_file() and (collection.parent / BUILD_FILE).is_file():
            model = shop_model
        else:
            model = default_model
    return collection, Path(model).expanduser().resolve()


def prepare_default(collection: Path, model: Path, *, train_seconds: float = 120.0) -> None:
    """For the course's default paths: train the default model and build the Fashion-MNIST index
    now if they are missing (once, before any page opens). Other paths must exist already."""
    from ..model.persistence import load_model
    from ..search.collection import CorruptIndexError, IndexMismatchError
    from ..search.stores import open_collection
    from .course import load_or_build_index, load_or_train_default

    default_collection, default_model = default_paths()
    if model == default_model.resolve():
        trained = load_or_train_default(model, max_seconds=train_seconds)
    elif not model.is_file():
        raise FashsimError(f"no model at {model} (give --model, or train one: python -m fashsim train)")
    else:
        trained = load_model(model)
    if collection == default_collection.resolve():
        load_or_build_index(trained, collection)
        return
    try:
        opened = open_collection(collection, model=trained)  # the store: $FASHSIM_STORE (fashsim serve --store)
    except (CorruptIndexError, IndexMismatchError) as exc:
        raise FashsimError(f"cannot serve {collection}: {exc}") from None
    if hasattr(opened, "close"):
        opened.close()  # Milvus Lite: release the database for the app's kernels


def voila_arguments(
    *,
    port: int = DEFAULT_PORT,
    cull_idle_timeout: int = CULL_IDLE_TIMEOUT,
    cull_interval: int = CULL_INTERVAL,
    preheat: int = PRELOADED_KERNELS,
    refill_delay: float = POOL_REFILL_DELAY,
    open_browser: bool = False,
) -> list[str]:
    """Voilà's command line for the app (after ``python -m voila``). ``preheat``: keep that many
    kernels started with the app already shown, so a page opens without waiting for one; the pool
    is refilled ``refill_delay`` seconds after pages took kernels from it."""
    args = [
        str(APP_NOTEBOOK),
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        "--Voila.port_retries=0",
        f"--template={TEMPLATE}",
        "--no-browser" if not open_browser else "--Voila.open_browser=True",
        f"--Voila.tornado_settings={{'websocket_max_message_size': {WEBSOCKET_MAX_MESSAGE_BYTES}}}",
        f"--MappingKernelManager.cull_idle_timeout={cull_idle_timeout}",
        f"--MappingKernelManager.cull_interval={cull_interval}",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
        "--VoilaConfiguration.show_tracebacks=False",
        # the app's output may come late when many kernels start at once on few cores (Voila's
        # default of 4 s then serves a page without the app)
        "--VoilaExecutor.iopub_timeout=60",
        f"--VoilaConfiguration.multi_kernel_manager_class={__name__}.AppKernelManager",
        *kernel_arguments(),  # the kernels' sockets encrypted (fashsim.app.kernels)
    ]
    if preheat > 0:
        args += [
            "--VoilaConfiguration.preheat_kernel=True",
            f"--VoilaConfiguration.default_pool_size={preheat}",
            f"--VoilaKernelManager.fill_delay={refill_delay:g}",
        ]
    return args


def voila_environment(collection: Path, model: Path, base: dict | None = None) -> dict[str, str]:
    """The server's environment (the kernels inherit it): the collection, the model and the
    template folder on ``JUPYTER_PATH``."""
    env = dict(os.environ if base is None else base)
    env[ENV_COLLECTION] = str(collection)
    env[ENV_MODEL] = str(model)
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(JUPYTER_DATA), env.get("JUPYTER_PATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # one search at a time per kernel; many kernels share the cores
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


def lab_arguments() -> list[str]:
    """The ``jupyter lab`` arguments that give it the web app's websocket message limit: what
    ``make lab`` passes (its ``WS_MAX``; a test keeps the two equal) and the browser test uses."""
    return [f"--ServerApp.tornado_settings={{'websocket_max_message_size': {WEBSOCKET_MAX_MESSAGE_BYTES}}}"]


def voila_process(collection: Path, model: Path, **options) -> subprocess.Popen:
    """Start Voilà serving the app (returns at once; the caller waits on or stops the process)."""
    return subprocess.Popen(
        [sys.executable, "-m", "voila", *voila_arguments(**options)], env=voila_environment(collection, model)
    )


def serve(
    collection: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    *,
    port: int = DEFAULT_PORT,
    train_seconds: float = 120.0,
    **options,
) -> int:
    """Serve the app on http://127.0.0.1:PORT/ until interrupted; returns Voilà's exit code."""
    try:
        import voila  # noqa: F401
    except ImportError:
        raise FashsimError("Voilà is not installed: pip install -c constraints.txt -e '.[app]'") from None
    collection, model = resolve(collection, model)
    prepare_default(collection, model, train_seconds=train_seconds)
    print(f"fashsim: serving {collection} (model {model}) on http://127.0.0.1:{port}/  (Ctrl-C stops)", flush=True)
    process = voila_process(collection, model, port=port, **options)
    # Ctrl-C or a SIGTERM to this process stops Voilà cleanly (SIGTERM: it shuts its kernels down)
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:
        return stop_server(process)
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_server(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """Stop a server process (Voilà, JupyterLab): SIGTERM, so that it shuts its kernels down, then
    SIGKILL if it is still running after ``timeout`` seconds. Returns its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def open_app(collection: str | os.PathLike | None = None, model: str | os.PathLike | None = None, **app_options):
    """In the app's kernel: the :class:`~fashsim.app.demo.SearchApp` over the collection to serve
    (see :func:`resolve`), or, when it cannot be opened, a readable message (never a traceback)."""
    from IPython.display import HTML

    from ..search.stores import open_searcher
    from .demo import SearchApp

    try:
        collection, model = resolve(collection, model)
        searcher = open_searcher(model, collection, threads=1)  # the store: $FASHSIM_STORE
        return SearchApp(searcher, **app_options)
    except (FashsimError, OSError) as exc:
        return HTML(
            f"<h3>fashsim</h3><p style='color:#b00020'>The search app cannot start: {html.escape(str(exc))}</p>"
        )
