"""Embedding a large image set in parallel shards, and merging the shards into one collection.

    torchrun --standalone --nproc_per_node=4 -m fashsim embed-shards --catalog shop/ --out data/index/shop

The images (a Fashion-MNIST-style uint8 array, or a :class:`~fashsim.data.catalogs.FileCatalog`
of image files decoded with :func:`~fashsim.data.uploads.load_image` and
:func:`~fashsim.data.transforms.prepare_image`) are cut into shards of ``shard_size`` consecutive
items. Each process of a ``torchrun`` job (or a single process) embeds its shards, streamed
``batch_size`` images at a time, and writes each one atomically into ``shard_dir``::

    shard-00003.npz    vectors (count, dim) float32 and ids (count,) int64: positions in the image set
    shard-00003.json   the manifest, written last: shard, start, stop, count, unreadable items,
                       model fingerprint, a digest of the shard's input, the sha256 of the .npz

A shard is finished when its manifest exists and agrees with the model, the input and the
``.npz`` on disk; a crash loses only the shards in progress, and a rerun redoes only the shards
that are missing or stale (another model, changed images). :func:`merge_shards` then checks
that every shard is there and builds (and saves) one :class:`~fashsim.search.collection.Collection`.

Which process embeds which shard: under a ``torch.distributed`` process group rank 0 lists the
unfinished shards and hands them out round-robin (a rerun spreads the leftovers over all
ranks); without one, shard ``s`` belongs to rank ``s % world_size``. ``shard_dir`` must be
shared by all the processes (one machine, or a shared file system across machines).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.catalogs import CatalogImages, FileCatalog, collate_catalog_batch
from ..data.datasets import ImageArrayDataset
from ..errors import FashsimError
from ..fileio import atomic_write_bytes, sha256_file

FORMAT = 1

Source = np.ndarray | ImageArrayDataset | FileCatalog


@dataclass
class ShardReport:
    """What :func:`embed_shards` did: the shards this process embedded, and the finished shards
    that were kept (all of them under a process group, else this process's own)."""

    num_shards: int
    embedded: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _dist():
    """``torch.distributed``, imported when first needed (the command line imports this module
    to list its flags; PyTorch loads only when something is embedded)."""
    import torch.distributed

    return torch.distributed


def shard_name(shard: int) -> str:
    """The file stem of shard number ``shard``: ``shard-00042``."""
    return f"shard-{shard:05d}"


def shard_bounds(total: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every shard of ``total`` items."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    return [(start, min(total, start + shard_size)) for start in range(0, total, shard_size)]


# ------------------------------------------------------------------ the input of a shard
def _images(source: Source) -> np.ndarray | None:
    if isinstance(source, ImageArrayDataset):
        return source.images
    if isinstance(source, np.ndarray):
        return source
    return None


def _source_digest(source: Source, start: int, stop: int) -> str:
    """A hash of what the shard's vectors depend on besides the model: the images' bytes, or
    each file's path, size and modification time."""
    digest = hashlib.sha256(f"{start}:{stop}".encode())
    images = _images(source)
    if images is not None:
        digest.update(str(images.shape[1:]).encode())
        digest.update(np.ascontiguousarray(images[start:stop]).data)
    else:
        for path in source.paths[start:stop]:
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:24]


def _batches(
    source: Source, start: int, stop: int, model, batch_size: int, num_workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, str]]]:
    """``(ids, uint8 images, unreadable {id: message})`` of the shard, ``batch_size`` at a time."""
    import torch

    images = _images(source)
    if images is not None:
        for first in range(start, stop, batch_size):
            last = min(stop, first + batch_size)
            yield np.arange(first, last, dtype=np.int64), images[first:last], {}
        return
    files = CatalogImages(source.paths[start:stop], model.input_spec)
    loader = torch.utils.data.DataLoader(
        files, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_catalog_batch
    )
    for local, batch, errors in loader:
        yield local + start, batch, {int(i) + start: e for i, e in zip(local, errors) if e}


# ------------------------------------------------------------------ shards on disk
def _read_manifest(shard_dir: Path, shard: int) -> dict | None:
    try:
        return json.loads((shard_dir / f"{shard_name(shard)}.json").read_text())
    except (OSError, ValueError):
        return None


def _finished(shard_dir: Path, shard: int, expected: Mapping) -> bool:
    """Whether the shard's manifest matches ``expected`` and its vectors file is intact."""
    manifest = _read_manifest(shard_dir, shard)
    if manifest is None or any(manifest.get(key) != value for key, value in expected.items()):
        return False
    vectors = shard_dir / f"{shard_name(shard)}.npz"
    return vectors.is_file() and sha256_file(vectors) == manifest.get("vectors_sha256")


def _remove_other_runs(shard_dir: Path, num_shards: int, total: int, model_print: str) -> list[str]:
    """Delete the shards of another run (another shard count, item count or model) left in
    ``shard_dir``, which :func:`read_shards` would otherwise refuse to merge with this run's;
    returns their names."""
    removed = []
    for manifest_path in sorted(shard_dir.glob("shard-*.json")):
        try:
            manifest = json.loads(manifest_path.read_text())
            run = (manifest["num_shards"], manifest["total"], manifest["model_fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            run = None  # unreadable: this run rewrites it, or read_shards names it
        if run is not None and run != (num_shards, total, model_print):
            manifest_path.unlink(missing_ok=True)
            manifest_path.with_suffix(".npz").unlink(missing_ok=True)
            removed.append(manifest_path.stem)
    return removed


def _expected(
    source: Source,
    bounds: tuple[int, int],
    shard: int,
    num_shards: int,
    total: int,
    model_print: str,
) -> dict:
    start, stop = bounds
    return {
        "format": FORMAT,
        "shard": shard,
        "num_shards": num_shards,
        "total": total,
        "start": start,
        "stop": stop,
        "model_fingerprint": model_print,
        "source_digest": _source_digest(source, start, stop),
    }


def _embed_one(
    model, source: Source, shard_dir: Path, expected: dict, *, batch_size: int, num_workers: int, device, rank: int
) -> None:
    from .inference import embed_arrays

    began = time.perf_counter()
    ids, vectors, unreadable = [], [], {}
    for batch_ids, images, errors in _batches(
        source, expected["start"], expected["stop"], model, batch_size, num_workers
    ):
        keep = np.array([int(i) not in errors for i in batch_ids], dtype=bool)
        unreadable.update(errors)
        if keep.any():
            ids.append(batch_ids[keep])
            vectors.append(embed_arrays(model, images[keep], batch_size=batch_size, device=device))
    dim = model.embedding_dim
    vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, vectors=vectors.astype(np.float32), ids=ids.astype(np.int64))
    name = shard_name(expected["shard"])
    path = atomic_write_bytes(shard_dir / f"{name}.npz", buffer.getvalue())
    manifest = {
        **expected,
        "count": len(ids),
        "embedding_dim": dim,
        "unreadable": {str(i): message for i, message in sorted(unreadable.items())},
        "vectors_sha256": sha256_file(path),
        "seconds": round(time.perf_counter() - began, 3),
        "rank": rank,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_bytes(shard_dir / f"{name}.json", json.dumps(manifest, indent=1).encode())  # last: "finished"


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def embed_shards(
    model,
    source: Source,
    shard_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    batch_size: int = 512,
    num_workers: int = 0,
    device=None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> ShardReport:
    """Embed this process's unfinished shards of ``source`` with ``model`` into ``shard_dir``
    (see the module docstring). ``rank``/``world_size`` default to the process group's, else
    torchrun's variables, else a single process. Every rank returns once all ranks are done
    when a process group is up (a barrier), else once its own shards are."""
    from .persistence import fingerprint

    dist = _dist()
    began = time.perf_counter()
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = _rank_and_world(rank, world_size)
    model = model.eval()
    total = len(source)
    bounds = shard_bounds(total, shard_size)
    model_print = fingerprint(model)
    expected = [_expected(source, b, s, len(bounds), total, model_print) for s, b in enumerate(bounds)]
    if rank == 0:  # another run's shards in the folder: this run replaces them
        removed = _remove_other_runs(shard_dir, len(bounds), total, model_print)
        if removed and progress:
            print(f"removed {len(removed)} shards of an earlier run with other sizes or model: {', '.join(removed)}")
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if group:  # rank 0's view of what is missing, handed out round-robin
        box = [[s for s in range(len(bounds)) if not _finished(shard_dir, s, expected[s])] if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        missing = box[0]
        mine, reused = missing[rank::world_size], [s for s in range(len(bounds)) if s not in missing]
    else:  # shard s is rank s % world_size's
        owned = range(rank, len(bounds), world_size)
        mine = [s for s in owned if not _finished(shard_dir, s, expected[s])]
        reused = [s for s in owned if s not in mine]
    report = ShardReport(len(bounds), reused=reused)
    for shard in mine:
        _embed_one(
            model,
            source,
            shard_dir,
            expected[shard],
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            rank=rank,
        )
        report.embedded.append(shard)
        if progress:
            print(
                f"rank {rank}: {shard_name(shard)} ({expected[shard]['stop'] - expected[shard]['start']} images) "
                f"done, {len(report.embedded)}/{len(mine)}",
                flush=True,
            )
    if group:
        dist.barrier()
    report.seconds = time.perf_counter() - began
    return report


# ------------------------------------------------------------------ merge
def read_shards(
    shard_dir: str | os.PathLike, *, model_fingerprint: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, str], str]:
    """``(vectors, ids, unreadable, model fingerprint)`` of every shard in ``shard_dir``, in id
    order, after checking that all shards of one run are there, intact and of one model."""
    shard_dir = Path(shard_dir)
    manifests = []
    for path in sorted(shard_dir.glob("shard-*.json")):
        try:
            manifests.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise FashsimError(f"{path} is unreadable ({exc}): delete it and rerun embed-shards") from None
    if not manifests:
        raise FashsimError(f"no finished shards in {shard_dir}: run embed-shards first")
    runs = {(m["num_shards"], m["total"], m["model_fingerprint"]) for m in manifests}
    if len(runs) > 1:
        raise FashsimError(
            f"{shard_dir} mixes shards of different runs (shard count, item count or model): "
            "rerun embed-shards over the same images with one model"
        )
    num_shards, _, fp = runs.pop()
    if model_fingerprint is not None and fp != model_fingerprint:
        raise FashsimError(f"the shards in {shard_dir} were embedded by model {fp}, not {model_fingerprint}")
    present = {m["shard"]: m for m in manifests}
    missing = sorted(set(range(num_shards)) - set(present))
    if missing:
        raise FashsimError(
            f"{len(missing)} of {num_shards} shards are missing ({', '.join(map(str, missing[:10]))}"
            f"{' ...' if len(missing) > 10 else ''}): rerun embed-shards, which computes only those"
        )
    vectors, ids, unreadable = [], [], {}
    for shard in range(num_shards):
        path = shard_dir / f"{shard_name(shard)}.npz"
        if not path.is_file() or sha256_file(path) != present[shard]["vectors_sha256"]:
            raise FashsimError(
                f"{path} is missing or corrupted: delete {shard_name(shard)}.json and rerun embed-shards"
            )
        with np.load(path) as blob:
            vectors.append(blob["vectors"])
            ids.append(blob["ids"])
        unreadable.update({int(i): message for i, message in present[shard]["unreadable"].items()})
    return np.concatenate(vectors), np.concatenate(ids), unreadable, fp


def default_records(source: Source, *, prefix: str = "item") -> list[dict]:
    """One collection record per item of ``source``: ``id`` (its position), ``source`` (the file's
    path, or ``<prefix>:<position>`` for arrays), ``category`` and a catalog's metadata columns."""
    if isinstance(source, FileCatalog):
        records = []
        for i, (path, label, extra) in enumerate(zip(source.paths, source.labels, source.extra)):
            meta = {(f"catalog_{k}" if k in ("id", "source", "category") else k): v for k, v in extra.items()}
            records.append({**meta, "id": i, "source": str(path), "category": source.class_names[int(label)]})
        return records
    if isinstance(source, ImageArrayDataset):
        return [
            {"id": i, "source": f"{prefix}:{i}", "category": source.class_names[int(label)]}
            for i, label in enumerate(source.labels)
        ]
    return [{"id": i, "source": f"{prefix}:{i}", "category": ""} for i in range(len(source))]


def merge_shards(
    shard_dir: str | os.PathLike,
    records: Sequence[Mapping],
    *,
    model_fingerprint: str | None = None,
    out: str | os.PathLike | None = None,
    kind: str = "auto",
    **index_params,
):
    """One :class:`~fashsim.search.collection.Collection` of every shard in ``shard_dir`` (saved to
    ``out`` when given). ``records[i]`` describes item ``i`` of the embedded image set (see
    :func:`default_records`); unreadable images are left out, with a warning."""
    from ..search.collection import Collection

    vectors, ids, unreadable, fp = read_shards(shard_dir, model_fingerprint=model_fingerprint)
    total = len(ids) + len(unreadable)
    if len(records) != total:
        raise FashsimError(f"{len(records)} records for the {total} items the shards were made from")
    if unreadable:
        first = ", ".join(f"{i}: {m}" for i, m in list(sorted(unreadable.items()))[:5])
        warnings.warn(f"{len(unreadable)} unreadable images were left out of the collection ({first})", stacklevel=2)
    chosen = [records[int(i)] for i in ids]
    collection = Collection.build(vectors, chosen, kind=kind, model_fingerprint=fp, **index_params)
    if out is not None:
        collection.save(out)
    return collection


# ------------------------------------------------------------------ command line
def add_embed_shards_parser(subparsers) -> argparse.ArgumentParser:
    """The ``fashsim embed-shards`` subcommand (run it under ``torchrun`` for several processes)."""
    parser = subparsers.add_parser(
        "embed-shards",
        help="embed Fashion-MNIST or a catalog in shards, in parallel under torchrun, then build the collection",
        description="Each process embeds its share of the shards; finished shards are kept, so a rerun after a "
        "crash only redoes the missing ones. Parallel: torchrun --standalone --nproc_per_node=N -m fashsim "
        "embed-shards ...",
    )
    parser.add_argument("--model", help="model file (default data/models/triplet/model.pt)")
    parser.add_argument(
        "--catalog", help="an image folder, CSV catalog or DeepFashion In-shop folder (default: Fashion-MNIST)"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["train", "test"],
        choices=["train", "test"],
        help="Fashion-MNIST splits (default: both, ids as `fashsim index` gives them)",
    )
    parser.add_argument("--shards", help="shard folder (default <out>.shards)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default 512)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="image-decoding workers per process (catalogs; default 0: in the process)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: this process's GPU (LOCAL_RANK) when there is one, else the CPU",
    )
    parser.add_argument(
        "--out", help="collection folder (default data/index/fashion-mnist, or data/index/<catalog folder name>)"
    )
    parser.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "hnsw", "ivfpq"],
        help="FAISS index kind of the merged collection (default auto: by its size)",
    )
    parser.add_argument("--no-merge", action="store_true", help="only embed the shards")
    parser.set_defaults(func=main_embed_shards)
    return parser


def _fashion_mnist(splits: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    from ..data.fashion_mnist import load_fashion_mnist
    from ..data.sources import fashion_mnist_id, fashion_mnist_source

    images, records = [], []
    for split in splits:
        data = load_fashion_mnist(split)
        images.append(data.images)
        records += [
            {
                "id": fashion_mnist_id(split, i),
                "source": fashion_mnist_source(split, i),
                "category": data.class_names[label],
            }
            for i, label in enumerate(data.labels)
        ]
    return np.concatenate(images), records


def main_embed_shards(args) -> int:
    """``fashsim embed-shards``: embed this process's shards; rank 0 then merges and saves the collection."""
    import torch

    from ..data.catalogs import open_catalog
    from ..paths import data_dir, default_model_path
    from ..train.distributed import init_process_group, launched_by_torchrun, local_rank, local_world_size
    from .persistence import fingerprint, load_model

    for flag, value in (("--shard-size", args.shard_size), ("--batch-size", args.batch_size)):
        if value < 1:  # before any shard is written (an empty one would count as finished)
            raise ValueError(f"{flag} must be ≥ 1, got {value}")
    if launched_by_torchrun():
        init_process_group("cpu")  # gloo: the shards only need a barrier
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    model = load_model(args.model or default_model_path(), device=device)
    if args.catalog:
        source = open_catalog(args.catalog)
        records = default_records(source)
        out = Path(args.out or data_dir() / "index" / Path(args.catalog).resolve().name)
    else:
        source, records = _fashion_mnist(args.splits)
        out = Path(args.out or data_dir() / "index" / "fashion-mnist")
    shard_dir = Path(args.shards or out.with_name(out.name + ".shards"))
    report = embed_shards(
        model,
        source,
        shard_dir,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=device,
        progress=True,
    )
    rank = _dist().get_rank() if _dist().is_initialized() else 0
    print(
        f"rank {rank}: embedded {len(report.embedded)} shards, kept {len(report.reused)} finished ones "
        f"({report.seconds:.1f} s)",
        flush=True,
    )
    if rank == 0 and not args.no_merge:
        collection = merge_shards(shard_dir, records, model_fingerprint=fingerprint(model), out=out, kind=args.kind)
        print(f"merged {report.num_shards} shards: {len(collection)} items ({collection.index.kind}) -> {out}")
    return 0
