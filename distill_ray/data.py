"""Bundled real data, read offline, with fixed seeded splits.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (70,000 28x28 grey images, 10 classes,
MIT). It is found system-wide if installed; otherwise the ``.deb`` is fetched with
``apt-get download`` (no root needed) and unpacked with ``dpkg -x`` into a user cache. Nothing is
read from a model or dataset hub.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SUBDIR = Path("usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataUnavailable(RuntimeError):
    """A bundled dataset is neither installed nor fetchable; the message says how to get it."""


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_RAY_CACHE", "~/.cache/distill-ray")).expanduser()


@dataclass(frozen=True)
class Split:
    """One split of a classification dataset. ``ids`` are stable sample ids across runs."""

    inputs: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClassificationData:
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]


def _debian_dataset_dir(package: str, subdir: Path) -> Path:
    """The package's data directory: system-wide, else unpacked from the .deb into the cache."""
    system = Path("/") / subdir
    if system.is_dir() and any(system.iterdir()):
        return system
    unpacked = cache_root() / "debs" / package
    if (unpacked / subdir).is_dir() and any((unpacked / subdir).iterdir()):
        return unpacked / subdir
    how = (f"install it with `sudo apt-get install {package}` (Debian/Ubuntu), or run "
           f"`apt-get download {package} && dpkg -x {package}_*.deb {unpacked}`")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise DataUnavailable(f"{package} is not installed and apt-get/dpkg are missing: {how}")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise DataUnavailable(f"could not fetch {package} ({got.stderr.strip().splitlines()[-1:] or 'no .deb'}); {how}")
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True)
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        if unpacked.exists():
            shutil.rmtree(unpacked)
        shutil.move(str(staging), str(unpacked))  # whole tree at once: no half-unpacked cache
    return unpacked / subdir


def _read_idx(path: Path) -> np.ndarray:
    """IDX format: big-endian magic (dtype code, ndim), then dims, then raw uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataUnavailable(f"{path} is truncated: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(n)
    return np.sort(order[:limit]) if limit is not None and limit < n else np.arange(n)


def load_fashion_mnist(val_fraction: float = 0.1, split_seed: int = 0, max_train_samples: int | None = None,
                       max_eval_samples: int | None = None) -> ClassificationData:
    """Fashion-MNIST as float32 [N, 1, 28, 28] in [0, 1] with train/val/test splits fixed by seed.

    The official 10,000-image test set is the test split; validation is a seeded slice of the
    60,000 training images. Sample ids are the image's index in its official file (test ids are
    offset by 60,000), so they stay the same whatever subset is taken.
    """
    root = _debian_dataset_dir(FASHION_MNIST_PACKAGE, FASHION_MNIST_SUBDIR)
    train_x = _read_idx(root / "train-images-idx3-ubyte.gz")
    train_y = _read_idx(root / "train-labels-idx1-ubyte.gz")
    test_x = _read_idx(root / "t10k-images-idx3-ubyte.gz")
    test_y = _read_idx(root / "t10k-labels-idx1-ubyte.gz")

    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(train_y))
    n_val = int(round(len(order) * val_fraction))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    train_idx = train_idx[_subset(len(train_idx), max_train_samples, rng)]
    val_idx = val_idx[_subset(len(val_idx), max_eval_samples, rng)]
    test_idx = _subset(len(test_y), max_eval_samples, rng)

    def split(x: np.ndarray, y: np.ndarray, idx: np.ndarray, id_offset: int) -> Split:
        images = (x[idx].astype(np.float32) / 255.0)[:, None, :, :]
        return Split(images, y[idx].astype(np.int64), (idx + id_offset).astype(np.int64))

    return ClassificationData(
        train=split(train_x, train_y, train_idx, 0),
        val=split(train_x, train_y, val_idx, 0),
        test=split(test_x, test_y, test_idx, len(train_y)),
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        input_shape=(1, 28, 28),
    )
