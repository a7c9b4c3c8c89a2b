"""The one optimizer: layer-wise LMO steps (Gluon), with AdamW groups for mixed presets.

Every preset in this package (Muon, Scion, unconstrained Scion, Gluon with any norm table) is a
list of parameter groups handed to :class:`Gluon`; there is no other ``step()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gluon_optim import lowrank as _lowrank
from gluon_optim import norms as _norms
from gluon_optim.estimators import ESTIMATORS, VR_ESTIMATORS, mvr1_, mvr2_, mvr3_, storm_
from gluon_optim.polar import COMPILE_BACKENDS, NS_FORMS, NS_PRESETS

__all__ = ["DEFAULTS", "Gluon", "describe", "resolve_norm"]

#: Every group key with its default. Values are plain data (str, float, int, bool, tuple), so
#: ``state_dict()`` loads with ``torch.load(weights_only=True)``.
DEFAULTS: dict[str, Any] = {
    # What the group does: "lmo" (Gluon step) or "adamw" (torch.optim.AdamW's update, for the
    # parameters a Muon-style preset leaves to Adam).
    "algorithm": "lmo",
    "lr": 0.02,
    "weight_decay": 0.0,
    # -- lmo groups -------------------------------------------------------------------------
    "norm": "auto",  # a key of norms.NORMS, or "auto": bias_rms / spectral / spectral_conv by ndim
    "scale": 1.0,  # the per-group radius multiplier rho (Scion's `scale`)
    "shape_rule": "rms",  # spectral norm only: norms.SHAPE_RULES
    "transposed": False,  # parameter stored as (d_in, d_out), e.g. nn.Embedding.weight
    # beta, the weight on the old momentum (Scion's alpha = 1 - beta). For estimator "storm" and
    # "storm_lowrank" it is LiMuon's beta instead: the SMALL weight of the fresh gradient.
    "momentum": 0.9,
    "nesterov": False,  # Nesterov as torch.optim.Muon; estimator "ema" only
    # The momentum estimator (gluon_optim.estimators): "ema" (Gluon), "mvr1" | "mvr2" | "mvr3"
    # (Gluon-MVR), "storm" | "storm_lowrank" (LiMuon options 1 and 2).
    "estimator": "ema",
    "mvr_q": 0.1,  # mvr2 / mvr3: q in [0, 1]; G <- g + (1 - q)(G - g_prev). Our default.
    # Variance-reduced estimators: where g_prev comes from. "exact": the current batch at the
    # previous iterate (step(closure) or the previous_iterate() block; two gradients per step);
    # "approx": the previous step's gradient (one gradient per step, as MARS-approx).
    "two_point": "exact",
    "rank": 8,  # storm_lowrank: rank r of the momentum factors (capped at min(m, n))
    "oversampling": 5,  # storm_lowrank: extra randomized-SVD sketch columns s
    "rsvd_seed": 0,  # storm_lowrank: base seed of the sketch (mixed with step, index, role)
    "constrained": False,  # SCG: X <- (1 - lr) X + t lmo(M)
    "radius": "constant",  # "constant" | "l0l1" | "theory_decay"
    "l0": 0.0,
    "l1": 1.0,
    "radius_source": "gradient",  # l0l1 only: dual norm of the "gradient" (paper) or "momentum"
    "polar_method": "newton_schulz",
    "ns_preset": "jordan",
    "ns_steps": 5,
    "compute_dtype": "bfloat16",
    "ns_form": "standard",  # "standard" | "gram" | "auto" (see gluon_optim.polar.newton_schulz)
    # Batch the group's EMA step: foreach momentum updates, same-shape LMOs stacked into one
    # call. None: on when every parameter of the group is on a GPU (on CPU it does not pay).
    "foreach": None,
    # torch.compile backend for Newton–Schulz: "" (eager PyTorch), "inductor", "aot_eager", ...
    "compile": "",
    # -- adamw groups -----------------------------------------------------------------------
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    # -- both -------------------------------------------------------------------------------
    "nonfinite": "raise",  # "raise" | "skip" | "ignore" (no check, no host synchronisation)
    "role": "",  # informational: which role the preset gave this group
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ("lmo", "adamw"),
    "radius": ("constant", "l0l1", "theory_decay"),
    "radius_source": ("gradient", "momentum"),
    "estimator": ESTIMATORS,
    "two_point": ("exact", "approx"),
    "nonfinite": ("raise", "skip", "ignore"),
    "polar_method": ("newton_schulz", "svd"),
    "ns_form": NS_FORMS,
    "compile": ("", *COMPILE_BACKENDS),
}

# Keys torch or its schedulers may add to a group after construction.
_FOREIGN_KEYS = frozenset({"params", "param_names", "initial_lr", "differentiable"})

# Per-parameter state of each variance-reduced estimator (besides "step" and the two-point key).
_BUFFERS: dict[str, tuple[str, ...]] = {
    "mvr1": ("momentum_buffer",),
    "mvr2": ("momentum_buffer", "mvr_estimate"),
    "mvr3": ("momentum_buffer", "mvr_estimate"),
    "storm": ("momentum_buffer",),
    "storm_lowrank": ("lowrank_u", "lowrank_s", "lowrank_v"),
}
# state_bytes() categories.
_MOMENTUM_KEYS = frozenset(
    {"momentum_buffer", "mvr_estimate", "lowrank_u", "lowrank_s", "lowrank_v"}
    | {"exp_avg", "exp_avg_sq"}
)
_TWO_POINT_KEYS = frozenset({"prev_param", "prev_grad", "prev_point_grad"})
_VR_ONLY_KEYS = _TWO_POINT_KEYS | {"mvr_estimate", "lowrank_u", "lowrank_s", "lowrank_v"}

# Pass 1 of a step: every group with its (parameter, gradient) pairs.
_Work = list[tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]]


def _exact_two_point(group: Mapping[str, Any]) -> bool:
    """Whether the group's step needs ``g_k(X^{k-1})``: a VR estimator in exact mode."""
    return (
        group["algorithm"] == "lmo"
        and group["estimator"] in VR_ESTIMATORS
        and group["two_point"] == "exact"
    )


@lru_cache(maxsize=256)
def _build_norm(
    name: str,
    shape_rule: str,
    method: str,
    preset: str,
    steps: int,
    dtype: str,
    form: str,
    backend: str,
) -> _norms.Norm:
    cls = _norms.NORMS[name]
    if cls in (_norms.Spectral, _norms.SpectralConv):
        opts: dict[str, object] = dict(
            method=method,
            ns_preset=preset,
            ns_steps=steps,
            compute_dtype=dtype,
            ns_form=form,
            compile=backend,
        )
        if cls is _norms.Spectral:
            opts["shape_rule"] = shape_rule
        return _norms.get(name, **opts)
    return _norms.get(name)


def resolve_norm(group: Mapping[str, Any], p: Tensor) -> _norms.Norm:
    """The :class:`~gluon_optim.norms.Norm` a group applies to parameter ``p``.

    ``norm="auto"`` picks by dimension as Scion's ``Auto``: ``bias_rms`` for 0-/1-D,
    ``spectral`` for 2-D and ``spectral_conv`` for 3-D and more.
    """
    name = group["norm"]
    if name == "auto":
        name = "bias_rms" if p.ndim <= 1 else "spectral" if p.ndim == 2 else "spectral_conv"
    return _build_norm(
        name,
        group["shape_rule"],
        group["polar_method"],
        group["ns_preset"],
        group["ns_steps"],
        group["compute_dtype"],
        group["ns_form"],
        group["compile"],
    )


def _operand_shape(norm: _norms.Norm, p: Tensor, transposed: bool) -> tuple[int, ...]:
    # A vector is never silently read as a one-column matrix: it keeps its shape, and the
    # matrix norm's shape check rejects it.
    if norm.kind == "matrix" and p.ndim >= 2:
        if transposed:
            return (p.shape[1], p.shape[0])
        return (p.shape[0], math.prod(p.shape[1:]))
    return tuple(p.shape)


def _to_operand(norm: _norms.Norm, t: Tensor, transposed: bool) -> Tensor:
    # Matrix norms see a (d_out, d_in) matrix: conv kernels are flattened (the shape rules then
    # use the flattened shape, never kernel dimensions) and nn.Embedding weights, stored as
    # (vocab, dim) = (d_in, d_out), are transposed.
    if norm.kind == "matrix":
        return t.T if transposed else t.reshape(t.shape[0], -1)
    return t


def _from_operand(norm: _norms.Norm, t: Tensor, p: Tensor, transposed: bool) -> Tensor:
    if norm.kind == "matrix":
        return t.T if transposed else t.reshape(p.shape)
    return t


def _name(group: Mapping[str, Any], i: int) -> str:
    names = group.get("param_names")
    return str(names[i]) if names else f"params[{i}]"


def _role(group: Mapping[str, Any]) -> str:
    return f", role {group['role']!r}" if group.get("role") else ""


def _where(group: Mapping[str, Any], index: int | None) -> str:
    role = _role(group)
    return f" (param group {index}{role})" if index is not None else f" (new param group{role})"


def _to_host(flags: list[Tensor]) -> list[bool]:
    """Boolean scalars to Python, with one transfer per device rather than one per tensor.

    Copying each flag to the host on its own would synchronise once per parameter on a GPU.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    out = [False] * len(flags)
    for positions in by_device.values():
        values = torch.stack([flags[i] for i in positions]).tolist()
        for i, v in zip(positions, values, strict=True):
            out[i] = bool(v)
    return out


def _drop_vr_leftovers(state: dict[str, Any]) -> None:
    """Remove what a variance-reduced estimator left in ``state`` (an EMA step follows)."""
    if len(state) > 2:
        for key in [key for key in state if key in _VR_ONLY_KEYS]:
            del state[key]


def _momentum_buffer(state: dict[str, Any], g: Tensor) -> Tensor:
    """The EMA momentum buffer of ``state``, created at zero like ``g`` on first use."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
    buf: Tensor = state["momentum_buffer"]
    return buf


def _use_foreach(group: Mapping[str, Any], items: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether an LMO group takes the batched path (see the ``foreach`` group key)."""
    if group["estimator"] != "ema" or group["radius"] == "theory_decay":
        return False
    if group["foreach"] is None:
        return all(p.is_cuda for p, _ in items)
    return bool(group["foreach"])


def _all_finite(t: Tensor) -> Tensor:
    """A device-side boolean: whether every entry of ``t`` is finite.

    ``aminmax`` propagates NaN and shows an infinity in the minimum or the maximum, so the two
    extrema are finite exactly when every entry is. It is one fused reduction without a
    temporary, about 20x faster on CPU than ``isfinite(t).all()`` (docs/performance.md).
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def _check_hyperparameters(group: Mapping[str, Any], index: int | None) -> None:
    """Raise ``ValueError`` naming the first invalid option of ``group``."""
    where = _where(group, index)
    for key, allowed in _CHOICES.items():
        if group[key] not in allowed:
            raise ValueError(f"Unknown {key} {group[key]!r}{where}; expected one of {allowed}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must have one element, got shape {tuple(lr.shape)}{where}")
        if lr.requires_grad:
            raise ValueError(f"Tensor lr must not require grad{where}")
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise ValueError(f"Invalid learning rate: {lr!r}{where}; expected a float or a tensor")
    elif not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr}{where}; it must be finite and >= 0")

    def number(key: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"Invalid {key}: {v!r}{where}; expected a number")
        ok = (v > lo if lo_open else v >= lo) and v < hi and math.isfinite(v)
        if not ok:
            lo_txt = f"> {lo}" if lo_open else f">= {lo}"
            hi_txt = "" if hi == math.inf else f" and < {hi}"
            raise ValueError(f"Invalid {key}: {v}{where}; it must be {lo_txt}{hi_txt}")

    number("weight_decay", 0.0)
    for key in ("nesterov", "constrained", "transposed"):
        if not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key}: {group[key]!r}{where}; expected True or False")
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise ValueError(
            f"Invalid foreach: {group['foreach']!r}{where}; expected None, True or False"
        )
    if group["algorithm"] == "adamw":
        if group["estimator"] != "ema":
            raise ValueError(
                f"estimator={group['estimator']!r} needs algorithm='lmo'{where}; AdamW groups "
                "keep AdamW's own moments (estimator='ema')"
            )
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r}{where}; expected a pair of floats")
        for j, b in enumerate(betas):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {j}: {b!r}{where}")
        number("eps", 0.0, lo_open=True)
        return
    estimator = group["estimator"]
    if estimator in ("storm", "storm_lowrank"):
        # LiMuon's beta multiplies the fresh gradient: beta = 1 keeps no correction (M = g).
        v = group["momentum"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ValueError(
                f"Invalid momentum: {v!r}{where}; for estimator={estimator!r} momentum is "
                "LiMuon's beta, the weight of the fresh gradient (M <- g + (1 - beta)(M - "
                "g_prev)), and it must be > 0 and <= 1 (e.g. 0.1)"
            )
    else:
        number("momentum", 0.0, 1.0)
    q = group["mvr_q"]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ValueError(f"Invalid mvr_q: {q!r}{where}; it must be a number in [0, 1]")
    for key, lo in (("rank", 1), ("oversampling", 0)):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"Invalid {key}: {v!r}{where}; expected an int >= {lo}")
    if isinstance(group["rsvd_seed"], bool) or not isinstance(group["rsvd_seed"], int):
        raise ValueError(f"Invalid rsvd_seed: {group['rsvd_seed']!r}{where}; expected an int")
    if group["nesterov"] and estimator != "ema":
        raise ValueError(
            f"nesterov=True is defined for estimator='ema' only, got estimator={estimator!r}"
            f"{where}; the variance-reduced estimators have no Nesterov form in their sources"
        )
    number("scale", 0.0, lo_open=True)
    number("l0", 0.0)
    number("l1", 0.0)
    if group["radius"] == "l0l1" and group["l0"] == 0.0 and group["l1"] == 0.0:
        raise ValueError(f"radius='l0l1' needs l0 > 0 or l1 > 0{where}")
    if group["nesterov"] and group["momentum"] == 0.0:
        raise ValueError(f"nesterov=True needs momentum > 0{where}")
    if group["norm"] != "auto" and group["norm"] not in _norms.NORMS:
        raise ValueError(
            f"Unknown norm {group['norm']!r}{where}; expected 'auto' or one of "
            f"{sorted(_norms.NORMS)}"
        )
    if group["shape_rule"] not in _norms.SHAPE_RULES:
        raise ValueError(
            f"Unknown shape_rule {group['shape_rule']!r}{where}; expected one of "
            f"{sorted(_norms.SHAPE_RULES)}"
        )
    if group["ns_preset"] not in NS_PRESETS:
        raise ValueError(
            f"Unknown ns_preset {group['ns_preset']!r}{where}; expected one of {sorted(NS_PRESETS)}"
        )
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        raise ValueError(f"Invalid ns_steps: {steps!r}{where}; expected an int in [1, 100)")
    if group["compute_dtype"] not in _norms._DTYPES:
        raise ValueError(
            f"Unknown compute_dtype {group['compute_dtype']!r}{where}; expected one of "
            f"{sorted(_norms._DTYPES)}"
        )


def _lowrank_shape_error(group: Mapping[str, Any], p: Tensor) -> str | None:
    if group["estimator"] == "storm_lowrank" and p.ndim < 2:
        return (
            f"estimator='storm_lowrank' needs a matrix (2-D, or a conv kernel, flattened to "
            f"(C_out, C_in*k*k)), got shape {tuple(p.shape)}; give vectors their own group "
            "with another estimator (e.g. 'storm')"
        )
    return None


def _check_shapes(group: Mapping[str, Any], index: int | None) -> None:
    """Raise ``ValueError`` if a parameter cannot be handled by the group's norm."""
    where = _where(group, index)
    for i, p in enumerate(group["params"]):
        name = _name(group, i)
        if torch.is_complex(p):
            raise ValueError(f"Parameter {name!r}{where} is complex; gluon-optim is real-only")
        if not p.is_floating_point():
            raise ValueError(f"Parameter {name!r}{where} has dtype {p.dtype}; need floating point")
        if group["algorithm"] != "lmo":
            continue
        err = _lowrank_shape_error(group, p)
        if err is not None:
            raise ValueError(f"Parameter {name!r}{where}: {err}")
        norm = resolve_norm(group, p)
        if group["transposed"] and not (norm.kind == "matrix" and p.ndim == 2):
            raise ValueError(
                f"transposed=True needs a 2-D parameter and a matrix norm; parameter {name!r} "
                f"has shape {tuple(p.shape)} and norm {norm.name!r}{where}"
            )
        err = norm.shape_error(_operand_shape(norm, p, group["transposed"]))
        if err is not None:
            raise ValueError(f"Parameter {name!r}{where}: {err}")


class Gluon(Optimizer):
    r"""Layer-wise LMO optimizer (Gluon), with Muon and Scion as configurations.

    For every parameter ``X_i`` of a group with norm ``||.||_(i)``:

    .. math::
        M_i^k &= \beta M_i^{k-1} + (1-\beta)\, g_i^k
              \qquad(\text{Nesterov: use } g_i^k + \beta (M_i^k - g_i^k))\\
        X_i &\leftarrow (1 - \mathrm{lr}\cdot\mathrm{wd})\, X_i
              \qquad(\text{decoupled weight decay, as torch.optim.Muon})\\
        X_i &\leftarrow (1-\mathrm{lr})\, X_i \qquad(\text{only if constrained: SCG})\\
        X_i &\leftarrow X_i + t_i^k\, \mathrm{lmo}_{(i)}(M_i^k),
              \qquad t_i^k = \mathrm{lr}\cdot\mathrm{scale}\cdot\rho(k)

    with the radius policy ``rho``: ``constant`` (1), ``l0l1`` (Gluon Theorem 1:
    ``||G||_* / (L0 + L1 ||G||_*)`` with ``G`` the gradient, or the momentum as an unanalysed
    option) or ``theory_decay`` (Gluon Theorem 2: ``rho = (k+1)^{-3/4}`` and
    ``beta^k = 1 - (k+1)^{-1/2}``, overriding ``momentum``). Because ``t`` is proportional to the
    group's ``lr``, any ``torch.optim.lr_scheduler`` drives it. The momentum buffer starts at
    zero as in torch.optim.Muon and the Scion code, not at Gluon's ``M^0 = g^0``: the first
    direction is the same (the LMO is scale invariant), later momenta differ by the transient
    ``beta^(k+1) g^0``.

    Variance-reduced estimators (group key ``estimator``; :mod:`gluon_optim.estimators`) replace
    the EMA line; ``g_prev`` is the current batch's gradient at the previous iterate
    (``two_point="exact"``) or the previous step's gradient (``"approx"``):

    * ``mvr1``: ``M = g + beta (M - g_prev)`` (Gluon-MVR-1);
    * ``mvr2``: ``G = g + (1 - q)(G - g_prev)``, ``M = beta M + (1 - beta) G`` (``q = mvr_q``);
    * ``mvr3``: ``mvr2`` plus ``beta (g - g_prev)`` -- our reconstruction, the paper's formula
      could not be read;
    * ``storm``: ``M = g + (1 - beta)(M - g_prev)`` with ``beta = momentum`` LiMuon's SMALL
      weight of the fresh gradient (``storm`` with ``b`` is ``mvr1`` with ``1 - b``);
    * ``storm_lowrank``: ``storm`` on ``M_hat``, the stored rank-``rank`` randomized SVD of
      ``M`` (matrices only; ``(m + n) r + r`` numbers of state).

    Their first step uses ``M^0 = G^0 = g^0``. Exact mode needs a second gradient each step:
    pass a closure to :meth:`step` (called at ``X^{k-1}``, then at ``X^k``) or compute it in a
    :meth:`previous_iterate` block; otherwise ``step()`` raises and changes nothing. Nesterov is
    ``ema`` only; ``theory_decay`` decays the radius and leaves a VR estimator's ``beta`` alone.
    :meth:`state_bytes` reports the memory of momentum and two-point state.

    Groups with ``algorithm="adamw"`` take torch.optim.AdamW's update instead (``betas``,
    ``eps``, ``weight_decay``), so a Muon preset is one optimizer object: one ``step()``, one
    scheduler, one ``state_dict()``.

    Reductions: with ``norm="spectral", shape_rule="muon", momentum=0.95, nesterov=True`` this is
    torch.optim.Muon; with ``scale=rho_l`` and Scion's norm table it is (unconstrained) Scion
    (Pethick et al. 2025, Algorithm 3); ``norm="sign_unscaled", momentum=0`` is sign-SGD and
    ``norm="euclidean", momentum=0`` layer-wise normalised gradient descent.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or group dicts (see :data:`DEFAULTS`
            for every key). :func:`gluon_optim.param_groups` builds groups from a model.
        lr: learning rate ``gamma`` (float or one-element tensor).
        **defaults: any other key of :data:`DEFAULTS`, applied to groups that do not set it.

    Non-finite gradients: ``nonfinite="raise"`` (default) raises before any parameter or state
    changes; ``"skip"`` leaves that group's parameters and state untouched for this step;
    ``"ignore"`` does no check (and so no host synchronisation).

    References:
        Riabinin et al., "Gluon: Making Muon & Scion Great Again!", arXiv 2505.13416, Alg. 1.
        Pethick et al., "Training Deep Learning Models with Norm-Constrained LMOs",
        arXiv 2502.07529, Alg. 3.
        Qian et al., "Muon is Provably Faster with Momentum Variance Reduction",
        arXiv 2512.16598 (Gluon-MVR). Huang et al., "LiMuon", arXiv 2509.14562, Alg. 1.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float | Tensor = DEFAULTS["lr"],
        **defaults: Any,
    ) -> None:
        unknown = sorted(set(defaults) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"Gluon got unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
        merged = dict(DEFAULTS, **defaults, lr=lr)
        _check_hyperparameters(merged, None)
        super().__init__(params, merged)

    # -- groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group completely, then add it; an invalid group leaves the optimizer as is."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        unknown = sorted(set(param_group) - set(DEFAULTS) - _FOREIGN_KEYS)
        if unknown:
            raise ValueError(
                f"Param group has unknown option(s) {unknown}; known: {sorted(DEFAULTS)}"
            )
        params = param_group.get("params")
        if params is None:
            raise ValueError("Param group has no 'params'")
        items = [params] if isinstance(params, Tensor) else list(params)
        if not items:
            raise ValueError("Param group has an empty 'params' list")
        names = [x[0] if isinstance(x, tuple) else None for x in items]
        tensors = [x[1] if isinstance(x, tuple) else x for x in items]
        candidate = {**self.defaults, **param_group, "params": tensors}
        if all(n is not None for n in names):
            candidate["param_names"] = names
        _check_hyperparameters(candidate, None)
        _check_shapes(candidate, None)
        seen: dict[int, str] = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                seen[id(p)] = _name(group, i)
        for i, p in enumerate(tensors):
            if id(p) in seen:
                raise ValueError(
                    f"Parameter {_name(candidate, i)!r} is already in another param group "
                    f"(as {seen[id(p)]!r}); every parameter must get exactly one group"
                )
            seen[id(p)] = _name(candidate, i)
        super().add_param_group({**param_group, "params": items})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups saved by an older version get today's defaults for keys they lack.
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)

    def needs_closure(self) -> bool:
        """Whether :meth:`step` needs a closure (or a :meth:`previous_iterate` block).

        True when some group uses a variance-reduced estimator with ``two_point="exact"``: its
        step evaluates the same batch at the previous and the current iterate.
        """
        return any(_exact_two_point(group) for group in self.param_groups)

    # -- the two-point gradient ---------------------------------------------------------------
    @contextlib.contextmanager
    def previous_iterate(self) -> Iterator[None]:
        """Compute the gradient at the previous iterate, for ``two_point="exact"`` groups.

        Inside the block, the parameters of every group with a variance-reduced estimator and
        ``two_point="exact"`` hold their previous iterate ``X^{k-1}`` (the value before their
        last update); every other parameter keeps its value. Run the forward and backward pass of
        the CURRENT batch inside; on exit the gradients of those parameters are kept as the
        two-point gradient ``g_k(X^{k-1})`` (state key ``"prev_point_grad"``), the parameters
        are restored to ``X^k`` exactly, and every ``.grad`` is put back as it was before the
        block (so gradients computed before it survive, and nothing leaks out of it)::

            opt.zero_grad()
            with opt.previous_iterate():
                loss_fn(model(x), y).backward()   # g_k(X^{k-1}), kept by the optimizer
            loss_fn(model(x), y).backward()       # g_k(X^k), in .grad as usual
            opt.step()

        Like ``.grad``, the kept gradients accumulate over several blocks until :meth:`step`
        consumes them. On a parameter's first step there is no previous iterate: the block runs
        at the current point and its gradients are discarded. If the block raises, parameters,
        ``.grad`` and optimizer state are left as they were before it.
        """
        params = self._previous_iterate_params()
        pending = {
            id(p): self.state[p]["prev_point_grad"]
            for p in params
            if "prev_point_grad" in self.state[p]
        }
        with self._at_previous_iterate(params, pending) as found:
            yield
        for p in params:
            if id(p) in found:
                self.state[p]["prev_point_grad"] = found[id(p)]

    def _previous_iterate_params(self, work: _Work | None = None) -> list[Tensor]:
        """Parameters whose next step needs ``g_k(X^{k-1})`` (with a gradient, if ``work``)."""
        out: list[Tensor] = []
        if work is None:
            pairs = [(group, group["params"]) for group in self.param_groups]
        else:
            pairs = [(group, [p for p, _ in items]) for group, items in work]
        for group, params in pairs:
            if not _exact_two_point(group):
                continue
            buffers = _BUFFERS[group["estimator"]]
            for p in params:
                state = self.state.get(p)
                if state and "prev_param" in state and all(key in state for key in buffers):
                    out.append(p)
        return out

    @contextlib.contextmanager
    def _at_previous_iterate(
        self, params: list[Tensor], start: Mapping[int, Tensor]
    ) -> Iterator[dict[int, Tensor]]:
        """Swap ``params`` to their stored ``X^{k-1}``; yield a dict filled on a clean exit.

        On entry every ``.grad`` of the optimizer is set aside (``params`` start from a copy of
        ``start`` where given, so repeated blocks accumulate); on a clean exit the dict maps
        ``id(p)`` to a copy of the gradient computed in the block. Always: ``X^k`` is restored
        bit for bit and every ``.grad`` is put back as found.
        """
        everything = [p for group in self.param_groups for p in group["params"]]
        saved = [p.grad for p in everything]
        current = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
        found: dict[int, Tensor] = {}
        try:
            with torch.no_grad():
                for p in everything:
                    p.grad = None
                for p in params:
                    p.copy_(self.state[p]["prev_param"])
                    if id(p) in start:
                        p.grad = start[id(p)].clone(memory_format=torch.preserve_format)
            yield found
            # Copied, not taken over: gradient storage may be reused by the next backward pass
            # (DDP's gradient_as_bucket_view, user hooks), and the state must not alias it.
            for p in params:
                if p.grad is not None:
                    found[id(p)] = p.grad.clone(memory_format=torch.preserve_format)
        finally:
            with torch.no_grad():
                for p, x in zip(params, current, strict=True):
                    p.copy_(x)
                for p, g in zip(everything, saved, strict=True):
                    p.grad = g

    def _two_point_gradients(
        self, work: _Work, from_closure: dict[int, Tensor] | None
    ) -> dict[int, Tensor]:
        """``g_k(X^{k-1})`` for every parameter whose update needs it, keyed by ``id(p)``.

        ``from_closure`` holds what :meth:`step` evaluated with its closure; without a closure
        the gradients must have been left by a :meth:`previous_iterate` block. Raises
        ``RuntimeError`` (having changed nothing) when a needed gradient is missing.
        """
        params = self._previous_iterate_params(work)
        if not params:
            return {}
        if from_closure is not None:
            found = from_closure
        else:
            found = {
                id(p): self.state[p]["prev_point_grad"]
                for p in params
                if "prev_point_grad" in self.state[p]
            }
        missing = {id(p) for p in params if id(p) not in found}
        if not missing:
            return found
        where: list[str] = []
        names: list[str] = []
        for index, (group, _) in enumerate(work):
            lost = [_name(group, i) for i, p in enumerate(group["params"]) if id(p) in missing]
            if lost:
                where.append(f"{index} (estimator {group['estimator']!r}{_role(group)})")
                names += lost
        if from_closure is not None:
            raise RuntimeError(
                f"Gluon.step(closure): the closure's call at the previous iterate produced no "
                f"gradient for parameter(s) {names} of param group(s) "
                f"{', '.join(where)} (two_point='exact'); nothing was changed. The closure must "
                "compute the loss of the same batch and call backward() each time it is called."
            )
        raise RuntimeError(
            f"Gluon.step(): param group(s) {', '.join(where)} use a variance-reduced estimator "
            "with two_point='exact', which needs the gradient of the CURRENT batch at the "
            f"PREVIOUS iterate, and none was given for parameter(s) {names}; nothing was "
            "changed. Either pass a closure, opt.step(closure), that zeroes the gradients, "
            "computes the loss of the batch and calls backward() (the optimizer calls it at "
            "X^k and again at X^(k-1)); or compute that gradient inside "
            "`with opt.previous_iterate(): loss_fn(model(x), y).backward()` before calling "
            "opt.step(); or set two_point='approx' (one gradient per step: the previous "
            "step's gradient stands in for it)."
        )

    # -- memory -------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state, by purpose.

        * ``"momentum"``: momentum buffers, MVR-2/3's gradient estimates ``G``, the low-rank
          factors of ``storm_lowrank`` (``(m + n) r + r`` numbers per matrix), and AdamW's
          ``exp_avg`` / ``exp_avg_sq``;
        * ``"two_point"``: what the variance-reduced estimators keep for their second gradient:
          the previous iterate (``two_point="exact"``), the previous gradient (``"approx"``),
          and a gradient left by :meth:`previous_iterate` and not yet consumed;
        * ``"total"``: every tensor in the state, step counters included.

        Transient tensors of a step (the full momentum that ``storm_lowrank`` rebuilds, the
        copy of ``X^k`` held while the closure runs at ``X^{k-1}``) are not state and are not
        counted.
        """
        momentum = two_point = total = 0
        for state in self.state.values():
            for key, value in state.items():
                if not isinstance(value, Tensor):
                    continue
                size = value.numel() * value.element_size()
                total += size
                if key in _MOMENTUM_KEYS:
                    momentum += size
                elif key in _TWO_POINT_KEYS:
                    two_point += size
        return {"momentum": momentum, "two_point": two_point, "total": total}

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Groups with a variance-reduced estimator and ``two_point="exact"`` need a second
        gradient: the same batch at the previous iterate. Given a closure, the step calls it
        twice: first with those groups' parameters at ``X^{k-1}`` (every other parameter stays
        at ``X^k``), copying the gradients it produces out of ``.grad``; then, with ``X^k``
        restored bit for bit and every ``.grad`` put back, at ``X^k``. That last call's loss is
        returned and its gradients are the ones left in ``.grad``. (Evaluating the previous
        point first means ``.grad`` never has to be saved across a backward pass, which breaks
        when gradient storage is reused, as DDP's ``gradient_as_bucket_view`` does.) Without a
        closure the gradient must come from a :meth:`previous_iterate` block, or the step
        raises ``RuntimeError`` and changes nothing. The closure is called once on a step that
        needs no second gradient.
        """
        loss = None
        from_closure: dict[int, Tensor] | None = None
        if closure is not None:
            targets = self._previous_iterate_params()
            if targets:
                with self._at_previous_iterate(targets, {}) as from_closure:
                    with torch.enable_grad():
                        closure()
            with torch.enable_grad():
                loss = closure()

        # Pass 1: look at everything, change nothing. Any error raised here leaves parameters
        # and optimizer state exactly as they were.
        work: _Work = []
        for index, group in enumerate(self.param_groups):
            _check_hyperparameters(group, index)
            items: list[tuple[Tensor, Tensor]] = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"Parameter {_name(group, i)!r}{_where(group, index)} has a sparse "
                        "gradient; gluon-optim needs dense gradients"
                    )
                if torch.is_complex(g):
                    raise RuntimeError(
                        f"Parameter {_name(group, i)!r}{_where(group, index)} has a complex "
                        "gradient"
                    )
                if group["algorithm"] == "lmo":
                    err = _lowrank_shape_error(group, p)
                    if err is not None:
                        raise ValueError(
                            f"Parameter {_name(group, i)!r}{_where(group, index)}: {err}"
                        )
                items.append((p, g))
            work.append((group, items))
        prev_point = self._two_point_gradients(work, from_closure)
        skipped = self._nonfinite_groups(work, prev_point)

        # Pass 2: update.
        for index, (group, items) in enumerate(work):
            if index in skipped or not items:
                continue
            if group["algorithm"] == "adamw":
                for p, g in items:
                    self._adamw_update(p, g, group)
                continue
            position: dict[int, int] = {}
            if group["estimator"] == "storm_lowrank":  # the sketch seed uses it
                position = {id(q): j for j, q in enumerate(group["params"])}
            if _use_foreach(group, items):
                self._lmo_update_foreach(items, group)
                continue
            for p, g in items:
                self._lmo_update(p, g, group, prev_point.get(id(p)), position.get(id(p), 0))

        # A gradient left by previous_iterate() belongs to this step, used or not.
        for group in self.param_groups:
            if _exact_two_point(group):
                for p in group["params"]:
                    state = self.state.get(p)
                    if state:
                        state.pop("prev_point_grad", None)
        return loss

    def _nonfinite_groups(self, work: _Work, prev_point: Mapping[int, Tensor]) -> set[int]:
        """Indices of groups to skip; raises for a non-finite gradient under ``raise``.

        The two-point gradient ``g_k(X^{k-1})`` of a parameter counts as part of its gradient.
        """
        checked = [
            (index, group, items)
            for index, (group, items) in enumerate(work)
            if group["nonfinite"] != "ignore" and items
        ]
        if not checked:
            return set()
        finite = []
        for _, _, items in checked:
            for p, g in items:
                ok = _all_finite(g)
                if id(p) in prev_point:
                    ok = ok & _all_finite(prev_point[id(p)])
                finite.append(ok)
        flags = _to_host(finite)
        skipped: set[int] = set()
        pos = 0
        for index, group, items in checked:
            bad = [k for k in range(len(items)) if not flags[pos + k]]
            pos += len(items)
            if not bad:
                continue
            if group["nonfinite"] == "skip":
                skipped.add(index)
                continue
            params = [p for p, _ in items]
            names = [
                _name(group, next(j for j, q in enumerate(group["params"]) if q is params[k]))
                for k in bad
            ]
            raise FloatingPointError(
                f"Non-finite gradient in parameter(s) {names}{_where(group, index)}; nothing "
                "was updated. Set nonfinite='skip' to skip such steps instead."
            )
        return skipped

    def _lmo_update(
        self,
        p: Tensor,
        g: Tensor,
        group: dict[str, Any],
        g_prev: Tensor | None = None,
        index: int = 0,
    ) -> None:
        state, k = self._begin_step(p)
        if group["estimator"] != "ema":
            m = self._vr_momentum(p, g, g_prev, group, state, k, index)
        else:
            _drop_vr_leftovers(state)
            beta = group["momentum"]
            if group["radius"] == "theory_decay":
                beta = 1.0 - (k + 1) ** -0.5  # Gluon Theorem 2
            if beta > 0.0 or group["radius"] == "theory_decay":
                buf = _momentum_buffer(state, g)
                buf.lerp_(g, 1.0 - beta)
                # Nesterov as torch.optim.Muon: g + beta (M - g), built out of place so that
                # p.grad is never written (KellerJordan/Muon's in-place lerp_ overwrites it).
                m = g.lerp(buf, beta) if group["nesterov"] else buf
            else:
                m = g

        norm = resolve_norm(group, p)
        operand = _to_operand(norm, m, group["transposed"])
        self._apply_lmo(p, g, operand, norm.direction(operand), norm, group, k)

    def _lmo_update_foreach(
        self, items: list[tuple[Tensor, Tensor]], group: dict[str, Any]
    ) -> None:
        """The EMA step of a whole group, batched; the same arithmetic as :meth:`_lmo_update`.

        Momentum and Nesterov go through ``torch._foreach_lerp_`` / ``_foreach_lerp`` (one
        multi-tensor kernel instead of one per parameter), and parameters whose LMO operands
        share norm, shape, dtype and device are stacked and get their directions from one
        batched call (``baddbmm`` Newton–Schulz for the spectral norms). Only used for
        ``estimator="ema"`` with a step-independent momentum (not ``theory_decay``).
        """
        grads = [g for _, g in items]
        states, steps = [], []
        for p, _ in items:
            state, k = self._begin_step(p)
            _drop_vr_leftovers(state)
            states.append(state)
            steps.append(k)
        beta = group["momentum"]
        moms = grads
        if beta > 0.0:
            bufs = [_momentum_buffer(state, g) for state, g in zip(states, grads, strict=True)]
            torch._foreach_lerp_(bufs, grads, 1.0 - beta)
            moms = list(torch._foreach_lerp(grads, bufs, beta)) if group["nesterov"] else bufs

        norms = [resolve_norm(group, p) for p, _ in items]
        operands = [
            _to_operand(norm, m, group["transposed"]) for norm, m in zip(norms, moms, strict=True)
        ]
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for j, (norm, op) in enumerate(zip(norms, operands, strict=True)):
            # Only norms that act on the last one or two dims batch over a new leading one.
            batched = norm.kind == "matrix" or (norm.kind == "vector" and op.ndim >= 1)
            key = (norm, tuple(op.shape), op.dtype, op.device) if batched else (j,)
            buckets.setdefault(key, []).append(j)
        directions: list[Tensor | None] = [None] * len(items)
        for idx in buckets.values():
            if len(idx) == 1:
                directions[idx[0]] = norms[idx[0]].direction(operands[idx[0]])
                continue
            stacked = norms[idx[0]].direction(torch.stack([operands[j] for j in idx]))
            for j, d in zip(idx, stacked.unbind(0), strict=True):
                directions[j] = d
        for j, (p, g) in enumerate(items):
            direction = directions[j]
            assert direction is not None
            self._apply_lmo(p, g, operands[j], direction, norms[j], group, steps[j])

    def _begin_step(self, p: Tensor) -> tuple[dict[str, Any], int]:
        """``p``'s state with its step counter advanced, and this step's 0-based index ``k``."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["step"] += 1
        return state, int(state["step"].item()) - 1  # a CPU scalar: no device synchronisation

    def _apply_lmo(
        self,
        p: Tensor,
        g: Tensor,
        operand: Tensor,
        direction: Tensor,
        norm: _norms.Norm,
        group: dict[str, Any],
        k: int,
    ) -> None:
        """``X <- X + t lmo(M)`` with the group's radius policy, weight decay and constraint.

        ``operand`` is the momentum as the norm sees it and ``direction`` its LMO direction.
        """
        transposed = group["transposed"]
        factor = norm.factor(operand.shape)
        lr = group["lr"]
        radius: float | Tensor = lr * group["scale"]
        if group["radius"] == "theory_decay":
            radius = radius * (k + 1) ** -0.75
        elif group["radius"] == "l0l1":
            if group["radius_source"] == "momentum":
                # -<M, lmo(M)> = f <M, D>: the dual norm comes free from the direction.
                dual = factor * (operand * direction.to(operand.dtype)).sum()
            else:
                dual = norm.dual(_to_operand(norm, g, transposed)).sum()
            # With L0 = 0 a zero gradient would make 0/0; the clamp keeps the step exactly 0.
            denom = (group["l0"] + group["l1"] * dual).clamp(min=torch.finfo(dual.dtype).tiny)
            radius = radius * dual / denom

        if group["weight_decay"] != 0.0:
            p.mul_(1.0 - lr * group["weight_decay"])
        if group["constrained"]:
            p.mul_(1.0 - lr)
        update = _from_operand(norm, direction, p, transposed)
        if isinstance(radius, Tensor):
            p.add_(update.to(p.dtype) * (-(radius * factor)).to(p.dtype))
        else:
            # The factor goes into alpha, never into the low-precision direction: for the Muon
            # preset this is exactly torch.optim.Muon's `param.add_(update, alpha=-adjusted_lr)`.
            p.add_(update, alpha=-(radius * factor))

    def _vr_momentum(
        self,
        p: Tensor,
        g: Tensor,
        g_prev: Tensor | None,
        group: dict[str, Any],
        state: dict[str, Any],
        k: int,
        index: int,
    ) -> Tensor:
        """Advance a variance-reduced estimator; return the momentum ``M^k`` for the LMO.

        The first step (no buffers yet) sets ``M^0 = G^0 = g_0(X^0)``. A missing two-point
        gradient (only possible when ``two_point`` or the estimator changed mid-run) is taken
        to be ``g``, which makes that one step an EMA step. Before ``p`` changes, the step
        records what the next one needs: ``X^k`` (exact) or ``g_k(X^k)`` (approx), in ``p``'s
        dtype, copied out of ``p`` / ``p.grad``.
        """
        estimator = group["estimator"]
        beta = group["momentum"]
        exact = group["two_point"] == "exact"
        buffers = _BUFFERS[estimator]
        keep = {"step", "prev_point_grad", "prev_param" if exact else "prev_grad", *buffers}
        for key in [key for key in state if key not in keep]:  # another estimator's leftovers
            del state[key]
        if not exact:
            g_prev = state.get("prev_grad")
        ready = all(key in state for key in buffers)
        gp = g if g_prev is None else g_prev

        if estimator == "storm_lowrank":
            if ready:
                m = _lowrank.reconstruct(
                    state["lowrank_u"], state["lowrank_s"], state["lowrank_v"]
                ).reshape(p.shape)
                storm_(m, g, gp, beta)
            else:
                m = g.clone()
            rows = p.shape[0]
            u, s, v = _lowrank.rsvd(
                m.reshape(rows, p.numel() // rows),
                group["rank"],
                oversampling=group["oversampling"],
                seed=_lowrank.sketch_seed(group["rsvd_seed"], k, index, group["role"]),
            )
            state["lowrank_u"], state["lowrank_s"], state["lowrank_v"] = (
                u.to(p.dtype),
                s.to(p.dtype),
                v.to(p.dtype),
            )
        elif not ready:
            for key in buffers:
                state[key] = g.clone(memory_format=torch.preserve_format)
            m = state["momentum_buffer"]
        else:
            m = state["momentum_buffer"]
            if estimator == "mvr1":
                mvr1_(m, g, gp, beta)
            elif estimator == "mvr2":
                mvr2_(m, state["mvr_estimate"], g, gp, beta, group["mvr_q"])
            elif estimator == "mvr3":
                mvr3_(m, state["mvr_estimate"], g, gp, beta, group["mvr_q"])
            else:
                storm_(m, g, gp, beta)

        key, source = ("prev_param", p) if exact else ("prev_grad", g)
        if key in state:
            state[key].copy_(source)
        else:
            state[key] = source.detach().clone(memory_format=torch.preserve_format)
        return m

    def _adamw_update(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> None:
        # torch.optim.AdamW's single-tensor update, in the same order of operations.
        state, k = self._begin_step(p)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = float(k + 1)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"] != 0.0:
            p.mul_(1.0 - lr * group["weight_decay"])
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        if isinstance(lr, Tensor):
            p.add_(exp_avg / denom * (-lr / bias_correction1).to(p.dtype))
        else:
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def describe(optimizer: Gluon) -> str:
    """A plain-text table with one row per parameter: what the optimizer will do to it.

    Columns: parameter name, shape, role, update (``adamw``, or the norm with its shape rule;
    ``(T)`` marks a transposed view), the LMO factor ``f`` of that shape (``lmo = -f * D``), the
    group's scale, lr, and the radius ``t = lr * scale`` of a constant-radius step.
    """
    header = ("param", "shape", "role", "update", "factor", "scale", "lr", "radius t")
    rows: list[tuple[str, ...]] = []
    for index, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        lr_f = float(lr) if not isinstance(lr, Tensor) else float(lr.item())
        for i, p in enumerate(group["params"]):
            shape = "x".join(str(s) for s in p.shape) or "scalar"
            if group["algorithm"] == "adamw":
                b1, b2 = group["betas"]
                rows.append(
                    (
                        _name(group, i),
                        shape,
                        group["role"] or f"group {index}",
                        f"adamw(b={b1},{b2})",
                        "-",
                        "-",
                        f"{lr_f:.3g}",
                        "-",
                    )
                )
                continue
            norm = resolve_norm(group, p)
            label = norm.name
            if norm.name == "spectral":
                label += f"/{group['shape_rule']}"
            if group["transposed"]:
                label += " (T)"
            factor = norm.factor(_operand_shape(norm, p, group["transposed"]))
            rows.append(
                (
                    _name(group, i),
                    shape,
                    group["role"] or f"group {index}",
                    label,
                    f"{factor:.4g}",
                    f"{group['scale']:.4g}",
                    f"{lr_f:.3g}",
                    f"{lr_f * group['scale']:.4g}",
                )
            )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
