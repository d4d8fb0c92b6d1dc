"""The course notebooks: committed clean, and executed headless (papermill, smoke profile)."""

import json

import nbformat
import numpy as np
import pytest

from fashsim import pipeline, splits
from conftest import REPO

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
    from fashsim.models import load_model

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
    from fashsim.collection import Collection
    from fashsim.models import load_model

    model = load_model(home / "data" / "models" / "triplet" / "model.pt")
    collection = Collection.load(home / "data" / "index" / "fashion-mnist", model=model)
    assert len(collection) == 4000
    hits = collection.search(collection.index.reconstruct([60001]), 5, category="Trouser")[0]
    assert len(hits) == 5 and {h.category for h in hits} == {"Trouser"}


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
