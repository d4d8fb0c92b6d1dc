"""The Searcher facade on real Fashion-MNIST images (an untrained model is enough: an image's own
copy in the catalog is always its nearest neighbour)."""

import numpy as np
import pytest
from image_fixtures import HOSTILE_UPLOADS, encode, png, product_photo
from PIL import Image

from fashsim.data.sources import fashion_mnist_source, load_source_image
from fashsim.errors import InvalidImageError
from fashsim.model.networks import EmbeddingNet
from fashsim.model.persistence import save_model
from fashsim.search.collection import IndexMismatchError
from fashsim.search.searcher import Searcher


@pytest.fixture
def searcher(small_searcher):
    return small_searcher


def test_an_uploaded_catalog_image_finds_itself_first(searcher, fmnist_test):
    for i in (0, 17, 1999):
        hits = searcher.search(png(fmnist_test.images[i]), k=5)
        assert hits[0].id == 60000 + i and hits[0].score > hits[1].score  # its own copy (re-prepared: not identical)
        assert hits[0].source == fashion_mnist_source("test", i)
        assert hits[0].category == fmnist_test.class_names[fmnist_test.labels[i]]
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_every_input_kind(searcher, fmnist_test, tmp_path):
    image = fmnist_test.images[5]
    path = tmp_path / "q.png"
    path.write_bytes(png(image))
    for query in (path, str(path), png(image), Image.fromarray(image), image):
        assert searcher.search(query, k=1)[0].id == 60005
        embedding = searcher.embed(query)  # the query's vector, for callers that search themselves
        assert embedding.shape == (1, searcher.model.embedding_dim)
        assert np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)
        assert searcher.collection.search(embedding, 1)[0][0].id == 60005


def test_category_filter(searcher, fmnist_test):
    hits = searcher.search(png(fmnist_test.images[0]), k=20, category="Bag")
    assert len(hits) == 20 and {h.category for h in hits} == {"Bag"}


@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_uploads_raise_the_data_layer_errors(searcher, name):
    with pytest.raises(InvalidImageError):
        searcher.search(HOSTILE_UPLOADS[name])


def test_product_photo_is_seen_like_fashion_mnist(searcher):
    seen = searcher.prepare(encode(product_photo((600, 800)), "JPEG"))
    assert seen.shape == (28, 28) and seen[:, 0].max() < 30  # inverted: dark background
    assert len(searcher.search(encode(product_photo((600, 800)), "JPEG"), k=3)) == 3


def test_thumbnails_from_sources(fmnist_test, tmp_path):
    assert np.array_equal(load_source_image(fashion_mnist_source("test", 3)), fmnist_test.images[3])
    path = tmp_path / "p.png"
    path.write_bytes(encode(product_photo((40, 50)), "PNG"))
    assert load_source_image(str(path)).shape == (50, 40, 3)


def test_from_paths_refuses_an_index_of_another_model(searcher, fmnist_test, tmp_path):
    searcher.collection.save(tmp_path / "index")
    save_model(searcher.model, tmp_path / "same.pt")
    reloaded = Searcher.from_paths(tmp_path / "same.pt", tmp_path / "index")
    assert reloaded.search(png(fmnist_test.images[9]), k=1)[0].id == 60009
    save_model(EmbeddingNet("small_cnn"), tmp_path / "other.pt")
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        Searcher.from_paths(tmp_path / "other.pt", tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="64-d embeddings"):
        Searcher(EmbeddingNet("small_cnn", embedding_dim=64), searcher.collection, check_fingerprint=False)
