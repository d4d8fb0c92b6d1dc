"""Web app benchmark: the Voilà search page (``python -m fashsim serve``) under N concurrent browser sessions.

For N = 1, 3 and 8 visitors at once (one headless Chromium, a browser context per visitor):

* page interactive: from navigation until the app's buttons are on the page (the visitor's kernel
  started, the app notebook run, the widgets rendered);
* click to results: from a click on "Random catalog item" or "Find similar" until the page shows
  that search's K result cards (timed inside the page: a MutationObserver watches the status line,
  which names the search's number); each visitor uploads a JPEG first, then clicks ``--clicks``
  times, alternating the two buttons;
* server memory: RSS and PSS of the Voilà server plus all its kernels (psutil), at rest before the
  visitors come, at the peak while they search, per kernel, and how long after the pages close the
  memory is back at rest (kernels of closed pages are culled after the cull timeout).

The server runs as ``python -m fashsim serve`` runs it (a pool of ``webapp.PRELOADED_KERNELS``
preheated kernels, refilled ``webapp.POOL_REFILL_DELAY`` s after pages take them), with a shorter
cull timeout (``--cull-idle-timeout``, default 30 s) so the run ends sooner. The collection is
the course's default one (data/models/triplet/model.pt + data/index/fashion-mnist) when both
exist; else a stand-in with the same sizes, built once in data/bench/webapp-stand-in: the
default architecture, untrained (BatchNorm-calibrated), over all 70 000 Fashion-MNIST images.
Latency and memory do not depend on the weights.

Targets: click-to-results p50 ≤ 0.3 s with one session, ≤ 0.6 s with three; page interactive ≤ 5 s.

    .venv/bin/python benchmarks/bench_webapp.py [--sessions 1 3 8] [--clicks 10]

Needs Debian's chromium at /usr/bin/chromium. Writes ``reports/benchmarks/webapp.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fashsim.app import webapp

K = 10

CLICK_AND_WAIT = """async ([selector, n, k]) => {
  const done = () => {
    const s = document.querySelector('.fashsim-status');
    return s && s.innerText.includes(`(search ${n} `) && document.querySelectorAll('.fashsim-hit').length === k;
  };
  const button = document.querySelector(selector);
  for (let i = 0; i < 500 && button.disabled; i++) { await new Promise((r) => setTimeout(r, 10)); }
  const t0 = performance.now();
  button.click();
  await new Promise((resolve, reject) => {
    if (done()) { resolve(); return; }
    const observer = new MutationObserver(() => { if (done()) { observer.disconnect(); resolve(); } });
    observer.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
    setTimeout(() => { observer.disconnect(); reject(new Error(`no results for search ${n}`)); }, 60000);
  });
  return (performance.now() - t0) / 1000;
}"""


# ---------------------------------------------------------------- the collection
def stand_in_collection(home: Path) -> tuple[Path, Path]:
    """The default architecture, untrained but BatchNorm-calibrated, over all 70 000 images."""
    import torch

    from fashsim.app.course import index_fashion_mnist
    from fashsim.data.fashion_mnist import load_fashion_mnist
    from fashsim.data.transforms import FASHION_MNIST_SPEC, to_tensor
    from fashsim.model.networks import EmbeddingNet
    from fashsim.model.persistence import save_model

    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        images = load_fashion_mnist("train").images[:6000]
        for start in range(0, len(images), 500):
            model(to_tensor(images[start : start + 500], FASHION_MNIST_SPEC))
    model.eval()
    model_path = save_model(model, home / "model.pt")
    collection_dir = home / "collection"
    index_fashion_mnist(model, kind="flat").save(collection_dir)
    return collection_dir, Path(model_path)


# ---------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(server_pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(server_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kernels(server_pid: int) -> list:
    out = []
    for p in processes(server_pid)[1:]:
        try:
            if "ipykernel_launcher" in " ".join(p.cmdline()):
                out.append(p)
        except Exception:  # noqa: BLE001 - a process that just ended
            pass
    return out


def memory(server_pid: int) -> dict:
    """RSS and PSS (MiB) of the server and its kernels; PSS shares common pages fairly."""
    total_rss = total_pss = 0.0
    per_kernel = []
    for p in processes(server_pid):
        try:
            info = p.memory_full_info()
            is_kernel = "ipykernel_launcher" in " ".join(p.cmdline())
        except Exception:  # noqa: BLE001 - a process that just ended
            continue
        rss, pss = info.rss / 2**20, getattr(info, "pss", info.rss) / 2**20
        total_rss += rss
        total_pss += pss
        if is_kernel:
            per_kernel.append(
                {"rss_mib": round(rss, 1), "pss_mib": round(pss, 1), "uss_mib": round(info.uss / 2**20, 1)}
            )
    return {
        "rss_mib": round(total_rss, 1),
        "pss_mib": round(total_pss, 1),
        "kernels": len(per_kernel),
        "per_kernel": per_kernel,
    }


class MemorySampler:
    """The peak of :func:`memory` while it runs (sampled every ``every`` seconds)."""

    def __init__(self, server_pid: int, every: float = 0.5):
        self.server_pid, self.every, self.peak = server_pid, every, {"rss_mib": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            sample = memory(self.server_pid)
            if sample["rss_mib"] > self.peak["rss_mib"]:
                self.peak = sample
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def kernel_ids(server_pid: int) -> set[str]:
    """The ids of the server's running kernels (from their connection files' names)."""
    ids = set()
    for p in kernels(server_pid):
        try:
            ids.update(re.findall(r"kernel-([0-9a-f-]+)\.json", " ".join(p.cmdline())))
        except Exception:  # noqa: BLE001 - a process that just ended
            pass
    return ids


def taken_from_pool(log: Path, since: int) -> set[str]:
    """The kernels Voilà gave to pages (its log after byte ``since``): the visitors' kernels."""
    return set(re.findall(r"Using pre-heated kernel: ([0-9a-f-]+)", log.read_bytes()[since:].decode(errors="replace")))


def at_rest(server_pid: int, pool: int, visitors: set = frozenset()) -> bool:
    """The server is at rest: no visitor's kernel is left, the pool is full again, and nothing is
    busy starting (the whole process tree used under 10 % of one core over a second)."""
    alive = kernel_ids(server_pid)
    if len(alive) != pool or alive & visitors:
        return False
    procs = processes(server_pid)
    for p in procs:
        cpu_percent(p)  # starts each process's measurement
    time.sleep(1.0)
    return sum(cpu_percent(p) for p in procs) < 10.0


def cpu_percent(process) -> float:
    """A process's CPU use since the last call (0 for a process that just ended)."""
    try:
        return process.cpu_percent(None)
    except Exception:  # noqa: BLE001 - a process that just ended
        return 0.0


def wait_for(condition, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


# ---------------------------------------------------------------- the visitors
async def visitor(browser, url: str, photo: Path, clicks: int) -> dict:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    started = time.perf_counter()
    await page.goto(url, timeout=180_000)
    await page.wait_for_selector("button.fashsim-random", timeout=180_000)
    interactive = time.perf_counter() - started
    async with page.expect_file_chooser() as chooser:
        await page.click("button.fashsim-upload")
    started = time.perf_counter()
    await (await chooser.value).set_files(str(photo))
    await page.wait_for_function(
        "() => { const s = document.querySelector('.fashsim-status'); return s && s.innerText.includes('(search 1 '); }",
        timeout=60_000,
    )
    upload = time.perf_counter() - started
    latencies = []
    for n in range(2, clicks + 2):
        selector = "button.fashsim-random" if n % 2 == 0 else "button.fashsim-find"
        latencies.append(await page.evaluate(CLICK_AND_WAIT, [selector, n, K]))
    return {"context": context, "interactive_s": interactive, "upload_s": upload, "click_s": latencies}


async def run_sessions(n: int, url: str, photo: Path, clicks: int) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(webapp.CHROMIUM), args=webapp.CHROMIUM_ARGS)
        try:
            results = await asyncio.gather(*(visitor(browser, url, photo, clicks) for _ in range(n)))
            for result in results:
                await result.pop("context").close()  # the visitors leave
        finally:
            await browser.close()
    return results


def percentile(values, q) -> float:
    return round(float(np.percentile(values, q)), 3)


def main(argv=None) -> int:
    from fashsim.fileio import atomic_write_bytes
    from fashsim.paths import data_dir, reports_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--clicks", type=int, default=10, help="timed clicks per visitor (default 10)")
    parser.add_argument(
        "--preheat",
        type=int,
        default=webapp.PRELOADED_KERNELS,
        help=f"kernels kept ready (default {webapp.PRELOADED_KERNELS}, as `serve`)",
    )
    parser.add_argument("--cull-idle-timeout", type=int, default=30)
    parser.add_argument("--cull-interval", type=int, default=5)
    parser.add_argument("--collection", help="a saved collection (default: the course's, else a stand-in)")
    parser.add_argument("--model", help="its model")
    parser.add_argument("--output", default=str(reports_dir() / "benchmarks" / "webapp.json"))
    args = parser.parse_args(argv)
    if not webapp.CHROMIUM.is_file():
        print(f"needs Debian's chromium at {webapp.CHROMIUM} (apt-get install chromium)", file=sys.stderr)
        return 1

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from image_fixtures import encode, product_photo

    workdir = Path(tempfile.mkdtemp(prefix="bench_webapp_"))
    collection, model = webapp.resolve(args.collection, args.model)
    stand_in = not ((collection / "CURRENT").is_file() and model.is_file())
    if stand_in:
        cache = data_dir() / "bench" / "webapp-stand-in"  # kept for the next run
        collection, model = cache / "collection", cache / "model.pt"
        if not ((collection / "CURRENT").is_file() and model.is_file()):
            print("no trained default model and index: building a stand-in collection (70 000 items) ...", flush=True)
            cache.mkdir(parents=True, exist_ok=True)
            collection, model = stand_in_collection(cache)
    photo = workdir / "photo.jpg"
    photo.write_bytes(encode(product_photo(seed=5), "JPEG", quality=90))

    port = free_port()
    log = open(workdir / "voila.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voila",
            *webapp.voila_arguments(
                port=port,
                preheat=args.preheat,
                cull_idle_timeout=args.cull_idle_timeout,
                cull_interval=args.cull_interval,
            ),
        ],
        env=webapp.voila_environment(collection, model),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "collection": str(collection),
        "items": None,
        "stand_in_model": stand_in,
        "server": {
            "preheated_kernels": args.preheat,
            "pool_refill_delay_s": webapp.POOL_REFILL_DELAY,
            "cull_idle_timeout_s": args.cull_idle_timeout,
            "cull_interval_s": args.cull_interval,
            "websocket_max_message_bytes": webapp.WEBSOCKET_MAX_MESSAGE_BYTES,
        },
        "k": K,
        "clicks_per_session": args.clicks,
        "runs": [],
    }
    try:
        if not wait_for(lambda: b"is filled with" in (workdir / "voila.log").read_bytes(), 300):
            raise RuntimeError("the preheated kernel never became ready")
        settle = args.cull_idle_timeout + 3 * args.cull_interval + 60
        if not wait_for(lambda: at_rest(server.pid, args.preheat), settle):
            raise RuntimeError("the server never came to rest after starting its kernels")
        rest = memory(server.pid)
        report["at_rest"] = rest
        print(f"at rest: {rest['rss_mib']:.0f} MiB RSS, {rest['pss_mib']:.0f} MiB PSS, {rest['kernels']} kernel(s)")
        for n in args.sessions:
            # each run starts from a server at rest: its pool full, no kernel left from the run before
            wait_for(lambda: at_rest(server.pid, args.preheat), settle)
            before = memory(server.pid)
            log_offset = (workdir / "voila.log").stat().st_size
            with MemorySampler(server.pid) as sampler:
                sessions = asyncio.run(run_sessions(n, url, photo, args.clicks))
            closed = time.monotonic()
            visitors = taken_from_pool(workdir / "voila.log", log_offset)
            back = wait_for(
                lambda b=before, v=visitors: (
                    at_rest(server.pid, args.preheat, v) and memory(server.pid)["rss_mib"] <= b["rss_mib"] * 1.10 + 50
                ),
                settle,
            )
            after = memory(server.pid)
            clicks = [t for s in sessions for t in s["click_s"]]
            interactive = [s["interactive_s"] for s in sessions]
            run = {
                "sessions": n,
                "page_interactive_s": {
                    "p50": percentile(interactive, 50),
                    "max": round(max(interactive), 3),
                    "each": [round(t, 3) for t in interactive],
                },
                "upload_to_results_s": {"p50": percentile([s["upload_s"] for s in sessions], 50)},
                "click_to_results_s": {
                    "p50": percentile(clicks, 50),
                    "p95": percentile(clicks, 95),
                    "max": round(max(clicks), 3),
                    "n": len(clicks),
                },
                "memory_before": {k: before[k] for k in ("rss_mib", "pss_mib", "kernels")},
                "memory_peak": sampler.peak,
                "memory_after_close": {k: after[k] for k in ("rss_mib", "pss_mib", "kernels")},
                "back_to_rest_after_close_s": round(time.monotonic() - closed, 1) if back else None,
            }
            report["runs"].append(run)
            print(
                f"{n} session(s): interactive p50 {run['page_interactive_s']['p50']} s "
                f"(max {run['page_interactive_s']['max']}), click-to-results p50 "
                f"{run['click_to_results_s']['p50']} s p95 {run['click_to_results_s']['p95']} s, peak "
                f"{sampler.peak['rss_mib']:.0f} MiB RSS / {sampler.peak.get('pss_mib', 0):.0f} MiB PSS with "
                f"{sampler.peak.get('kernels')} kernels, back to rest {run['back_to_rest_after_close_s']} s after "
                "the pages closed",
                flush=True,
            )
    finally:
        webapp.stop_server(server)
        log.close()
    from fashsim.search.collection import Collection

    report["items"] = len(Collection.load(collection))
    kernels_seen = [k for run in report["runs"] for k in run["memory_peak"].get("per_kernel", [])]
    if kernels_seen:
        report["per_kernel_mib"] = {
            key: round(float(np.median([k[key] for k in kernels_seen])), 1) for key in ("rss_mib", "pss_mib", "uss_mib")
        }
    one = next((r for r in report["runs"] if r["sessions"] == 1), None)
    three = next((r for r in report["runs"] if r["sessions"] == 3), None)
    report["targets"] = {
        "click_p50_1_session_le_0.3s": one and one["click_to_results_s"]["p50"] <= 0.3,
        "click_p50_3_sessions_le_0.6s": three and three["click_to_results_s"]["p50"] <= 0.6,
        "page_interactive_le_5s_1_session": one and one["page_interactive_s"]["max"] <= 5.0,
        "page_interactive_le_5s_3_sessions": three and three["page_interactive_s"]["max"] <= 5.0,
        "memory_back_to_rest_after_close": all(r["back_to_rest_after_close_s"] is not None for r in report["runs"]),
    }
    output = atomic_write_bytes(args.output, json.dumps(report, indent=2).encode())
    print(f"targets: {report['targets']}\n-> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
