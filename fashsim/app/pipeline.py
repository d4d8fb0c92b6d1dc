"""Run the course notebooks in order, headless, with papermill.

Each notebook's own ``parameters`` cell holds the defaults of the full run (the README's main
job). The ``smoke`` profile overrides them with tiny sizes so the whole course runs in minutes
for the tests. Executed copies go to ``reports/executed/``; the first failing notebook stops the
run with an error that names it and the failing cell.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import FashsimError
from ..paths import notebooks_dir, reports_dir
from .kernels import kernel_config
from .results import update_results

#: per-notebook parameter overrides, by profile; keys are notebook stems without the number prefix.
PROFILES: dict[str, dict[str, dict]] = {
    "full": {},
    "smoke": {
        "dataset_prep": {"val_fraction": 0.1, "samples_per_class": 6},
        "triplet_training": {"train_subset": 3000, "epochs": 2, "max_seconds": 30, "p": 10, "k": 8},
        "faiss_indexing": {"max_per_split": 2000, "compare_queries": 200, "quick_train_seconds": 20},
        "evaluation": {
            "eval_size": 1500,
            "quick_train_seconds": 20,
            "baseline_budget_seconds": 8,
            "open_set_budget_seconds": 8,
        },
        "embedding_umap": {"n_points": 600, "quick_train_seconds": 20},
        "search_demo": {"quick_train_seconds": 20},
        "your_own_shop": {
            "shop_size": 600,
            "image_size": 64,
            "n_colours": 2,
            "train_seconds": 10,
            "baseline_image_size": 64,
            "n_queries": 3,
            "workers": 1,
        },
        "beyond_triplets": {
            "budget_seconds": 3,
            "train_subset": 2000,
            "val_size": 500,
            "eval_size": 1000,
            "n_timed_queries": 20,
        },
    },
}

_NOTEBOOK_NAME = re.compile(r"^(\d\d)_(\w+)\.ipynb$")


class PipelineError(FashsimError):
    """A notebook of the pipeline failed; the message names the notebook and the cell."""


def course_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    return sorted(p for p in folder.glob("*.ipynb") if _NOTEBOOK_NAME.match(p.name))


def notebook_key(path: Path) -> str:
    """``03_faiss_indexing.ipynb`` → ``faiss_indexing`` (the key used in profiles)."""
    return _NOTEBOOK_NAME.match(path.name).group(2)


def parameters_for(path: Path, profile: str, overrides: Mapping[str, Mapping] | None = None) -> dict:
    """The parameters papermill injects into ``path`` for ``profile`` plus explicit overrides."""
    if profile not in PROFILES:
        raise PipelineError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    key = notebook_key(path)
    params = dict(PROFILES[profile].get(key, {}))
    for name in (key, path.stem):
        params.update((overrides or {}).get(name, {}))
    return params


def run_pipeline(
    profile: str = "full",
    *,
    only: list[str] | None = None,
    overrides: Mapping[str, Mapping] | None = None,
    output_dir: str | Path | None = None,
    notebooks: list[Path] | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
) -> list[Path]:
    """Execute the notebooks in order (``only``: a subset, by number or key); returns executed paths.

    Raises :class:`PipelineError` naming the notebook and cell at the first failure.
    """
    import papermill as pm

    notebooks = notebooks if notebooks is not None else course_notebooks()
    if not notebooks:
        raise PipelineError(f"no numbered notebooks found in {notebooks_dir()}")
    names = {nb: {nb.stem[:2], notebook_key(nb), nb.stem} for nb in notebooks}
    known = set().union(*names.values())
    for what, asked in (("--only", only or ()), ("parameters for", overrides or {})):
        unknown = [name for name in asked if name not in known]
        if unknown:  # a typo would otherwise run the wrong notebooks, or drop a parameter without a word
            raise PipelineError(
                f"{what} {', '.join(map(repr, unknown))}: no such notebook; name one by number, key or file "
                f"stem, e.g. {', '.join(sorted(n for n in known if len(n) == 2))} or "
                f"{', '.join(notebook_key(nb) for nb in notebooks)}"
            )
    if only:
        notebooks = [nb for nb in notebooks if names[nb] & set(only)]
    output_dir = Path(output_dir) if output_dir is not None else reports_dir() / "executed"
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for position, notebook in enumerate(notebooks, start=1):
        target = output_dir / notebook.name
        params = parameters_for(notebook, profile, overrides)
        print(f"[{position}/{len(notebooks)}] {notebook.name} ({profile}) -> {target}", flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(notebook),
                str(target),
                parameters=params,
                kernel_name=kernel_name,
                cwd=str(notebook.parent),
                progress_bar=progress,
                config=kernel_config(),
            )
        except pm.PapermillExecutionError as exc:
            raise PipelineError(
                f"notebook {notebook.name} failed in its cell In [{exc.exec_count}]: "
                f"{exc.ename}: {exc.evalue}\n  executed copy with the traceback: {target}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - e.g. nbclient's DeadKernelError: the kernel was killed (memory?)
            raise PipelineError(
                f"notebook {notebook.name} stopped: {type(exc).__name__}: {exc}\n"
                f"  executed copy, up to where it stopped: {target}"
            ) from exc
        seconds = time.perf_counter() - start
        update_results(
            "pipeline",
            **{
                notebook.stem: {
                    "seconds": round(seconds, 1),
                    "profile": profile,
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            },
        )
        print(f"    done in {seconds:.1f} s", flush=True)
        executed.append(target)
    return executed
