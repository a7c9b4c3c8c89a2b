"""The check every model of the real-models matrix passes (tests/test_real_models.py and
tests/vision/): a preset builds with the plain call, five steps reduce the loss of a fixed
batch, and the optimizer state round-trips through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import Tensor, nn

import gluon_optim as go

Build = Callable[[], nn.Module]
Loss = Callable[[nn.Module], Tensor]
Factory = Callable[[nn.Module], go.Gluon]

PRESETS: dict[str, Factory] = {
    "muon": go.muon,
    "scion": go.scion,
    "unscion": lambda m: go.scion(m, constrained=False),
}


def check_trains_and_round_trips(build: Build, loss: Loss, factory: Factory) -> go.Gluon:
    """Five steps reduce ``loss``; a twin loaded from the saved state takes the same next step."""
    torch.manual_seed(0)
    model = build()
    opt = factory(model)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        value = loss(model)
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < losses[0], losses

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = build()
    twin.load_state_dict(model.state_dict())
    twin_opt = factory(twin)
    twin_opt.load_state_dict(state)
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.manual_seed(1)  # the same dropout masks for both
        o.zero_grad()
        loss(m).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    return opt


def roles_of(model: nn.Module) -> dict[str, str]:
    return {a.name: a.role for a in go.assign_roles(model)}


def tiny_gpt2(vocab: int, n_layer: int, n_embd: int, n_positions: int) -> nn.Module:
    """A transformers GPT-2 LM from a config: no dropout, random init (the caller seeds)."""
    import transformers  # here, not at the top: the vision environment has no transformers

    cfg = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model: nn.Module = transformers.GPT2LMHeadModel(cfg)
    return model
