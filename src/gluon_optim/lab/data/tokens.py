"""Language-model data: :class:`TokenDataset`, the stdlib byte corpus and any text file/folder."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ._common import (
    DataError,
    as_int,
    atomic_write,
    check_split,
    default_cache_dir,
    derive_seed,
)

TokenArray = npt.NDArray[Any]
"""A 1-D array of unsigned token ids (``uint8`` bytes or ``uint16`` tokens), often a memmap."""

_EVAL_SEED = 0x5EED
_SEPARATOR = b"\n"
_CACHE_FORMAT = 1
#: Directory names never descended into when collecting the standard library's sources.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class _Stream:
    """Several 1-D token arrays read as one logical stream, without concatenating them.

    Shards stay memory-mapped; a window that crosses the end of one array continues at the
    start of the next, exactly as if the arrays had been concatenated.
    """

    def __init__(self, parts: Sequence[TokenArray]) -> None:
        self.parts = [p for p in parts if p.shape[0] > 0]
        sizes = [int(p.shape[0]) for p in self.parts]
        self.starts = np.cumsum([0, *sizes], dtype=np.int64)
        self.size = int(self.starts[-1])

    def windows(self, offsets: npt.NDArray[np.int64], length: int) -> npt.NDArray[np.int64]:
        """Rows ``stream[o : o + length]`` for each offset ``o``, as an int64 array."""
        if len(self.parts) == 1:
            index = offsets[:, None] + np.arange(length, dtype=np.int64)[None, :]
            return np.asarray(self.parts[0][index], dtype=np.int64)
        out = np.empty((offsets.shape[0], length), dtype=np.int64)
        for row, start in enumerate(offsets.tolist()):
            k = int(np.searchsorted(self.starts, start, side="right")) - 1
            pos, filled = start - int(self.starts[k]), 0
            while filled < length:
                piece = self.parts[k][pos : pos + length - filled]
                out[row, filled : filled + piece.shape[0]] = piece
                filled += piece.shape[0]
                k, pos = k + 1, 0
        return out


class TokenDataset:
    """Train/validation token streams with stateless, seeded random-window batches.

    Built by :func:`stdlib_corpus`, :func:`text_corpus` or :func:`shard_corpus` (or directly
    from arrays). Each split is one logical stream of token ids, possibly made of several
    memory-mapped arrays (shards) that are never copied into one.

    :meth:`batch` is a *pure function* of ``(split, step, batch_size, block_size, seed)``: the
    window offsets come from a :class:`torch.Generator` seeded by a hash of ``(seed, split,
    step)``. There is no loader state, so a run resumed at step ``k`` sees exactly the batches an
    uninterrupted run sees, and a checkpoint needs no data-loader entry.

    Attributes:
        name: a short description of the source, e.g. ``"stdlib"`` or ``"text:/path"``.
        vocab_size: number of token ids; every id in the data must be below it.
        info: provenance (paths, file counts, cache file, byte counts) for run logs.
    """

    def __init__(
        self,
        name: str,
        vocab_size: int,
        train: Sequence[TokenArray],
        val: Sequence[TokenArray],
        *,
        info: Mapping[str, object] | None = None,
    ) -> None:
        self.name = name
        self.vocab_size = as_int("vocab_size", vocab_size, 2)
        self.info: dict[str, object] = dict(info or {})
        self._streams: dict[str, _Stream] = {}
        for split, parts in (("train", train), ("val", val)):
            for part in parts:
                if part.ndim != 1 or not np.issubdtype(part.dtype, np.integer):
                    raise DataError(
                        f"{name}: {split} arrays must be 1-D integer arrays, "
                        f"got shape {part.shape} dtype {part.dtype}"
                    )
            stream = _Stream(parts)
            if stream.size == 0:
                raise DataError(f"{name}: the {split} split is empty (0 tokens)")
            self._streams[split] = stream

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.name!r}, vocab_size={self.vocab_size}, "
            f"train={self.num_tokens('train')}, val={self.num_tokens('val')})"
        )

    def num_tokens(self, split: str) -> int:
        """Number of tokens in ``split`` (``"train"`` or ``"val"``), all shards together."""
        check_split(split)
        return self._streams[split].size

    def batch(
        self, split: str, step: int, batch_size: int, block_size: int, seed: int
    ) -> tuple[Tensor, Tensor]:
        """The batch of ``step``: ``x, y`` int64 tensors of shape ``(batch_size, block_size)``.

        ``y[:, t] = x[:, t + 1]`` shifted in the stream (next-token targets). Each row is a
        window at a uniformly random offset drawn from a generator seeded by ``(seed, split,
        step)``, so equal arguments give identical tensors in any process. Raises
        :class:`DataError` when ``split`` has fewer than ``block_size + 1`` tokens.
        """
        step = as_int("step", step, 0)
        seed = as_int("seed", seed, None)
        return self._sample(split, batch_size, block_size, derive_seed("tokens", seed, split, step))

    def eval_batches(
        self, split: str, num_batches: int, batch_size: int, block_size: int
    ) -> list[tuple[Tensor, Tensor]]:
        """A fixed list of ``num_batches`` batches of ``split`` for measuring validation loss.

        The windows come from a fixed seed independent of the training seed, so every run (and
        every resume) evaluates on exactly the same tokens and losses are comparable.
        """
        num_batches = as_int("num_batches", num_batches, 0)
        return [
            self._sample(split, batch_size, block_size, derive_seed("eval", _EVAL_SEED, split, i))
            for i in range(num_batches)
        ]

    def _sample(
        self, split: str, batch_size: int, block_size: int, generator_seed: int
    ) -> tuple[Tensor, Tensor]:
        check_split(split)
        batch_size = as_int("batch_size", batch_size, 1)
        block_size = as_int("block_size", block_size, 1)
        stream = self._streams[split]
        if stream.size < block_size + 1:
            raise DataError(
                f"{self.name}: the {split} split has {stream.size} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; use a smaller block_size or more data"
            )
        gen = torch.Generator().manual_seed(generator_seed)
        offsets = torch.randint(0, stream.size - block_size, (batch_size,), generator=gen)
        rows = stream.windows(offsets.numpy(), block_size + 1)
        top = int(rows.max())
        if top >= self.vocab_size:
            raise DataError(
                f"{self.name}: token id {top} in the {split} split is >= vocab_size "
                f"{self.vocab_size}"
            )
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _check_val_every(val_every: int) -> int:
    return as_int("val_every", val_every, 2)


def _check_max_bytes(max_bytes: int | None) -> int | None:
    return None if max_bytes is None else as_int("max_bytes", max_bytes, 1)


def _collect_stdlib(root: Path) -> list[tuple[str, int]]:
    """``(relative posix path, size)`` of every stdlib ``*.py`` file, sorted by path."""
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for fname in filenames:
            if not fname.endswith(".py"):
                continue
            full = Path(dirpath, fname)
            if full.is_file():
                found.append((full.relative_to(root).as_posix(), full.stat().st_size))
    found.sort()
    return found


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _split_by_file(
    root: Path, relpaths: Sequence[str], val_every: int, max_bytes: int | None
) -> tuple[bytes, bytes, int, int]:
    """Join files into (train, val) byte strings; file ``i`` is val iff ``i % val_every`` is last.

    With ``max_bytes`` a split stops reading once it holds that many bytes (then is cut to it).
    """
    chunks: dict[bool, list[bytes]] = {False: [], True: []}
    held = {False: 0, True: 0}
    for i, rel in enumerate(relpaths):
        is_val = i % val_every == val_every - 1
        if max_bytes is not None and held[is_val] >= max_bytes:
            if all(v >= max_bytes for v in held.values()):
                break
            continue
        data = _read_file(root / rel)
        chunks[is_val].append(data)
        held[is_val] += len(data) + len(_SEPARATOR)
    train, val = _SEPARATOR.join(chunks[False]), _SEPARATOR.join(chunks[True])
    if max_bytes is not None:
        train, val = train[:max_bytes], val[:max_bytes]
    return train, val, len(chunks[False]), len(chunks[True])


def _load_cache(cache: Path, stem: str) -> tuple[TokenArray, TokenArray, dict[str, Any]] | None:
    """The cached (train, val) memmaps and metadata, or None if absent or inconsistent."""
    meta_path = cache / f"{stem}.json"
    try:
        meta = json.loads(meta_path.read_text())
        arrays = []
        for split in ("train", "val"):
            path = cache / f"{stem}.{split}.u8"
            if meta.get("format") != _CACHE_FORMAT or path.stat().st_size != meta[f"{split}_bytes"]:
                return None
            arrays.append(np.memmap(path, dtype=np.uint8, mode="r"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays[0], arrays[1], meta


def stdlib_corpus(
    cache_dir: str | Path | None = None, *, max_bytes: int | None = None, val_every: int = 10
) -> TokenDataset:
    """The running Python's standard-library sources as a byte-level corpus (vocabulary 256).

    Always available offline, identical on every machine with the same Python version, and real
    code: a good default for language-model experiments that must not download anything.

    Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, recursively, skipping the
    directories in :data:`STDLIB_EXCLUDED_DIRS` (``site-packages``/``dist-packages``, which are
    third-party, and the ``test``/``tests``/``idle_test`` suites, which are large, repetitive and
    full of deliberately malformed sources). They are sorted by relative path; file ``i`` goes to
    validation when ``i % val_every == val_every - 1`` (every ``val_every``-th file), the rest to
    training, so no file is split across the two. Files are joined with a ``b"\\n"`` byte.

    The two byte arrays are cached in ``cache_dir`` (default ``$GLUON_OPTIM_CACHE`` or
    ``~/.cache/gluon-optim``) under a key made of the Python version and a hash of the file
    list, sizes, ``val_every`` and ``max_bytes``; files are written atomically and later loads
    memory-map them. If the cache cannot be written the corpus is used from memory, with a
    :class:`RuntimeWarning`.

    Args:
        cache_dir: where to keep the cache files.
        max_bytes: cut each split to its first ``max_bytes`` bytes, reading only the files
            needed (tests and tiny demos).
        val_every: every ``val_every``-th file is a validation file (>= 2).
    """
    val_every = _check_val_every(val_every)
    max_bytes = _check_max_bytes(max_bytes)
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"standard library directory {root} does not exist")
    files = _collect_stdlib(root)
    if not files:
        raise DataError(f"no *.py files found under the standard library directory {root}")
    version = sys.implementation.name + ".".join(str(v) for v in sys.version_info[:3])
    key = json.dumps(
        [_CACHE_FORMAT, sys.version, str(root), val_every, max_bytes, files], separators=(",", ":")
    )
    stem = f"stdlib-{version}-{derive_seed(key):016x}"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    info: dict[str, object] = {"root": str(root), "files": len(files), "val_every": val_every}
    info["max_bytes"] = max_bytes

    loaded = _load_cache(cache, stem)
    if loaded is not None:
        train, val, meta = loaded
        info.update(train_files=meta["train_files"], val_files=meta["val_files"])
        info.update(cache=str(cache / stem), cached=True)
    else:
        train_b, val_b, n_train, n_val = _split_by_file(
            root, [rel for rel, _ in files], val_every, max_bytes
        )
        if not train_b or not val_b:
            raise DataError(
                f"the standard library under {root} gave an empty split "
                f"({len(train_b)} train bytes, {len(val_b)} val bytes, {len(files)} files)"
            )
        info.update(train_files=n_train, val_files=n_val, cached=False)
        new_meta: dict[str, object] = {"format": _CACHE_FORMAT, "python": sys.version}
        new_meta.update(root=str(root), train_files=n_train, val_files=n_val)
        new_meta.update(train_bytes=len(train_b), val_bytes=len(val_b))
        try:
            atomic_write(cache / f"{stem}.train.u8", train_b)
            atomic_write(cache / f"{stem}.val.u8", val_b)
            atomic_write(cache / f"{stem}.json", json.dumps(new_meta, indent=1).encode())
            info["cache"] = str(cache / stem)
        except OSError as e:
            warnings.warn(
                f"could not write the stdlib corpus cache in {cache} ({e}); using it from memory",
                RuntimeWarning,
                stacklevel=2,
            )
        cached = _load_cache(cache, stem) if "cache" in info else None
        if cached is not None:
            train, val = cached[0], cached[1]
        else:
            train = np.frombuffer(train_b, dtype=np.uint8)
            val = np.frombuffer(val_b, dtype=np.uint8)
    info.update(train_bytes=int(train.shape[0]), val_bytes=int(val.shape[0]))
    return TokenDataset("stdlib", 256, [train], [val], info=info)


def _visible_files(folder: Path) -> list[Path]:
    """Regular files under ``folder``, recursively, skipping hidden names; sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, f)
            for f in filenames
            if not f.startswith(".") and Path(dirpath, f).is_file()
        )
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    return found


def text_corpus(path: str | Path, *, val_every: int = 10) -> TokenDataset:
    """Any text (or binary) file or folder as a byte-level corpus (vocabulary 256).

    Bytes are used as-is, so no encoding is assumed and nothing is lost.

    * A single file is memory-mapped and split by position: the last ``size // val_every``
      bytes are validation, the rest training.
    * A folder contributes all its regular files, recursively, skipping hidden files and
      folders (names starting with ``"."``, e.g. ``.git``), sorted by relative path; it is split
      by file like :func:`stdlib_corpus` (file ``i`` is validation when
      ``i % val_every == val_every - 1``) and files are joined with ``b"\\n"``. A folder needs
      at least ``val_every`` files.

    Raises :class:`DataError` for a missing path, an empty file or folder, or a split that
    would be empty.
    """
    val_every = _check_val_every(val_every)
    p = Path(path).expanduser()
    name = f"text:{p}"
    if not p.exists():
        raise DataError(f"text corpus {p}: no such file or directory")
    if p.is_file():
        size = p.stat().st_size
        if size == 0:
            raise DataError(f"text corpus {p}: the file is empty (0 bytes)")
        n_val = size // val_every
        if n_val == 0:
            raise DataError(
                f"text corpus {p}: {size} bytes is too small to split off 1/{val_every} "
                f"for validation"
            )
        data = np.memmap(p, dtype=np.uint8, mode="r")
        info = {"path": str(p), "files": 1, "train_bytes": size - n_val, "val_bytes": n_val}
        return TokenDataset(name, 256, [data[: size - n_val]], [data[size - n_val :]], info=info)
    if not p.is_dir():
        raise DataError(f"text corpus {p}: not a regular file or a directory")
    files = _visible_files(p)
    if not files:
        raise DataError(f"text corpus {p}: the folder contains no files")
    if len(files) < val_every:
        raise DataError(
            f"text corpus {p}: {len(files)} files, fewer than val_every={val_every}, so no file "
            f"would go to validation; pass a smaller val_every or a single file"
        )
    rel = [f.relative_to(p).as_posix() for f in files]
    train_b, val_b, n_train, n_val = _split_by_file(p, rel, val_every, None)
    for split, blob in (("train", train_b), ("val", val_b)):
        if not blob.strip(_SEPARATOR):
            raise DataError(f"text corpus {p}: the {split} files are all empty")
    info = {"path": str(p), "files": len(files), "train_files": n_train, "val_files": n_val}
    info.update(train_bytes=len(train_b), val_bytes=len(val_b))
    train = np.frombuffer(train_b, dtype=np.uint8)
    val = np.frombuffer(val_b, dtype=np.uint8)
    return TokenDataset(name, 256, [train], [val], info=info)
