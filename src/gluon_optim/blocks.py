"""Blocks: when one parameter holds several layers, each is an LMO unit of its own.

By default a parameter is one layer: one matrix, one LMO, one dual norm, one radius. Two kinds
of parameter hold several:

* **stacked experts**: a mixture-of-experts layer stores its ``E`` experts as one ``(E, d_out,
  d_in)`` tensor (or ``(E, d_in, d_out)``, transposed). It is ``E`` independent linear maps, so
  its LMO is ``E`` LMOs. Read as one flattened ``(E, d_out * d_in)`` matrix, as a conv kernel
  is, it would be a different (and wrong) step;
* **fused blocks**: a matrix that concatenates several layers along ``d_out``: ``[gate; up]``
  of a gated MLP, ``[q; k; v]`` of an attention, one block of rows per head.

The group setting ``blocks`` says which, as text (plain data in ``state_dict``, shown by
``describe()``)::

    "whole"                    one unit (the default)
    "experts"                  the leading dims index matrices: (*E, d_out, d_in) is prod(E) units
    "chunks=K"                 d_out in K consecutive equal blocks (torch.chunk along d_out)
    "interleaved=K"            d_out in K interleaved blocks: row i belongs to block i % K
    "experts+chunks=K"         both: each expert's rows in K blocks (and likewise interleaved)

Rows are counted in the layer's own orientation: with ``transposed=True`` (a weight stored
``(d_in, d_out)``) the blocks split the stored columns. Every unit has the shape ``(d_out / K,
d_in)``, so each unit's shape factor, dual norm and radius are its own and the units of one
parameter go through Newton–Schulz as one batched call.

The product of the units' norm balls is the parameter's ball under the max of the units'
norms, whose LMO is each unit's LMO and whose dual norm is the sum of the units' duals: a
blocked parameter is a set of layers in the sense of Gluon's layer-wise analysis (Riabinin et
al. 2025, arXiv 2505.13416, section 2), which is why radius policies see one dual per unit.

Limits: blocks are equal in size (a ``[q; k; v]`` with grouped-query sizes splits per head,
where every block is ``head_dim`` rows, not per projection), and they split ``d_out`` only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import Tensor

from gluon_optim.settings import Check

__all__ = ["WHOLE", "Blocks", "BlocksCheck", "parse"]

#: The default: the parameter is one unit.
WHOLE = "whole"
_PART = re.compile(r"(chunks|interleaved)=([0-9]+)")


@dataclass(frozen=True)
class Blocks:
    """A parsed ``blocks`` setting.

    Attributes:
        experts: the leading dims of the parameter index independent matrices.
        count: how many equal blocks each matrix's ``d_out`` is split into (1: none).
        interleaved: block ``j`` holds rows ``j, j + count, j + 2 count, ...`` (otherwise it
            holds ``count`` consecutive rows, as ``torch.chunk``).
    """

    experts: bool = False
    count: int = 1
    interleaved: bool = False

    @property
    def whole(self) -> bool:
        return not self.experts and self.count == 1

    def shape(self, shape: tuple[int, ...] | Any, transposed: bool = False) -> tuple[int, ...]:
        """The units' view of a parameter of ``shape``: ``(*batch, d_out / count, d_in)``."""
        self.check(tuple(shape), transposed)
        *lead, a, b = shape
        d_out, d_in = (b, a) if transposed else (a, b)
        lead = lead if self.experts else []
        if self.count == 1:
            return (*lead, d_out, d_in)
        return (*lead, self.count, d_out // self.count, d_in)

    def view(self, t: Tensor, transposed: bool = False) -> Tensor:
        """``t`` (shaped like the parameter) as its units: a view, never a copy.

        Writing into the view writes into ``t``, which is how a blocked update is applied.
        """
        self.check(tuple(t.shape), transposed)
        m = t.mT if transposed else t
        if self.count == 1:
            return m
        *lead, d_out, d_in = m.shape
        rows = d_out // self.count
        # view() with the stored strides: splitting one dim is always a view, never a copy.
        stride = m.stride()
        if self.interleaved:
            shape = (*lead, self.count, rows, d_in)
            strides = (*stride[:-2], stride[-2], stride[-2] * self.count, stride[-1])
        else:
            shape = (*lead, self.count, rows, d_in)
            strides = (*stride[:-2], stride[-2] * rows, stride[-2], stride[-1])
        return m.as_strided(shape, strides, m.storage_offset())

    def error(self, shape: tuple[int, ...], transposed: bool = False) -> str | None:
        """Why a parameter of ``shape`` cannot be split this way, or ``None``."""
        text = str(self)
        if self.experts and len(shape) < 3:
            return (
                f"blocks={text!r} needs a stack of matrices (3 or more dims, the leading ones "
                f"indexing experts), got shape {tuple(shape)}"
            )
        if not self.experts and len(shape) != 2:
            return (
                f"blocks={text!r} splits a matrix (2 dims), got shape {tuple(shape)}; a stack of "
                f"experts is 'experts+{text}'"
            )
        d_out = shape[-1] if transposed else shape[-2]
        if d_out % self.count:
            return (
                f"blocks={text!r}: d_out = {d_out} (of shape {tuple(shape)}"
                f"{', transposed' if transposed else ''}) is not a multiple of {self.count}"
            )
        return None

    def check(self, shape: tuple[int, ...], transposed: bool = False) -> None:
        if self.whole:
            raise ValueError("blocks='whole' has no units' view; use the norm's own operand")
        err = self.error(shape, transposed)
        if err is not None:
            raise ValueError(err)

    def __str__(self) -> str:
        parts = ["experts"] if self.experts else []
        if self.count > 1:
            parts.append(f"{'interleaved' if self.interleaved else 'chunks'}={self.count}")
        return "+".join(parts) or WHOLE


def _reason(text: Any) -> str | None:
    if not isinstance(text, str):
        return f"expected text such as 'experts' or 'chunks=3', got {type(text).__name__}"
    if text == WHOLE:
        return None
    parts = text.split("+")
    if len(set(parts)) != len(parts):
        return "a part is repeated"
    splits = [p for p in parts if p != "experts"]
    if len(splits) > 1:
        return "at most one of chunks=K and interleaved=K"
    if splits:
        found = _PART.fullmatch(splits[0])
        if found is None:
            return (
                f"{splits[0]!r} is not 'experts', 'chunks=K' or 'interleaved=K' (parts joined "
                "by '+')"
            )
        if int(found.group(2)) < 2:
            return f"{splits[0]!r}: K must be 2 or more"
    return None


@lru_cache(maxsize=256)
def parse(text: str) -> Blocks:
    """The :class:`Blocks` a ``blocks`` setting names (grammar: the module docstring)."""
    reason = _reason(text)
    if reason is not None:
        raise ValueError(f"Invalid blocks: {text!r}; {reason}")
    if text == WHOLE:
        return Blocks()
    parts = text.split("+")
    out = Blocks(experts="experts" in parts)
    for part in parts:
        found = _PART.fullmatch(part)
        if found is not None:
            kind, k = found.groups()
            out = Blocks(out.experts, int(k), kind == "interleaved")
    return out


def is_stack(text: str) -> bool:
    """Whether ``blocks=text`` reads a parameter as a stack of experts."""
    return text != WHOLE and parse(text).experts


def units(shape: tuple[int, ...], transposed: bool, text: str) -> int:
    """How many LMO units a parameter of ``shape`` is under ``blocks=text``."""
    b = parse(text)
    if b.whole:
        return 1
    return math.prod(b.shape(shape, transposed)[:-2])


class BlocksCheck(Check):
    """The ``blocks`` setting's check: the grammar of the module docstring."""

    def __call__(self, value: Any) -> str | None:
        return _reason(value)

    def describe(self) -> str:
        return "`whole`, `experts`, `chunks=K`, `interleaved=K`, or `experts+` one of those"
