"""The course notebooks: committed clean, and executed headless (papermill, smoke profile)."""

import json

import nbformat
import numpy as np
import pytest
from conftest import REPO

from fashsim.app import pipeline
from fashsim.data import splits

NOTEBOOKS = pipeline.course_notebooks(REPO / "notebooks")


def test_notebooks_exist_in_order():
    assert [nb.name for nb in NOTEBOOKS][:1] == ["01_dataset_prep.ipynb"]
    numbers = [nb.name[:2] for nb in NOTEBOOKS]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_parameters(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs: make strip"
    first_code = code[0]
    assert "parameters" in first_code.metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    assert nb.metadata.kernelspec.name == "python3"
    assert not any("def " in c.source for c in code), "functions belong in fashsim/, not in notebooks"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Run every notebook once in the smoke profile into an empty project folder."""
    home = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASHSIM_HOME", str(home))
        executed = pipeline.run_pipeline("smoke", progress=False)
    return home, {path.name: nbformat.read(path, as_version=4) for path in executed}


def _images_shown(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_01_dataset_prep_records_splits_and_figures(smoke_run):
    home, executed = smoke_run
    nb = executed["01_dataset_prep.ipynb"]
    assert _images_shown(nb) >= 3
    for name in ("01_class_samples", "01_class_balance", "01_pk_batch"):
        assert (home / "reports" / "figures" / f"{name}.png").stat().st_size > 5000
    summary = json.loads((home / "data" / "processed" / "dataset_summary.json").read_text())
    assert summary["sizes"]["train"] + summary["sizes"]["val"] == 60000
    assert summary["sizes"]["test"] == 10000
    assert summary["train_class_counts"] == [6000] * 10
    saved, meta = splits.load_splits(home / "data" / "processed" / "fashion_mnist_splits.npz")
    assert len(np.intersect1d(saved["train"], saved["val"])) == 0
    assert meta["open_set_holdout"] == summary["open_set_holdout"]


def test_02_triplet_training_saves_a_model_that_beats_chance(smoke_run):
    home, executed = smoke_run
    nb = executed["02_triplet_training.ipynb"]
    assert _images_shown(nb) >= 3
    model_dir = home / "data" / "models" / "triplet"
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history["history"]) == 2
    assert history["best"]["val_recall@1"] > 0.6  # 3000 images, 2 epochs; chance is 0.1
    from fashsim.model.persistence import load_model

    model = load_model(model_dir / "model.pt")
    assert model.embedding_dim == 128
    for name in ("02_batch_distances_untrained", "02_training_curves", "02_batch_distances_trained"):
        assert (home / "reports" / "figures" / f"{name}.png").exists()


def test_03_faiss_indexing_saves_a_loadable_index(smoke_run):
    home, executed = smoke_run
    nb = executed["03_faiss_indexing.ipynb"]
    assert _images_shown(nb) >= 2
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "identical results: True" in text and "4000 items" in text
    from fashsim.model.persistence import load_model
    from fashsim.search.collection import Collection

    model = load_model(home / "data" / "models" / "triplet" / "model.pt")
    collection = Collection.load(home / "data" / "index" / "fashion-mnist", model=model)
    assert len(collection) == 4000
    hits = collection.search(collection.index.reconstruct([60001]), 5, category="Trouser")[0]
    assert len(hits) == 5 and {h.category for h in hits} == {"Trouser"}


def test_04_evaluation_metrics_match_an_independent_implementation(smoke_run, fmnist_test):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from fashsim.model.inference import embed_arrays
    from fashsim.model.persistence import load_model

    home, executed = smoke_run
    assert _images_shown(executed["04_evaluation.ipynb"]) >= 3
    report = json.loads((home / "reports" / "metrics.json").read_text())
    closed = report["closed_set"]
    assert report["eval_items"] == 1500
    assert set(closed) == {"triplet (ours)", "cross-entropy, same budget", "untrained CNN", "PCA-128 of pixels",
                           "raw pixels"}
    ours = closed["triplet (ours)"]
    assert ours["recall@1"] > closed["untrained CNN"]["recall@1"]
    assert ours["map@r"] > closed["raw pixels"]["map@r"]
    # recompute with pytorch-metric-learning from the saved model
    model = load_model(home / "data" / "models" / "triplet" / "model.pt")
    emb = torch.from_numpy(embed_arrays(model, fmnist_test.images[:1500]))
    ref = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count").get_accuracy(
        emb, torch.from_numpy(fmnist_test.labels[:1500]))
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-5)
    assert sum(map(sum, report["confusion_matrix"])) == 1500
    assert report["open_set"]["holdout"] == ["Coat", "Shirt", "Sneaker"]
    assert 0 < report["open_set"]["open-set model, unseen categories"]["recall@1"] <= 1
    for name in ("04_recall_at_k", "04_confusion_matrix"):
        assert (home / "reports" / "figures" / f"{name}.png").exists()


def test_05_umap_maps_raw_and_trained(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["05_embedding_umap.ipynb"]) >= 1
    assert (home / "reports" / "figures" / "05_umap_raw_vs_trained.png").stat().st_size > 20000


def test_06_demo_runs_a_scripted_search(smoke_run):
    home, executed = smoke_run
    nb = executed["06_search_demo.ipynb"]
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "ok - [(1, " in text and "HTML" in text and "and the next search works: 10 results" in text
    assert _images_shown(nb) >= 1
    assert (home / "reports" / "figures" / "06_demo_search.png").exists()


def test_07_report_is_regenerated_from_the_outputs(smoke_run):
    import re

    home, _ = smoke_run
    report = (home / "reports" / "REPORT.md").read_text()
    metrics = json.loads((home / "reports" / "metrics.json").read_text())
    ours = metrics["closed_set"]["triplet (ours)"]["recall@1"]
    assert f"| triplet (ours) | {round(ours, 4):.4g} |" in report  # the table quotes metrics.json
    links = re.findall(r"\(figures/([\w.]+\.png)\)", report)
    assert len(links) >= 5 and all((home / "reports" / "figures" / name).exists() for name in links)
    assert "not generated" not in report


def test_08_beyond_triplets_compares_every_variant_and_reranker(smoke_run):
    from fashsim.evaluation import variants

    home, executed = smoke_run
    results = json.loads((home / "reports" / "beyond_triplets.json").read_text())
    for setting in ("closed_set", "open_set"):
        rows = results[setting]
        assert [r["variant"] for r in rows] == list(variants.VARIANTS)
        assert all(0 < r[m] <= 1 for r in rows for m in variants.METRICS)
        assert all(r["train s"] >= results["budget_seconds"] * 0.9 and r["ms/query"] > 0 for r in rows)
    assert len({r["map@r"] for r in results["closed_set"]}) > 1  # the variants really differ
    rankings = [r["ranking"] for r in results["reranking_closed"]]
    assert rankings[0].startswith("cosine") and any("Minkowski p=0.5" in r for r in rankings)
    assert any(r.startswith("k-reciprocal") for r in rankings)
    assert len(results["verdict"]["closed set, training"]) == len(variants.VARIANTS) - 1
    text = "".join(out.get("text", "") for cell in executed["08_beyond_triplets.ipynb"].cells
                   for out in cell.get("outputs", []))
    assert "closed set, training" in text and "saved" in text


def test_cli_search_and_evaluate_on_the_pipeline_outputs(smoke_run, tmp_path, fmnist_test):
    import os
    import subprocess
    import sys

    from PIL import Image

    home, _ = smoke_run
    env = {**os.environ, "FASHSIM_HOME": str(home)}
    query = tmp_path / "query.png"
    Image.fromarray(fmnist_test.images[1]).save(query)  # test image 1 is in the smoke index (id 60001)
    found = subprocess.run([sys.executable, "-m", "fashsim", "search", str(query), "-k", "3"],
                           capture_output=True, text=True, env=env)
    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[0].split()
    assert first[0] == "1" and float(first[1]) > 0.999 and first[-1] == "fashion-mnist:test:1"
    page = tmp_path / "page.jpg"
    page.write_text("<html><body>not a photo</body></html>")
    refused = subprocess.run([sys.executable, "-m", "fashsim", "search", str(page)], capture_output=True, text=True,
                             env=env)
    assert refused.returncode == 1 and "HTML" in refused.stderr and "Traceback" not in refused.stderr
    scores = subprocess.run([sys.executable, "-m", "fashsim", "evaluate"], capture_output=True, text=True, env=env)
    assert scores.returncode == 0 and json.loads(scores.stdout)["recall@1"] > 0.6


def test_failing_notebook_is_named(tmp_path, project_home):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('fine')"),
        nbformat.v4.new_code_cell("raise RuntimeError('boom in the middle')"),
        nbformat.v4.new_code_cell("print('never')"),
    ]
    broken = tmp_path / "09_broken.ipynb"
    nbformat.write(nb, broken)
    with pytest.raises(pipeline.PipelineError) as info:
        pipeline.run_pipeline("smoke", notebooks=[broken], output_dir=tmp_path / "out", progress=False)
    message = str(info.value)
    assert "09_broken.ipynb" in message and "RuntimeError" in message and "boom in the middle" in message
    assert (tmp_path / "out" / "09_broken.ipynb").exists()


def test_profile_parameters():
    first = NOTEBOOKS[0]
    assert pipeline.parameters_for(first, "full") == {}
    smoke = pipeline.parameters_for(first, "smoke", {"dataset_prep": {"seed": 5}})
    assert smoke["seed"] == 5 and smoke["samples_per_class"] == 6
    with pytest.raises(pipeline.PipelineError, match="unknown profile"):
        pipeline.parameters_for(first, "huge")
