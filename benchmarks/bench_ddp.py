"""Data-parallel training benchmark: throughput of 1 process vs ``torchrun`` with N processes on
this machine, and how far one distributed step is from one process on the same global batch.

    .venv/bin/python benchmarks/bench_ddp.py [--processes 2] [--steps 30] [--device cpu]

For a fixed number of optimisation steps of the course's P×K batch (10×16 = 160 images, the
default recipe), it times: one process with every core (what ``fashsim train`` does), one
process with one core per process's share, and ``torchrun --standalone --nproc_per_node=N``
(gloo on CPUs, NCCL on GPUs). The equivalence check runs one step of each and reports the loss
difference and the gradient differences, next to the float32 noise of merely reordering the same
batch in one process. Writes ``reports/benchmarks/ddp.json``.

On one small CPU machine N processes share the same cores, so they are not expected to be
faster than one: the numbers measure the overhead of the gathers, the synchronised BatchNorm and
the gradient all-reduce, not a speed-up (see docs/distributed-training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fashsim.data import fashion_mnist
from fashsim.fileio import atomic_write_bytes
from fashsim.paths import reports_dir
from fashsim.train import distributed
from fashsim.train import loop as training

SUBSET = 6000  # training images the runs draw their batches from


def _config(device: str, **overrides) -> training.TrainConfig:
    return training.TrainConfig.course(device=device, val_max_items=500, **overrides)


def _data():
    data = fashion_mnist.load_fashion_mnist("train", download=False)
    idx = np.random.default_rng(0).choice(len(data), SUBSET + 500, replace=False)
    return data.subset(idx[:SUBSET]), data.subset(idx[SUBSET:])


def _batches(run, steps: int):
    """``steps`` batches of this process, cycling through epochs."""
    epoch = 0
    while True:
        for indices in run.batches(epoch):
            yield indices
            steps -= 1
            if steps == 0:
                return
        epoch += 1


def worker_throughput(args) -> None:
    """One process of a throughput run (alone, or one rank under torchrun)."""
    train_set, val_set = _data()
    Run = distributed.run_class(None, args.device)
    with tempfile.TemporaryDirectory() as out:
        run = Run(_config(args.device), train_set, val_set, Path(out), progress=False, feature_cache=None)
        if args.threads:
            torch.set_num_threads(args.threads)
        run.model.train()
        batches = list(_batches(run, args.warmup + args.steps))
        for indices in batches[: args.warmup]:
            run.step(run.make_batch(indices), 0.0)
        _wait_for(run)
        start = time.perf_counter()
        for indices in batches[args.warmup :]:
            run.step(run.make_batch(indices), 0.0)
        _wait_for(run)
        seconds = time.perf_counter() - start
        if run.is_main:
            world = torch.distributed.get_world_size() if distributed.is_active() else 1
            result = {
                "processes": world,
                "threads_per_process": torch.get_num_threads(),
                "steps": args.steps,
                "global_batch": run.batch_size,
                "seconds": round(seconds, 3),
                "images_per_second": round(args.steps * run.batch_size / seconds, 1),
                "device": str(run.device),
                "backend": torch.distributed.get_backend() if world > 1 else None,
            }
            Path(args.result).write_text(json.dumps(result))


def worker_step(args) -> None:
    """One rank of the equivalence check: one step on the first global batch, gradients saved."""
    train_set, val_set = _data()
    Run = distributed.run_class(None, args.device)
    with tempfile.TemporaryDirectory() as out:
        run = Run(
            _config(args.device, augment=False, amp=False),
            train_set,
            val_set,
            Path(out),
            progress=False,
            feature_cache=None,
        )
        run.sampler.set_epoch(0)
        indices = next(iter(run.sampler))
        run.model.train()
        stats = training.stats_to_floats(run.step(run.make_batch(indices), 0.0))
        if run.is_main:
            torch.save(
                {
                    "stats": stats,
                    "global": next(run.sampler.global_batches()),
                    "grads": {n: p.grad.cpu() for n, p in run.model.named_parameters()},
                },
                args.result,
            )


def _wait_for(run) -> None:
    """Every queued step finished, on the GPU (a step returns before its kernels have run) and on every rank."""
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    if distributed.is_active():
        torch.distributed.barrier()


def _single_step(order, device: str) -> tuple[dict, dict]:
    train_set, val_set = _data()
    with tempfile.TemporaryDirectory() as out:
        run = training._Run(
            _config(device, augment=False, amp=False), train_set, val_set, Path(out), progress=False, feature_cache=None
        )
        run.model.train()
        stats = training.stats_to_floats(run.step(run.make_batch(order), 0.0))
        return stats, {n: p.grad.cpu().clone() for n, p in run.model.named_parameters()}


def _relative(a: dict, b: dict) -> dict[str, float]:
    return {n: float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in b}


def equivalence(processes: int, device: str, folder: Path) -> dict:
    result = folder / "step.pt"
    _launch(["--worker", "step", "--result", str(result), "--device", device], processes)
    ddp = torch.load(result, weights_only=False)
    order = distributed.global_batch_order(ddp["global"], processes)
    stats, grads = _single_step(order, device)
    _, reordered = _single_step(ddp["global"], device)  # the same batch in sampler order: float32 noise
    ours, noise = _relative(ddp["grads"], grads), _relative(reordered, grads)
    scale = max(float(g.norm()) for g in grads.values())
    meaningful = [n for n in grads if float(grads[n].norm()) > 1e-6 * scale]  # a bias before BatchNorm has none
    return {
        "processes": processes,
        "loss_single": stats["loss"],
        "loss_distributed": ddp["stats"]["loss"],
        "loss_abs_diff": abs(stats["loss"] - ddp["stats"]["loss"]),
        "grad_max_abs_diff": max(float((ddp["grads"][n] - grads[n]).abs().max()) for n in grads),
        "grad_max_rel_diff": max(ours[n] for n in meaningful),
        "grad_max_rel_diff_after_last_batchnorm": max(ours[n] for n in meaningful if not n.startswith("backbone")),
        "reorder_noise_max_rel_diff": max(noise[n] for n in meaningful),
        "note": "relative L2 difference per parameter tensor; float32. Reordering the same batch in one process "
        "moves the backbone's gradients as much (BatchNorm makes them small sums of large terms).",
    }


def _launch(worker_args: list[str], processes: int, threads: int | None = None) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    script = [str(Path(__file__).resolve()), *worker_args, *(["--threads", str(threads)] if threads else [])]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            *script,
        ]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def throughput(processes: int, steps: int, device: str, folder: Path, threads: int | None = None) -> dict:
    result = folder / f"throughput-{processes}-{threads}.json"
    _launch(
        ["--worker", "throughput", "--steps", str(steps), "--result", str(result), "--device", device],
        processes,
        threads,
    )
    return json.loads(result.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes of the torchrun run (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimisation steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--output", default=str(reports_dir() / "benchmarks" / "ddp.json"))
    parser.add_argument("--worker", choices=["throughput", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "throughput":
        worker_throughput(args)
        return 0
    if args.worker == "step":
        worker_step(args)
        return 0

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = [
            ("1 process, all cores", throughput(1, args.steps, args.device, folder)),
            (
                f"1 process, {max(1, cores // args.processes)} thread(s)",
                throughput(1, args.steps, args.device, folder, threads=max(1, cores // args.processes)),
            ),
            (f"{args.processes} processes (torchrun)", throughput(args.processes, args.steps, args.device, folder)),
        ]
        check = equivalence(args.processes, args.device, folder)
    report = {
        "script": "benchmarks/bench_ddp.py",
        "started_utc": started,
        "machine": {
            "cpu_cores": cores,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": "a machine shared with other jobs: timings vary from run to run",
        },
        "recipe": {"p": 10, "k": 16, "backbone": "small_cnn", "steps": args.steps, "warmup_steps": args.warmup},
        "throughput": {name: result for name, result in runs},
        "equivalence": check,
    }
    output = atomic_write_bytes(args.output, json.dumps(report, indent=2).encode())
    for name, result in runs:
        print(
            f"{name:28s} {result['images_per_second']:8.1f} img/s  ({result['seconds']:.1f} s for {args.steps} steps)"
        )
    print(
        f"equivalence: loss diff {check['loss_abs_diff']:.2e}, gradient max rel diff {check['grad_max_rel_diff']:.2e}"
        f" (reordering noise {check['reorder_noise_max_rel_diff']:.2e})"
    )
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
