"""Your own shop: the generated colour shop, catalogs of every layout built into searchable
collections, unreadable files reported, colour queries, metadata filters, evaluation."""

import collections
import csv
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashsim.app import shop
from fashsim.data import catalogs, colour_shop
from fashsim.errors import FashsimError, FolderInUseError
from fashsim.evaluation import shop as shop_eval
from fashsim.fileio import folder_lock
from fashsim.model.persistence import load_model
from fashsim.search.collection import IndexMismatchError
from fashsim.search.filters import FilterError, parse_conditions
from fashsim.search.searcher import Searcher

SMALL = {"size": 240, "image_size": 64, "colours": ["Red", "Navy Blue", "Yellow"], "patterns": ["Solid", "Striped"]}
FAST = {
    "backbone": "mobilenet_v2",
    "image_size": 64,
    "train_seconds": 6.0,
    "workers": 1,
    "progress": False,
    "chunk_size": 128,
}


@pytest.fixture(scope="module")
def small_shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop") / "colour-shop"
    colour_shop.generate_colour_shop(root, **SMALL, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def kaggle_build(small_shop, tmp_path_factory):
    return shop.build_shop_collection(small_shop, tmp_path_factory.mktemp("built") / "shop", **FAST)


def _rows(root):
    with open(root / "styles.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ the generated catalog
def test_colour_shop_is_a_deterministic_kaggle_layout_catalog(small_shop, tmp_path):
    rows = _rows(small_shop)
    assert list(rows[0]) == list(colour_shop.COLUMNS)
    assert len(rows) == 240 and len({r["id"] for r in rows}) == 240
    assert all((small_shop / "images" / f"{r['id']}.jpg").is_file() for r in rows)
    styles = {(r["articleType"], r["baseColour"], r["pattern"]) for r in rows}
    assert len(styles) == 10 * 3 * 2  # every style present, balanced within each garment kind
    counts = collections.Counter((r["articleType"], r["baseColour"], r["pattern"]) for r in rows)
    assert set(counts.values()) == {4}
    image = np.asarray(Image.open(small_shop / "images" / f"{rows[0]['id']}.jpg"))
    assert image.shape == (64, 64, 3) and image[0, 0].min() > 200  # a light background, in colour
    # same seed, other worker count: the same bytes; a second call reuses the files
    again = colour_shop.generate_colour_shop(tmp_path / "again", **SMALL, workers=2, progress=False)
    assert (again.parent / "styles.csv").read_bytes() == (small_shop / "styles.csv").read_bytes()
    assert (again.parent / "images" / "10007.jpg").read_bytes() == (small_shop / "images" / "10007.jpg").read_bytes()
    mtime = (again.parent / "images" / "10007.jpg").stat().st_mtime_ns
    colour_shop.generate_colour_shop(tmp_path / "again", **SMALL, progress=False)
    assert (again.parent / "images" / "10007.jpg").stat().st_mtime_ns == mtime
    with pytest.raises(FashsimError, match="another colour shop"):
        colour_shop.generate_colour_shop(tmp_path / "again", **{**SMALL, "seed": 1}, progress=False)


def test_rendered_colour_and_pattern_are_visible():
    garment = np.zeros((28, 28), np.uint8)
    garment[4:24, 6:22] = 200
    rng = np.random.default_rng(0)
    red = np.asarray(
        Image.open(io.BytesIO(colour_shop.render_item(garment, colour_shop.COLOURS["Red"], "Solid", 64, rng)))
    )
    centre = red[24:40, 24:40].reshape(-1, 3).mean(0)
    assert centre[0] > 120 and centre[1] < 80 and centre[2] < 80
    assert colour_shop.pattern_mask("Solid", 20, 20, rng).max() == 0
    stripes = colour_shop.pattern_mask("Striped", 60, 60, rng)
    assert 0.3 < stripes.mean() < 0.7


def test_open_catalog_keeps_every_column_and_combines_labels(small_shop):
    catalog = catalogs.open_catalog(small_shop)
    assert catalogs.detect_layout(small_shop) == "csv"
    assert len(catalog) == 240 and catalog.class_names[0] == "Boots"
    assert set(colour_shop.COLUMNS) <= set(catalog.extra[0])  # category and id columns too
    assert catalog.paths[0] == small_shop / "images" / f"{catalog.extra[0]['id']}.jpg"
    labels, names = catalog.combined_labels(["articleType", "baseColour", "pattern"])
    assert len(names) == 60 and labels.max() == 59
    assert names[labels[0]] == " / ".join(catalog.extra[0][c] for c in ("articleType", "baseColour", "pattern"))
    with pytest.raises(KeyError, match="no metadata column"):
        catalog.column("fabric")


# ------------------------------------------------------------------ build and search
def test_kaggle_layout_builds_a_searchable_collection_with_every_column(kaggle_build):
    build = kaggle_build
    assert build.label_columns == ["articleType", "baseColour", "pattern"]
    assert len(build.collection) == 240 and build.summary["styles"] == 60
    searcher = Searcher.from_paths(build.model_path, build.collection_dir)
    assert searcher.spec.channels == 3 and not searcher.spec.dark_background
    hit = searcher.search(build.records[0]["source"], k=3)[0]
    assert hit.id == build.records[0]["id"] == 10000 and hit.score > 0.99
    for column in (*colour_shop.COLUMNS[1:], "style"):  # every styles.csv column but the id, and the label
        assert column in hit.extra
    assert isinstance(hit.extra["price"], float) and isinstance(hit.extra["year"], int)
    assert build.summary["train"]["step"] > 0
    saved = json.loads((build.out_dir / "build.json").read_text())
    assert saved["indexed"] == 240 and saved["unreadable"] == []


def test_rgb_query_keeps_its_colour_and_finds_that_colour_first(kaggle_build, fmnist_train):
    searcher = kaggle_build.searcher()
    prepared = searcher.prepare(np.full((50, 40, 3), (200, 30, 35), np.uint8))
    assert prepared.shape == (64, 64, 3) and prepared[..., 0].mean() > 150 > prepared[..., 1].mean() + 60
    found = 0
    for n, colour in enumerate(("Red", "Navy Blue", "Yellow")):
        for garment_index in (0, 1, 2, 3):  # garments from the *training* split: never in the shop
            rng = np.random.default_rng([7, n, garment_index])
            query = colour_shop.render_item(
                fmnist_train.images[garment_index], colour_shop.COLOURS[colour], "Solid", 64, rng
            )
            hits = searcher.search(query, k=5)
            found += sum(h.extra["baseColour"] == colour for h in hits)
            assert hits[0].extra["baseColour"] == colour
    assert found >= 0.9 * 3 * 4 * 5


def test_metadata_filters_on_any_column(kaggle_build):
    searcher = kaggle_build.searcher()
    query = kaggle_build.records[5]["source"]
    cheap_red = parse_conditions(["baseColour=Red", "price<50"])  # what `fashsim shop search --where` passes
    assert cheap_red == {"baseColour": [("==", "Red")], "price": [("<", 50)]}
    hits = searcher.search(query, k=10, where=cheap_red)
    assert hits and all(h.extra["baseColour"] == "Red" and h.extra["price"] < 50 for h in hits)
    striped_bags = searcher.search(query, k=50, category="Handbags", where=parse_conditions("pattern!=Solid"))
    assert striped_bags and all(h.category == "Handbags" and h.extra["pattern"] == "Striped" for h in striped_bags)
    assert searcher.search(query, k=5, where=parse_conditions("price>100000")) == []
    for bad in ("price<cheap", "no operator"):
        with pytest.raises(FilterError):
            parse_conditions(bad)
    kinds = searcher.collection.metadata.field_kinds()
    assert kinds["price"] == "number" and kinds["baseColour"] == "text"
    with pytest.raises(FilterError, match="no column 'colour'"):
        parse_conditions("colour=Red", kinds)


def test_a_collection_refuses_another_model(kaggle_build):
    from fashsim.model.networks import EmbeddingNet

    other = EmbeddingNet("small_cnn", in_channels=3, input_spec=kaggle_build.model.input_spec)
    with pytest.raises(IndexMismatchError):
        Searcher(other, kaggle_build.collection)
    with pytest.raises(IndexMismatchError):
        from fashsim.search.collection import Collection

        Collection.load(kaggle_build.collection_dir, model=other)


def test_the_default_cnn_learns_colour_from_scratch_in_bfloat16(small_shop, tmp_path, monkeypatch):
    """The default recipe (small CNN from scratch) in bfloat16 — what a CPU that computes it
    natively runs (forced here, so that every machine runs that path: elsewhere it is emulated,
    slower but the same) — already tells the colours apart after a few steps; with amp=False it
    trains in float32. A second build reuses the finished model and still says its precision."""
    from fashsim.train import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    # the budget leaves room for a CPU that emulates bfloat16 (a step took 4.5 s instead of 0.4 s in
    # float32 on a 2-core AVX2 machine): max_epochs ends the run, 8 epochs of one batch each
    build_cnn = functools.partial(
        shop.build_shop_collection,
        small_shop,
        backbone="small_cnn",
        train_seconds=120.0,
        workers=1,
        progress=False,
    )
    build = build_cnn(tmp_path / "out", train_options={"max_epochs": 8})
    trained = build.summary["train"]
    assert trained["precision"] == "bfloat16"
    assert trained["epoch"] == 8 and build.summary["image_size"] == shop.RECIPES["small_cnn"].image_size
    # its input: each photo cropped to the product, also for queries through the saved model
    assert load_model(build.model_path).input_spec.trim_background
    scores = shop_eval.shop_metrics(build.embeddings, build.records, build.label_columns)
    assert scores["baseColour_match@5"] > 0.9  # 3 colours: chance is a third
    again = build_cnn(tmp_path / "out", train_options={"max_epochs": 8})
    assert again.summary["train"]["resumed"] and again.summary["train"]["precision"] == "bfloat16"
    plain = build_cnn(tmp_path / "float32", train_options={"max_epochs": 1, "amp": False})
    assert plain.summary["train"]["precision"] == "float32"


def test_a_second_build_resumes_from_cached_chunks_and_checkpoint(kaggle_build, small_shop, capsys):
    chunks = sorted((kaggle_build.out_dir / "cache" / "features").glob("chunk-*.npz"))
    assert len(chunks) == 2  # 240 items in chunks of 128
    stamps = [c.stat().st_mtime_ns for c in chunks]
    with folder_lock(kaggle_build.out_dir, "shop build", "wait"):  # a build in progress: another is refused
        with pytest.raises(FolderInUseError, match=rf"in use by another shop build \(pid {os.getpid()}\); wait for"):
            shop.build_shop_collection(small_shop, kaggle_build.out_dir, **FAST)
    capsys.readouterr()
    again = shop.build_shop_collection(small_shop, kaggle_build.out_dir, **FAST)
    assert [c.stat().st_mtime_ns for c in chunks] == stamps
    assert again.summary["train"]["resumed"] is True
    assert again.summary["model_fingerprint"] == kaggle_build.summary["model_fingerprint"]
    assert "reused as it is" not in capsys.readouterr().out
    # asking a finished build for longer training says how to get it, rather than ignoring it
    longer = shop.build_shop_collection(small_shop, kaggle_build.out_dir, **{**FAST, "max_epochs": 900})
    assert longer.summary["model_fingerprint"] == kaggle_build.summary["model_fingerprint"]
    said = capsys.readouterr().out
    assert "reused as it is; to train it with max_epochs 900, build afresh" in said
    with pytest.raises(ValueError, match="max_epochs must be"):
        shop.build_shop_collection(small_shop, kaggle_build.out_dir, **{**FAST, "max_epochs": 0})


def test_a_pretrained_backbone_is_fine_tuned_on_photos_read_from_disk(small_shop, kaggle_build, tmp_path, capsys):
    """What a GPU build does with a pretrained backbone, forced on the CPU (the same code on another
    device): the head learns on the cached features, then the whole network is fine-tuned on P×K
    batches decoded from the image files, and the catalog is embedded with the fine-tuned model —
    whose saved copy finds each photo first. A second build resumes both phases."""
    build_ft = functools.partial(
        shop.build_shop_collection,
        small_shop,
        tmp_path / "fine",
        **{**FAST, "max_epochs": 1, "train_seconds": 300.0},
        fine_tune=True,
        train_options={"seconds": 3.0},  # the head's phase; max_epochs and train_seconds bound the fine-tuning
    )
    build = build_ft()
    s = build.summary
    assert s["fine_tuned"] is True and s["device"] == "cpu"
    assert s["fine_tune"]["epoch"] == 1 and s["fine_tune"]["config"]["lr"] == shop.RECIPES["mobilenet_v2"].fine_tune_lr
    assert s["train"]["config"]["seconds"] == 3.0
    # the backbone moved away from the shipped ImageNet weights (the frozen build keeps them)
    tuned = dict(build.model.backbone.named_parameters())
    shipped = dict(kaggle_build.model.backbone.named_parameters())
    assert any(not np.allclose(tuned[k].detach(), shipped[k].detach()) for k in shipped)
    # the collection holds the fine-tuned model's embeddings: the saved model finds each photo first
    searcher = Searcher.from_paths(build.model_path, build.collection_dir)
    for record in build.records[:3]:
        top = searcher.search(record["source"], k=1)[0]
        assert top.id == record["id"] and top.score > 0.99
    capsys.readouterr()
    again = build_ft()
    assert again.summary["train"]["resumed"] and again.summary["fine_tune"]["resumed"]
    assert again.summary["model_fingerprint"] == s["model_fingerprint"]


def test_a_build_refuses_a_device_or_fine_tuning_it_cannot_have(small_shop, tmp_path, capsys):
    with pytest.raises(ValueError, match="small_cnn trains every layer from scratch already"):
        shop.build_shop_collection(small_shop, tmp_path / "a", backbone="small_cnn", fine_tune=True)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(FashsimError, match="no CUDA GPU is available"):
            shop.build_shop_collection(small_shop, tmp_path / "b", device="cuda")
        from fashsim.app.cli import main

        assert main(["shop", "build", str(small_shop), "--out", str(tmp_path / "c"), "--device", "cuda"]) == 1
        assert "no CUDA GPU is available" in capsys.readouterr().err


def test_a_build_with_other_settings_says_it_trains_afresh(small_shop, tmp_path, capsys):
    shop.build_shop_collection(small_shop, tmp_path / "out", **FAST)
    capsys.readouterr()
    other = shop.build_shop_collection(small_shop, tmp_path / "out", **FAST, train_options={"margin": 0.3})
    assert other.summary["train"]["resumed"] is False
    assert "other items or settings; training afresh" in capsys.readouterr().out


def test_unreadable_images_are_reported_file_by_file(small_shop, tmp_path):
    broken = tmp_path / "broken-shop"
    shutil.copytree(small_shop, broken)
    (broken / "images" / "10003.jpg").write_bytes(b"")
    (broken / "images" / "10010.jpg").write_bytes((broken / "images" / "10011.jpg").read_bytes()[:200])
    with pytest.raises(FashsimError) as error:
        shop.build_shop_collection(broken, tmp_path / "out", **FAST)
    message = str(error.value)
    assert "2 of 240" in message and "10003.jpg" in message and "10010.jpg" in message
    assert "skip_unreadable" in message
    with pytest.warns(UserWarning, match="left out"):
        build = shop.build_shop_collection(broken, tmp_path / "out", **FAST, skip_unreadable=True)
    assert len(build.collection) == 238
    assert len(build.summary["unreadable"]) == 2 and "10003.jpg" in build.summary["unreadable"][0]
    assert {10003, 10010}.isdisjoint(r["id"] for r in build.records)


def test_image_folder_layout(small_shop, tmp_path):
    folder = tmp_path / "folder"
    for row in _rows(small_shop)[:120]:
        target = folder / row["articleType"] / f"{row['id']}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_shop / "images" / f"{row['id']}.jpg", target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build = shop.build_shop_collection(folder, tmp_path / "out", **{**FAST, "train_seconds": 2.0})
    assert build.label_columns == ["category"]
    assert any("not in the catalog" in note for note in build.summary["notes"])
    first = _rows(small_shop)[0]
    hits = build.searcher().search(folder / first["articleType"] / f"{first['id']}.jpg", k=3)
    assert hits[0].category == first["articleType"] and hits[0].score > 0.99


def test_deepfashion_inshop_layout(small_shop, tmp_path):
    root = tmp_path / "inshop"
    rows = _rows(small_shop)[:60]
    lines = []
    for n, row in enumerate(rows):
        gender = "WOMEN" if row["gender"] == "Women" else "MEN"
        item = f"id_{int(row['id']) // 2:08d}"  # two photos per item
        name = f"img/{gender}/{row['articleType'].replace(' ', '_')}/{item}/{n:02d}_1_front.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_shop / "images" / f"{row['id']}.jpg", root / name)
        lines.append(f"{name} {item} {'train' if n % 3 else 'query'}")
    (root / "Eval").mkdir()
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
    )
    assert catalogs.detect_layout(root) == "inshop"
    build = shop.build_shop_collection(
        root, tmp_path / "out", label_columns=["item_id"], **{**FAST, "train_seconds": 2.0}
    )
    assert build.label_columns == ["item_id"]
    hit = build.searcher().search(root / lines[0].split()[0], k=1)[0]
    assert hit.extra["item_id"] == lines[0].split()[1] and hit.extra["split"] == "query"


def test_generic_csv_with_paths_and_the_command_line(small_shop, tmp_path, capsys):
    rows = _rows(small_shop)[:100]
    with open(tmp_path / "my_catalog.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "kind", "colour", "price"])
        for row in rows:
            writer.writerow(
                [str(small_shop / "images" / f"{row['id']}.jpg"), row["articleType"], row["baseColour"], row["price"]]
            )
    out = tmp_path / "out"
    code = shop.main_build(
        [
            "build",
            str(tmp_path / "my_catalog.csv"),
            "--out",
            str(out),
            "--category-column",
            "kind",
            "--label-columns",
            "kind",
            "colour",
            "--image-size",
            "64",
            "--train-seconds",
            "2",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 0 and "indexed 100 of 100" in capsys.readouterr().out
    code = shop.main_build(
        [
            "search",
            str(out),
            str(small_shop / "images" / f"{rows[0]['id']}.jpg"),
            "-k",
            "3",
            "--where",
            "price<60",
            "--json",
        ]
    )
    hits = json.loads(capsys.readouterr().out)
    assert code == 0 and len(hits) == 3 and all(h["extra"]["price"] < 60 for h in hits)
    assert hits[0]["extra"]["style"].count(" / ") == 1
    assert shop.main_build(["build", str(tmp_path / "missing.csv"), "--out", str(out)]) == 1


def test_a_csv_naming_images_by_another_id_column_builds_from_the_command_line(small_shop, tmp_path, capsys):
    """A shop's own CSV whose images are <image-dir>/<sku>.jpg: --id-column names that column."""
    rows = _rows(small_shop)[:60]
    with open(tmp_path / "skus.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "kind", "colour"])
        writer.writerows([row["id"], row["articleType"], row["baseColour"]] for row in rows)
    args = ["build", str(tmp_path / "skus.csv"), "--out", str(tmp_path / "out"), "--category-column", "kind"]
    args += ["--image-dir", str(small_shop / "images"), "--train-seconds", "1", "--workers", "1", "--quiet"]
    assert shop.main_build(args) != 0  # no path column and no 'id' column: refused, saying what it needs
    assert "or an 'id' column" in capsys.readouterr().err
    assert shop.main_build(args + ["--id-column", "sku"]) == 0
    assert "indexed 60 of 60" in capsys.readouterr().out
    hit = Searcher.from_paths(tmp_path / "out" / shop.MODEL_FILE, tmp_path / "out" / "collection").search(
        small_shop / "images" / f"{rows[0]['id']}.jpg", k=1
    )[0]
    assert hit.extra["sku"] == int(rows[0]["id"]) and hit.extra["colour"] == rows[0]["baseColour"]


def test_a_catalog_saved_by_a_spreadsheet_builds_and_filters_from_any_folder(small_shop, tmp_path, monkeypatch, capsys):
    """Windows-1252 text with semicolons, images named <id>.JPG / .png, columns named like the
    record's own fields, text sizes and zero-padded codes; built from a relative path, used from
    another folder."""
    rows = _rows(small_shop)[:48]
    owner = tmp_path / "owner"
    (owner / "images").mkdir(parents=True)
    lines = ["id;articleType;baseColour;productDisplayName;size;sku;category;style;source"]
    for n, row in enumerate(rows):
        extension = (".JPG", ".png", ".jpg")[n % 3]
        image = Image.open(small_shop / "images" / f"{row['id']}.jpg")
        image.save(owner / "images" / f"{row['id']}{extension}", format="PNG" if extension == ".png" else "JPEG")
        lines.append(
            f"{row['id']};{row['articleType']};{row['baseColour']};Robe élégante {n};{('8', '10', 'M')[n % 3]};"
            f"{n:04d};Apparel;SKU-{n};Supplier {n % 2}"
        )
    (owner / "styles.csv").write_bytes("\r\n".join(lines).encode("cp1252"))

    with pytest.warns(UserWarning, match="not UTF-8.*Windows-1252"):
        catalog = catalogs.open_catalog(owner, category_column="articleType")  # else "category" comes first
    assert len(catalog) == 48 and catalog.extra[1]["productDisplayName"] == "Robe élégante 1"
    assert catalog.paths[0].name == f"{rows[0]['id']}.JPG" and catalog.paths[0].is_absolute()
    record = shop.catalog_records(catalog, range(48), ["articleType", "baseColour"])[1]
    assert record["category"] == rows[1]["articleType"] and record["catalog_category"] == "Apparel"
    assert record["style"] == f"{rows[1]['articleType']} / {rows[1]['baseColour']}"
    assert record["catalog_style"] == "SKU-1" and record["catalog_source"] == "Supplier 1"
    assert record["source"] == str(catalog.paths[1]) and record["id"] == int(rows[1]["id"])
    assert (record["size"], record["sku"]) == ("10", "0001")  # text columns stay text

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = shop.build_shop_collection(
            "owner",
            "out",
            label_columns=["articleType", "baseColour"],
            csv_options={"category_column": "articleType"},
            **{**FAST, "train_seconds": 2.0},
        )
    assert any("'size' stays text: 16 of 48 values are not plain numbers ('M')" in n for n in built.summary["notes"])
    assert any("read as Windows-1252" in n for n in built.summary["notes"])  # what the catalog said, kept
    assert "note: column 'size' stays text" in capsys.readouterr().out
    monkeypatch.chdir("/")
    query = str(owner / "images" / f"{rows[3]['id']}.JPG")
    for where, check in (
        ("size=8", lambda h: h["extra"]["size"] == "8"),
        ("sku=0003", lambda h: h["id"] == int(rows[3]["id"])),
    ):
        assert shop.main_build(["search", str(tmp_path / "out"), query, "-k", "5", "--where", where, "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert hits and all(map(check, hits))
    assert Path(hits[0]["source"]).is_file()  # absolute: thumbnails and baselines work from any folder
    assert shop.main_build(["search", str(tmp_path / "out"), query, "--where", "colour=Red"]) == 1
    assert "no column 'colour'" in capsys.readouterr().err
    # a quoted value is the value; a filter nothing matches says so rather than printing nothing
    assert shop.main_build(["search", str(tmp_path / "out"), query, "--where", 'size="8"', "--json"]) == 0
    assert all(h["extra"]["size"] == "8" for h in json.loads(capsys.readouterr().out))
    assert shop.main_build(["search", str(tmp_path / "out"), query, "--where", "size=eight"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and "no item matches size=eight (values compare exactly" in said.err


def test_prices_written_with_thousands_separators_filter_as_numbers():
    rows = shop._typed_columns(
        [{"price": "1,299.00", "stock": "1,000"}, {"price": "49.5", "stock": "7"}, {"price": ""}]
    )
    assert [r.get("price") for r in rows] == [1299.0, 49.5, ""] and [r.get("stock") for r in rows[:2]] == [1000, 7]
    assert isinstance(rows[0]["stock"], int)
    # a decimal comma (12,50) or a misplaced separator is not read as thousands: the column stays text, with a note
    odd = [{"price": "12,50"}, {"price": "3"}, {"price": "4"}, {"price": "1,2345"}, {"price": "8"}]
    assert [r["price"] for r in shop._typed_columns(odd)] == ["12,50", "3", "4", "1,2345", "8"]
    assert "'price' stays text: 2 of 5 values" in shop.mostly_numeric_text_columns(odd)[0]


def test_catalogs_that_cannot_make_a_shop_are_refused_before_reading_images(small_shop, tmp_path):
    one = tmp_path / "one" / "Shoes"
    one.mkdir(parents=True)
    for n in range(3):
        (one / f"{n}.jpg").write_bytes(b"not read yet")  # a guard after streaming would report these
    with pytest.raises(FashsimError, match="at least two"):
        shop.build_shop_collection(tmp_path / "one", tmp_path / "out", **FAST)
    small = catalogs.open_catalog(small_shop).subset(range(40))
    with pytest.raises(FashsimError, match="'ivfpq' index needs at least 256 items"):
        shop.build_shop_collection(small, tmp_path / "out", kind="ivfpq", **FAST)
    with pytest.raises(FashsimError, match="holds no shop build"):
        shop.open_shop(tmp_path / "nothing")
    csv_path = tmp_path / "loose.csv"
    csv_path.write_text("path,name,articleType\na.jpg,Shirt, slim fit,Shirts\nb.jpg,Dress,Dresses\n")
    with pytest.warns(UserWarning, match=r"1 rows have more fields than the header \(lines 2\).*'articleType'"):
        loose = catalogs.load_csv_catalog(csv_path, check_files=False)
    assert loose.categories() == ["slim fit,Shirts", "Dresses"]  # what the repair did, said out loud
    # a catalog that fails to load keeps what the loader noticed on the way in its message
    (tmp_path / "latin.csv").write_bytes("path;Kategorie\r\nrobe.jpg;Robe d'été\r\n".encode("cp1252"))
    with pytest.raises(FashsimError, match=r"(?s)no category column.*note: .*read as Windows-1252"):
        shop.build_shop_collection(tmp_path / "latin.csv", tmp_path / "out", **FAST)


def test_a_shop_collection_is_served_with_its_own_model(kaggle_build):
    from fashsim.app import webapp

    collection, model = webapp.resolve(kaggle_build.collection_dir)
    assert model == kaggle_build.model_path.resolve()
    # the build's own folder (what `shop search` takes) serves the same collection and model
    assert webapp.resolve(kaggle_build.out_dir) == (collection, model)


def test_the_demo_crops_a_random_catalog_photo_of_the_models_own_size(tmp_path):
    """A catalog photo already at the model's 32 px is prepared as the build prepared it for the
    index (cropped to its product), not taken as the model's input as it is."""
    from fashsim.app.demo import SearchApp, load_source_image

    root = tmp_path / "shop32"
    colour_shop.generate_colour_shop(
        root, size=40, image_size=32, colours=["Red"], patterns=["Solid"], workers=1, progress=False
    )
    build = shop.build_shop_collection(
        root, tmp_path / "out", train_seconds=1.0, max_epochs=1, workers=1, progress=False
    )
    app = SearchApp(build.searcher(), k=3, seed=0)
    hits = app.search_random()
    assert len(hits) == 3 and app.last_query.shape == (32, 32, 3)
    shown = int(re.search(r"catalog item (\d+)", app.status.value).group(1))
    photo = load_source_image(next(r["source"] for r in build.records if r["id"] == shown))
    assert photo.shape == (32, 32, 3)
    assert np.array_equal(app.last_query, app.searcher.prepare(photo))
    assert not np.array_equal(app.last_query, photo)


# ------------------------------------------------------------------ evaluation
def test_shop_metrics_and_split():
    records = [{"articleType": t, "baseColour": c, "pattern": "Solid"} for t in "AB" for c in "xy" for _ in range(3)]
    style = shop_eval.style_labels(records, ["articleType", "baseColour"])
    perfect = np.eye(4, dtype=np.float32)[style] + 0.01 * np.random.default_rng(0).normal(size=(12, 4))
    scores = shop_eval.shop_metrics(perfect, records, ["articleType", "baseColour"], ks=(1, 2))
    assert scores["style_recall@1"] == scores["style_map@r"] == 1.0
    assert scores["baseColour_match@2"] == 1.0 and scores["category_recall@1"] == 1.0
    # "category" is the catalog's category a build's records carry, whatever the label columns' order
    by_colour = np.eye(2, dtype=np.float32)[[int(r["baseColour"] == "y") for r in records]]
    by_colour += 0.01 * np.random.default_rng(1).normal(size=by_colour.shape)
    kinds = [{**r, "category": r["articleType"]} for r in records]
    scores = shop_eval.shop_metrics(by_colour, kinds, ["baseColour", "articleType"], ks=(1,))
    assert scores["baseColour_recall@1"] == 1.0 and scores["articleType_recall@1"] < 0.8
    assert scores["category_recall@1"] == scores["articleType_recall@1"]
    parts = shop_eval.shop_split(
        records * 2,
        ["articleType", "baseColour"],
        test_fraction=0.25,
        open_set=[{"articleType": "B", "baseColour": "y"}, {"fabric": "silk"}],
    )
    assert len(parts["unseen"]) == 6 and all(records[i % 12]["articleType"] == "B" for i in parts["unseen"])
    assert len(np.intersect1d(parts["train"], parts["test"])) == 0
    assert len(parts["train"]) + len(parts["test"]) + len(parts["unseen"]) == 24
    for fraction in (0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.9):  # the fewest items a style needs to lend one
        smallest = shop_eval.smallest_style_held_out(fraction)
        assert shop_eval.held_out_count(fraction, smallest) == 1
        assert shop_eval.held_out_count(fraction, smallest - 1) == 0
        single = [{"articleType": "A"}] * smallest
        assert len(shop_eval.shop_split(single, ["articleType"], test_fraction=fraction)["test"]) == 1
    hist = shop_eval.colour_histogram(np.full((2, 4, 4, 3), 255, np.uint8))
    assert hist.shape == (2, 512) and np.allclose(hist[:, -1], 1.0)


def test_evaluate_shop_compares_with_baselines(kaggle_build, tmp_path):
    build = kaggle_build
    parts = shop_eval.shop_split(
        build.records,
        build.label_columns,
        test_fraction=0.5,
        open_set=[{"articleType": "Dresses", "pattern": "Striped"}],
    )
    paths = [r["source"] for r in build.records]
    report = shop_eval.evaluate_shop(
        build.embeddings,
        build.records,
        paths,
        parts,
        build.label_columns,
        baselines=("colour_histogram", "raw_pixels", "greyscale_fashion_mnist"),
        greyscale_model=tmp_path / "absent.pt",
        workers=1,
    )
    assert set(report["methods"]) == {"trained", "colour_histogram", "raw_pixels"}
    assert "greyscale_fashion_mnist skipped" in report["notes"][0]
    assert 0 <= report["methods"]["raw_pixels"]["test"]["style_recall@1"] <= 1
    assert "open_set" in report["methods"]["trained"]
    rows = shop_eval.comparison_rows(report)
    assert rows[0]["method"] == "trained" and "baseColour_match@5" in rows[0]
    json.dumps(report)  # JSON-able


def test_a_build_with_a_hold_out_is_measured_on_the_items_it_never_learnt(small_shop, kaggle_build, tmp_path, capsys):
    """``build --hold-out`` keeps a share of every style out of training; ``evaluate`` measures on
    exactly those, from the vectors in the saved collection (the same numbers as the build's own)."""
    out = tmp_path / "measured"
    built = shop.build_shop_collection(small_shop, out, **FAST, hold_out=0.25)
    summary = json.loads((out / shop.BUILD_FILE).read_text())
    held = set(summary["held_out_ids"])
    assert len(held) == 60 and summary["trained_on"] == 180  # a quarter of each of the 60 four-item styles
    assert collections.Counter(r["style"] for r in built.records if r["id"] in held) == {
        style: 1 for style in {r["style"] for r in built.records}
    }
    code = shop.main_build(["evaluate", str(out), "--baselines", "colour_histogram", "--workers", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "60 held-out items" in printed and "| colour_histogram |" in printed
    # one held-out item per style: no style pairs among them, and the output says why, not just "None"
    assert "note: no held-out item has another item of its style" in printed
    assert "with --hold-out 0.25 a style needs 6 items or more" in printed
    report = json.loads((out / shop.EVALUATION_FILE).read_text())
    assert report["sizes"]["test"] == 60 and set(report["methods"]) == {"trained", "colour_histogram"}
    test = np.asarray([n for n, r in enumerate(built.records) if r["id"] in held])
    direct = shop_eval.shop_metrics(built.embeddings[test], [built.records[i] for i in test], built.label_columns)
    for key in ("style_recall@1", "style_map@r", "baseColour_match@5", "category_recall@1"):
        assert report["methods"]["trained"]["test"][key] == pytest.approx(direct[key], abs=1e-6)
    assert report["methods"]["colour_histogram"]["test"]["baseColour_match@5"] > 0.9  # colour is what it sees

    with pytest.raises(FashsimError, match="--hold-out 0.2"):  # trained on everything: nothing to measure
        shop.evaluate_shop_build(kaggle_build.out_dir)
    assert shop.main_build(["evaluate", str(tmp_path / "absent")]) == 1
    with pytest.raises(ValueError, match="hold_out"):
        shop.build_shop_collection(small_shop, tmp_path / "bad", **FAST, hold_out=1.0)


def test_baselines_refuse_images_that_are_gone(tmp_path):
    with pytest.raises(FashsimError, match="(?s)can no longer be read.*gone.jpg: no such file"):
        shop_eval.baseline_embeddings("raw_pixels", [tmp_path / "gone.jpg"], workers=0)


def test_greyscale_and_frozen_baselines_embed_catalog_photos(small_shop, tmp_path):
    from fashsim.model.networks import EmbeddingNet
    from fashsim.model.persistence import save_model

    paths = sorted((small_shop / "images").glob("*.jpg"))[:12]
    save_model(EmbeddingNet("small_cnn").eval(), tmp_path / "greyscale.pt")
    grey = shop_eval.baseline_embeddings(
        "greyscale_fashion_mnist", paths, greyscale_model=tmp_path / "greyscale.pt", workers=0
    )
    assert grey.shape == (12, 128) and np.allclose(np.linalg.norm(grey, axis=1), 1, atol=1e-4)
    frozen = shop_eval.baseline_embeddings("frozen_imagenet", paths, image_size=64, workers=0)
    assert frozen.shape == (12, 1280) and np.isfinite(frozen).all()
    with pytest.raises(ValueError, match="unknown baseline"):
        shop_eval.baseline_embeddings("sift", paths)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures other processes through /proc/stat")
def test_training_threads_follow_other_processes_not_this_ones_own_work():
    """One torch thread while other processes keep the cores busy, every core otherwise — and this
    process's own work (generating and reading the catalog just before training) is not "busy"."""
    from fashsim.app import shop_train

    cores = os.cpu_count() or 1
    spin = threading.Event()
    worker = threading.Thread(target=lambda: [None for _ in iter(spin.is_set, True)])  # this process, busy
    worker.start()
    try:
        assert shop_train.busy_cores() < 0.5  # its own CPU time is not counted
    finally:
        spin.set()
        worker.join()
    assert shop_train.auto_threads() == cores
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(cores)  # other processes
    ]
    try:
        time.sleep(0.3)
        assert shop_train.busy_cores() >= cores - 0.5
        assert shop_train.auto_threads() == 1
    finally:
        for process in spinners:
            process.kill()
            process.wait()
