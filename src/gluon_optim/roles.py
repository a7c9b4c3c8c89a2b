"""Roles: which part of the network each parameter is, decided from module types.

A role says how a parameter enters the network, which is what the choice of norm depends on
(Scion Recommendation 3.1; Gluon section 4.1):

========== ===========================================================================
role       parameters
========== ===========================================================================
embedding  ``nn.Embedding`` weights (one-hot input), or whatever ``embedding=`` names
tied       a weight that is both the token embedding and the output head
hidden     ``nn.Linear`` weights and attention projections inside the network
conv       ``nn.Conv1d/2d/3d`` kernels
head       the output layer's weight, named by ``head=`` (or ``model.head``/``model.lm_head``)
bias       biases of linear, conv and attention layers (including the head's)
norm       gains and shifts of LayerNorm, RMSNorm, BatchNorm, GroupNorm, InstanceNorm
========== ===========================================================================

Roles are never guessed from ``ndim`` alone: the head must be named (a linear head is
indistinguishable from a hidden layer by shape), a parameter no rule covers is an error, and so
is a parameter that two rules claim. Frozen parameters (``requires_grad=False``) are left out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ROLES", "Assignment", "assign_roles"]

ROLES: tuple[str, ...] = ("embedding", "tied", "hidden", "conv", "head", "bias", "norm")

_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_ATTENTION_BIASES = ("in_proj_bias", "bias_k", "bias_v")

ModuleRef = nn.Module | nn.Parameter | Iterable[nn.Module | nn.Parameter]


@dataclass(frozen=True)
class Assignment:
    """One parameter with its role: ``name`` is its first name in ``model.named_parameters()``."""

    name: str
    param: nn.Parameter
    role: str
    module: str


def _param_ids(ref: ModuleRef | None) -> dict[int, str]:
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
                    f"{type(item).__name__} module passed as head/embedding has no parameters "
                    "of its own"
                )
        elif isinstance(item, torch.Tensor):
            out[id(item)] = "weight"
        else:
            raise TypeError(
                f"head/embedding must be modules or parameters, got {type(item).__name__}"
            )
    return out


def _type_role(module: nn.Module, pname: str) -> str | None:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding" if pname == "weight" else None
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return {"weight": "conv", "bias": "bias"}.get(pname)
    if isinstance(module, nn.Linear):
        return {"weight": "hidden", "bias": "bias"}.get(pname)
    if isinstance(module, nn.MultiheadAttention):
        if pname in _ATTENTION_WEIGHTS:
            return "hidden"
        if pname in _ATTENTION_BIASES:
            return "bias"
        return None
    if isinstance(module, _NORM_LAYERS):
        return "norm"
    return None


def _default_head(model: nn.Module) -> ModuleRef:
    for attr in ("head", "lm_head"):
        found = getattr(model, attr, None)
        if isinstance(found, (nn.Module, nn.Parameter)):
            return found
    raise ValueError(
        f"No head named for {type(model).__name__}: pass head=<output module> (the layer that "
        "produces logits, which gets its own norm), or head=[] if the model has none. "
        "Roles are not guessed from shapes."
    )


def assign_roles(
    model: nn.Module,
    *,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[str, str] | None = None,
) -> list[Assignment]:
    """Give every trainable parameter of ``model`` exactly one role.

    Args:
        model: the network.
        head: the output layer (module or parameter, or a list); ``None`` looks for
            ``model.head`` or ``model.lm_head``; ``[]`` declares that there is none.
        embedding: extra input embeddings beyond the ``nn.Embedding`` modules found by type.
        roles: explicit roles by parameter name; keys may be ``fnmatch`` patterns
            (``"pos_emb*"``). Use it for parameters that no module type covers.

    Returns:
        One :class:`Assignment` per parameter, in ``model.named_parameters()`` order.

    Raises:
        ValueError: a parameter has no role, two conflicting roles, or an override names an
            unknown role or matches nothing.
    """
    roles = dict(roles or {})
    for pattern, role in roles.items():
        if role not in ROLES:
            raise ValueError(
                f"roles[{pattern!r}] = {role!r} is not a role; expected one of {ROLES}"
            )
    head_ids = _param_ids(_default_head(model) if head is None else head)
    embedding_ids = _param_ids(embedding)

    names: dict[int, list[str]] = {}
    claims: dict[int, list[tuple[str, str]]] = {}  # id -> [(role, why)]
    modules: dict[int, str] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            names.setdefault(id(p), []).append(full)
            modules.setdefault(id(p), type(module).__name__)
            typed_role = _type_role(module, pname)
            if typed_role is not None:
                claims.setdefault(id(p), []).append((typed_role, f"{type(module).__name__} {full}"))

    used_patterns: set[str] = set()
    out: list[Assignment] = []
    problems: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pid = id(p)
        all_names = names.get(pid, [name])
        typed = {r for r, _ in claims.get(pid, [])}
        explicit = [
            (pat, roles[pat])
            for pat in roles
            if any(fnmatch.fnmatchcase(n, pat) for n in all_names)
        ]
        used_patterns.update(pat for pat, _ in explicit)
        in_head = head_ids.get(pid)
        in_emb = embedding_ids.get(pid) or ("weight" if "embedding" in typed else None)

        chosen: list[str] = []
        if in_head == "weight" and in_emb == "weight":
            chosen.append("tied")
        elif in_head == "weight":
            chosen.append("head")
        elif in_head == "bias":
            chosen.append("bias")
        elif pid in embedding_ids:
            chosen.append("embedding" if embedding_ids[pid] == "weight" else "bias")
        if explicit:
            if len({r for _, r in explicit}) > 1:
                problems.append(f"{name!r} matches role overrides with different roles: {explicit}")
                continue
            if chosen and chosen[0] != explicit[0][1]:
                problems.append(
                    f"{name!r} is given two roles: {chosen[0]!r} (head/embedding argument) and "
                    f"{explicit[0][1]!r} (roles[{explicit[0][0]!r}])"
                )
                continue
            chosen = [explicit[0][1]]
        if not chosen:
            if len(typed) > 1:
                where = "; ".join(f"{why} -> {r}" for r, why in claims[pid])
                problems.append(
                    f"{name!r} is shared by modules with different roles ({where}); name it with "
                    "head=, embedding= or roles="
                )
                continue
            if not typed:
                problems.append(
                    f"{name!r} (shape {tuple(p.shape)}, in a {modules.get(pid, '?')}) has no role: "
                    "no rule covers this module type; give it one with roles={name: role}"
                )
                continue
            chosen = [typed.pop()]
        out.append(Assignment(name=name, param=p, role=chosen[0], module=modules.get(pid, "")))

    unused = sorted(set(roles) - used_patterns)
    if unused:
        problems.append(f"role override(s) {unused} match no trainable parameter")
    if problems:
        raise ValueError("Cannot assign parameter roles:\n  - " + "\n  - ".join(problems))
    return out
