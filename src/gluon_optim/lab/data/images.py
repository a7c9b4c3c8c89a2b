"""Image classification data: :class:`ImageDataset`, scikit-learn's digits and CIFAR-10."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ._common import DataError, as_int, check_split, derive_seed

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
"""The five CIFAR-10 training batches of the python-pickle layout (10000 images each)."""
CIFAR_VAL_FILE = "test_batch"
"""The CIFAR-10 test batch, used as the validation split."""
CIFAR_CLASSES = 10


class ImageDataset:
    """Normalized train/val image tensors held in memory, with stateless seeded batches.

    :meth:`batch` is a pure function of its arguments: with a batch size, each epoch is a
    permutation of the split drawn from a generator seeded by ``(seed, split, epoch)`` and
    ``step`` picks the position in it (the last incomplete batch of an epoch is dropped, so
    every batch has exactly ``batch_size`` examples); without one it returns the whole split
    (full-batch training). A resumed run therefore sees the same batches with no loader state.

    Returned tensors may share memory with the dataset: do not modify them in place.

    Attributes:
        name: ``"digits"`` or ``"cifar10:/path"``.
        num_classes: labels are in ``[0, num_classes)``.
        in_channels: ``C`` of the ``(N, C, H, W)`` images.
        image_size: ``H == W``.
        info: provenance and the normalization constants, for run logs.
    """

    def __init__(
        self,
        name: str,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        num_classes: int,
        *,
        info: Mapping[str, object] | None = None,
    ) -> None:
        self.name = name
        self.num_classes = as_int("num_classes", num_classes, 1)
        self.info: dict[str, object] = dict(info or {})
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        shapes = set()
        for split, (x, y) in (("train", train), ("val", val)):
            if x.dim() != 4 or x.dtype != torch.float32 or x.shape[2] != x.shape[3]:
                raise DataError(
                    f"{name}: {split} images must be float32 (N, C, H, H), got "
                    f"{x.dtype} {tuple(x.shape)}"
                )
            if y.dim() != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"{name}: {split} labels must be int64 of shape ({x.shape[0]},), got "
                    f"{y.dtype} {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise DataError(f"{name}: the {split} split is empty (0 examples)")
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DataError(
                    f"{name}: {split} labels span [{int(y.min())}, {int(y.max())}], outside "
                    f"[0, {self.num_classes})"
                )
            shapes.add(tuple(x.shape[1:]))
            self._data[split] = (x, y)
        if len(shapes) != 1:
            raise DataError(f"{name}: train and val image shapes differ: {sorted(shapes)}")
        self.in_channels = int(train[0].shape[1])
        self.image_size = int(train[0].shape[2])
        self._perm_key: tuple[str, int, int] | None = None
        self._perm = torch.empty(0, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, train={self.num_examples('train')}, "
            f"val={self.num_examples('val')}, classes={self.num_classes}, "
            f"shape=({self.in_channels}, {self.image_size}, {self.image_size}))"
        )

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` (``"train"`` or ``"val"``)."""
        check_split(split)
        return int(self._data[split][1].shape[0])

    def batch(
        self, split: str, step: int, batch_size: int | None, seed: int
    ) -> tuple[Tensor, Tensor]:
        """Images ``(B, C, H, W)`` float32 and labels ``(B,)`` int64 for ``step``.

        ``batch_size`` None or <= 0: the whole split in its fixed order (full-batch training;
        ``step`` and ``seed`` are ignored). Otherwise epoch ``step // (N // batch_size)`` is a
        seeded permutation and the batch is its ``step % (N // batch_size)``-th slice; a
        ``batch_size`` larger than the split raises :class:`DataError`.
        """
        check_split(split)
        x, y = self._data[split]
        bs = None if batch_size is None else as_int("batch_size", batch_size, None)
        if bs is None or bs <= 0:
            return x, y
        step = as_int("step", step, 0)
        seed = as_int("seed", seed, None)
        n = int(y.shape[0])
        per_epoch = n // bs
        if per_epoch == 0:
            raise DataError(
                f"{self.name}: batch_size {bs} exceeds the {n} examples of the {split} "
                f"split; use batch_size 0 (or None) for full-batch training"
            )
        epoch, pos = divmod(step, per_epoch)
        key = (split, seed, epoch)
        if self._perm_key != key:
            gen = torch.Generator().manual_seed(derive_seed("images", seed, split, epoch))
            self._perm, self._perm_key = torch.randperm(n, generator=gen), key
        idx = self._perm[pos * bs : (pos + 1) * bs]
        return x[idx], y[idx]

    def eval_batches(self, split: str, batch_size: int | None) -> list[tuple[Tensor, Tensor]]:
        """The whole split in its fixed order, in chunks of ``batch_size`` (the last may be
        smaller); one chunk when ``batch_size`` is None or <= 0. Every example appears once."""
        check_split(split)
        x, y = self._data[split]
        bs = None if batch_size is None else as_int("batch_size", batch_size, None)
        if bs is None or bs <= 0:
            return [(x, y)]
        return [(x[i : i + bs], y[i : i + bs]) for i in range(0, int(y.shape[0]), bs)]


def _normalize(
    train: npt.NDArray[np.float32], val: npt.NDArray[np.float32]
) -> tuple[Tensor, Tensor, list[float], list[float]]:
    """Standardize both splits per channel with the TRAIN mean/std (no val statistics leak)."""
    mean = train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = train.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    shape = (1, -1, 1, 1)
    m32, s32 = mean.astype(np.float32).reshape(shape), std.astype(np.float32).reshape(shape)
    tr = torch.from_numpy(np.ascontiguousarray((train - m32) / s32, dtype=np.float32))
    va = torch.from_numpy(np.ascontiguousarray((val - m32) / s32, dtype=np.float32))
    return tr, va, [float(v) for v in mean], [float(v) for v in std]


def digits(*, val_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled handwritten digits: 1797 grayscale 8x8 images, 10 classes.

    Ships inside scikit-learn, so it is always available offline; small enough for full-batch
    training on a laptop CPU in seconds. Pixels (0..16) are divided by 16, then standardized
    with the training split's mean and std. The split is stratified and deterministic
    (``sklearn.model_selection.train_test_split`` with ``random_state=seed``), with
    ``val_fraction`` of the examples in validation.
    """
    try:
        frac = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}") from None
    if not 0.0 < frac < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    seed = as_int("seed", seed, 0)
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(f"digits() needs scikit-learn (pip install 'gluon-optim[lab]'): {e}") from e
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    try:
        tr, va = train_test_split(
            np.arange(labels.shape[0]), test_size=frac, random_state=seed, stratify=labels
        )
    except ValueError as e:
        raise DataError(f"digits: cannot split with val_fraction={val_fraction}: {e}") from None
    x_tr, x_va, mean, std = _normalize(images[tr], images[va])
    info = {"val_fraction": frac, "seed": seed, "mean": mean, "std": std}
    train = (x_tr, torch.from_numpy(labels[tr]))
    val = (x_va, torch.from_numpy(labels[va]))
    return ImageDataset("digits", train, val, 10, info=info)


_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads only numpy arrays, dtypes and plain containers: a CIFAR batch, never code.

    A pickle can name any callable; this one refuses everything but the handful of numpy
    reconstructors a CIFAR-10 batch uses (``numpy.core`` names from numpy 1.x pickles are
    resolved to ``numpy._core`` on numpy 2), so a crafted file cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        plain = module.replace("numpy._core", "numpy.core", 1)
        if (plain, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        candidates = [plain]
        if plain.startswith("numpy.core"):
            candidates.insert(0, plain.replace("numpy.core", "numpy._core", 1))
        for mod in candidates:
            try:
                return getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def _get(batch: dict[Any, Any], key: str) -> Any:
    """``batch[b"key"]`` (the CIFAR layout) or ``batch["key"]`` (re-pickled under Python 3)."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_cifar_batch(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """One CIFAR-10 batch as ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels."""
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"CIFAR-10 file {path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # any failure to unpickle means a corrupt or foreign file
        raise DataError(f"CIFAR-10 file {path}: corrupt or not a pickle ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 file {path}: expected a dict, got {type(obj).__name__}")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in obj)
        raise DataError(f"CIFAR-10 file {path}: needs keys b'data' and b'labels', has {keys}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(
            f"CIFAR-10 file {path}: b'data' must be a uint8 array (N, 3072), got "
            f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        )
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 file {path}: b'data' rows have {data.shape[1]} values, not 3072")
    try:
        lab = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"CIFAR-10 file {path}: b'labels' is not a list of integers") from None
    if lab.shape != (data.shape[0],):
        raise DataError(
            f"CIFAR-10 file {path}: {data.shape[0]} images but labels of shape {lab.shape}"
        )
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= CIFAR_CLASSES):
        raise DataError(
            f"CIFAR-10 file {path}: labels span [{int(lab.min())}, {int(lab.max())}], "
            f"outside [0, {CIFAR_CLASSES})"
        )
    return data.reshape(-1, 3, 32, 32), lab


def cifar10(path: str | Path) -> ImageDataset:
    """CIFAR-10 from a local folder in the python-pickle layout; never downloads.

    ``path`` holds ``data_batch_1`` .. ``data_batch_5`` (training, 50000 images) and
    ``test_batch`` (validation, 10000), each a pickle of a dict with ``b"data"`` (uint8,
    ``N x 3072``, channel-major RGB 32x32) and ``b"labels"`` (ints 0..9) -- the contents of
    ``cifar-10-python.tar.gz``; a folder containing ``cifar-10-batches-py/`` is accepted too.
    Pixels are scaled to [0, 1] and standardized per channel with the training mean/std.

    The pickles are read with a restricted unpickler that only rebuilds numpy arrays, so a
    tampered file cannot execute code. Missing, unreadable or malformed files raise
    :class:`DataError` naming the file.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"CIFAR-10 folder {root}: no such directory")
    if not root.is_dir():
        raise DataError(f"CIFAR-10 path {root}: not a directory")
    nested = root / "cifar-10-batches-py"
    if not (root / CIFAR_TRAIN_FILES[0]).exists() and nested.is_dir():
        root = nested
    names = (*CIFAR_TRAIN_FILES, CIFAR_VAL_FILE)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 folder {root}: missing {', '.join(missing)} (expected the python-pickle "
            f"layout: data_batch_1..data_batch_5 and test_batch)"
        )
    parts = [_read_cifar_batch(root / n) for n in CIFAR_TRAIN_FILES]
    x_tr8 = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_va8, y_va = _read_cifar_batch(root / CIFAR_VAL_FILE)
    x_tr = x_tr8.astype(np.float32) / np.float32(255.0)
    x_va = x_va8.astype(np.float32) / np.float32(255.0)
    t_tr, t_va, mean, std = _normalize(x_tr, x_va)
    del x_tr, x_va
    info = {"path": str(root), "mean": mean, "std": std}
    train = (t_tr, torch.from_numpy(y_tr))
    val = (t_va, torch.from_numpy(y_va))
    return ImageDataset(f"cifar10:{root}", train, val, CIFAR_CLASSES, info=info)
