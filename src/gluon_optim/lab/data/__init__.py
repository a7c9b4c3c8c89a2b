"""Offline data for the lab: byte/token corpora for language models, small image sets.

Nothing here downloads anything. Sources:

* :func:`stdlib_corpus` -- the running Python's standard-library sources as bytes (the default
  text corpus: always present, deterministic, cached as memory-mapped files);
* :func:`text_corpus` -- any local file or folder, as bytes;
* :func:`shard_corpus` -- nanoGPT / modded-nanogpt ``.bin`` token shards (:func:`write_shard`
  writes them);
* :func:`digits` -- scikit-learn's bundled 8x8 digits; :func:`cifar10` -- CIFAR-10 from a local
  folder in its python-pickle layout.

Every batch is a pure function of ``(split, step, batch size, seed)``, so training resumes
bit-identically without checkpointing any loader state. Every problem with the input raises
:class:`DataError` with a message naming the file or split. :func:`load_data` turns a one-line
spec (as given on the command line) into a dataset.
"""

from __future__ import annotations

from pathlib import Path

from ._common import DataError, default_cache_dir
from .images import ImageDataset, cifar10, digits
from .shards import read_shard, shard_corpus, write_shard
from .tokens import TokenDataset, stdlib_corpus, text_corpus

__all__ = [
    "DATA_KINDS",
    "DataError",
    "ImageDataset",
    "TokenDataset",
    "cifar10",
    "default_cache_dir",
    "digits",
    "load_data",
    "read_shard",
    "shard_corpus",
    "stdlib_corpus",
    "text_corpus",
    "write_shard",
]

DATA_KINDS = {
    "stdlib": "stdlib                      the Python standard library sources, as bytes",
    "text": "text:PATH                   a text file or folder, as bytes",
    "shards": "shards:TRAIN_GLOB,VAL_GLOB  nanoGPT .bin token shards",
    "digits": "digits                      scikit-learn's 8x8 digits images",
    "cifar10": "cifar10:PATH                CIFAR-10 python-pickle folder",
}
"""The spec kinds :func:`load_data` understands, each with its syntax and a description."""


def load_data(spec: str, *, cache_dir: str | Path | None = None) -> TokenDataset | ImageDataset:
    """Build a dataset from a one-line spec, the form the command line's ``--data`` takes.

    Specs: ``stdlib``, ``text:PATH``, ``shards:TRAIN_GLOB,VAL_GLOB``, ``digits``,
    ``cifar10:PATH``. The kind is the text before the first ``:`` (so Windows paths like
    ``text:C:\\corpus`` work). ``cache_dir`` is passed to :func:`stdlib_corpus`. A malformed
    spec or an unknown kind raises :class:`DataError` listing the accepted forms.
    """
    if not isinstance(spec, str):
        raise DataError(f"data spec must be a string, got {type(spec).__name__}")
    kind, sep, arg = spec.strip().partition(":")
    forms = "; ".join(DATA_KINDS.values())
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data kind {kind!r} in spec {spec!r}; expected one of: {forms}")
    takes_arg = kind in ("text", "shards", "cifar10")
    if takes_arg and not arg:
        raise DataError(f"data spec {spec!r}: {kind} needs an argument: {DATA_KINDS[kind]}")
    if not takes_arg and sep:
        raise DataError(f"data spec {spec!r}: {kind} takes no argument: {DATA_KINDS[kind]}")
    if kind == "stdlib":
        return stdlib_corpus(cache_dir)
    if kind == "digits":
        return digits()
    if kind == "text":
        return text_corpus(arg)
    if kind == "cifar10":
        return cifar10(arg)
    train, comma, val = arg.partition(",")
    if not comma or not train or not val or "," in val:
        raise DataError(
            f"data spec {spec!r}: shards needs exactly two comma-separated globs: "
            f"{DATA_KINDS['shards']}"
        )
    return shard_corpus(train, val)
