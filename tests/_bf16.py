"""A machine-independent bfloat16 for tests of low-precision numerics.

A bfloat16 matrix product's result depends on the CPU: how many terms a kernel accumulates in
float32 before it rounds, whether it converts to bfloat16 between blocks, which instructions it
has (AVX512-BF16, AMX). A test that asserts how much bfloat16 Newton–Schulz loses, measured on
one CPU, can therefore fail on another. Under :class:`ExactBF16Products` every bfloat16 product
that Newton–Schulz makes (``@``, ``torch.matmul``, ``torch.mm``, ``torch.bmm``, ``torch.addmm``,
``torch.baddbmm``) is computed in float64 and rounded once to bfloat16: the most accurate
result a bfloat16 kernel can return, the same on every machine. Elementwise bfloat16 arithmetic
is left alone: it is computed in float32 and rounded once on every CPU already.

A claim shown under this mode holds for ideal accumulation; a CPU that accumulates worse adds
its own rounding, which ``benchmarks/accuracy.py`` measures on the machine at hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_PRODUCTS = {torch.Tensor.__matmul__, torch.matmul, torch.Tensor.matmul, torch.mm, torch.bmm}
_FUSED = {torch.addmm, torch.baddbmm}


class ExactBF16Products(TorchFunctionMode):
    """bfloat16 products computed exactly (in float64) and rounded once (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _PRODUCTS and _bf16(args[0], args[1]):
            self.products += 1
            return (args[0].double() @ args[1].double()).to(torch.bfloat16)
        if func in _FUSED and _bf16(*args[:3]):
            self.products += 1
            bias, a, b = (t.double() for t in args[:3])
            beta, alpha = kwargs.get("beta", 1.0), kwargs.get("alpha", 1.0)
            return (beta * bias + alpha * (a @ b)).to(torch.bfloat16)
        return func(*args, **kwargs)


def _bf16(*tensors: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tensors)
