import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fashsim.app import viz
from fashsim.app.report import training_rows
from fashsim.errors import FashsimError
from fashsim.model.persistence import load_model
from fashsim.train import device
from fashsim.train import loop as training

TINY = dict(p=10, k=8, epochs=2, warmup_steps=5, lr_warmup_steps=5, val_max_items=None, patience=None)


@pytest.fixture(scope="module")
def tiny_data(fmnist_train):
    rng = np.random.default_rng(0)
    idx = rng.choice(len(fmnist_train), 2400, replace=False)
    return fmnist_train.subset(idx[:2000]), fmnist_train.subset(idx[2000:])


def test_device_selection_and_amp_on_cpu():
    chosen = device.select_device("auto")
    assert chosen.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device.select_device("cpu")
    assert cpu.type == "cpu" and torch.get_num_threads() == os.cpu_count()
    assert device.amp_enabled(training.TrainConfig(amp=True), cpu) is False
    assert device.amp_enabled(training.TrainConfig(amp=True), torch.device("cuda")) is True
    assert device.amp_enabled(training.TrainConfig(amp=False), torch.device("cuda")) is False
    if not torch.cuda.is_available():
        with pytest.raises(FashsimError, match="no CUDA GPU"):
            device.select_device("cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_autocast_dtype_per_device(monkeypatch, native_bf16):
    """float16 (with a gradient scaler) on CUDA; bfloat16 on a CPU only when it does bf16 in
    hardware; float32 otherwise or with amp=False."""
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native_bf16)
    on, off = training.TrainConfig(amp=True), training.TrainConfig(amp=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert device.autocast_dtype(on, cuda) is torch.float16
    assert device.autocast_dtype(on, cpu) is (torch.bfloat16 if native_bf16 else None)
    assert device.autocast_dtype(off, cpu) is None and device.autocast_dtype(off, cuda) is None


def test_cpu_bf16_detection_reads_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = cpuinfo.read_text().split()
    assert device.cpu_has_native_bf16() == any(f in flags for f in ("avx512_bf16", "amx_tile"))


def test_lr_schedule():
    assert training.lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert training.lr_factor(50, 0.0, 10) == pytest.approx(1.0)
    assert training.lr_factor(50, 0.5, 10) == pytest.approx(0.5)
    assert training.lr_factor(50, 1.0, 10) == pytest.approx(0.0)


def test_collapse_monitor():
    monitor = training.CollapseMonitor(threshold=0.05, patience=3)
    assert [monitor.update(s) for s in (0.01, 0.01, 0.5, 0.01, 0.01, 0.01, 0.01)] == [
        False,
        False,
        False,
        False,
        False,
        True,
        False,
    ]


def test_short_run_learns_and_writes_everything(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    result = training.train(training.TrainConfig(**TINY, device="cpu"), train_set, val_set, tmp_path, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for key in (
        "train_loss",
        "train_active_fraction",
        "train_hardest_pos",
        "train_hardest_neg",
        "train_spread",
        "val_recall@1",
        "val_map@r",
        "images_per_second",
    ):
        assert key in result.history[-1]
    assert result.best["val_recall@1"] > 0.5  # chance is 0.1
    saved = json.loads((tmp_path / "history.json").read_text())
    precision = "bfloat16" if device.cpu_has_native_bf16() else "float32"
    assert saved["device"] == "cpu" and saved["precision"] == precision and len(saved["history"]) == 2
    model = load_model(tmp_path / "model.pt")
    assert model.embedding_dim == 128

    # notebook 02's table: this run's best epoch, then the benchmark's rows, compared recipes included
    scores = {"recall@1": 0.9, "recall@5": 0.97, "map@r": 0.8, "epochs": 21}
    benchmark = {
        "triplet": scores,
        "triplet_without_flip_average": {"recall@1": 0.89, "recall@5": 0.96, "map@r": 0.79},
        "variants": {"mining=batch_hard ce_weight=1.0": {**scores, "recall@1": 0.91}},
    }
    rows = training_rows(saved, benchmark)
    assert [row["run"] for row in rows] == [
        "this run (validation split)",
        "benchmark: triplet (test split)",
        "benchmark: triplet_without_flip_average (test split)",
        "benchmark: variant mining=batch_hard ce_weight=1.0 (test split)",
    ]
    assert rows[0]["best epoch"] == result.best["epoch"] and rows[0]["epochs"] == 2
    assert rows[0]["recall@1"] == round(result.best["val_recall@1"], 4)
    assert rows[-1]["recall@1"] == 0.91 and rows[-1]["epochs"] == 21


def test_torchvision_backbone_trains_on_greyscale_arrays(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    config = training.TrainConfig(**TINY | {"epochs": 1}, backbone="resnet18", weights="random", embedding_dim=32)
    result = training.train(config, train_set.subset(range(400)), val_set.subset(range(200)), tmp_path, progress=False)
    assert result.model.config["backbone"] == "resnet18" and result.model.input_spec.channels == 1
    assert load_model(tmp_path / "model.pt").embedding_dim == 32


def test_cross_entropy_baseline_runs(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    config = training.TrainConfig(**TINY | {"epochs": 1}, loss="cross_entropy", device="cpu")
    result = training.train(config, train_set, val_set, tmp_path, progress=False)
    assert result.history[0]["val_recall@1"] > 0.4


def test_resume_continues_this_run_and_sets_other_runs_aside(tiny_data, tmp_path, capsys):
    train_set, val_set = tiny_data
    first = training.train(training.TrainConfig(**TINY | {"epochs": 1}), train_set, val_set, tmp_path, progress=False)
    more = training.train(training.TrainConfig(**TINY | {"epochs": 2}), train_set, val_set, tmp_path, progress=False)
    assert len(more.history) == 2 and more.history[0] == first.history[0]
    assert more.history[1]["steps"] == 2 * first.history[0]["steps"]
    capsys.readouterr()

    def set_aside_runs():
        return sorted((tmp_path / "superseded").iterdir()) if (tmp_path / "superseded").is_dir() else []

    def history_in(folder):
        return json.loads((folder / "history.json").read_text())["history"]

    # another configuration: a fresh run; the earlier run's files are kept, not overwritten
    other = training.train(training.TrainConfig(**TINY | {"margin": 0.5}), train_set, val_set, tmp_path, progress=False)
    assert other.history[0]["steps"] == first.history[0]["steps"]  # started from step 0
    assert "holds a run made with a different configuration (margin)" in capsys.readouterr().out
    (kept,) = set_aside_runs()
    assert history_in(kept) == more.history and {p.name for p in kept.iterdir()} == set(training.RUN_FILES)
    assert load_model(kept / "model.pt").embedding_dim == 128

    # the same configuration on other data (e.g. another open-set hold-out) does not continue either
    fewer = train_set.subset(range(1600))
    config = training.TrainConfig(**TINY | {"margin": 0.5, "epochs": 3})
    again = training.train(config, fewer, val_set, tmp_path, progress=False)
    assert again.history[0]["steps"] < first.history[0]["steps"] and len(again.history) == 3
    assert "holds a run made with other training or validation data" in capsys.readouterr().out
    assert history_in(set_aside_runs()[-1]) == other.history

    # resume=False keeps the earlier run too; a resume of the same run and data continues it
    training.train(config, fewer, val_set, tmp_path, progress=False, resume=False)
    assert len(set_aside_runs()) == 3 and history_in(set_aside_runs()[-1]) == again.history
    assert "resume=False" in capsys.readouterr().out
    done = training.train(config, fewer, val_set, tmp_path, progress=False)
    assert "resuming from" in capsys.readouterr().out and len(done.history) == 3 and len(set_aside_runs()) == 3

    # a model without its checkpoint (deleted by hand, as an unreadable one's message once advised) is kept too
    (tmp_path / training.RUN_FILES[0]).unlink()
    training.train(config, fewer, val_set, tmp_path, progress=False)
    assert "holds an earlier run's files but no checkpoint of it" in capsys.readouterr().out
    assert len(set_aside_runs()) == 4 and history_in(set_aside_runs()[-1]) == done.history


def test_time_budget_stops(tiny_data, tmp_path):
    """Also the float32 CPU path (amp=False), which CPUs without native bf16 take."""
    train_set, val_set = tiny_data
    result = training.train(
        training.TrainConfig(**TINY | {"epochs": 50, "max_seconds": 2, "amp": False}),
        train_set,
        val_set,
        tmp_path,
        progress=False,
    )
    assert result.stopped == "time budget" and len(result.history) < 50
    assert json.loads((tmp_path / "history.json").read_text())["precision"] == "float32"


def test_val_every_validates_and_checkpoints_every_n_epochs_and_after_the_last(tiny_data, tmp_path):
    train_set, val_set = tiny_data[0].subset(range(800)), tiny_data[1]
    config = training.TrainConfig(**TINY | {"epochs": 5, "val_every": 2, "patience": 1})
    result = training.train(config, train_set, val_set, tmp_path, progress=False)
    validated = [r["epoch"] for r in result.history if "val_map@r" in r]
    assert validated[:2] == [2, 4] and len(result.history) in (4, 5)  # patience 1 counts validations
    assert all("train_loss" in r and "images_per_second" in r for r in result.history)
    assert all(r["validation_seconds"] >= 0 for r in result.history if "val_map@r" in r)
    if len(result.history) == 5:
        assert validated == [2, 4, 5]  # the last epoch is always validated
    blob = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert blob["state"]["epoch"] == validated[-1]  # checkpoints are written with validations
    saved = json.loads((tmp_path / "history.json").read_text())
    assert len(saved["history"]) == len(result.history) and saved["best"]["epoch"] in validated
    figure = viz.training_curves(result.history)  # the curves plot the validated epochs only
    assert [list(line.get_xdata()) for line in figure.axes[2].lines] == [validated, validated]
    with pytest.raises(ValueError, match="val_every"):
        training.TrainConfig(val_every=0)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from fashsim.data import fashion_mnist
    from fashsim.train import loop as training
    data = fashion_mnist.load_fashion_mnist("train", download=False)
    idx = np.random.default_rng(0).choice(len(data), 3000, replace=False)
    cfg = training.TrainConfig(p=10, k=8, epochs=int(sys.argv[2]), warmup_steps=5, lr_warmup_steps=5,
                               val_max_items=None, patience=None)
    training.train(cfg, data.subset(idx[:2500]), data.subset(idx[2500:]), sys.argv[1], progress=False)
""")


def test_killed_mid_epoch_then_resumed(tmp_path):
    """kill -9 during epoch 2 leaves epoch 1's checkpoint intact; a rerun resumes from it. While
    the first run lives, a second one into the same folder is refused at once, naming it."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run([sys.executable, str(script), str(out), "1"], capture_output=True, text=True)
    assert proc.poll() is None, "the first run ended before the second one was tried"
    assert second.returncode != 0
    assert f"{out} is in use by another training run (pid {proc.pid}); wait for it" in second.stderr
    time.sleep(0.5)  # now inside a later epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((out / "history.json").read_text())["history"]
    assert 1 <= len(done) < 30
    resumed = subprocess.run(
        [sys.executable, str(script), str(out), str(len(done) + 1)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoint.pt'}" in resumed.stdout
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == len(done) + 1 and history[: len(done)] == done


def test_frozen_pretrained_backbone_trains_only_the_head_on_cached_features(
    tiny_data, tmp_path, monkeypatch, project_home
):
    from fashsim.model import inference as features

    train_set, val_set = tiny_data
    config = training.TrainConfig(
        **TINY | {"epochs": 3},
        backbone="mobilenet_v2",
        weights="shipped",
        freeze_backbone=True,
        image_size=32,
        embedding_dim=64,
        lr=1e-3,
    )
    calls = []
    real_extract = features.extract_features
    monkeypatch.setattr(
        features, "extract_features", lambda *a, **kw: calls.append(len(a[1])) or real_extract(*a, **kw)
    )
    result = training.train(config, train_set, val_set, tmp_path / "run", progress=False)
    assert calls == [len(train_set), len(val_set)]  # the backbone saw every image once
    assert len(list((project_home / "data" / "cache" / "features").glob("features-*.npy"))) == 2
    assert result.best["val_recall@1"] > 0.6  # chance is 0.1
    untouched = training.EmbeddingNet("mobilenet_v2", weights="shipped", in_channels=3).backbone.state_dict()
    trained = load_model(tmp_path / "run" / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(untouched.values(), trained.backbone.state_dict().values()))
    assert trained.input_spec.size == 32 and trained.input_spec.channels == 3 and trained.input_spec.dark_background
    # a second run with the same backbone and images reads the cached features back
    again = training.train(config, train_set, val_set, tmp_path / "again", progress=False)
    assert calls == [len(train_set), len(val_set)]
    assert again.history[0]["val_recall@1"] == result.history[0]["val_recall@1"]
    with pytest.raises(ValueError, match="needs pretrained weights"):
        training.TrainConfig(**TINY, freeze_backbone=True)


def test_angular_loss_and_multi_scale_head_train(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    config = training.TrainConfig(**TINY | {"epochs": 1}, loss="angular", multi_scale=True, lr=1e-3)
    result = training.train(config, train_set, val_set, tmp_path, progress=False)
    assert result.history[0]["val_recall@1"] > 0.5  # chance is 0.1
    assert 0 <= result.history[0]["train_active_fraction"] <= 1
    assert load_model(tmp_path / "model.pt").config["multi_scale"] is True
    joint = training.train(
        training.TrainConfig(**TINY | {"epochs": 1}, ce_weight=0.5),
        train_set,
        val_set,
        tmp_path / "joint",
        progress=False,
    )
    assert joint.history[0]["train_cross_entropy"] > 0 and joint.model.classifier is not None
    with pytest.raises(ValueError, match="loss must be one of"):
        training.train(training.TrainConfig(loss="contrastive"), train_set, val_set, tmp_path / "x", progress=False)
