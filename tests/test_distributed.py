"""Distributed training and sharded embedding, on CPU: gloo, 2 processes started by
``torchrun --standalone`` (the launcher users run), on small Fashion-MNIST subsets."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch

from fashsim.data.catalogs import load_catalog_images, load_image_folder
from fashsim.data.sampler import DistributedPKBatchSampler, PKBatchSampler
from fashsim.errors import FashsimError
from fashsim.model.inference import embed_arrays
from fashsim.model.networks import EmbeddingNet
from fashsim.model.persistence import fingerprint, load_model, save_model
from fashsim.model.sharded_embedding import default_records, embed_shards, merge_shards, read_shards
from fashsim.train import distributed
from fashsim.train import loop as training

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# one thread per process (2 processes on the 2 cores of the CI machine); torchrun's own default
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(script, *args, timeout=240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*TORCHRUN, str(script), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def write(tmp_path, name: str, code: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


# ------------------------------------------------------------------ the sampler
def test_distributed_sampler_splits_every_global_batch_among_the_ranks(fmnist_train):
    labels = fmnist_train.labels[:6000]
    single = PKBatchSampler(labels, p=10, k=8, seed=3)
    ranks = [DistributedPKBatchSampler(labels, p=10, k=8, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        assert all(len(s) == len(single) for s in ranks)  # as many (global) batches as one process takes
        for whole, mine, theirs in zip(single, *ranks):
            assert sorted(mine + theirs) == sorted(whole) and not set(mine) & set(theirs)  # disjoint shares
            assert distributed.global_batch_order(whole, 2) == mine + theirs  # what all_gather reassembles
            for share in (mine, theirs):  # K/world images of each of the P classes
                assert set(Counter(labels[share].tolist()).values()) == {4} and len(set(labels[share])) == 10
    with pytest.raises(ValueError, match="does not split evenly"):
        DistributedPKBatchSampler(labels, p=3, k=3, rank=0, world_size=2)


def test_train_detects_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.run_class(None) is training._Run  # a plain process: the single-process run
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.wants_distributed(None)  # torchrun --nproc_per_node=1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.wants_distributed(None) and not distributed.wants_distributed(False)
    monkeypatch.delenv("RANK")
    with pytest.raises(FashsimError, match="torchrun"):
        distributed.run_class(True)


def test_global_batchnorm_is_a_drop_in_replacement():
    """Alone it is a plain BatchNorm; the swap keeps the parameters (the optimiser's), buffers and state-dict keys."""
    torch.manual_seed(0)
    net = EmbeddingNet("small_cnn")
    reference = EmbeddingNet("small_cnn")
    reference.load_state_dict(net.state_dict())
    params, keys = list(net.parameters()), list(net.state_dict())
    replaced, kept = distributed.synchronise_batchnorm(net, torch.device("cpu"))
    assert replaced == 6 and not kept  # five in the CNN, the BN-neck
    assert all(a is b for a, b in zip(net.parameters(), params)) and list(net.state_dict()) == keys
    assert sum(isinstance(m, distributed.GlobalBatchNorm) for m in net.modules()) == 6
    x = torch.randn(16, 1, 28, 28)
    torch.testing.assert_close(net(x), reference(x))  # train mode, no process group
    torch.testing.assert_close(net.neck.running_mean, reference.neck.running_mean)


# ------------------------------------------------------------------ one step = one process on the global batch
SETTINGS = {"batch_hard": dict(mining="batch_hard"), "ce": dict(mining="batch_all", ce_weight=0.5)}
STEP = """
    import sys, numpy as np, torch
    from pathlib import Path
    from fashsim.data import fashion_mnist
    from fashsim.train import distributed, loop as training

    out = Path(sys.argv[1])
    data = fashion_mnist.load_fashion_mnist("train", download=False)
    idx = np.random.default_rng(0).choice(len(data), 1000, replace=False)
    for name, settings in {"batch_hard": dict(mining="batch_hard"), "ce": dict(mining="batch_all", ce_weight=0.5)}.items():
        config = training.TrainConfig(p=10, k=8, augment=False, amp=False, device="cpu", lr_warmup_steps=1, **settings)
        Run = distributed.run_class(None, "cpu")  # what train() does: DistributedRun under torchrun
        run = Run(config, data.subset(idx[:800]), data.subset(idx[800:]), out / name, progress=False,
                  feature_cache=None)
        run.sampler.set_epoch(0)
        mine = next(iter(run.sampler))
        run.model.train()
        stats = training.stats_to_floats(run.step(run.make_batch(mine), 0.0))
        torch.save({"stats": stats, "indices": mine, "global": next(run.sampler.global_batches()),
                    "grads": {n: p.grad for n, p in run.model.named_parameters()},
                    "buffers": dict(run.model.named_buffers())}, out / f"{name}-rank{run.rank}.pt")
"""


def test_one_distributed_step_equals_one_process_on_the_global_batch(fmnist_train, tmp_path):
    """Loss, mining statistics, parameter gradients (DDP-averaged) and BatchNorm running
    statistics of a 2-process step equal those of one process on the same global batch.

    Tolerances (float32): loss 2e-5 relative; each backbone parameter's gradient within 10 % in
    relative L2 norm (observed 1–2 %), the layers after the last BatchNorm within 1e-3 (observed
    1e-4). Float32 noise is that large in the backbone: one process fed the same batch in another
    order moves its gradients by ~1 % (several BatchNorms make them small sums of large terms). A
    real mistake is far outside: per-rank BatchNorm statistics give 40–100 %, a missing or
    doubled gradient scale 50–100 %. The ranks' own gradients are bit-identical.
    """
    torchrun(write(tmp_path, "step.py", STEP), tmp_path)
    idx = np.random.default_rng(0).choice(len(fmnist_train), 1000, replace=False)
    train_set, val_set = fmnist_train.subset(idx[:800]), fmnist_train.subset(idx[800:])
    for name, settings in SETTINGS.items():
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1)]
        order = distributed.global_batch_order(ranks[0]["global"], 2)
        assert order == ranks[0]["indices"] + ranks[1]["indices"]
        config = training.TrainConfig(p=10, k=8, augment=False, amp=False, device="cpu", lr_warmup_steps=1, **settings)
        run = training._Run(config, train_set, val_set, tmp_path / f"single-{name}", progress=False, feature_cache=None)
        run.model.train()
        stats = training.stats_to_floats(run.step(run.make_batch(order), 0.0))
        for key, value in stats.items():
            assert ranks[0]["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        assert abs(ranks[0]["stats"]["loss"] - stats["loss"]) <= 2e-5 * max(1.0, abs(stats["loss"]))
        scale = max(p.grad.norm() for p in run.model.parameters())
        for param_name, param in run.model.named_parameters():
            mine, theirs = ranks[0]["grads"][param_name], ranks[1]["grads"][param_name]
            assert torch.equal(mine, theirs), param_name
            error = (mine - param.grad).norm()
            assert error <= 0.1 * param.grad.norm() + 1e-6 * scale, (name, param_name, error / param.grad.norm())
            if not param_name.startswith("backbone"):
                assert error <= 1e-3 * param.grad.norm() + 1e-6 * scale, (name, param_name)
        for buffer_name, buffer in run.model.named_buffers():
            torch.testing.assert_close(ranks[0]["buffers"][buffer_name], buffer, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ training runs
TRAIN = """
    import os, sys, numpy as np
    from pathlib import Path
    from fashsim.data import fashion_mnist
    from fashsim.train import loop as training

    out, epochs, images = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    data = fashion_mnist.load_fashion_mnist("train", download=False)
    idx = np.random.default_rng(0).choice(len(data), images + images // 4, replace=False)
    config = training.TrainConfig(p=10, k=8, epochs=epochs, warmup_steps=5, lr_warmup_steps=5, val_max_items=None,
                                  patience=None)
    result = training.train(config, data.subset(idx[:images]), data.subset(idx[images:]), out / "run", progress=False)
    print(f"rank {os.environ.get('RANK', '0')}: R@1 {result.best['val_recall@1']:.4f}", flush=True)
"""


def test_two_processes_train_as_well_as_one(tmp_path):
    """2 epochs on 1600 images: the same global batches, so the same quality within noise. On 400
    validation images Recall@1 moves in steps of 0.0025 and its run-to-run noise is a few points
    (measured: 0.033 and 0.050 apart); MAP@R, which counts every relevant image, is steadier
    (0.012 and 0.008 apart), so it gets the tight bound."""
    script = write(tmp_path, "train.py", TRAIN)
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "2", "1600"], capture_output=True, text=True, env=ENV
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(script, tmp_path / "two", 2, 1600)
    assert "rank 0: R@1" in two.stdout and "rank 1: R@1" in two.stdout
    histories = {n: json.loads((tmp_path / n / "run" / "history.json").read_text()) for n in ("one", "two")}
    single, double = histories["one"]["history"], histories["two"]["history"]
    assert [h["steps"] for h in double] == [h["steps"] for h in single] == [20, 40]  # one step per global batch
    assert [h["images"] for h in double] == [h["images"] for h in single]
    assert abs(double[-1]["val_map@r"] - single[-1]["val_map@r"]) <= 0.03
    assert abs(double[-1]["val_recall@1"] - single[-1]["val_recall@1"]) <= 0.08
    assert double[-1]["val_recall@1"] > 0.6  # chance is 0.1
    assert abs(double[-1]["train_loss"] - single[-1]["train_loss"]) < 0.05
    assert load_model(tmp_path / "two" / "run" / "model.pt").embedding_dim == 128
    assert not list((tmp_path / "two" / "run").glob(".*.tmp"))  # rank 0 alone wrote, nothing left half-written


def test_a_killed_rank_resumes_from_rank_0s_checkpoint(tmp_path):
    """kill -9 of rank 1 during epoch 2 stops the job (torchrun ends rank 0); a new job resumes
    every rank from epoch 1's checkpoint, with the history of the killed job kept."""
    script = write(tmp_path, "train.py", TRAIN)
    out = tmp_path / "out"
    job = subprocess.Popen(
        [*TORCHRUN, str(script), str(out), "30", "800"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        deadline = time.time() + 150
        while not (out / "run" / "checkpoint.pt").exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)  # now inside epoch 2
        os.kill(int((out / "pid1").read_text()), signal.SIGKILL)
        assert job.wait(timeout=60) != 0
    finally:
        if job.poll() is None:
            job.kill()
    done = json.loads((out / "run" / "history.json").read_text())["history"]
    assert 1 <= len(done) < 30
    resumed = torchrun(script, out, len(done) + 1, 800)
    assert f"resuming from {out / 'run' / 'checkpoint.pt'}" in resumed.stdout
    history = json.loads((out / "run" / "history.json").read_text())["history"]
    assert len(history) == len(done) + 1 and history[: len(done)] == done
    assert history[-1]["steps"] == (len(done) + 1) * 10


# ------------------------------------------------------------------ sharded embedding
SHARDS = """
    import sys, numpy as np, torch.distributed as dist
    from fashsim.data import fashion_mnist
    from fashsim.model.persistence import load_model
    from fashsim.model.sharded_embedding import embed_shards

    dist.init_process_group("gloo")
    data = fashion_mnist.load_fashion_mnist("train", download=False).subset(np.arange(2000))
    report = embed_shards(load_model(sys.argv[1]), data, sys.argv[2], shard_size=300, batch_size=128)
    print(f"rank {dist.get_rank()} embedded {report.embedded}", flush=True)
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return EmbeddingNet("small_cnn").eval()


def test_sharded_embedding_matches_one_process_and_redoes_only_missing_shards(fmnist_train, random_model, tmp_path):
    save_model(random_model, tmp_path / "model.pt")
    script, shards = write(tmp_path, "shards.py", SHARDS), tmp_path / "shards"
    first = torchrun(script, tmp_path / "model.pt", shards)
    assert "rank 0 embedded [0, 2, 4, 6]" in first.stdout and "rank 1 embedded [1, 3, 5]" in first.stdout
    data = fmnist_train.subset(np.arange(2000))
    expected = embed_arrays(random_model, data.images)
    collection = merge_shards(
        shards, default_records(data), model_fingerprint=fingerprint(random_model), out=tmp_path / "collection"
    )
    ids = collection.index.ids()
    assert len(collection) == 2000 and np.array_equal(ids, np.arange(2000))
    np.testing.assert_allclose(collection.index.reconstruct(ids), expected, atol=1e-5)
    assert collection.model_fingerprint == fingerprint(random_model)

    manifest = json.loads((shards / "shard-00003.json").read_text())
    assert (manifest["start"], manifest["stop"], manifest["count"]) == (900, 1200, 300)
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    (shards / "shard-00003.npz").unlink()  # a lost shard: rerun, and only it is embedded again
    (shards / "shard-00005.json").unlink()  # an unfinished one (no manifest)
    with pytest.raises(Exception, match="shards are missing"):
        merge_shards(shards, default_records(data))
    again = torchrun(script, tmp_path / "model.pt", shards)
    assert "rank 0 embedded [3]" in again.stdout and "rank 1 embedded [5]" in again.stdout
    changed = {p.name for p in shards.glob("shard-*.npz") if p.stat().st_mtime_ns != kept.get(p.name)}
    assert changed == {"shard-00003.npz", "shard-00005.npz"}
    vectors, ids, unreadable, _ = read_shards(shards)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert np.array_equal(ids, np.arange(2000)) and not unreadable


def test_sharded_embedding_of_an_image_folder(fmnist_train, random_model, tmp_path, capsys):
    """Files decoded like load_catalog_images; an unreadable file is left out (and said); another
    model makes every shard stale."""
    from PIL import Image

    root = tmp_path / "shop"
    for i in range(24):
        folder = root / fmnist_train.class_names[fmnist_train.labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - fmnist_train.images[i]).resize((56, 56)).save(folder / f"{i:03d}.png")
    (root / "Bag" / "broken.png").parent.mkdir(exist_ok=True)
    (root / "Bag" / "broken.png").write_bytes(b"not an image")
    catalog = load_image_folder(root)
    broken = [str(p) for p in catalog.paths].index(str(root / "Bag" / "broken.png"))
    report = embed_shards(random_model, catalog, tmp_path / "shards", shard_size=10, batch_size=4, rank=0, world_size=1)
    assert report.embedded == [0, 1, 2] and report.reused == []
    with pytest.warns(UserWarning, match="1 unreadable images"):
        collection = merge_shards(tmp_path / "shards", default_records(catalog), out=tmp_path / "collection")
    readable = [i for i in range(len(catalog)) if i != broken]
    assert np.array_equal(collection.index.ids(), readable)
    images = load_catalog_images(catalog.subset(readable), random_model.input_spec, progress=False).images
    np.testing.assert_allclose(
        collection.index.reconstruct(np.asarray(readable)), embed_arrays(random_model, images), atol=1e-5
    )
    hit = collection.search(collection.index.reconstruct(np.asarray([readable[0]])), k=1)[0][0]
    assert hit.source == str(catalog.paths[readable[0]])
    again = embed_shards(random_model, catalog, tmp_path / "shards", shard_size=10, rank=0, world_size=1)
    assert again.reused == [0, 1, 2] and again.embedded == []
    torch.manual_seed(1)
    other = EmbeddingNet("small_cnn").eval()
    assert embed_shards(other, catalog, tmp_path / "shards", shard_size=10, rank=0, world_size=1).embedded == [0, 1, 2]
    # other shard sizes in the same folder: the earlier run's surplus shards go, the merge works
    bigger = embed_shards(other, catalog, tmp_path / "shards", shard_size=20, rank=0, world_size=1, progress=True)
    assert bigger.embedded == [0, 1] and sorted(p.stem for p in (tmp_path / "shards").glob("shard-*.json")) == [
        "shard-00000",
        "shard-00001",
    ]
    vectors, ids, unreadable, _ = read_shards(tmp_path / "shards")
    assert np.array_equal(ids, readable) and len(unreadable) == 1
    assert "removed 3 shards of an earlier run" in capsys.readouterr().out
