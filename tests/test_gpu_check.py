"""benchmarks/gpu_check.py on a machine without CUDA: it says so and exits 0; and its checks
(training, quality, the checkpoint on the CPU, FAISS, the colour shop fine-tuned) run end to end
when pointed at the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(tmp_path, *args, timeout=300):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    return done, json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    done, report = run_check(tmp_path)
    assert done.returncode == 0, done.stderr
    assert report["cuda"] is False and "no CUDA GPU" in report["message"]
    assert "no CUDA GPU" in done.stdout


def test_every_check_runs_on_the_cpu(tmp_path):
    """The same checks with --device cpu and a tiny budget: one (partial) epoch, so the loss cannot
    be seen to fall and the run reports that check as failed (exit status 1); the others pass."""
    done, report = run_check(
        tmp_path,
        *("--device", "cpu", "--backbone", "small_cnn", "--image-size", "28", "--k", "8"),
        *("--max-seconds", "3", "--val-max-items", "500", "--resume-seconds", "1"),
        *("--shop-size", "960", "--shop-seconds", "4", "--shop-image-size", "64"),
    )
    checks = report["checks"]
    assert report["errors"] == {}, report["errors"]
    assert done.returncode == 1 and "SOME CHECKS FAILED" in done.stdout  # only "the loss falls" needs epochs
    training = checks["amp_training"]
    assert training["device"] == "cpu" and training["no_nan"] and training["epochs"] == 1
    assert training["per_epoch"][0]["val_recall@1"] > 0.1 and training["stopped"] == "time budget"
    quality = checks["quality"]
    assert quality["ok"] and 0.3 < quality["recall@1"] <= 1 and quality["goal_met"] is False
    assert quality["train_wall_seconds"] >= quality["train_seconds"]
    assert (
        checks["checkpoint_gpu_to_cpu"]["ok"]
        and checks["checkpoint_gpu_to_cpu"]["resume_on_cpu"]["resumed_epochs"] == 2
    )
    assert checks["faiss"]["ok"] and checks["faiss"]["faiss_gpu"] == "not available (faiss-cpu)"
    shop = checks["shop_fine_tune"]
    assert shop["ok"] and shop["device"] == "cpu" and shop["fine_tune"]["step"] >= 1 and shop["head"]["step"] >= 1
    assert 0 < shop["test"]["baseColour_match@5"] <= 1 and shop["split"]["train"] > shop["split"]["test"] > 0
