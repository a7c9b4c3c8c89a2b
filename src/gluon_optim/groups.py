"""Param-group settings: the one table, its defaults, its validation and its typed signature.

:data:`SETTINGS` is assembled from the core settings below and the settings each estimator
(:mod:`gluon_optim.estimators`) and radius policy (:mod:`gluon_optim.radius`) declares for
itself. Everything else derives from it: :data:`DEFAULTS`, the checks run at construction,
``add_param_group``, ``load_state_dict`` and (for the ``per_step`` settings) every ``step()``,
and the settings table of ``docs/optimizer.md`` (:func:`settings_table`; a test keeps them
equal). :class:`GroupSettings` is the same table written for the type checker, so that
``Gluon(params, momentun=0.9)`` fails in mypy as well as at run time; a test checks it lists
exactly the keys of :data:`SETTINGS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from torch import Tensor

from gluon_optim import blocks as _blocks
from gluon_optim import norms as _norms
from gluon_optim.estimators import APPROX_REDUCES_TO, ESTIMATORS, Estimator, approx_reduction
from gluon_optim.estimators import RENAMED as _RENAMED_ESTIMATORS
from gluon_optim.polar import COMPILE_BACKENDS, NS_FORMS, NS_PRESETS
from gluon_optim.radius import POLICIES, RadiusPolicy
from gluon_optim.settings import (
    Choice,
    Flag,
    Integer,
    LearningRate,
    Number,
    OptionalFlag,
    Pair,
    Setting,
    Text,
)
from gluon_optim.storage import STATE_DTYPES

__all__ = [
    "DEFAULTS",
    "FOREIGN_KEYS",
    "RENAMED_KEYS",
    "SETTINGS",
    "GroupOptions",
    "GroupSettings",
    "PresetOptions",
    "check_keys",
    "param_name",
    "settings_table",
    "upgrade",
    "validate",
    "where",
    "write_docs",
]

_ALL = ("all",)
_LMO = ("lmo",)
_POLAR = ("spectral", "spectral_conv")

_CORE: tuple[Setting, ...] = (
    Setting(
        "algorithm",
        "lmo",
        Choice(("lmo", "adamw")),
        _ALL,
        "`lmo`: the Gluon step; `adamw`: torch.optim.AdamW's update (for what Muon leaves to Adam)",
    ),
    Setting("lr", 0.02, LearningRate(), _ALL, "learning rate; the radius is `lr * scale`", True),
    Setting(
        "weight_decay",
        0.0,
        Number(0.0),
        _ALL,
        "decoupled weight decay `X <- (1 - lr * wd) X`, as torch.optim.Muon / AdamW",
        True,
    ),
    Setting(
        "norm",
        "auto",
        Choice(lambda: ("auto", *_norms.NORMS)),
        _LMO,
        "the layer's norm; `auto`: bias_rms / spectral / spectral_conv by dimension",
    ),
    Setting("scale", 1.0, Number(0.0, lo_open=True), _LMO, "radius multiplier rho", True),
    Setting(
        "shape_rule",
        "rms",
        Choice(lambda: tuple(_norms.SHAPE_RULES)),
        ("spectral",),
        "shape factor of the spectral LMO (rms, muon, moonlight, none)",
    ),
    Setting(
        "transposed",
        False,
        Flag(),
        _LMO,
        "the parameter is stored `(d_in, d_out)` (e.g. nn.Embedding.weight)",
    ),
    Setting(
        "blocks",
        _blocks.WHOLE,
        _blocks.BlocksCheck(),
        _LMO,
        "the LMO units of a parameter: `whole`, stacked `experts`, and `d_out` split in "
        "`chunks=K` or `interleaved=K` blocks (gluon_optim.blocks)",
    ),
    Setting(
        "momentum",
        0.9,
        Number(0.0, 1.0, hi_open=True),
        _LMO,
        "beta, the weight of the OLD momentum, for every estimator (Scion's alpha = 1 - beta)",
        True,
    ),
    Setting(
        "estimator",
        "ema",
        Choice(lambda: tuple(ESTIMATORS), renamed=_RENAMED_ESTIMATORS),
        _LMO,
        "the momentum estimator (see the estimators table)",
    ),
    Setting("constrained", False, Flag(), _LMO, "SCG: `X <- (1 - lr) X + t lmo(M)`"),
    Setting(
        "radius_policy",
        "constant",
        Choice(lambda: tuple(POLICIES)),
        _LMO,
        "the step-size policy (see the radius policies table)",
    ),
    Setting(
        "polar_method",
        "newton_schulz",
        Choice(("newton_schulz", "svd")),
        _POLAR,
        "how `U V^T` is computed: Newton–Schulz or an exact SVD",
    ),
    Setting(
        "ns_preset",
        "jordan",
        Choice(lambda: tuple(NS_PRESETS)),
        _POLAR,
        "Newton–Schulz coefficients",
    ),
    Setting("ns_steps", 5, Integer(1, 99), _POLAR, "Newton–Schulz iterations"),
    Setting(
        "compute_dtype",
        "bfloat16",
        Choice(_norms.COMPUTE_DTYPES),
        _POLAR,
        "dtype Newton–Schulz runs in",
    ),
    Setting(
        "ns_form",
        "standard",
        Choice(NS_FORMS),
        _POLAR,
        "`standard`, `gram` (iterate on the Gram matrix) or `auto` (by FLOP count)",
    ),
    Setting(
        "compile",
        "",
        Choice(("", *COMPILE_BACKENDS)),
        _POLAR,
        "torch.compile backend for Newton–Schulz (`''`: eager)",
    ),
    Setting(
        "foreach",
        None,
        OptionalFlag(),
        ("ema", "adamw"),
        "multi-tensor kernels and batched LMOs; None: on when every parameter is on a GPU",
    ),
    Setting(
        "betas",
        (0.9, 0.95),
        Pair(Number(0.0, 1.0, hi_open=True), label="beta"),
        ("adamw",),
        "AdamW's (beta1, beta2)",
        True,
    ),
    Setting("eps", 1e-8, Number(0.0, lo_open=True), ("adamw",), "AdamW's epsilon"),
    Setting(
        "nonfinite",
        "raise",
        Choice(("raise", "skip", "ignore")),
        _ALL,
        "a NaN/inf gradient: `raise` before any change, `skip` the group's step, or `ignore`",
    ),
    Setting(
        "state_dtype",
        "auto",
        Choice(tuple(STATE_DTYPES)),
        _ALL,
        "dtype the estimator buffers and AdamW moments are stored in (updated in the wider of "
        "it and the parameter's); `auto`: the parameter's. Two-point buffers keep the parameter's",
    ),
    Setting("role", "", Text(), _ALL, "informational: the role a preset gave this group"),
    Setting("name", "", Text(), _ALL, "informational: a label (e.g. for an LR monitor)"),
)


def _assemble() -> tuple[Setting, ...]:
    out: dict[str, Setting] = {s.name: s for s in _CORE}
    owners: list[Estimator | RadiusPolicy] = [*ESTIMATORS.values(), *POLICIES.values()]
    for owner in owners:
        for s in owner.settings:
            if out.setdefault(s.name, s) is not s:
                raise RuntimeError(f"setting {s.name!r} is declared twice")
    return tuple(out.values())


#: Every group key, declared once.
SETTINGS: tuple[Setting, ...] = _assemble()
_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
_PER_STEP: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.per_step)
_STABLE: tuple[str, ...] = tuple(s.name for s in SETTINGS if not s.per_step)

#: Every group key with its default. Values are plain data (str, float, int, bool, tuple), so
#: ``state_dict()`` loads with ``torch.load(weights_only=True)``.
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}

#: Keys that torch, its schedulers or other frameworks add to a group; accepted and ignored by
#: the step. ``lr_scale`` is timm's layer-wise decay factor: timm's schedulers multiply the lr by
#: it, so the group's ``lr`` already includes it when a step reads it. Any other unknown key is
#: an error, because a misspelt setting (``momentun``) must not pass as a label.
FOREIGN_KEYS = frozenset({"params", "param_names", "initial_lr", "differentiable", "lr_scale"})

#: Group keys of earlier versions, with the key that replaces them.
RENAMED_KEYS: dict[str, str] = {"radius": "radius_policy"}


class PresetOptions(TypedDict, total=False):
    """Every setting but ``lr`` and ``rank``: what a preset with its own ``lr`` and ``rank``
    arguments (``limuon``) forwards to its groups."""

    algorithm: str
    weight_decay: float
    norm: str
    scale: float
    shape_rule: str
    transposed: bool
    blocks: str
    momentum: float
    estimator: str
    constrained: bool
    radius_policy: str
    polar_method: str
    ns_preset: str
    ns_steps: int
    compute_dtype: str
    ns_form: str
    compile: str
    foreach: bool | None
    betas: tuple[float, float]
    eps: float
    nonfinite: str
    state_dtype: str
    role: str
    name: str
    nesterov: bool
    momentum_init: str
    two_point: str
    allow_degenerate: bool
    mvr_q: float
    mars_gamma: float
    oversampling: int
    rsvd_seed: int
    l0: float
    l1: float
    radius_source: str


class GroupOptions(PresetOptions, total=False):
    """Every setting but ``lr``: the keyword arguments of ``Gluon(params, lr, **options)``."""

    rank: int


class GroupSettings(GroupOptions, total=False):
    """The settings a param group may set, for the type checker (a test checks the keys)."""

    lr: float | Tensor


def upgrade(group: dict[str, Any]) -> dict[str, Any]:
    """A param group saved by gluon-optim 0.1.0, in today's settings (``Gluon.load_state_dict``).

    ``radius`` becomes ``radius_policy``; LiMuon's ``momentum`` (its beta, the weight of the
    fresh gradient) becomes ``1 - beta``, and estimator ``storm`` is ``mvr1``.
    """
    if "radius" not in group:  # 0.1.0 saved every default, "radius" included
        return group
    group["radius_policy"] = group.pop("radius")
    if group.get("estimator") in ("storm", "storm_lowrank"):
        group["momentum"] = 1.0 - group["momentum"]
        if group["estimator"] == "storm":
            group["estimator"] = "mvr1"
    return group


def param_name(group: Mapping[str, Any], i: int) -> str:
    """The name of a group's ``i``-th parameter (``params[i]`` where the group has no names)."""
    names = group.get("param_names")
    return str(names[i]) if names else f"params[{i}]"


def where(group: Mapping[str, Any], index: int | None) -> str:
    """`` (param group 3, role 'hidden')``: where an error happened, for its message."""
    role = f", role {group['role']!r}" if group.get("role") else ""
    return f" (param group {index}{role})" if index is not None else f" (new param group{role})"


def check_keys(keys: Mapping[str, Any] | set[str], context: str) -> None:
    """Raise ``ValueError`` for a key that is no setting (naming a renamed key's new name)."""
    for old, new in RENAMED_KEYS.items():
        if old in keys:
            raise ValueError(
                f"{context}: option {old!r} was renamed to {new!r} in gluon-optim 0.2.0"
            )
    unknown = sorted(set(keys) - set(DEFAULTS) - FOREIGN_KEYS)
    if unknown:
        raise ValueError(f"{context} got unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")


#: The largest lr x scale (and lr x weight_decay) accepted: past it a float32 step overflows
#: part-way through an update, after other parameters already moved.
_HUGE = 1e30


def _overflows(group: Mapping[str, Any], key: str) -> bool:
    lr = group["lr"]
    return not isinstance(lr, Tensor) and lr * group[key] > _HUGE


@dataclass(frozen=True)
class _Rule:
    """A constraint between settings: ``broken(group)`` is true when it does not hold.

    ``message`` is formatted with the group's settings and ``where``; a callable makes it from
    the group first (when its words depend on a value).
    """

    broken: Callable[[Mapping[str, Any]], bool]
    message: str | Callable[[Mapping[str, Any]], str]


def _degenerate(g: Mapping[str, Any]) -> bool:
    """An MVR estimator in approx mode, not opted into (``allow_degenerate``)."""
    return (
        g["algorithm"] == "lmo"
        and g["estimator"] in APPROX_REDUCES_TO
        and g["two_point"] == "approx"
        and not g["allow_degenerate"]
    )


def _degenerate_message(g: Mapping[str, Any]) -> str:
    # The preset's sentence (approx_reduction), then what a group can do instead.
    return (
        "estimator={estimator!r}{where}: "
        + approx_reduction(g["estimator"])
        + ". Use two_point='exact' (the paper's method), or estimator='mars' with "
        "two_point='approx' for a one-gradient correction that keeps a momentum; "
        "allow_degenerate=True runs the reduction on purpose (to show it)"
    )


_RULES: tuple[_Rule, ...] = (
    _Rule(
        lambda g: g["algorithm"] == "adamw" and g["estimator"] != "ema",
        "estimator={estimator!r} needs algorithm='lmo'{where}; AdamW groups keep AdamW's own "
        "moments (estimator='ema')",
    ),
    _Rule(
        lambda g: g["nesterov"] and g["estimator"] != "ema",
        "nesterov=True is defined for estimator='ema' only, got estimator={estimator!r}{where}; "
        "the variance-reduced estimators have no Nesterov form in their sources",
    ),
    _Rule(
        lambda g: g["nesterov"] and g["momentum"] == 0.0,
        "nesterov=True needs momentum > 0{where}",
    ),
    _Rule(
        lambda g: g["radius_policy"] == "l0l1" and g["l0"] == 0.0 and g["l1"] == 0.0,
        "radius_policy='l0l1' needs l0 > 0 or l1 > 0{where}",
    ),
    _Rule(
        lambda g: _overflows(g, "scale") or _overflows(g, "weight_decay"),
        "lr={lr!r} with scale={scale!r} and weight_decay={weight_decay!r}{where}: a step of "
        f"that size overflows float32 (lr times scale and lr times weight_decay must stay "
        f"below {_HUGE:g}); nothing was changed",
    ),
    _Rule(_degenerate, _degenerate_message),
)


def _raise_first(
    group: Mapping[str, Any], index: int | None, settings: tuple[Setting, ...]
) -> None:
    loc = where(group, index)
    for s in settings:
        err = s.error(group[s.name], loc)
        if err is not None:
            raise ValueError(err)
    for rule in _RULES:
        if rule.broken(group):
            message = rule.message(group) if callable(rule.message) else rule.message
            raise ValueError(message.format(where=loc, **group))


_LR_ON_DEVICE = LearningRate(read_device_values=True)


def validate(group: Mapping[str, Any], index: int | None) -> None:
    """Raise ``ValueError`` naming the first invalid setting of a complete ``group``.

    This complete check also reads a tensor lr that lives on a device (one host transfer), which
    the per-step check leaves alone.
    """
    _raise_first(group, index, SETTINGS)
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.device.type != "cpu":  # a CPU lr was read just above
        err = _LR_ON_DEVICE.error("lr", lr, where(group, index))
        if err is not None:
            raise ValueError(err)


def validate_step(group: Mapping[str, Any], index: int, seen: dict[int, tuple[Any, ...]]) -> None:
    """The check of ``step()``: the per-step settings always, the rest only when it changed.

    ``seen`` maps ``id(group)`` to the types and values of the other settings when they last
    passed, so a step in which nothing but the lr changed costs one tuple comparison per group.
    The types come first: a value of another type (a tensor put where a flag was) makes the
    comparison stop at the types, before ``==`` could compare it elementwise and raise, and
    the complete check then names the setting.
    """
    values = tuple(group[name] for name in _STABLE)
    stable = (tuple(map(type, values)), values)
    if seen.get(id(group)) == stable:
        _raise_first(group, index, _PER_STEP)
        return
    validate(group, index)
    seen[id(group)] = stable


def _cell(text: str) -> str:
    # A pipe inside a cell would end it, even inside backticks (norms are written ||x||).
    return text.replace("|", "\\|")


def _markdown(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines)


def _names(items: Iterable[str]) -> str:
    return ", ".join(f"`{x}`" for x in items) or "-"


def settings_table() -> str:
    """The settings as a Markdown table (what ``docs/optimizer.md`` shows)."""
    rows = [
        (
            f"`{s.name}`",
            f"`{s.default!r}`",
            s.check.describe(),
            ", ".join(s.applies),
            s.doc + (" (checked every step)" if s.per_step else ""),
        )
        for s in SETTINGS
    ]
    return _markdown(("setting", "default", "allowed", "applies to", "doc"), rows)


def estimators_table() -> str:
    """The estimators as a Markdown table."""
    rows = [
        (
            f"`{e.name}`",
            "yes" if e.two_point else "no",
            _names(e.state),
            _names(s.name for s in e.settings),
            e.doc,
        )
        for e in ESTIMATORS.values()
    ]
    return _markdown(("estimator", "two-point", "state", "settings", "update"), rows)


def policies_table() -> str:
    """The radius policies as a Markdown table."""
    rows = [(f"`{p.name}`", _names(s.name for s in p.settings), p.doc) for p in POLICIES.values()]
    return _markdown(("radius_policy", "settings", "radius"), rows)


#: The generated blocks of docs/optimizer.md, by marker name.
DOC_TABLES = {
    "settings": settings_table,
    "estimators": estimators_table,
    "radius-policies": policies_table,
}


def render_docs(text: str) -> str:
    """``text`` with every ``<!-- NAME:start -->...<!-- NAME:end -->`` block regenerated."""
    for name, make in DOC_TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise ValueError(f"the document has no {start} ... {end} block")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{make()}\n{end}{tail}"
    return text


def write_docs(path: str | Path) -> None:
    """Regenerate the tables of a document in place (``make docs-tables``)."""
    path = Path(path)
    path.write_text(render_docs(path.read_text()))
