"""The course notebooks: committed clean, and executed headless (papermill, smoke profile).

The executed notebooks are checked through what they recorded (``reports/results/*.json``, the
models and indexes they saved), never through their printed text.
"""

import ast
import json
from dataclasses import fields

import nbformat
import numpy as np
import papermill
import pytest
from conftest import REPO

from fashsim.app import pipeline
from fashsim.data import splits
from fashsim.train import TrainConfig

NOTEBOOKS = pipeline.course_notebooks(REPO / "notebooks")
COURSE_ORDER = [
    "dataset_prep",
    "triplet_training",
    "faiss_indexing",
    "evaluation",
    "embedding_umap",
    "search_demo",
    "beyond_triplets",
    "your_own_shop",
    "report",
]


def test_notebooks_follow_the_course_order_and_the_report_is_last():
    numbers = [int(nb.name[:2]) for nb in NOTEBOOKS]
    assert numbers == list(range(1, len(NOTEBOOKS) + 1)), "numbered 01, 02, ... without gaps or repeats"
    keys = [pipeline.notebook_key(nb) for nb in NOTEBOOKS]
    assert keys == [key for key in COURSE_ORDER if key in keys] and keys[-1] == "report"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_parameters(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs: make strip"
    first_code = code[0]
    assert "parameters" in first_code.metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    assert nb.metadata.kernelspec.name == "python3"
    assert not any("def " in c.source or "lambda" in c.source for c in code), "functions belong in fashsim/"


@pytest.mark.parametrize("profile", sorted(pipeline.PROFILES))
def test_every_profile_key_is_a_real_notebook_parameter(profile):
    by_key = {pipeline.notebook_key(nb): nb for nb in NOTEBOOKS}
    for key, overrides in pipeline.PROFILES[profile].items():
        assert key in by_key, f"profile {profile!r} names no notebook {key!r}"
        declared = papermill.inspect_notebook(str(by_key[key]))
        assert set(overrides) <= set(declared), f"{key}: {set(overrides) - set(declared)} are not parameters"


def test_training_notebook_parameters_are_the_course_recipe():
    """Notebook 02's parameters named like TrainConfig settings default to TrainConfig.course()."""
    declared = papermill.inspect_notebook(str(REPO / "notebooks" / "02_triplet_training.ipynb"))
    course = TrainConfig.course()
    settings = [f.name for f in fields(TrainConfig) if f.name in declared]
    assert len(settings) >= 15
    for name in settings:
        assert ast.literal_eval(declared[name]["default"]) == getattr(course, name), name


def test_shop_notebook_parameters_are_the_library_defaults():
    """Notebook 08 generates the default colour shop and builds it with the default recipe."""
    from fashsim.app import shop
    from fashsim.data import colour_shop

    declared = papermill.inspect_notebook(str(REPO / "notebooks" / "08_your_own_shop.ipynb"))
    default = {name: ast.literal_eval(declared[name]["default"]) for name in declared}
    assert default["shop_size"] == colour_shop.DEFAULT_SIZE and default["n_colours"] == colour_shop.DEFAULT_COLOURS
    assert default["image_size"] == colour_shop.ShopParams().image_size
    assert default["backbone"] == shop.DEFAULT_BACKBONE and default["train_seconds"] is None


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


def _results(home, name):
    return json.loads((home / "reports" / "results" / f"{name}.json").read_text())


def test_01_dataset_prep_records_splits_and_figures(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["01_dataset_prep.ipynb"]) >= 3
    for name in ("01_class_samples", "01_class_balance", "01_pk_batch"):
        assert (home / "reports" / "figures" / f"{name}.png").stat().st_size > 5000
    summary = _results(home, "dataset_prep")
    assert summary["sizes"]["train"] + summary["sizes"]["val"] == 60000
    assert summary["sizes"]["test"] == 10000
    assert summary["train_class_counts"] == [6000] * 10 and summary["val_class_counts"] == [600] * 10
    saved, meta = splits.load_splits(home / "data" / "processed" / "fashion_mnist_splits.npz")
    assert len(np.intersect1d(saved["train"], saved["val"])) == 0
    assert meta["open_set_holdout"] == summary["open_set_holdout"] == ["Coat", "Shirt", "Sneaker"]
    assert np.isin(saved["open_train"], saved["train"]).all() and len(saved["open_train"]) == 0.7 * len(saved["train"])


def test_later_notebooks_read_the_splits_of_notebook_01(smoke_run, monkeypatch):
    from fashsim.data.course_splits import course_splits, load_open_set

    home, _ = smoke_run
    monkeypatch.setenv("FASHSIM_HOME", str(home))
    parts, meta = course_splits()
    saved, _ = splits.load_splits(home / "data" / "processed" / "fashion_mnist_splits.npz")
    assert all(np.array_equal(parts[k], saved[k]) for k in saved)
    open_set = load_open_set()
    assert set(np.unique(open_set.train.labels)) == set(range(10)) - {4, 6, 7}  # Coat, Shirt, Sneaker held out
    assert set(np.unique(open_set.unseen_test.labels)) == {4, 6, 7}


def test_02_triplet_training_saves_a_model_that_beats_chance(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["02_triplet_training.ipynb"]) >= 3
    model_dir = home / "data" / "models" / "triplet"
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history["history"]) == 2
    assert history["best"]["val_recall@1"] > 0.6  # 3000 images, 2 epochs; chance is 0.1
    recorded = _results(home, "triplet_training")
    assert recorded["best"] == history["best"] and recorded["config"]["mining"] == TrainConfig.course().mining
    from fashsim.model.persistence import load_model

    assert load_model(model_dir / "model.pt").embedding_dim == 128
    for name in ("02_batch_distances_untrained", "02_training_curves", "02_batch_distances_trained"):
        assert (home / "reports" / "figures" / f"{name}.png").exists()


def test_03_faiss_indexing_saves_a_loadable_index(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["03_faiss_indexing.ipynb"]) >= 2
    recorded = _results(home, "faiss_indexing")
    assert recorded["items"] == 4000 and recorded["reload_identical"] is True
    assert recorded["filtered_categories"] == ["Trouser"]
    moved = recorded["removed_then_restored"]
    assert moved["after_removal"] != moved["best"] == moved["restored"]
    assert recorded["kinds"][0]["kind"] == "flat" and all(0 <= row["recall@10"] <= 1 for row in recorded["kinds"])
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
    report = _results(home, "evaluation")
    closed = report["closed_set"]
    assert report["eval_items"] == 1500
    baseline = f"cross-entropy ({report['baseline_train_seconds']:.0f} s)"
    assert set(closed) == {"triplet (ours)", baseline, "untrained CNN", "PCA-128 of pixels", "raw pixels"}
    ours = closed["triplet (ours)"]
    assert ours["recall@1"] > closed["untrained CNN"]["recall@1"]
    assert ours["map@r"] > closed["raw pixels"]["map@r"]
    # recompute with pytorch-metric-learning from the saved model
    model = load_model(home / "data" / "models" / "triplet" / "model.pt")
    emb = torch.from_numpy(embed_arrays(model, fmnist_test.images[:1500]))
    ref = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count").get_accuracy(
        emb, torch.from_numpy(fmnist_test.labels[:1500])
    )
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-5)
    assert report["recall_at_k"]["triplet (ours)"]["1"] == pytest.approx(ours["recall@1"])
    assert sum(map(sum, report["confusion_matrix"])) == 1500
    assert len(report["per_category_recall@1"]) == 10
    assert report["open_set"]["holdout"] == ["Coat", "Shirt", "Sneaker"]
    assert 0 < report["open_set"]["open-set model, unseen categories"]["recall@1"] <= 1
    for name in ("04_recall_at_k", "04_confusion_matrix"):
        assert (home / "reports" / "figures" / f"{name}.png").exists()


def test_05_umap_maps_raw_and_trained(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["05_embedding_umap.ipynb"]) >= 1
    assert (home / "reports" / "figures" / "05_umap_raw_vs_trained.png").stat().st_size > 20000
    recorded = _results(home, "embedding_umap")
    faithfulness = recorded["trustworthiness@10"]
    assert recorded["points"] == 600 and all(0.5 < v <= 1 for v in faithfulness.values())


def test_06_demo_runs_a_scripted_search(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["06_search_demo.ipynb"]) >= 1
    recorded = _results(home, "search_demo")
    assert [hit["rank"] for hit in recorded["results"]] == list(range(1, 11))
    scores = [hit["score"] for hit in recorded["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99  # test image 42 itself is in the index
    assert "HTML" in recorded["hostile_upload_message"] and recorded["results_after_hostile_upload"] == 10
    assert (home / "reports" / "figures" / "06_demo_search.png").exists()


def test_07_beyond_triplets_compares_every_variant_and_reranker(smoke_run):
    from fashsim.evaluation import variants
    from fashsim.train.variants import VARIANTS

    home, _ = smoke_run
    results = _results(home, "beyond_triplets")
    for setting in ("closed_set", "open_set"):
        rows = results[setting]
        assert [r["variant"] for r in rows] == list(VARIANTS)
        assert all(0 < r[m] <= 1 for r in rows for m in variants.METRICS)
        assert all(r["train s"] >= results["budget_seconds"] * 0.9 and r["ms/query"] > 0 for r in rows)
    assert len({r["map@r"] for r in results["closed_set"]}) > 1  # the variants really differ
    rankings = [r["ranking"] for r in results["reranking_closed"]]
    assert rankings[0].startswith("cosine") and any("Minkowski p=0.5" in r for r in rankings)
    assert any(r.startswith("k-reciprocal") for r in rankings)
    assert len(results["verdict"]["closed set, training"]) == len(VARIANTS) - 1


def test_08_your_own_shop_builds_and_evaluates_a_colour_catalog(smoke_run):
    home, executed = smoke_run
    assert _images_shown(executed["08_your_own_shop.ipynb"]) >= 4
    recorded = _results(home, "your_own_shop")
    trained = recorded["evaluation"]["methods"]["trained"]["test"]
    assert trained["baseColour_match@5"] > 0.9


def test_the_report_is_last_and_holds_every_notebooks_results(smoke_run):
    import re

    home, _ = smoke_run
    report = (home / "reports" / "REPORT.md").read_text()
    evaluation = _results(home, "evaluation")
    ours = evaluation["closed_set"]["triplet (ours)"]["recall@1"]
    assert f"| triplet (ours) | {round(ours, 4):.4g} |" in report  # the table quotes the recorded results
    beyond = _results(home, "beyond_triplets")
    assert f"| {beyond['closed_set'][1]['variant']} | {beyond['closed_set'][1]['recall@1']:.4g} |" in report
    shop = _results(home, "your_own_shop")["evaluation"]["methods"]["trained"]["test"]
    assert f"| trained | {round(shop['style_recall@1'], 4):.4g} |" in report  # notebook 08's comparison
    for heading in (
        "Pipeline run",
        "Data",
        "Training the triplet network",
        "Recall@K",
        "Per-category Recall@1",
        "Open set",
        "Vector index",
        "Embedding space",
        "Search demo",
        "Beyond triplets",
        "Your own shop: a colour catalog",
    ):
        assert f"## {heading}" in report, heading
    times = _results(home, "pipeline")
    assert all(f"| {nb.stem} |" in report for nb in NOTEBOOKS[:-1]) and set(times) >= {nb.stem for nb in NOTEBOOKS[:-1]}
    links = re.findall(r"\(figures/([\w.]+\.png)\)", report)
    assert len(links) >= 8 and all((home / "reports" / "figures" / name).exists() for name in links)
    assert "not generated" not in report


def test_cli_search_and_evaluate_on_the_pipeline_outputs(smoke_run, tmp_path, fmnist_test):
    import os
    import subprocess
    import sys

    from PIL import Image

    home, _ = smoke_run
    env = {**os.environ, "FASHSIM_HOME": str(home)}
    query = tmp_path / "query.png"
    Image.fromarray(fmnist_test.images[1]).save(query)  # test image 1 is in the smoke index (id 60001)
    found = subprocess.run(
        [sys.executable, "-m", "fashsim", "search", str(query), "-k", "3"], capture_output=True, text=True, env=env
    )
    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[0].split()
    assert first[0] == "1" and float(first[1]) > 0.999 and first[-1] == "fashion-mnist:test:1"
    page = tmp_path / "page.jpg"
    page.write_text("<html><body>not a photo</body></html>")
    refused = subprocess.run(
        [sys.executable, "-m", "fashsim", "search", str(page)], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 1 and "HTML" in refused.stderr and "Traceback" not in refused.stderr
    for args, said in (
        (
            ["search", str(query), "--category", "dress"],
            "no category 'dress' in the collection (did you mean 'Dress'?)",
        ),
        (["search", str(query), "--model", str(home / "data/models/triplet/checkpoint.pt")], "training checkpoint"),
        (["index", "--max-per-split", "50", "--out", str(query)], "File exists"),  # a file where a folder goes
    ):
        wrong = subprocess.run([sys.executable, "-m", "fashsim", *args], capture_output=True, text=True, env=env)
        assert wrong.returncode == 1 and said in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    scores = subprocess.run([sys.executable, "-m", "fashsim", "evaluate"], capture_output=True, text=True, env=env)
    assert scores.returncode == 0 and json.loads(scores.stdout)["recall@1"] > 0.6
    # the same model's index in the Milvus store (Milvus Lite), searched through the same command
    milvus = tmp_path / "fashion.db"
    built = subprocess.run(
        [sys.executable, "-m", "fashsim", "index", "--store", "milvus", "--out", str(milvus), "--max-per-split", "300"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    found = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashsim",
            "search",
            str(query),
            "-k",
            "3",
            "--store",
            "milvus",
            "--index",
            str(milvus),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["source"] == "fashion-mnist:test:1" and hits[0]["score"] > 0.999 and len(hits) == 3


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
    assert "In [3]" in message  # the cell as the executed copy labels it (after the injected parameters)
    assert (tmp_path / "out" / "09_broken.ipynb").exists()

    nb.cells[2] = nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    nbformat.write(nb, broken)  # a kernel killed mid-run (out of memory, say) is named too, not a traceback
    with pytest.raises(pipeline.PipelineError, match=r"09_broken.ipynb stopped: DeadKernelError"):
        pipeline.run_pipeline("smoke", notebooks=[broken], output_dir=tmp_path / "out", progress=False)


def test_unknown_notebook_names_are_refused(tmp_path):
    for kwargs, name in (
        ({"only": ["02", "report_typo"]}, "report_typo"),
        ({"overrides": {"triplet_trainig": {}}}, "triplet_trainig"),
    ):
        with pytest.raises(pipeline.PipelineError, match=f"'{name}': no such notebook.*01.*dataset_prep"):
            pipeline.run_pipeline("smoke", output_dir=tmp_path, progress=False, **kwargs)


def test_notebook_kernels_talk_over_encrypted_sockets(tmp_path, project_home, capfd):
    """ipykernel ≥ 7 warns on every run that a kernel's TCP traffic is plain text: the pipeline's
    kernels get CurveZMQ keys instead, and the run's output stays free of that warning."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from ipykernel.kernelapp import IPKernelApp\n"
            "print('encrypted:', IPKernelApp.instance().curve_secretkey is not None)"
        ),
    ]
    path = tmp_path / "01_sockets.ipynb"
    nbformat.write(nb, path)
    [executed] = pipeline.run_pipeline("smoke", notebooks=[path], output_dir=tmp_path / "out", progress=False)
    assert nbformat.read(executed, as_version=4).cells[1].outputs[0]["text"] == "encrypted: True\n"
    assert "without encryption" not in capfd.readouterr().err


def test_profile_parameters():
    first = NOTEBOOKS[0]
    assert pipeline.parameters_for(first, "full") == {}
    smoke = pipeline.parameters_for(first, "smoke", {"dataset_prep": {"seed": 5}})
    assert smoke["seed"] == 5 and smoke["samples_per_class"] == 6
    with pytest.raises(pipeline.PipelineError, match="unknown profile"):
        pipeline.parameters_for(first, "huge")


def test_the_pipeline_table_totals_each_profile_apart():
    from fashsim.app.report import build_report

    times = {
        "01_dataset_prep": {"seconds": 60, "profile": "full", "finished": "2026-11-28 01:00:00"},
        "02_triplet_training": {"seconds": 30, "profile": "smoke", "finished": "2026-11-27 09:00:00"},
        "03_faiss_indexing": {"seconds": 60, "profile": "full", "finished": "2026-11-28 01:01:00"},
    }
    report = build_report({"pipeline": times})
    assert "Total: 2.0 minutes (full profile), 0.5 minutes (smoke profile)." in report
