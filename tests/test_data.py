import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.data import load_folder, load_source, make_splits, partition
from collafuse.errors import DataError


def test_builtin_sources():
    digits = load_source("digits", 1, 16)
    assert digits.images.shape == (1797, 1, 16, 16) and digits.num_classes == 10
    assert float(digits.images.min()) >= -1 and float(digits.images.max()) <= 1
    mnist = load_source("mnist5k", 1, 28)
    assert mnist.images.shape == (5000, 1, 28, 28) and torch.bincount(mnist.labels).tolist() == [500] * 10
    faces = load_source("lfw", 1, 24)
    assert faces.images.shape == (100, 1, 24, 24) and faces.labels is None
    with pytest.raises(DataError, match="valid: digits"):
        load_source("cifar", 1, 16)


def test_lfw_keeps_only_faces():
    from skimage.data import lfw_subset

    faces = load_source("lfw", 1, 25)
    expected = torch.from_numpy(np.asarray(lfw_subset()[:100], dtype=np.float32)) * 2 - 1
    assert torch.allclose(faces.images[:, 0], expected, atol=1e-6)


def test_folder_with_class_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_folder(tmp_path, 1, 8)
    assert data.images.shape == (6, 1, 8, 8) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable image"):
        load_folder(tmp_path, 1, 8)


def test_splits_are_disjoint_and_sized():
    g = torch.Generator().manual_seed(0)
    m, n, a = make_splits(100, 50, 20, 10, g)
    assert (len(m), len(n), len(a)) == (50, 20, 10)
    assert len(set(m.tolist()) | set(n.tolist()) | set(a.tolist())) == 80


@pytest.mark.parametrize("scheme", ["iid", "label", "dirichlet"])
def test_partitions_cover_each_image_once(scheme):
    labels = torch.arange(300) % 10
    parts = partition(300, labels, 5, scheme, torch.Generator().manual_seed(0), dirichlet_alpha=0.3)
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(300))
    assert all(len(p) > 0 for p in parts)
    if scheme == "label":
        assert all(len(torch.unique(labels[p])) == 2 for p in parts)
    if scheme == "iid":
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_dirichlet_is_skewed_for_small_alpha():
    labels = torch.arange(2000) % 10
    parts = partition(2000, labels, 4, "dirichlet", torch.Generator().manual_seed(1), dirichlet_alpha=0.1)
    # With alpha = 0.1 most clients are dominated by few classes.
    top_share = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]
    assert np.mean(top_share) > 0.3


def test_partition_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DataError, match="more clients"):
        partition(3, None, 4, "iid", g)
    with pytest.raises(DataError, match="needs labelled data"):
        partition(30, None, 2, "label", g)
    with pytest.raises(DataError, match="cannot cover 10 classes"):
        partition(100, torch.arange(100) % 10, 2, "label", g, labels_per_client=2)
