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


# ----------------------------------------------------------------------------- issue 11: hostile data files


def _npz_with_header(path, name, real, claimed, **others):
    """A .npz whose array ``name`` holds ``real`` but whose header claims shape ``claimed``."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for key, arr in {**others, name: real}.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            raw = buf.getvalue()
            if key == name:
                body = raw[10 + struct.unpack("<H", raw[8:10])[0]:]
                header = repr({"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": claimed})
                header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
                raw = raw[:8] + struct.pack("<H", len(header)) + header.encode("latin1") + body
            z.writestr(f"{key}.npy", raw)
    return path


def test_npz_header_claiming_10_to_the_13_labels_is_refused_unread(tmp_path):
    from collafuse.data import load_npz

    images = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    path = _npz_with_header(tmp_path / "d.npz", "labels", np.zeros(8, np.int64), (10**13,), images=images)
    with pytest.raises(DataError, match="'labels' of shape \\(10000000000000,\\) would take"):
        load_npz(path, 1, 8)
    path = _npz_with_header(tmp_path / "e.npz", "images", images, (8000, 8, 8))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_npz(path, 1, 8)


def test_npz_of_pickled_objects_or_not_an_npz_is_refused(tmp_path):
    from collafuse.data import load_npz

    np.savez(tmp_path / "p.npz", images=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(DataError, match="pickled Python objects"):
        load_npz(tmp_path / "p.npz", 1, 8)
    np.save(tmp_path / "plain.npy", np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "plain.npy", 1, 8)
    np.savez(tmp_path / "c.npz", images=np.zeros((4, 8, 8), complex))
    with pytest.raises(DataError, match="numeric"):
        load_npz(tmp_path / "c.npz", 1, 8)
    np.savez(tmp_path / "l.npz", images=np.zeros((4, 8, 8)), labels=np.array([0, 1, 2, 10**12]))
    with pytest.raises(DataError, match="at most 10000 classes"):
        load_npz(tmp_path / "l.npz", 1, 8)


def test_channel_first_npz_loads_like_channel_last(tmp_path):
    """DESIGN §9: (N, C, H, W), the PyTorch habit, is detected (second axis 1 or 3, last axis not) and loads."""
    from collafuse.data import load_npz, looks_channel_first

    rng = np.random.default_rng(0)
    for channels, dtype in ((1, np.float32), (3, np.uint8)):
        last = (rng.random((10, 16, 16, channels)) * (255 if dtype == np.uint8 else 1)).astype(dtype)
        np.savez(tmp_path / "last.npz", images=last)
        np.savez(tmp_path / "first.npz", images=last.transpose(0, 3, 1, 2))
        a, b = load_npz(tmp_path / "last.npz", channels, 16), load_npz(tmp_path / "first.npz", channels, 16)
        assert torch.equal(a.images, b.images) and a.images.shape == (10, channels, 16, 16)
    assert looks_channel_first((10, 3, 32, 32)) and looks_channel_first((10, 1, 8, 8))
    assert not looks_channel_first((10, 32, 32, 3)) and not looks_channel_first((3, 3, 8, 3))
    assert not looks_channel_first((10, 8, 8))
    np.savez(tmp_path / "rgb.npz", images=np.zeros((10, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="3 channel\\(s\\) but the config says channels=1"):
        load_npz(tmp_path / "rgb.npz", 1, 8)
    np.savez(tmp_path / "hw3.npz", images=np.zeros((10, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="3 channel\\(s\\) but the config says channels=1"):
        load_npz(tmp_path / "hw3.npz", 1, 8)


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side, phrase", [(20000, "decompression bomb"), (10000, "decompression bomb"),
                                          (6000, "too large to load")])
def test_huge_png_is_a_data_error_without_a_warning(side, phrase, tmp_path, recwarn):
    (tmp_path / "big.png").write_bytes(_png_claiming(side, side))
    with pytest.raises(DataError, match=phrase):
        load_folder(tmp_path, 1, 8)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_truncated_png_is_a_data_error(tmp_path):
    (tmp_path / "t.png").write_bytes(_png_claiming(64, 64))
    with pytest.raises(DataError, match="not a readable image"):
        load_folder(tmp_path, 1, 8)
