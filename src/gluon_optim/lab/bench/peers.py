"""The optimizers :func:`~gluon_optim.lab.bench.bench_step` measures ours against.

``torch.optim.Muon`` (the reference every ratio is taken against), pytorch-optimizer's ``Muon``
and ``SCION``, HeavyBall's ``Muon`` and ``Scion`` (run eagerly, see :func:`_heavyball_eager`)
and ``torch.optim.AdamW`` (the elementwise baseline). The optional peers are imported only when
:func:`table` is called, so a missing or broken install becomes a note in the result, never an
import error, and importing the benchmark has no side effects.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

Factory = Callable[[list[nn.Parameter], float], Optimizer]


@dataclass(frozen=True)
class Entry:
    """One benchmarked optimizer: how to build it and its spectral shape rule (None: no LMO)."""

    name: str
    factory: Factory
    shape_rule: str | None
    note: str = ""
    # The first step overwrites the parameters with an initialisation (heavyball.Scion), so the
    # first step's direction is measured against a twin stepped with lr=0.
    reinit_on_first_step: bool = False


@dataclass(frozen=True)
class Table:
    """The optimizers to measure, in row order, and those left out with the reason."""

    entries: tuple[Entry, ...]
    not_measured: Mapping[str, str]


def table(ours: Sequence[Entry]) -> Table:
    """The reference, ``ours``, the optional peers that import, and the AdamW baseline last.

    The reference comes first because every ratio is taken against the first row.
    """
    not_measured: dict[str, str] = {}
    optional = [*_pytorch_optimizer(not_measured), *_heavyball_peers(not_measured)]
    reference = Entry("torch.optim.Muon", _torch_muon, "muon", "reference; adjust_lr_fn='original'")
    baseline = Entry("torch.optim.AdamW", _adamw, None, "elementwise baseline")
    return Table((reference, *ours, *optional, baseline), not_measured)


# -- torch ---------------------------------------------------------------------------------------


def _torch_muon(params: list[nn.Parameter], lr: float) -> Optimizer:
    return torch.optim.Muon(params, lr=lr, weight_decay=0.0, adjust_lr_fn="original")


def _adamw(params: list[nn.Parameter], lr: float) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# -- pytorch-optimizer ---------------------------------------------------------------------------


def _pytorch_optimizer(not_measured: dict[str, str]) -> list[Entry]:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        not_measured["pytorch_optimizer"] = "not installed"
        return []
    return [
        Entry("pto.Muon", _pto_muon, "muon", _pto_muon_plain_list_note()),
        Entry("pto.SCION", _pto_scion, "rms", "momentum=0.1 (== beta 0.9)"),
    ]


def _pto_muon(params: list[nn.Parameter], lr: float) -> Optimizer:
    from pytorch_optimizer import Muon

    # pytorch-optimizer's Muon requires parameter groups carrying `use_muon`; a plain list of
    # tensors is rejected (see _pto_muon_plain_list_note).
    opt: Optimizer = Muon([{"params": params, "use_muon": True}], lr=lr, weight_decay=0.0)
    return opt


def _pto_scion(params: list[nn.Parameter], lr: float) -> Optimizer:
    from pytorch_optimizer import SCION
    from pytorch_optimizer.optimizer.scion import LMONorm

    # SCION's `momentum` is the weight of the NEW gradient (0.1 == beta 0.9); unconstrained,
    # spectral LMO with its default sqrt(d_out/d_in) scaling, radius 1.
    opt: Optimizer = SCION(
        params,
        lr=lr,
        momentum=0.1,
        constraint=False,
        norm_type=LMONorm.SPECTRAL,
        scale=1.0,
        weight_decay=0.0,
    )
    return opt


def _pto_muon_plain_list_note() -> str:
    """Why pytorch-optimizer's Muon needs groups: try a plain list and record what it says."""
    from pytorch_optimizer import Muon

    p = nn.Parameter(torch.zeros(2, 2))
    try:
        Muon([p])
    except Exception as exc:  # noqa: BLE001 - we record whatever it raises
        return f"plain list rejected ({type(exc).__name__}: {exc}); run with use_muon=True group"
    return "accepts a plain list"


# -- HeavyBall -----------------------------------------------------------------------------------


def _heavyball_peers(not_measured: dict[str, str]) -> list[Entry]:
    try:
        importlib.import_module("heavyball")
    except ImportError:
        not_measured["heavyball"] = "not installed (pip install 'heavyball>=3.2', in the lab extra)"
        return []
    except Exception as exc:  # noqa: BLE001 - a broken install is skipped like a missing one
        not_measured["heavyball"] = f"import failed ({type(exc).__name__}: {exc})"
        return []
    not_measured["heavyball.MuonAdamW, MuonLaProp"] = (
        "MuonAdamW gives matrices heavyball.Muon's update (AdamW only on 1-D parameters); "
        "MuonLaProp orthogonalises a LaProp (Adam-normalised) update, a different method"
    )
    return _heavyball_entries()


@contextlib.contextmanager
def _heavyball_eager() -> Iterator[None]:
    """Run HeavyBall without ``torch.compile`` inside the block.

    HeavyBall wraps its kernels in ``torch.compile`` (mode ``heavyball.utils.compile_mode``,
    ``"max-autotune-no-cudagraphs"``) and runs them eagerly when that setting is ``None``; the
    setting is read at every call, so it is set here for the step only and restored after, and
    other HeavyBall users in the process are unaffected. Why eager on a CPU: compilation costs
    more than the whole benchmark (the first Muon step on one width-256 block took about 14 s,
    and every new set of shapes compiles again), Inductor emits ``FutureWarning``s (errors in
    this project's tests), and the gain afterwards was small (one width-256 block on 2 cores:
    about 25 ms compiled against 30 ms eager per step).
    """
    hb_utils: Any = importlib.import_module("heavyball.utils")
    saved = hb_utils.compile_mode
    hb_utils.compile_mode = None
    try:
        yield
    finally:
        hb_utils.compile_mode = saved


def _heavyball(name: str, **options: Any) -> Factory:
    """A factory of ``heavyball.<name>`` whose ``step`` runs eagerly (:func:`_heavyball_eager`).

    ``compile_step=False`` as well (HeavyBall's default: no compiled chain around the step).
    """

    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        cls = getattr(importlib.import_module("heavyball"), name)
        opt: Optimizer = cls(params, lr=lr, weight_decay=0.0, compile_step=False, **options)
        heavyball_step = opt.step

        @functools.wraps(heavyball_step)
        def step(closure: Callable[[], float] | None = None) -> Any:
            with _heavyball_eager():
                return heavyball_step(closure)

        opt.step = step  # type: ignore[method-assign]
        return opt

    return build


_HB_EAGER = "eager (torch.compile off: heavyball.utils.compile_mode=None during step)"


def _heavyball_entries() -> list[Entry]:
    """HeavyBall's Muon and Scion, configured as close to torch.optim.Muon / Scion as it allows.

    Muon: ``betas[0]=0.95`` with ``nesterov=True, heavyball_momentum=True``, i.e. ``v = 0.95 v +
    g`` and the update ``g + 0.95 v``, which is torch.optim.Muon's Nesterov momentum up to a
    positive factor that orthogonalisation removes (HeavyBall's default, ``heavyball_momentum=
    False``, is a different mix: ``g + EMA(g)``). HeavyBall has no NS coefficient or step option:
    5 steps of its own per-step coefficients on a stochastically rounded bf16 copy, and a
    ``sqrt(max(1, d_out/d_in))`` factor (shape rule ``muon``). Scion: EMA ``betas[0]=0.9`` with
    bias correction, spectral LMO times ``sqrt(d_out/d_in)`` (shape rule ``rms``), radius 1.
    """
    return [
        Entry(
            "heavyball.Muon",
            _heavyball("Muon", betas=(0.95, 0.99), nesterov=True, heavyball_momentum=True),
            "muon",
            f"{_HB_EAGER}; nesterov + heavyball_momentum (torch.optim.Muon's momentum up to "
            "scale); its own 5 NS coefficients on a stochastically rounded bf16 copy",
        ),
        Entry(
            "heavyball.Scion",
            _heavyball("Scion", betas=(0.9, 0.99), scale=1.0),
            "rms",
            f"{_HB_EAGER}; EMA 0.9 with bias correction; its first step overwrites the "
            "parameters with an orthogonal init x sqrt(d_out/d_in), so polar err is taken "
            "against an lr=0 twin",
            reinit_on_first_step=True,
        ),
    ]
