"""What every rank runs: the same model, batch and optimizer as one process, and the bad inputs.

``parity(rank, world)`` trains every case with ``distributed="replicated"`` on identical
gradients (every rank evaluates the same batch) and returns the parameters; the test compares
them with the same cases run in one process. ``errors(rank, world)`` provokes the failures that
must be clear errors on every rank: a NaN on one rank, a gradient missing on one rank, groups
built differently, a DTensor parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import gluon_optim as go
from gluon_optim import norms as go_norms

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
    "mvr3-approx": lambda m, **kw: go.gluon(m, lr=0.01, estimator="mvr3", two_point="approx", **kw),
    "mars-approx": lambda m, **kw: go.gluon(
        m, lr=0.01, estimator="mars", two_point="approx", mars_gamma=0.3, **kw
    ),
    "limuon-exact": lambda m, **kw: go.limuon(m, 3, lr=0.02, **kw),
    "limuon-ns-approx": lambda m, **kw: go.limuon(
        m, 2, lr=0.02, method="newton_schulz", two_point="approx", **kw
    ),
}


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

        go_norms.polar = polar  # type: ignore[assignment]
        setattr(dist, self._name, gather)
        dist.all_reduce = reduce
        return self

    def __exit__(self, *exc: object) -> None:
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


def errors(rank: int, world: int) -> dict[str, str]:
    out: dict[str, str] = {}

    def nan_on_rank_1() -> None:
        net = model()
        opt = go.muon(net, distributed="replicated")
        loss_of(net, 0).backward()
        if rank == 1:
            net.fc.weight.grad[0, 0] = float("nan")
        opt.step()

    out["nan"] = _expect(nan_on_rank_1)

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

    def grad_missing_on_rank_0() -> None:
        net = model()
        opt = go.muon(net, distributed="replicated")
        loss_of(net, 0).backward()
        if rank == 0:
            net.mix.weight.grad = None
        opt.step()

    out["grad_none"] = _expect(grad_missing_on_rank_0)

    def groups_in_another_order() -> None:
        net = model()
        named = list(net.named_parameters())
        if rank == 1:
            named.reverse()
        opt = go.Gluon(named, lr=0.01, norm="euclidean", distributed="replicated")
        loss_of(net, 0).backward()
        opt.step()

    out["order"] = _expect(groups_in_another_order)

    def dtensor_parameter() -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
        go.Gluon([("w", w)], lr=0.01)

    out["dtensor"] = _expect(dtensor_parameter)
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
