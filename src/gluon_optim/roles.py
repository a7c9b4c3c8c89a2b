"""Roles: which part of the network each parameter is, decided from modules, never from shapes.

A role says how a parameter enters the network, which is what the choice of norm depends on
(Scion Recommendation 3.1; Gluon section 4.1):

========== ===========================================================================
role       parameters
========== ===========================================================================
embedding  ``nn.Embedding`` weights (one-hot input), learned positions and tokens (below), or
           whatever ``embedding=`` names
tied       a weight that is both the token embedding and the output head
hidden     ``nn.Linear`` and Hugging Face ``Conv1D`` weights, attention projections
conv       ``nn.Conv1d/2d/3d`` kernels
head       the output layer's weight (found as described below, or named by ``head=``)
bias       biases of linear, conv and attention layers (including the head's)
norm       gains and shifts of normalisation layers, learned per-channel scales
========== ===========================================================================

The rules, in order of precedence (the first that applies decides):

1. ``roles=``: by parameter name (``fnmatch`` patterns, ``"*.pos_embed"``) or by module class
   (``{LlamaRMSNorm: "norm"}``, all of that class's own parameters; or
   ``{MyLinear: {"weight": "hidden", "bias": "bias"}}``). Names match with and without the
   prefixes that wrappers add (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``,
   ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``).
2. ``head=`` / ``embedding=``; without ``head=``, the head is the first of: the model's
   ``get_output_embeddings()`` (Hugging Face), ``get_classifier()`` (timm), then an attribute
   ``lm_head``, ``head``, ``heads``, ``fc``, ``classifier`` or ``score``. A module without
   parameters of its own stands for the last ``nn.Linear`` inside it (a ``Sequential``
   classifier); one with no parameters at all (timm's ``nn.Identity`` for ``num_classes=0``)
   means "no head".
3. Module types: ``nn.Embedding``, ``nn.Linear``, ``nn.Conv*d``, ``nn.MultiheadAttention``,
   torch's normalisation layers, and two families torch does not define:

   * **Hugging Face ``Conv1D``** (GPT-2 and its relatives): a module whose class is named
     ``Conv1D``, with an ``nf`` attribute and a weight of shape ``(d_in, nf)``. It is a linear
     layer stored transposed, so its weight is ``hidden`` and flagged ``transposed``: the
     presets put it in a group with ``transposed=True`` where the norm reads matrices, so shape
     factors come from the true ``(d_out, d_in)``, the same as an ``nn.Linear`` twin.
   * **Normalisation layers of any library**: a module whose class name contains ``Norm`` not
     followed by a lower-case letter (``LayerNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``,
     ``LayerNorm2d``, ``FusedRMSNorm``; not ``Normal`` or ``Normalize``) and whose own
     parameters are all vectors. Limits: a norm class named otherwise (``ScaleNorm`` matches,
     ``LN`` does not), or one that holds a matrix, needs ``roles={TheClass: "norm"}``.
   * **Hugging Face experts modules**: a module that declares its weights' layout as
     transformers' ``@use_experts_implementation`` does (``is_transposed``,
     ``is_concatenated`` and ``has_gate`` are booleans on the instance). Its 3-D weights are
     stacks of experts: ``hidden``, with ``blocks="experts"`` (each expert its own LMO unit,
     :mod:`gluon_optim.blocks`) and ``transposed`` from ``is_transposed``; its 2-D biases
     (``gate_up_proj_bias``, ``(E, d_out)``) are ``bias``.
   * **Routers**: a class whose name contains ``Router`` with a matrix ``weight``
     (``MixtralTopKRouter``, ``DeepseekV3TopkRouter``): a linear map ``d -> E``, so its
     weight is ``hidden`` and a ``bias`` is ``bias``.
4. Bare ``nn.Parameter``s that no module type covers, by their own name: learned positions and
   tokens (``pos_embed``, ``pos_embedding``, ``position_embedding(s)``, ``absolute_pos_embed``,
   ``cls_token``, ``class_token``, ``dist_token``, ``reg_token``, ``mask_token``) with 2 or
   more dims are ``embedding``; vectors named ``gamma``, ``gamma_1``, ``gamma_2``, ``scale``,
   ``layer_scale`` or ``ls_gamma`` (layer scale) are ``norm``; a vector named ``bias`` or
   ``sinks`` (GPT-OSS's attention sinks, one logit per head) is ``bias``. Any other bare
   parameter is an error: its meaning cannot be read off its name or shape.

A parameter no rule covers is an error, and so is a parameter that two rules of the same rank
claim with different roles. The error lists the parameters grouped by module class and ends
with a ``roles=`` argument to paste and check. Frozen parameters (``requires_grad=False``) are
left out.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gluon_optim.blocks import WHOLE, BlocksCheck

__all__ = ["FUSED", "ROLES", "Assignment", "Fused", "RoleKey", "assign_roles", "unwrap_model"]

ROLES: tuple[str, ...] = ("embedding", "tied", "hidden", "conv", "head", "bias", "norm")

_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
#: "Norm" not followed by a lower-case letter: LayerNorm, RMSNorm2d, RMSNormGated; not Normal.
_NORM_CLASS_NAME = re.compile(r"Norm(?![a-z])")
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_ATTENTION_BIASES = ("in_proj_bias", "bias_k", "bias_v")
_HEAD_ATTRIBUTES = ("lm_head", "head", "heads", "fc", "classifier", "score")
_RAW_EMBEDDINGS = (
    "pos_embed",
    "pos_embedding",
    "position_embedding",
    "position_embeddings",
    "absolute_pos_embed",
    "cls_token",
    "class_token",
    "dist_token",
    "reg_token",
    "mask_token",
)
_RAW_SCALES = ("gamma", "gamma_1", "gamma_2", "scale", "layer_scale", "ls_gamma")
#: Additive vectors: a bare bias, and attention sinks (GPT-OSS: one logit per head that every
#: query attends to, added to the softmax's denominator).
_RAW_BIASES = ("bias", "sinks")
#: Path segments that wrappers insert into parameter names.
_WRAPPER_SEGMENT = re.compile(
    r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\."
)

ModuleRef = nn.Module | nn.Parameter | Iterable[nn.Module | nn.Parameter]
#: A key of ``roles=``: a parameter-name pattern or a module class.
RoleKey = str | type[nn.Module]


#: Values of ``fused=``: how weights that concatenate layers are split by default.
FUSED: tuple[str, ...] = ("whole", "projections", "heads")
#: Module attribute names of fused attention projections ``[q; k; v]`` (GPT-2's and nanoGPT's
#: ``c_attn``, timm's and the lab's ``qkv``, Phi-3's ``qkv_proj``, MosaicML's ``Wqkv``) and of
#: fused gated-MLP inputs ``[gate; up]``.
_FUSED_QKV = ("c_attn", "qkv", "qkv_proj", "Wqkv")
_FUSED_GATE_UP = ("gate_up_proj",)
_HEADS = ("n_head", "num_heads", "num_attention_heads", "n_heads")
_KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")


@dataclass(frozen=True)
class Fused:
    """A weight that concatenates layers along ``d_out``, read from its module.

    ``projections`` is the ``blocks`` value of one unit per projection (``"chunks=3"`` for an
    equal ``[q; k; v]``, ``"chunks=2"`` for ``[gate; up]``), ``heads`` that of one unit per
    head of ``q``, ``k`` and ``v``; ``""`` where the layout has no such split that
    :mod:`gluon_optim.blocks` can express (a grouped-query ``[q; k; v]`` per projection has
    unequal blocks).
    """

    kind: str  # "qkv" or "gate_up"
    projections: str
    heads: str


@dataclass(frozen=True)
class Assignment:
    """One parameter with its role: ``name`` is its first name in ``model.named_parameters()``.

    ``transposed`` is true for a weight stored ``(d_in, d_out)`` where its role's modules store
    ``(d_out, d_in)`` (a Hugging Face ``Conv1D`` weight in role ``hidden`` or ``head``).
    ``blocks`` says which LMO units the weight holds (:mod:`gluon_optim.blocks`): ``"experts"``
    for a stack of experts, the split ``fused=`` asked for, or what ``blocks=`` set; ``fused``
    is the fused layout read from the module, if any.
    """

    name: str
    param: nn.Parameter
    role: str
    module: str
    transposed: bool = False
    blocks: str = WHOLE
    fused: Fused | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def _plain_names(name: str, wrapped: bool) -> list[str]:
    """``name`` and the same name without the segments that wrappers insert."""
    plain = _WRAPPER_SEGMENT.sub("", name)
    if wrapped and plain.startswith("module."):
        plain = plain[len("module.") :]
    return [name] if plain == name else [name, plain]


def _param_ids(ref: ModuleRef | None, what: str) -> dict[int, str]:
    """Parameter ids named by a head/embedding argument, mapped to the role they imply."""
    if ref is None:
        return {}
    items = [ref] if isinstance(ref, (nn.Module, nn.Parameter, torch.Tensor)) else list(ref)
    out: dict[int, str] = {}
    for item in items:
        if isinstance(item, nn.Module):
            for pname, p in item.named_parameters(recurse=False):
                out[id(p)] = "bias" if pname == "bias" else "weight"
            if not any(True for _ in item.parameters(recurse=False)):
                raise ValueError(
                    f"{what}: the {type(item).__name__} module passed has no parameters of its "
                    "own; pass the layer itself (or its weight)"
                )
        elif isinstance(item, torch.Tensor):
            out[id(item)] = "weight"
        else:
            raise TypeError(f"{what} must be modules or parameters, got {type(item).__name__}")
    return out


def _is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(d_in, nf)``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def _is_norm_layer(module: nn.Module) -> bool:
    if isinstance(module, _NORM_LAYERS):
        return True
    own = [p for _, p in module.named_parameters(recurse=False)]
    return (
        bool(_NORM_CLASS_NAME.search(type(module).__name__))
        and bool(own)
        and all(p.ndim == 1 for p in own)
    )


def _is_experts(module: nn.Module) -> bool:
    """A Hugging Face experts module: one that declares its weights' layout.

    transformers' ``@use_experts_implementation`` sets ``is_transposed``, ``is_concatenated``,
    ``has_gate`` and ``has_bias`` on every instance of an experts class (Mixtral, Qwen3-MoE,
    DeepSeek-V3, GPT-OSS and the rest), whose weights are stacks ``(E, d_out, d_in)``, or
    ``(E, d_in, d_out)`` when ``is_transposed``.
    """
    return all(
        isinstance(getattr(module, a, None), bool)
        for a in ("is_transposed", "is_concatenated", "has_gate")
    )


def _count(module: nn.Module | None, names: tuple[str, ...]) -> int | None:
    """The first positive int among ``names`` on ``module`` or its ``config``."""
    for owner in (module, getattr(module, "config", None)):
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _fused(
    attr: str, module: nn.Module, parent: nn.Module | None, pname: str, p: torch.Tensor
) -> Fused | None:
    """The fused layout of weight ``pname`` of ``module`` (held as ``parent.<attr>``)."""
    if _is_experts(module) and p.ndim == 3 and pname == "gate_up_proj" and module.has_gate:
        split = "chunks=2" if module.is_concatenated else "interleaved=2"
        return Fused("gate_up", f"experts+{split}", "")
    if (
        pname != "weight"
        or p.ndim != 2
        or not (isinstance(module, nn.Linear) or _is_conv1d(module))
    ):
        return None
    d_out = p.shape[1] if _is_conv1d(module) else p.shape[0]
    if attr in _FUSED_GATE_UP and d_out % 2 == 0:
        return Fused("gate_up", "chunks=2", "")
    if attr not in _FUSED_QKV:
        return None
    heads = _count(parent, _HEADS)
    kv = _count(parent, _KV_HEADS) or heads
    if heads is None or kv is None:
        return Fused("qkv", "chunks=3", "") if d_out % 3 == 0 else None
    units = heads + 2 * kv
    if d_out % units:
        return None
    return Fused("qkv", "chunks=3" if kv == heads else "", f"chunks={units}")


def _is_router(module: nn.Module) -> bool:
    """A mixture-of-experts router: a class named ``...Router`` with a matrix ``weight``."""
    weight = getattr(module, "weight", None)
    return (
        "Router" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.ndim == 2
    )


def _type_role(module: nn.Module, pname: str, p: torch.Tensor) -> tuple[str, bool] | None:
    """The role (and whether the weight is stored transposed) that a module type implies."""
    if _is_experts(module):
        if p.ndim == 3:
            return "hidden", bool(module.is_transposed)
        return ("bias", False) if pname.endswith("bias") and p.ndim == 2 else None
    if _is_router(module):
        return {"weight": ("hidden", False), "bias": ("bias", False)}.get(pname)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return ("embedding", False) if pname == "weight" else None
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return {"weight": ("conv", False), "bias": ("bias", False)}.get(pname)
    if isinstance(module, nn.Linear):
        return {"weight": ("hidden", False), "bias": ("bias", False)}.get(pname)
    if _is_conv1d(module):
        return {"weight": ("hidden", True), "bias": ("bias", False)}.get(pname)
    if isinstance(module, nn.MultiheadAttention):
        if pname in _ATTENTION_WEIGHTS:
            return "hidden", False
        if pname in _ATTENTION_BIASES:
            return "bias", False
        return None
    if _is_norm_layer(module):
        return "norm", False
    return None


def _raw_role(pname: str, p: torch.Tensor) -> str | None:
    """The role of a bare parameter with a conventional name (rule 4 of the module docstring)."""
    if pname in _RAW_EMBEDDINGS and p.ndim >= 2:
        return "embedding"
    if pname in _RAW_SCALES and p.ndim == 1:
        return "norm"
    if pname in _RAW_BIASES and p.ndim == 1:
        return "bias"
    return None


def _last_linear(module: nn.Module) -> nn.Module | None:
    found = [m for m in module.modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
    return found[-1] if found else None


def _as_head(found: object) -> ModuleRef | None:
    """A head candidate as a head argument; ``[]`` for "no head", ``None`` for "not a head"."""
    if isinstance(found, nn.Parameter):
        return found
    if not isinstance(found, nn.Module):
        return None
    if any(True for _ in found.parameters(recurse=False)):
        return found
    inner = _last_linear(found)
    if inner is not None:
        return inner
    return [] if not any(True for _ in found.parameters()) else None


def _default_head(model: nn.Module) -> ModuleRef:
    inner = unwrap_model(model)
    for method in ("get_output_embeddings", "get_classifier"):
        getter = getattr(inner, method, None)
        if callable(getter):
            try:
                head = _as_head(getter())
            except (AttributeError, NotImplementedError, TypeError):
                head = None  # a model whose getter is declared but not wired up
            if head is not None:
                return head
    for attr in _HEAD_ATTRIBUTES:
        head = _as_head(getattr(inner, attr, None))
        if head is not None:
            return head
    raise ValueError(
        f"No head found for {type(inner).__name__}: it has no get_output_embeddings() or "
        f"get_classifier() and no attribute {', '.join(_HEAD_ATTRIBUTES)}. Pass head=<output "
        "module> (the layer that produces logits, which gets its own norm), or head=[] if the "
        "model has none. Roles are not guessed from shapes."
    )


def _check_keyed(
    what: str, mapping: Mapping[RoleKey, Any], problem: Callable[[Any], str | None]
) -> None:
    """Check ``roles=`` or ``blocks=`` (``what``): keys are parameter-name patterns or module
    classes, and ``problem`` says what is wrong with a value (each value of a class's
    ``{parameter-name pattern: value}``), or ``None``."""
    for key, value in mapping.items():
        if not isinstance(key, (str, type)):
            raise TypeError(
                f"{what}: key {key!r} must be a parameter-name pattern or a module class"
            )
        values = value.values() if isinstance(value, Mapping) and isinstance(key, type) else [value]
        for item in values:
            reason = problem(item)
            if reason is not None:
                raise ValueError(f"{what}[{_key_text(key)}] = {value!r}: {reason}")


def _not_a_role(role: Any) -> str | None:
    return None if role in ROLES else f"{role!r} is not a role; expected one of {ROLES}"


def _class_roles(
    roles: Mapping[RoleKey, Any], module: nn.Module, pname: str
) -> list[tuple[RoleKey, str]]:
    out: list[tuple[RoleKey, str]] = []
    for key, value in roles.items():
        if isinstance(key, type) and isinstance(module, key):
            if isinstance(value, Mapping):
                out += [(key, r) for pat, r in value.items() if fnmatch.fnmatchcase(pname, pat)]
            else:
                out.append((key, value))
    return out


def _chosen_blocks(
    name: str,
    info: _Seen,
    blocks: Mapping[RoleKey, Any],
    role: str,
    fused: str,
    used: set[RoleKey],
    problems: list[str],
) -> str:
    """The ``blocks`` of one parameter: ``blocks=`` by name, then by class, then the split
    ``fused`` asks for where the module is fused, then the module's stack of experts."""
    explicit = [
        (pat, b)
        for pat, b in blocks.items()
        if isinstance(pat, str) and any(fnmatch.fnmatchcase(n, pat) for n in info.names)
    ] or info.blocks
    used.update(key for key, _ in explicit)
    if len({b for _, b in explicit}) > 1:
        where = ", ".join(f"blocks[{_key_text(k)}] -> {b!r}" for k, b in explicit)
        problems.append(f"{name!r} matches blocks overrides with different values: {where}")
    if explicit:
        return str(explicit[0][1])
    if role != "hidden":
        return WHOLE
    if info.fused is not None and fused != "whole":
        # "heads" is the finest split: per head where there are heads, else per projection.
        split = info.fused.heads if fused == "heads" else ""
        split = split or info.fused.projections
        if split:
            return split
    return "experts" if info.stacked else WHOLE


def _key_text(key: RoleKey) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


@dataclass
class _Seen:
    """What the module walk learned about one parameter."""

    names: list[str]
    module: nn.Module
    typed: list[tuple[str, bool, str]]  # (role, transposed, why)
    by_class: list[tuple[RoleKey, str]]
    raw: str | None
    stacked: bool = False  # a stack of experts, by its module's declared layout
    blocks: list[tuple[RoleKey, str]] = field(default_factory=list)  # blocks= that match it
    fused: Fused | None = None


def _walk(
    model: nn.Module, roles: Mapping[RoleKey, Any], blocks: Mapping[RoleKey, Any]
) -> dict[int, _Seen]:
    seen: dict[int, _Seen] = {}
    wrapped = unwrap_model(model) is not model
    modules = dict(model.named_modules(remove_duplicate=False))
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            info = seen.setdefault(id(p), _Seen([], module, [], [], None))
            info.names += [n for n in _plain_names(full, wrapped) if n not in info.names]
            typed = _type_role(module, pname, p)
            if typed is not None:
                info.typed.append((*typed, f"{type(module).__name__} {full}"))
            info.stacked = info.stacked or (_is_experts(module) and p.ndim == 3)
            parent = modules.get(mname.rpartition(".")[0]) if mname else None
            info.fused = info.fused or _fused(mname.rpartition(".")[2], module, parent, pname, p)
            info.by_class += _class_roles(roles, module, pname)
            info.blocks += _class_roles(blocks, module, pname)
            if info.raw is None:
                info.raw = _raw_role(pname, p)
    return seen


def _suggest(name: str, p: torch.Tensor) -> str:
    """A role to propose in the error message (to be checked: shapes do not decide roles)."""
    if name.rsplit(".", 1)[-1] == "bias":
        return "bias"
    if p.ndim == 1:
        return "norm"
    if p.ndim >= 3 and p.shape[0] == 1:
        return "embedding"
    return "conv" if p.ndim > 2 else "hidden"


def _unassigned_message(model: nn.Module, missing: list[tuple[str, torch.Tensor, _Seen]]) -> str:
    by_class: dict[type, list[tuple[str, torch.Tensor]]] = {}
    for name, p, info in missing:
        by_class.setdefault(type(info.module), []).append((name, p))
    lines = [
        f"{len(missing)} parameter(s) of {type(model).__name__} have no role (no rule covers "
        "their module type or name); by module class:"
    ]
    suggestion: dict[str, str] = {}
    for cls, params in by_class.items():
        examples = ", ".join(f"{n} {tuple(p.shape)}" for n, p in params[:3])
        more = f", ... ({len(params) - 3} more)" if len(params) > 3 else ""
        lines.append(
            f"      {cls.__module__}.{cls.__qualname__}: {len(params)} parameter(s): "
            f"{examples}{more}"
        )
        for name, p in params:
            # Layer indices become wildcards: one entry covers every block.
            pattern = re.sub(r"(?<=\.)\d+(?=\.)", "*", name)
            suggestion.setdefault(pattern, _suggest(name, p))
    pasted = ", ".join(f"{k!r}: {v!r}" for k, v in suggestion.items())
    lines.append(
        "    Give them roles by name or by class (roles={TheClass: 'norm'}). A starting point, "
        "guessed from shapes, so check every entry:\n      roles={" + pasted + "}"
    )
    return "\n".join(lines)


def assign_roles(
    model: nn.Module,
    *,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    blocks: Mapping[RoleKey, Any] | None = None,
    fused: str = "whole",
) -> list[Assignment]:
    """Give every trainable parameter of ``model`` exactly one role (rules: module docstring).

    Args:
        model: the network (DDP, DataParallel and ``torch.compile`` wrappers are looked through).
        head: the output layer (module or parameter, or a list); ``None`` finds it as the module
            docstring says; ``[]`` declares that there is none.
        embedding: extra input embeddings beyond those found by module type and name.
        roles: explicit roles. Keys are parameter-name patterns (``fnmatch``: ``"*.pos_embed"``)
            mapped to a role, or module classes mapped to a role (for all of the class's own
            parameters) or to ``{parameter-name pattern: role}``.
        blocks: explicit ``blocks`` (:mod:`gluon_optim.blocks`), keyed as ``roles``:
            ``{"*.c_attn.weight": "chunks=3"}``, ``{MyExperts: "experts"}``. Without one, a
            stack of experts of a module that declares its layout is ``"experts"`` and every
            other parameter ``"whole"``.
        fused: how a weight that concatenates layers (see :class:`Fused`) is split when
            ``blocks=`` does not name it: ``"whole"`` (one unit, the default), ``"projections"``
            (``[q; k; v]`` in 3, ``[gate; up]`` in 2, each expert's too) or ``"heads"`` (one
            unit per head of ``q``, ``k`` and ``v``; ``[gate; up]`` as under
            ``"projections"``). A layout that has no such split stays as it would be otherwise.

    Returns:
        One :class:`Assignment` per parameter, in ``model.named_parameters()`` order.

    Raises:
        ValueError: a parameter has no role, two conflicting roles, or an override names an
            unknown role or matches nothing.
    """
    roles, blocks = dict(roles or {}), dict(blocks or {})
    if fused not in FUSED:
        raise ValueError(f"Unknown fused {fused!r}; expected one of {FUSED}")
    _check_keyed("roles", roles, _not_a_role)
    _check_keyed("blocks", blocks, BlocksCheck())
    head_ids = _param_ids(_default_head(model) if head is None else head, "head")
    embedding_ids = _param_ids(embedding, "embedding")
    seen = _walk(model, roles, blocks)

    used: set[RoleKey] = set()
    out: list[Assignment] = []
    problems: list[str] = []
    missing: list[tuple[str, torch.Tensor, _Seen]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pid, info = id(p), seen[id(p)]
        typed_roles = {r for r, _, _ in info.typed}
        explicit = [
            (pat, r)
            for pat, r in roles.items()
            if isinstance(pat, str) and any(fnmatch.fnmatchcase(n, pat) for n in info.names)
        ] or info.by_class
        used.update(key for key, _ in explicit)
        in_head = head_ids.get(pid)
        in_emb = embedding_ids.get(pid) or ("weight" if "embedding" in typed_roles else None)

        chosen: str | None = None
        if in_head == "weight":
            chosen = "tied" if in_emb == "weight" else "head"
        elif in_head == "bias":
            chosen = "bias"
        elif pid in embedding_ids:
            chosen = "embedding" if embedding_ids[pid] == "weight" else "bias"
        if explicit:
            if len({r for _, r in explicit}) > 1:
                where = ", ".join(f"roles[{_key_text(k)}] -> {r!r}" for k, r in explicit)
                problems.append(f"{name!r} matches role overrides with different roles: {where}")
                continue
            if chosen is not None and chosen != explicit[0][1]:
                problems.append(
                    f"{name!r} is given two roles: {chosen!r} (head/embedding argument) and "
                    f"{explicit[0][1]!r} (roles[{_key_text(explicit[0][0])}])"
                )
                continue
            chosen = explicit[0][1]
        if chosen is None and len(typed_roles) > 1:
            where = "; ".join(f"{why} -> {r}" for r, _, why in info.typed)
            problems.append(
                f"{name!r} is shared by modules with different roles ({where}); name it with "
                "head=, embedding= or roles="
            )
            continue
        if chosen is None:
            chosen = typed_roles.pop() if typed_roles else info.raw
        if chosen is None:
            missing.append((name, p, info))
            continue
        # The stored layout matters only where the chosen role reads the weight as a layer.
        transposed = chosen in ("hidden", "head") and any(
            t for r, t, _ in info.typed if r == "hidden"
        )
        module = type(info.module).__name__
        split = _chosen_blocks(name, info, blocks, chosen, fused, used, problems)
        out.append(Assignment(name, p, chosen, module, transposed, split, info.fused))

    unused = sorted((_key_text(k) for k in set(roles) - used), key=str)
    unused += sorted((f"blocks[{_key_text(k)}]" for k in set(blocks) - used), key=str)
    if unused:
        problems.append(f"role override(s) [{', '.join(unused)}] match no trainable parameter")
    if missing:
        problems.append(_unassigned_message(model, missing))
    if problems:
        raise ValueError("Cannot assign parameter roles:\n  - " + "\n  - ".join(problems))
    return out
