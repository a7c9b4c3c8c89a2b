"""nanoGPT / modded-nanogpt ``.bin`` token shards: reading (memory-mapped) and writing.

Format (llm.c / modded-nanogpt, "version 1" = GPT-2 tokens): a header of 256 little-endian
int32 values, ``header[0] = 20240520`` (magic), ``header[1] = 1`` (version), ``header[2]`` =
number of tokens ``n``; then exactly ``n`` little-endian uint16 token ids. The file size is
therefore ``1024 + 2 * n`` bytes.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._common import DataError, as_int, atomic_write
from .tokens import TokenArray, TokenDataset

SHARD_MAGIC = 20240520
"""``header[0]`` of every shard."""
SHARD_VERSION = 1
"""``header[1]``: version 1 stores uint16 tokens (version 2, uint32 Llama-3 tokens, is not read)."""
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_MAX_TOKENS = 2**31 - 1


def write_shard(path: str | Path, tokens: npt.NDArray[np.integer] | Sequence[int]) -> None:
    """Write ``tokens`` as one ``.bin`` shard (the format in this module's docstring).

    Token ids must be integers in ``[0, 65535]`` and there may be at most ``2**31 - 1`` of them
    (the header stores the count as int32). The file is written atomically (temp file, fsync,
    rename), so a reader never sees a half-written shard. Used by the tests and to turn any
    tokenized corpus into data :func:`shard_corpus` can stream.
    """
    p = Path(path).expanduser()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"write_shard {p}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"write_shard {p}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size > _MAX_TOKENS:
        raise DataError(f"write_shard {p}: {arr.size} tokens exceed the int32 header limit")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise DataError(
            f"write_shard {p}: token ids must be in [0, 65535], "
            f"got range [{int(arr.min())}, {int(arr.max())}]"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    body = arr.astype("<u2", copy=False)
    atomic_write(p, header.tobytes() + body.tobytes())


def read_shard(path: str | Path) -> TokenArray:
    """Validate one shard's header and size and return its tokens as a read-only memmap.

    Raises :class:`DataError` naming the file for a missing file, a file shorter than the
    header, a wrong magic number or version (saying what was found), or a token count that
    disagrees with the file size (saying both).
    """
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"shard {p}: no such file") from None
    except OSError as e:
        raise DataError(f"shard {p}: cannot read ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(
            f"shard {p}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
            f"not a nanoGPT .bin shard"
        )
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise DataError(
            f"shard {p}: bad magic number {magic} in header[0], expected {SHARD_MAGIC}; "
            f"not a nanoGPT .bin shard"
        )
    if version != SHARD_VERSION:
        raise DataError(
            f"shard {p}: unsupported version {version} in header[1], expected {SHARD_VERSION} "
            f"(uint16 tokens)"
        )
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(
            f"shard {p}: header says {count} tokens, i.e. a file of {expected} bytes, "
            f"but the file has {size} bytes ({(size - HEADER_BYTES) / 2:g} tokens)"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(p, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def _expand(pattern: str, what: str) -> list[Path]:
    """The sorted files a glob (or a plain path, or a folder of ``*.bin``) names."""
    pattern = str(Path(pattern).expanduser()) if pattern.startswith("~") else pattern
    if not glob.has_magic(pattern):
        p = Path(pattern)
        if p.is_dir():
            found = sorted(p.glob("*.bin"))
            if not found:
                raise DataError(f"{what} shards: folder {p} contains no *.bin files")
            return found
        if not p.exists():
            raise DataError(f"{what} shards: {p}: no such file")
        return [p]
    found = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
    if not found:
        raise DataError(f"{what} shards: the pattern {pattern!r} matches no files")
    return found


def shard_corpus(train: str, val: str, *, vocab_size: int = 50304) -> TokenDataset:
    """Train/val token streams from nanoGPT / modded-nanogpt ``.bin`` shards.

    ``train`` and ``val`` are glob patterns (``**`` allowed), single files, or folders (meaning
    their ``*.bin`` files). Matching shards are sorted by path and read as one logical stream
    per split: each shard is validated (:func:`read_shard`) and memory-mapped, never copied, so
    corpora larger than memory work. ``vocab_size`` defaults to GPT-2's 50257 padded to 50304
    (as in modded-nanogpt); batches containing an id >= ``vocab_size`` raise :class:`DataError`.
    """
    vocab_size = as_int("vocab_size", vocab_size, 2)
    parts: dict[str, list[TokenArray]] = {}
    files: dict[str, list[str]] = {}
    for split, pattern in (("train", train), ("val", val)):
        paths = _expand(pattern, split)
        parts[split] = [read_shard(p) for p in paths]
        files[split] = [str(p) for p in paths]
        if sum(a.shape[0] for a in parts[split]) == 0:
            raise DataError(f"{split} shards {pattern!r}: all {len(paths)} shard(s) hold 0 tokens")
    info: dict[str, object] = {"train_shards": files["train"], "val_shards": files["val"]}
    info.update(
        train_tokens=sum(int(a.shape[0]) for a in parts["train"]),
        val_tokens=sum(int(a.shape[0]) for a in parts["val"]),
    )
    return TokenDataset(
        f"shards:{train},{val}", vocab_size, parts["train"], parts["val"], info=info
    )
