import numpy as np
import pytest
from PIL import Image

from fashsim.data import catalogs, splits
from fashsim.data.uploads import load_image
from fashsim.errors import DatasetFormatError, DatasetNotFoundError


def _write_png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 16), (value, value, value)).save(path)


def test_image_folder(tmp_path):
    for category, n in (("dresses", 3), ("shoes", 2)):
        for i in range(n):
            _write_png(tmp_path / category / f"{i}.png", 40 * i)
    _write_png(tmp_path / "shoes" / "nested" / "extra.png")
    (tmp_path / "shoes" / "notes.txt").write_text("not an image")
    (tmp_path / "shoes" / ".hidden.png").write_bytes(b"")
    for i in range(2):  # a phone's photos: not decodable without a plug-in, so counted and named
        (tmp_path / "dresses" / f"IMG_{i}.HEIC").write_bytes(b"heic")
    Image.new("RGB", (12, 16), (200, 10, 10)).save(tmp_path / "dresses" / "saved.jfif", format="JPEG")
    (tmp_path / "empty_category").mkdir()
    with pytest.warns(UserWarning, match=r"3 files are not images fashsim reads.*\.heic ×2, \.txt ×1"):
        catalog = catalogs.load_image_folder(tmp_path)
    assert catalog.class_names == ("dresses", "shoes")
    assert len(catalog) == 7 and any(p.suffix == ".jfif" for p in catalog.paths)
    assert np.bincount(catalog.labels).tolist() == [4, 3]
    assert catalog.categories()[0] == "dresses"
    assert load_image(catalog.paths[0]).size == (12, 16)
    sub = catalog.subset([5, 0])
    assert sub.categories() == ["shoes", "dresses"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError):
        catalogs.load_image_folder(tmp_path / "missing")
    (tmp_path / "flat.png").write_bytes(b"x")
    with pytest.raises(DatasetFormatError, match="category"):
        catalogs.load_image_folder(tmp_path)


def test_generic_csv_with_paths_and_extra_columns(tmp_path):
    _write_png(tmp_path / "img" / "a.png")
    _write_png(tmp_path / "img" / "b.png")
    (tmp_path / "catalog.csv").write_text("path,category,price\nimg/a.png,dress,10\nimg/b.png,bag,25\n")
    catalog = catalogs.load_csv_catalog(tmp_path / "catalog.csv")
    assert catalog.class_names == ("bag", "dress")
    assert catalog.categories() == ["dress", "bag"]
    assert catalog.extra[1] == {"price": "25"}
    assert catalog.paths[0] == tmp_path / "img" / "a.png"


def test_csv_saved_as_utf16_or_with_windows_paths(tmp_path):
    _write_png(tmp_path / "img" / "a.png")
    _write_png(tmp_path / "img" / "b.png")
    text = (
        "path,category,name\r\nimg\\a.png,dress,Été\r\nimg\\b.png,bag,Sac\r\n"  # Excel's "Unicode text", Windows paths
    )
    (tmp_path / "catalog.csv").write_bytes(text.encode("utf-16"))
    catalog = catalogs.load_csv_catalog(tmp_path / "catalog.csv")
    assert catalog.paths == (tmp_path / "img" / "a.png", tmp_path / "img" / "b.png")
    assert catalog.extra[0] == {"name": "Été"}


def test_a_csv_with_no_usable_rows_says_which_images_it_missed(tmp_path):
    (tmp_path / "catalog.csv").write_text("path,category\npics/a.png,dress\npics/b.png,bag\n")
    with pytest.raises(
        DatasetFormatError, match=r"no usable rows .*skipped 2 rows \(2 missing image\); missing under .*pics/a\.png"
    ):
        catalogs.load_csv_catalog(tmp_path / "catalog.csv")


def test_kaggle_fashion_product_images_layout(tmp_path):
    """styles.csv + images/<id>.jpg, including the dataset's famous unquoted-comma rows."""
    header = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    rows = [
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans",
        "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women, Silver, Watch",
        "11111,Women,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Row whose image is missing",
    ]
    (tmp_path / "styles.csv").write_text("\n".join([header, *rows]) + "\n")
    for item in ("15970", "39386", "59263"):
        _write_png(tmp_path / "images" / f"{item}.jpg")
    with pytest.warns(UserWarning) as caught:
        catalog = catalogs.load_csv_catalog(tmp_path / "styles.csv")
    said = [str(w.message) for w in caught]
    assert any("skipped 1 rows (1 missing image); missing under" in m and "11111.jpg" in m for m in said)
    assert any("1 rows have more fields than the header (lines 4)" in m for m in said)  # the watch's name
    assert len(catalog) == 3
    assert catalog.class_names == ("Jeans", "Shirts", "Watches")  # articleType by default
    watch = catalog.extra[2]
    assert watch["productDisplayName"] == "Titan Women, Silver, Watch"
    assert watch["masterCategory"] == "Accessories"
    with pytest.warns(UserWarning, match="more fields than the header"):
        by_master = catalogs.load_csv_catalog(
            tmp_path / "styles.csv", category_column="masterCategory", check_files=False
        )
    assert by_master.class_names == ("Accessories", "Apparel")


def test_csv_errors_name_the_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("file_name,colour\na.png,red\n")
    with pytest.raises(DatasetFormatError, match="columns are: file_name, colour"):
        catalogs.load_csv_catalog(tmp_path / "bad.csv")
    (tmp_path / "nopath.csv").write_text("category,colour\ndress,red\n")
    with pytest.raises(DatasetFormatError, match="path column"):
        catalogs.load_csv_catalog(tmp_path / "nopath.csv")
    with pytest.raises(DatasetNotFoundError):
        catalogs.load_csv_catalog(tmp_path / "absent.csv")


INSHOP = """8
image_name item_id evaluation_status
img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train
img/WOMEN/Dresses/id_00000002/02_2_side.jpg id_00000002 train
img/MEN/Denim/id_00000080/01_1_front.jpg id_00000080 query
img/MEN/Denim/id_00000080/01_2_side.jpg id_00000080 gallery
img/MEN/Denim/id_00000080/01_3_back.jpg id_00000080 gallery
img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg id_00000001 query
img/WOMEN/Blouses_Shirts/id_00000001/02_2_side.jpg id_00000001 gallery
img/WOMEN/Dresses/id_00000003/01_1_front.jpg id_00000003 train
"""


def test_deepfashion_inshop(tmp_path):
    (tmp_path / "list_eval_partition.txt").write_text(INSHOP)
    catalog = catalogs.load_deepfashion_inshop(tmp_path)
    assert len(catalog) == 8
    assert catalog.class_names == ("MEN/Denim", "WOMEN/Blouses_Shirts", "WOMEN/Dresses")
    assert catalog.paths[0] == tmp_path / "img/WOMEN/Dresses/id_00000002/02_1_front.jpg"
    parts = splits.inshop_split(catalog)
    assert parts["train"].tolist() == [0, 1, 7]
    assert parts["query"].tolist() == [2, 5]
    assert parts["gallery"].tolist() == [3, 4, 6]
    items = catalog.group_ids("item_id")
    assert items[2] == items[3] == items[4] and items[0] == items[1] != items[7]
    official = tmp_path / "In-shop"  # the official download: Eval/list_eval_partition.txt
    (official / "Eval").mkdir(parents=True)
    (official / "Eval" / "list_eval_partition.txt").write_text(INSHOP)
    assert (
        catalogs.load_deepfashion_inshop(official).paths[0] == official / "img/WOMEN/Dresses/id_00000002/02_1_front.jpg"
    )


def test_deepfashion_inshop_malformed(tmp_path):
    (tmp_path / "list_eval_partition.txt").write_text(INSHOP.replace("8\n", "9\n", 1))
    with pytest.raises(DatasetFormatError, match="announces 9"):
        catalogs.load_deepfashion_inshop(tmp_path)
    (tmp_path / "list_eval_partition.txt").write_text(INSHOP.replace(" query", " test", 1))
    with pytest.raises(DatasetFormatError, match="evaluation_status"):
        catalogs.load_deepfashion_inshop(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"nowhere/list_eval_partition.txt does not exist \(nor .*Eval"):
        catalogs.load_deepfashion_inshop(tmp_path / "nowhere")
