"""Which executor a model's parameters need: the modes, the layouts each accepts, the choice."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate, Shard

from gluon_optim.blocks import is_stack
from gluon_optim.directions import LocalExecutor
from gluon_optim.distributed.plan import OptimizerLike, named_params
from gluon_optim.distributed.replicated import ReplicatedExecutor
from gluon_optim.distributed.sharded import ShardedExecutor
from gluon_optim.distributed.tensors import is_dtensor
from gluon_optim.norms import Norm

__all__ = ["MODES", "check_mode", "executor", "layout_error"]

MODES = ("auto", "sharded", "replicated", "local")


def check_mode(mode: object) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"Unknown distributed {mode!r}; expected one of {MODES}")


def layout_error(mode: str, params: Sequence[tuple[str, Tensor, Mapping[str, Any]]]) -> str | None:
    """Why ``params`` (name, tensor, group) cannot run under ``mode``, or ``None``.

    DTensor parameters need the sharded mode, on a 1-D mesh, placed ``Shard(0)`` or
    ``Replicate()``; the sharded mode needs every parameter a DTensor of one mesh, and its
    groups' ``state_dtype`` left at ``auto`` and ``blocks`` at ``whole`` or a stack of experts
    (whose ``Shard(0)`` rows are whole experts).
    """
    sharded = [(n, p) for n, p, _ in params if is_dtensor(p)]
    if not sharded:
        if mode == "sharded":
            return (
                "distributed='sharded' needs DTensor parameters (FSDP2's fully_shard); these are "
                "plain tensors (use 'replicated' for DDP, 'local' for one process)"
            )
        return None
    name, first = sharded[0]
    if mode not in ("auto", "sharded"):
        return (
            f"Parameter {name!r} is a DTensor (FSDP2 / fully_shard), which needs "
            f"distributed='sharded' (or 'auto'), not {mode!r}: running the LMO on local shards "
            "would be a different algorithm"
        )
    plain = [n for n, p, _ in params if not is_dtensor(p)]
    if plain:
        return (
            f"Parameter {plain[0]!r} is a plain tensor while {name!r} is a DTensor: the sharded "
            "mode needs every parameter sharded (apply fully_shard to the root module too)"
        )
    mesh = cast(DTensor, first).device_mesh
    for n, p, _ in params:
        d = cast(DTensor, p)
        if d.device_mesh.ndim != 1:
            return (
                f"Parameter {n!r} is a DTensor on a {d.device_mesh.ndim}-D mesh: the sharded "
                "mode supports 1-D meshes (one FSDP2 dimension) only"
            )
        if d.device_mesh != mesh:
            return f"Parameter {n!r} is on another device mesh than {name!r}; use one mesh"
        if tuple(d.placements) not in ((Shard(0),), (Replicate(),)):
            return (
                f"Parameter {n!r} has placements {tuple(d.placements)}; the sharded mode "
                "supports Shard(0) (fully_shard's default) and Replicate() only"
            )
    for n, _, group in params:
        if group.get("state_dtype", "auto") != "auto":
            return (
                f"Parameter {n!r}: state_dtype={group['state_dtype']!r} is not supported by the "
                "sharded mode yet (its state is kept as DTensor rows in the parameter's dtype); "
                "leave state_dtype='auto' under FSDP2"
            )
        text = group.get("blocks", "whole")
        if text != "whole" and not is_stack(text):
            return (
                f"Parameter {n!r}: blocks={text!r} is not supported by the sharded mode yet "
                "(its rows are split across ranks, not its blocks; a stack of experts, "
                "'experts...', is); use distributed='replicated' with DDP, or blocks='whole' "
                "under FSDP2"
            )
    return None


def executor(
    optimizer: OptimizerLike,
    mode: str,
    group: ProcessGroup | None,
    resolve_norm: Callable[[Mapping[str, Any], Tensor], Norm],
) -> LocalExecutor:
    """The executor of ``mode`` for ``optimizer`` (see the module docstring)."""
    check_mode(mode)
    if group is not None and not isinstance(group, ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup, got {group!r}")
    params = list(named_params(optimizer))
    error = layout_error(mode, params)
    if error is not None:
        raise ValueError(error)
    sharded = bool(params) and is_dtensor(params[0][1])
    if mode == "local" or (mode == "auto" and not sharded):
        return LocalExecutor()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"distributed={mode!r} needs an initialised default process group "
            "(torch.distributed.init_process_group) or a process_group"
        )
    if not sharded:
        return ReplicatedExecutor(optimizer, group, resolve_norm)
    mesh_group = cast(DTensor, params[0][1]).device_mesh.get_group()
    if group is not None and dist.get_process_group_ranks(group) != dist.get_process_group_ranks(
        mesh_group
    ):
        raise ValueError(
            "process_group holds other ranks than the parameters' device mesh "
            f"({dist.get_process_group_ranks(group)} vs "
            f"{dist.get_process_group_ranks(mesh_group)}); leave it unset under FSDP2"
        )
    return ShardedExecutor(optimizer, mesh_group, resolve_norm)
