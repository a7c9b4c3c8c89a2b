"""What every rank runs: the same model, batch and optimizer as one process, and the bad inputs.

``parity(rank, world)`` trains every case with ``distributed="replicated"`` on identical
gradients (every rank evaluates the same batch) and returns the parameters; the test compares
them with the same cases run in one process. ``errors(rank, world)`` provokes the failures that
must be clear errors on every rank: a NaN on one rank, a gradient missing on one rank, groups
built differently, a DTensor parameter under "replicated". The FSDP2 cases (``"sharded"``) are
at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import gluon_optim as go
from gluon_optim import norms as go_norms
from gluon_optim.distributed import replicated

STEPS = 3
VOCAB = 11


class Net(nn.Module):
    """Embedding, linear, LayerNorm, a conv and a head: every role's norm, two dtypes of LMO."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 24)
        self.ln = nn.LayerNorm(24)
        self.conv = nn.Conv1d(24, 24, 3, padding=1)
        self.mix = nn.Linear(24, 24)
        self.head = nn.Linear(24, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(torch.relu(self.fc(self.embedding(x))))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.mix(h)))


def model() -> Net:
    torch.manual_seed(7)
    return Net()


class Experts(nn.Module):
    """A stack of 4 experts ``(4, 16, 8)`` / ``(4, 8, 16)`` that declares its layout as
    transformers' experts classes do, so each expert is an LMO unit (``blocks="experts"``)."""

    is_transposed = False
    is_concatenated = True
    has_gate = False

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(4, 16, 8) * 0.3)
        self.down = nn.Parameter(torch.randn(4, 8, 16) * 0.3)

    def forward(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        inner = torch.tanh(torch.einsum("btd,efd->btef", h, self.up))  # (B, T, E, 16)
        out = torch.einsum("btef,edf->bted", inner, self.down)  # (B, T, E, 8)
        return (out * weights[..., None]).sum(2)


class ExpertNet(nn.Module):
    """Embedding, a softly routed stack of experts (every expert sees every token), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.router = nn.Linear(8, 4)
        self.experts = Experts()
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embedding(x)
        return self.head(h + self.experts(h, self.router(h).softmax(-1)))


def expert_model() -> ExpertNet:
    torch.manual_seed(11)
    return ExpertNet()


#: Optimizers of the stacks of experts under FSDP2 (each rank computes its own experts).
EXPERT_CASES: dict[str, Builder] = {
    "muon": lambda m, **kw: go.muon(m, **kw),
    "l0l1": lambda m, **kw: go.gluon(m, lr=0.01, radius_policy="l0l1", **kw),
    "l0l1-momentum": lambda m, **kw: go.gluon(
        m, lr=0.01, radius_policy="l0l1", radius_source="momentum", **kw
    ),
}


def train_experts(name: str, sharded: bool) -> tuple[nn.Module, go.Gluon]:
    """Case ``name`` of :data:`EXPERT_CASES`, in one process or under fully_shard with one
    process's gradients injected."""
    from torch.distributed.fsdp import fully_shard

    net = expert_model()
    plain = expert_model()
    if sharded:
        for module in (net.embedding, net.router, net.experts, net.head):
            fully_shard(module)
        fully_shard(net)
    opt = EXPERT_CASES[name](net, **({} if sharded else {"distributed": "local"}))
    for k in range(STEPS):
        opt.zero_grad()
        if sharded:
            _inject(net, plain, k)
        else:
            loss_of(net, k).backward()
        opt.step()
    return net, opt


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    x = torch.randint(0, VOCAB, (3, 9), generator=gen)
    return x[:, :-1], x[:, 1:]


def loss_of(net: nn.Module, k: int) -> torch.Tensor:
    x, y = batch(k)
    logits = net(x)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


Builder = Callable[..., go.Gluon]
CASES: dict[str, Builder] = {
    "muon": lambda m, **kw: go.muon(m, **kw),
    "muon-foreach": lambda m, **kw: go.muon(m, foreach=True, **kw),
    "muon-fast": lambda m, **kw: go.muon(m, **go.presets.FAST_NS, **kw),
    "scion": lambda m, **kw: go.scion(m, lr=0.01, **kw),
    "unscion-foreach": lambda m, **kw: go.unscion(m, lr=0.01, foreach=True, **kw),
    "gluon-l0l1": lambda m, **kw: go.gluon(m, lr=1.0, radius_policy="l0l1", l1=40.0, **kw),
    "gluon-l0l1-momentum": lambda m, **kw: go.gluon(
        m, lr=1.0, radius_policy="l0l1", l1=40.0, radius_source="momentum", **kw
    ),
    "gluon-theory-decay": lambda m, **kw: go.gluon(m, lr=0.05, radius_policy="theory_decay", **kw),
    "gluon-svd-f32": lambda m, **kw: go.gluon(
        m, lr=0.02, polar_method="svd", compute_dtype="float32", **kw
    ),
    "mvr1-exact": lambda m, **kw: go.gluon_mvr(m, 1, lr=0.01, **kw),
    "mvr2-exact": lambda m, **kw: go.gluon_mvr(m, 2, lr=0.01, **kw),
    "mvr3-approx": lambda m, **kw: go.gluon(
        m, lr=0.01, estimator="mvr3", two_point="approx", allow_degenerate=True, **kw
    ),
    "mars-approx": lambda m, **kw: go.gluon(
        m, lr=0.01, estimator="mars", two_point="approx", mars_gamma=0.3, **kw
    ),
    "limuon-exact": lambda m, **kw: go.limuon(m, 3, lr=0.02, **kw),
    "limuon-ns-approx": lambda m, **kw: go.limuon(
        m, 2, lr=0.02, method="newton_schulz", two_point="approx", **kw
    ),
    "limuon-full": lambda m, **kw: go.limuon(m, lr=0.02, low_rank=False, **kw),
    # Buffers stored in bfloat16: elementwise, so every rank rounds them alike; LiMuon's
    # low-rank factors are the owner-run estimator's state, committed after the exchange.
    "muon-bf16-state": lambda m, **kw: go.muon(m, state_dtype="bfloat16", **kw),
    "mvr2-bf16-state": lambda m, **kw: go.gluon_mvr(m, 2, lr=0.01, state_dtype="bfloat16", **kw),
    "limuon-bf16-state": lambda m, **kw: go.limuon(m, 3, lr=0.02, state_dtype="bfloat16", **kw),
    # Blocked matrices: each unit is a layer with its own dual norm and radius.
    "l0l1-blocks": lambda m, **kw: go.gluon(m, lr=0.01, radius_policy="l0l1", blocks=_BLOCKS, **kw),
}


#: The cases with blocked matrices (the sharded mode refuses them).
_BLOCKS = {"fc.weight": "chunks=2", "mix.weight": "interleaved=3"}


def train(
    name: str,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    steps: range = range(STEPS),
    start: dict[str, Any] | None = None,
    **engine: Any,
) -> tuple[nn.Module, go.Gluon]:
    """Steps ``steps`` of case ``name`` (closures where the case needs a second gradient);
    ``wrap`` (DDP) wraps the model for the forward and backward passes; ``start`` is a
    ``{"model": ..., "optimizer": ...}`` checkpoint to continue from."""
    net = model()
    forward = net if wrap is None else wrap(net)
    opt = CASES[name](net, **engine)
    if start is not None:
        net.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
    for k in steps:

        def closure(k: int = k) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(forward, k)
            loss.backward()
            return loss

        if opt.needs_closure():
            opt.step(closure)
        else:
            closure()
            opt.step()
    return net, opt


def params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


class _Counter:
    """Counts this rank's Newton–Schulz calls on real matrices and the bytes it gathers."""

    def __init__(self) -> None:
        self.polar_calls = 0
        self.rsvd_calls = 0
        self.gathered_bytes = 0
        self.reduced_bytes = 0

    def __enter__(self) -> _Counter:
        self._name = (
            "all_gather_single"
            if hasattr(dist, "all_gather_single")
            else ("all_gather_into_tensor")
        )
        self._polar, self._gather, self._reduce = (
            go_norms.polar,
            getattr(dist, self._name),
            dist.all_reduce,
        )

        def polar(g: torch.Tensor, **kw: Any) -> torch.Tensor:
            if g.numel() > 1:  # the executor's dtype probe is one element
                self.polar_calls += 1 if g.ndim == 2 else g.shape[0]
            return self._polar(g, **kw)

        def gather(out: torch.Tensor, local: torch.Tensor, **kw: Any) -> Any:
            self.gathered_bytes += local.numel() * local.element_size()
            return self._gather(out, local, **kw)

        def reduce(t: torch.Tensor, **kw: Any) -> Any:
            self.reduced_bytes += t.numel() * t.element_size()
            return self._reduce(t, **kw)

        self._rsvd = go.lowrank.rsvd

        def rsvd(*args: Any, **kw: Any) -> Any:
            self.rsvd_calls += 1
            return self._rsvd(*args, **kw)

        go_norms.polar = polar  # type: ignore[assignment]
        go.lowrank.rsvd = rsvd  # type: ignore[assignment]
        setattr(dist, self._name, gather)
        dist.all_reduce = reduce
        return self

    def __exit__(self, *exc: object) -> None:
        go.lowrank.rsvd = self._rsvd  # type: ignore[assignment]
        go_norms.polar = self._polar  # type: ignore[assignment]
        setattr(dist, self._name, self._gather)
        dist.all_reduce = self._reduce


def parity(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"params": {}, "comm": {}}
    for name in CASES:
        with _Counter() as counter:
            net, opt = train(name, distributed="replicated")
        ex = opt.executor
        assert isinstance(ex, go.distributed.ReplicatedExecutor)
        out["params"][name] = params(net)
        out["comm"][name] = {
            "polar_calls": counter.polar_calls,
            "rsvd_calls": counter.rsvd_calls,
            "gathered_bytes": counter.gathered_bytes,
            "reduced_bytes": counter.reduced_bytes,
            "last_bytes": ex.last_bytes,
            "last_agree_bytes": ex.last_agree_bytes,
            "loads": ex.loads(),
            "owned": ex.last_owned,
        }
    return out


def _expect(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, FloatingPointError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _agreement_errors(rank: int, net_of: Callable[[], nn.Module], mode: str) -> dict[str, str]:
    """A NaN on rank 1, a gradient missing on rank 0, groups in another order on rank 1: what
    every rank raises, for models built by ``net_of`` under ``distributed=mode``."""
    out: dict[str, str] = {}

    def nan_on_rank_1() -> None:
        net = net_of()
        opt = go.muon(net, distributed=mode)
        loss_of(net, 0).backward()
        if rank == 1:
            go.distributed.local(net.fc.weight.grad)[0, 0] = float("nan")
        opt.step()

    out["nan"] = _expect(nan_on_rank_1)

    def grad_missing_on_rank_0() -> None:
        net = net_of()
        opt = go.muon(net, distributed=mode)
        loss_of(net, 0).backward()
        if rank == 0:
            net.mix.weight.grad = None
        opt.step()

    out["grad_none"] = _expect(grad_missing_on_rank_0)

    def groups_in_another_order() -> None:
        net = net_of()
        named = list(net.named_parameters())
        if rank == 1:
            named.reverse()
        opt = go.Gluon(named, lr=0.01, norm="euclidean", distributed=mode)
        loss_of(net, 0).backward()
        opt.step()

    out["order"] = _expect(groups_in_another_order)
    return out


def errors(rank: int, world: int) -> dict[str, str]:
    out = _agreement_errors(rank, model, "replicated")

    def nan_skipped() -> None:
        net = model()
        opt = go.muon(net, distributed="replicated", nonfinite="skip")
        before = net.fc.weight.detach().clone()
        loss_of(net, 0).backward()
        if rank == 1:
            net.fc.weight.grad[0, 0] = float("inf")
        opt.step()
        if not torch.equal(net.fc.weight, before):
            raise RuntimeError("the skipped group changed")

    out["skip"] = _expect(nan_skipped)

    def dtensor_parameter() -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
        go.Gluon([("w", w)], lr=0.01, distributed="replicated")

    out["dtensor"] = _expect(dtensor_parameter)

    def owner_fails_on_rank_1(case: str = "muon") -> None:
        net = model()
        opt = CASES[case](net, distributed="replicated")
        loss_of(net, 0).backward()
        before = params(net)
        # The replicated executor's own reference to the direction computation.
        compute = replicated.compute

        def failing(requests: Any) -> Any:
            if any(r.operand.numel() > 1 for r in requests):  # not the dtype probe
                raise RuntimeError("no convergence (injected)")
            return compute(requests)

        if rank == 1:
            replicated.compute = failing  # type: ignore[assignment]
        try:
            opt.step()
        finally:
            replicated.compute = compute  # type: ignore[assignment]
            if any(not torch.equal(before[n], params(net)[n]) for n in LMO_MATRICES):
                raise FloatingPointError("an LMO parameter moved")

    out["owner_fails"] = _expect(owner_fails_on_rank_1)
    # With one dual per unit on the wire, the failed owner's stand-ins must have its sizes.
    out["owner_fails_blocks"] = _expect(lambda: owner_fails_on_rank_1("l0l1-blocks"))
    return out


DDP_CASES = ("muon", "scion", "mvr2-exact", "limuon-exact")


def ddp(rank: int, world: int) -> dict[str, Any]:
    """Real DDP, every rank fed the full batch: the all-reduced mean is exact, so it is one
    process's gradient, and the parameters must end bit-identical to one process."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(net: nn.Module) -> nn.Module:
        return DistributedDataParallel(net, gradient_as_bucket_view=True)

    out: dict[str, Any] = {
        name: params(train(name, wrap=wrap, distributed="replicated")[0]) for name in DDP_CASES
    }
    # Roles read through the wrapper: names carry DDP's "module." and the head is still found.
    out["roles"] = {a.name: a.role for a in go.assign_roles(wrap(model()))}
    return out


RESUME_CASES = ("muon", "mvr2-exact", "limuon-exact", "gluon-l0l1")
#: Where the parent puts the checkpoint the resume workers continue from.
CHECKPOINT_ENV = "GLUON_OPTIM_TEST_CHECKPOINT"


def save_at_two_steps(rank: int, world: int) -> dict[str, Any]:
    """Two steps under ``"replicated"``; every rank returns its checkpoint (rank 0 is kept)."""
    out = {}
    for name in RESUME_CASES:
        net, opt = train(name, steps=range(2), distributed="replicated")
        out[name] = {"model": net.state_dict(), "optimizer": opt.state_dict()}
    return out


def resume(rank: int, world: int) -> dict[str, Any]:
    """The last step, from the checkpoint saved at another world size."""
    import os

    saved = torch.load(os.environ[CHECKPOINT_ENV], weights_only=True)
    engine = {"distributed": "replicated"} if world > 1 else {"distributed": "local"}
    return {
        name: params(train(name, steps=range(2, STEPS), start=saved[name], **engine)[0])
        for name in RESUME_CASES
    }


# -- FSDP2 ---------------------------------------------------------------------------------------
#: The sharded mode refuses a state_dtype and blocks (sharded_errors checks the refusals).
SHARDED_CASES = tuple(name for name in CASES if not name.endswith(("-state", "-blocks")))
#: Exact two-point cases also run with previous_iterate() blocks instead of closures.
BLOCK_CASES = ("mvr2-exact", "limuon-exact")


def shard(net: nn.Module) -> nn.Module:
    """``fully_shard`` every layer, then the root: every parameter a ``Shard(0)`` DTensor
    (the 11-row embedding and head are uneven at W = 2 and 3; at W = 3 the last rank holds 3)."""
    from torch.distributed.fsdp import fully_shard

    for module in (net.embedding, net.fc, net.conv, net.mix, net.head):
        fully_shard(module)
    fully_shard(net)
    return net


def _inject(net: nn.Module, plain: nn.Module, k: int) -> torch.Tensor:
    """One process's gradient of batch ``k`` at ``net``'s current (sharded) parameters, given
    to ``net`` as DTensor gradients: the optimizer then sees exactly one process's numbers."""
    from gluon_optim.distributed import shard_like

    with torch.no_grad():
        for (_, p), (_, q) in zip(net.named_parameters(), plain.named_parameters(), strict=True):
            q.copy_(p.full_tensor())
    plain.zero_grad()
    loss = loss_of(plain, k)
    loss.backward()
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        assert q.grad is not None
        p.grad = shard_like(q.grad, p)
    return loss.detach()


def train_sharded(
    name: str,
    steps: range = range(STEPS),
    inject: bool = True,
    opt_state: Any = None,
    block: bool = False,
) -> tuple[nn.Module, go.Gluon]:
    """Case ``name`` on a fully_shard'ed model: gradients injected from one process's model
    (``inject``) or from the sharded model's own forward and backward passes; an exact
    two-point step takes its second gradient from a closure, or from a ``previous_iterate()``
    block (``block``)."""
    net = shard(model())
    plain = model()
    opt = CASES[name](net)
    if opt_state is not None:
        opt_state(net, opt)
    for k in steps:

        def closure(k: int = k) -> torch.Tensor:
            opt.zero_grad()
            if inject:
                return _inject(net, plain, k)
            loss = loss_of(net, k)
            loss.backward()
            return loss

        if opt.needs_closure() and not block:
            opt.step(closure)
            continue
        if opt.needs_closure():
            opt.zero_grad()
            with opt.previous_iterate():
                if inject:
                    _inject(net, plain, k)
                else:
                    loss_of(net, k).backward()
        closure()
        opt.step()
    return net, opt


def full_params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}


class _A2ACounter:
    """Counts the bytes this rank hands to ``all_to_all_single`` (what it sends to others)."""

    def __enter__(self) -> _A2ACounter:
        self.sent = 0
        self._a2a = dist.all_to_all_single

        def a2a(
            out: torch.Tensor, inp: torch.Tensor, out_splits: Any, in_splits: Any, **kw: Any
        ) -> Any:
            me = dist.get_rank(kw.get("group"))
            self.sent += sum(n for r, n in enumerate(in_splits) if r != me)
            return self._a2a(out, inp, out_splits, in_splits, **kw)

        dist.all_to_all_single = a2a
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self._a2a


def sharded_parity(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"params": {}, "comm": {}, "block": {}, "experts": {}}
    for name in EXPERT_CASES:
        with _Counter() as counter, _A2ACounter() as a2a:
            net, opt = train_experts(name, sharded=True)
        out["experts"][name] = {
            "params": full_params(net),
            "polar_calls": counter.polar_calls,
            "a2a_sent": a2a.sent,
            "blocks": {n: g["blocks"] for g in opt.param_groups for n in g["param_names"]},
        }
    for name in BLOCK_CASES:  # the second gradient from previous_iterate() blocks
        out["block"][name] = full_params(train_sharded(name, block=True)[0])
    for name in SHARDED_CASES:
        with _Counter() as counter, _A2ACounter() as a2a:
            net, opt = train_sharded(name)
        ex = opt.executor
        assert isinstance(ex, go.distributed.ShardedExecutor), type(ex)
        out["params"][name] = full_params(net)
        out["comm"][name] = {
            "polar_calls": counter.polar_calls,
            "rsvd_calls": counter.rsvd_calls,
            "sent": a2a.sent,
            "last_bytes": ex.last_bytes,
            "phase_bytes": list(ex.last_phase_bytes),
            "owners": dict(ex.plan().owners),
            "shapes": {
                (gi, i): tuple(p.shape)
                for gi, g in enumerate(opt.param_groups)
                for i, p in enumerate(g["params"])
            },
        }
    return out


FSDP_CASES = ("muon", "scion", "mvr2-exact", "gluon-l0l1")


def fsdp(rank: int, world: int) -> dict[str, Any]:
    """Real FSDP2 forward and backward passes, every rank fed the full batch."""
    return {name: full_params(train_sharded(name, inject=False)[0]) for name in FSDP_CASES}


def comm_modes(rank: int, world: int) -> dict[str, Any]:
    """What ``CommDebugMode`` sees in one sharded step (the second, so state exists): the
    gradients, including exact MVR's second one, are computed before it starts."""
    from torch.distributed.tensor.debug import CommDebugMode

    out: dict[str, Any] = {}
    for name in ("muon", "mvr2-exact", "gluon-l0l1", "limuon-full", "limuon-exact"):
        net, opt = train_sharded(name, steps=range(1))
        plain = model()
        opt.zero_grad()
        if opt.needs_closure():
            with opt.previous_iterate():
                _inject(net, plain, 1)
        _inject(net, plain, 1)
        mode = CommDebugMode()
        with mode:
            opt.step()
        out[name] = {str(k): v for k, v in mode.get_comm_counts().items()}
    return out


RESUME_SHARDED = ("muon", "mvr2-exact", "gluon-l0l1", "limuon-full", "limuon-exact")


def dcp_save(rank: int, world: int) -> None:
    """Two sharded steps of every resume case, saved through torch.distributed.checkpoint."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    for name in RESUME_SHARDED:
        net, opt = train_sharded(name, steps=range(2))
        model_sd, optim_sd = get_state_dict(net, opt)
        path = os.path.join(os.environ[CHECKPOINT_ENV], name)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _dcp_load(name: str) -> Callable[[nn.Module, go.Gluon], None]:
    def load(net: nn.Module, opt: go.Gluon) -> None:
        import os

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(net, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(os.environ[CHECKPOINT_ENV], name))
        set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return load


def dcp_resume(rank: int, world: int) -> dict[str, Any]:
    """The last step, from the DCP checkpoint saved at another world size."""
    return {
        name: full_params(train_sharded(name, steps=range(2, STEPS), opt_state=_dcp_load(name))[0])
        for name in RESUME_SHARDED
    }


#: The parameters muon gives the LMO in ``Net`` (the others are AdamW's).
LMO_MATRICES = ("fc.weight", "conv.weight", "mix.weight")


def sharded_errors(rank: int, world: int) -> dict[str, str]:
    """The failures that must be clear errors on every rank under FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = _agreement_errors(rank, lambda: shard(model()), "sharded")
    out["replicated"] = _expect(lambda: go.muon(shard(model()), distributed="replicated"))
    out["local"] = _expect(lambda: go.muon(shard(model()), distributed="local"))
    out["plain"] = _expect(lambda: go.muon(model(), distributed="sharded"))
    out["state_dtype"] = _expect(lambda: go.muon(shard(model()), state_dtype="bfloat16"))
    out["blocks"] = _expect(lambda: go.muon(shard(model()), blocks={"fc.weight": "chunks=2"}))

    mesh = init_device_mesh("cpu", (world,))

    def shard1() -> None:
        w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
        go.Gluon([("w", w)], lr=0.01)

    out["shard1"] = _expect(shard1)

    def mixed() -> None:
        w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Replicate()]))
        go.Gluon([("w", w), ("v", nn.Parameter(torch.randn(3, 3)))], lr=0.01)

    out["mixed"] = _expect(mixed)

    def mesh_2d() -> None:
        if world % 2:
            raise ValueError("skipped: needs an even world")
        grid = init_device_mesh("cpu", (world // 2, 2))
        w = nn.Parameter(distribute_tensor(torch.randn(6, 4), grid, [Shard(0), Replicate()]))
        go.Gluon([("w", w)], lr=0.01)

    out["mesh2d"] = _expect(mesh_2d)

    def nan_state_on_rank_1() -> None:
        net = shard(model())
        opt = go.muon(net)
        loss_of(net, 0).backward()
        opt.step()
        state = opt.state_dict()
        before = {k: go.distributed.local(v).clone() for k, v in opt.state[net.fc.weight].items()}
        if rank == 1:
            # state_dict() holds the live tensors: the bad one is a copy.
            key = next(k for k, v in state["state"].items() if "momentum_buffer" in v)
            bad = state["state"][key]["momentum_buffer"].clone()
            go.distributed.local(bad).fill_(float("nan"))
            state["state"][key] = {**state["state"][key], "momentum_buffer": bad}
        try:
            opt.load_state_dict(state)
        finally:
            after = opt.state[net.fc.weight]
            for k, v in before.items():
                if not torch.equal(go.distributed.local(after[k]), v):
                    raise RuntimeError("state changed")

    out["nan_state"] = _expect(nan_state_on_rank_1)

    def owner_fails_on_rank_1() -> None:
        net = shard(model())
        opt = go.muon(net)
        loss_of(net, 0).backward()
        before = full_params(net)
        owned = go.distributed.ShardedExecutor._owned

        def failing(*args: Any) -> Any:
            raise RuntimeError("no convergence (injected)")

        if rank == 1:
            go.distributed.ShardedExecutor._owned = staticmethod(failing)  # type: ignore[method-assign]
        try:
            opt.step()
        finally:
            go.distributed.ShardedExecutor._owned = staticmethod(owned)  # type: ignore[method-assign]
            after = full_params(net)
            if any(not torch.equal(before[n], after[n]) for n in LMO_MATRICES):
                raise FloatingPointError("an LMO parameter moved")

    out["owner_fails"] = _expect(owner_fails_on_rank_1)
    return out


def probe_records(rank: int, world: int) -> dict[str, Any]:
    """The smoothness probe's records of muon runs (every 2 steps, 5 steps) under "sharded"
    and "replicated", and how many layers this rank measured itself."""
    from gluon_optim.smoothness.probe import SmoothnessProbe

    out: dict[str, Any] = {}
    measure = SmoothnessProbe._measure
    for mode in ("sharded", "replicated"):
        measured = 0

        def counted(self: SmoothnessProbe, *args: Any) -> Any:
            nonlocal measured
            measured += 1
            return measure(self, *args)

        net = shard(model()) if mode == "sharded" else model()
        plain = model()
        opt = go.muon(net, distributed=mode)
        probe = go.smoothness.SmoothnessProbe(opt, 2)
        probe._measure = counted.__get__(probe)  # type: ignore[method-assign]
        for k in range(5):
            opt.zero_grad()
            if mode == "sharded":
                _inject(net, plain, k)
            else:
                loss_of(net, k).backward()
            opt.step()
        probe.remove()
        out[mode] = {"records": probe.records, "measured": measured}
    return out


class _Wider(Net):
    """Net with a wider ``mix`` layer: another model, for the checkpoint test."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(24, 32)


class _Longer(Net):
    """Net with one more layer: another model, for the checkpoint test."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(24, 24)


def dcp_other_model(rank: int, world: int) -> dict[str, str]:
    """The muon DCP checkpoint of ``Net`` loaded into other models: every rank's error, and
    whether the parameters changed."""
    from torch.distributed.checkpoint.api import CheckpointException

    out: dict[str, str] = {}
    for label, cls in (("wider", _Wider), ("longer", _Longer)):
        net = shard(cls())
        opt = go.muon(net)
        before = full_params(net)
        try:
            _dcp_load("muon")(net, opt)
            out[label] = "no error"
        except CheckpointException as e:
            out[label] = f"{type(e).__name__}: {e}"
        same = all(torch.equal(before[n], v) for n, v in full_params(net).items())
        out[f"{label}_unchanged"] = str(same)
    return out


def fewer_rows_than_ranks(rank: int, world: int) -> dict[str, Any]:
    """Matrices with fewer rows than ranks (empty shards), a Replicate() one and a vector,
    under muon-style Gluon, MVR-2 exact and AdamW groups: the whole parameters after 3 steps,
    and the same steps in this process on plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    shapes = {"two_rows": (2, 5), "one_row": (1, 7), "tall": (9, 2), "replicated": (4, 6)}
    full = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    vector = torch.randn(5, generator=gen)
    grads = [
        {n: torch.randn(s, generator=gen) for n, s in [*shapes.items(), ("vector", (5,))]}
        for _ in range(3)
    ]
    out: dict[str, Any] = {}
    for label, options in (
        ("muon", {"norm": "spectral", "shape_rule": "muon", "nesterov": True, "momentum": 0.95}),
        (
            "mvr2",
            {"estimator": "mvr2", "two_point": "approx", "allow_degenerate": True, "momentum": 0.9},
        ),
    ):
        results = {}
        local_rows = {}
        for sharded in (True, False):

            def place(name: str, t: torch.Tensor, sharded: bool = sharded) -> torch.Tensor:
                # A copy: distribute_tensor may keep the tensor it is given as the local part.
                t = t.clone()
                if not sharded:
                    return t
                placement = Replicate() if name == "replicated" else Shard(0)
                return distribute_tensor(t, mesh, [placement])

            params = {n: nn.Parameter(place(n, t)) for n, t in full.items()}
            vec = nn.Parameter(place("vector", vector))
            opt = go.Gluon(
                [
                    {"params": list(params.items()), "lr": 0.02, **options},
                    {"params": [("vector", vec)], "algorithm": "adamw", "lr": 0.01},
                ]
            )
            for k in range(3):
                for n, p in [*params.items(), ("vector", vec)]:
                    p.grad = place(n, grads[k][n])
                opt.step()
            results[sharded] = {
                n: (p.full_tensor() if sharded else p).detach().clone()
                for n, p in [*params.items(), ("vector", vec)]
            }
            if sharded:
                local_rows = {n: tuple(go.distributed.local(p).shape) for n, p in params.items()}
        out[label] = {
            "differ": [
                n for n in results[False] if not torch.equal(results[True][n], results[False][n])
            ],
            "local_rows": local_rows,
        }
    return out
