"""Pieces shared by the token and image loaders: the error type, seeds, atomic writes."""

from __future__ import annotations

import hashlib
import operator
import os
import secrets
from pathlib import Path
from typing import SupportsIndex

SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad data input: a missing path, an empty corpus, a corrupt file, a too-short split.

    Every loader in :mod:`gluon_optim.lab.data` raises this (and only this) for problems with
    the data the caller pointed it at, with a message that names the path or split and says
    what is wrong, so the command line can print it without a traceback. It subclasses
    :class:`ValueError` so generic ``except ValueError`` handlers still catch it.
    """


def as_int(name: str, value: object, minimum: int | None) -> int:
    """``value`` as an int >= ``minimum`` (if given), else :class:`DataError`; bools rejected."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise DataError(f"{name} must be an integer, got {value!r}")
    out = operator.index(value)
    if minimum is not None and out < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_split(split: str) -> None:
    """Raise :class:`DataError` unless ``split`` is ``"train"`` or ``"val"``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def derive_seed(*parts: object) -> int:
    """A 63-bit generator seed that is a pure function of ``parts``.

    Uses a cryptographic hash of the parts' ``repr`` rather than Python's ``hash`` (which is
    salted per process for strings), so the same ``(seed, split, step)`` gives the same seed in
    every process, on every machine, before and after a resume.
    """
    text = "\x1f".join(repr(p) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def default_cache_dir() -> Path:
    """``$GLUON_OPTIM_CACHE`` if set and non-empty, else ``~/.cache/gluon-optim``."""
    env = os.environ.get("GLUON_OPTIM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gluon-optim"


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same directory, are flushed and fsync'ed, and the
    file is then renamed over ``path`` with :func:`os.replace` (atomic on POSIX and Windows).
    A crash leaves at most a stray ``.tmp-*`` file, never a truncated ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    # os.open with mode 0o666 honours the umask (mkstemp would force 0o600 on the result).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by fsync'ing its directory (POSIX only; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
