"""Models nobody here wrote, built from configs (random init, no downloads), with the plain call.

Each model of the matrix must build under ``muon``, ``scion`` and unconstrained ``scion`` with
no role argument, show the right roles and factors in ``describe()``, reduce the loss of a fixed
batch in five steps, and round-trip its state through ``torch.load(weights_only=True)``.

timm and torchvision are not in this environment: PyPI's torchvision for torch 2.13 is a CUDA
build that cannot load beside the CPU torch (and timm imports torchvision). They are tested in
their own environment, with torch 2.14.1: ``make test-vision`` (tests/vision/).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import gluon_optim as go
from _matrix import PRESETS, check_trains_and_round_trips, roles_of, tiny_gpt2

transformers = pytest.importorskip("transformers")

VOCAB = 61


# -- a nanoGPT-style model: its own LayerNorm class (not nn.LayerNorm), tied lm_head ---------------
class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: an optional bias, so not ``nn.LayerNorm``."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(d, bias=True), LayerNorm(d, bias=True)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2, heads: int = 2, block: int = 16) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(VOCAB, d),
                wpe=nn.Embedding(block, d),
                h=nn.ModuleList(NanoBlock(d, heads) for _ in range(layers)),
                ln_f=LayerNorm(d, bias=False),
            )
        )
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits: Tensor = self.lm_head(self.transformer.ln_f(x))
        return logits


# -- the matrix ----------------------------------------------------------------------------------
def _gpt2() -> nn.Module:
    return tiny_gpt2(VOCAB, n_layer=2, n_embd=32, n_positions=16)


def _llama(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            max_position_embeddings=16,
            tie_word_embeddings=tied,
        )
        return transformers.LlamaForCausalLM(cfg)

    return build


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(cfg)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": _gpt2,
    "llama-tied": _llama(True),
    "llama-untied": _llama(False),
    "bert-mlm": _bert,
    "nanogpt": NanoGPT,
}
#: parameter name -> role, a few per model, including the ones that used to fail.
EXPECTED: dict[str, dict[str, str]] = {
    "gpt2": {
        "transformer.wte.weight": "tied",
        "transformer.wpe.weight": "embedding",
        "transformer.h.0.attn.c_attn.weight": "hidden",
        "transformer.h.1.mlp.c_proj.bias": "bias",
        "transformer.h.0.ln_1.weight": "norm",
    },
    "llama-tied": {
        "model.embed_tokens.weight": "tied",
        "model.layers.0.self_attn.q_proj.weight": "hidden",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.norm.weight": "norm",
    },
    "llama-untied": {
        "model.embed_tokens.weight": "embedding",
        "lm_head.weight": "head",
        "model.layers.1.mlp.down_proj.weight": "hidden",
        "model.layers.1.post_attention_layernorm.weight": "norm",
    },
    "bert-mlm": {
        "bert.embeddings.word_embeddings.weight": "tied",
        "bert.embeddings.position_embeddings.weight": "embedding",
        "bert.encoder.layer.0.attention.self.query.weight": "hidden",
        "cls.predictions.transform.dense.weight": "hidden",
        "cls.predictions.bias": "bias",
        "bert.embeddings.LayerNorm.weight": "norm",
    },
    "nanogpt": {
        "transformer.wte.weight": "tied",
        "transformer.wpe.weight": "embedding",
        "transformer.h.0.ln_1.weight": "norm",
        "transformer.h.0.ln_1.bias": "norm",
        "transformer.ln_f.weight": "norm",
        "transformer.h.1.attn.c_attn.weight": "hidden",
    },
}


def _batch() -> Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module, ids: Tensor) -> Tensor:
    if isinstance(model, NanoGPT):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    out: Tensor = model(input_ids=ids, labels=ids).loss
    return out


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_roles_with_the_plain_call(name: str) -> None:
    roles = roles_of(_model(name))
    assert {n: roles[n] for n in EXPECTED[name]} == EXPECTED[name]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_five_steps_reduce_the_loss_and_the_state_round_trips(name: str, preset: str) -> None:
    ids = _batch()
    opt = check_trains_and_round_trips(MODELS[name], lambda m: _loss(m, ids), PRESETS[preset])
    text = go.describe(opt)
    assert all(n in text for n in EXPECTED[name])


# -- GPT-2's Conv1D against an nn.Linear twin ------------------------------------------------
def _linear_twin(model: nn.Module) -> nn.Module:
    """The same GPT-2 with every Conv1D replaced by the nn.Linear it computes."""
    conv1d = transformers.pytorch_utils.Conv1D
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, conv1d):
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)
    return model


def _factors(opt: go.Gluon) -> dict[str, str]:
    rows = go.describe(opt).splitlines()[2:]
    return {r.split()[0]: r.split()[-4] for r in rows}  # param ... factor scale lr radius


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gpt2_conv1d_steps_like_its_linear_twin(preset: str) -> None:
    model = _model("gpt2")
    twin = _linear_twin(_model("gpt2"))
    ids = _batch()
    torch.testing.assert_close(_loss(model, ids), _loss(twin, ids))
    opt, opt_twin = PRESETS[preset](model), PRESETS[preset](twin)
    assert _factors(opt) == _factors(opt_twin)
    # The values the old shape-only reading got wrong: Muon's sqrt(3) on c_attn (32 -> 96).
    if preset == "muon":
        assert _factors(opt)["transformer.h.0.attn.c_attn.weight"] == f"{math.sqrt(3):.4g}"
    for _ in range(3):
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            _loss(m, ids).backward()
            o.step()
    twin_params = dict(twin.named_parameters())
    conv1d = transformers.pytorch_utils.Conv1D
    stored_transposed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, conv1d)}
    for n, p in model.named_parameters():
        q = twin_params[n]
        expected = q.T if n in stored_transposed else q
        # Bit-identical on our machine (the polar code transposes to the same wide operand);
        # the tolerance only allows another platform's matmul order.
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=0, msg=n)


def test_conv1d_groups_are_named_and_flagged() -> None:
    opt = go.scion(_model("gpt2"))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["hidden_transposed"]["transposed"] is True
    assert by_name["hidden_transposed"]["role"] == "hidden"
    assert "hidden" not in by_name  # every GPT-2 hidden weight is a Conv1D
    assert all("(T)" in ln for ln in go.describe(opt).splitlines() if "c_attn.weight" in ln)


# -- wrappers and overrides by class -------------------------------------------------------------
# torch.compile's first import warns from torch's own modules (torch.jit deprecations).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_names_under_wrappers_resolve() -> None:
    model = NanoGPT()
    plain = {a.name: a.role for a in go.assign_roles(model)}
    for wrapped, prefix in (
        (torch.compile(model), "_orig_mod."),
        (nn.DataParallel(model), "module."),
    ):
        roles = {a.name: a.role for a in go.assign_roles(wrapped, roles={"*.wpe.weight": "hidden"})}
        assert roles[prefix + "transformer.wpe.weight"] == "hidden"
        assert {k.removeprefix(prefix): v for k, v in roles.items() if "wpe" not in k} == {
            k: v for k, v in plain.items() if "wpe" not in k
        }
        go.muon(wrapped)  # the head is found through the wrapper


def test_override_by_class() -> None:
    model = _model("llama-untied")
    rms = type(model.model.norm)
    roles = {a.name: a.role for a in go.assign_roles(model, roles={rms: "bias"})}
    assert roles["model.norm.weight"] == "bias"
    assert roles["model.layers.0.input_layernorm.weight"] == "bias"
    conv1d = transformers.pytorch_utils.Conv1D
    gpt2 = _model("gpt2")
    roles = {
        a.name: a.role
        for a in go.assign_roles(gpt2, roles={conv1d: {"weight": "conv", "bias": "norm"}})
    }
    assert roles["transformer.h.0.attn.c_attn.weight"] == "conv"
    assert roles["transformer.h.0.attn.c_attn.bias"] == "norm"


def test_describe_shows_the_papers_factors_on_llama() -> None:
    """Scion's factors (RMS->RMS sqrt(d_out/d_in), sign 1/d_in, colnorm sqrt(d) per token) and
    Muon's sqrt(max(1, d_out/d_in)), read off describe() for an untied Llama (d = 32)."""
    scion = _factors(go.scion(_model("llama-untied")))
    muon = _factors(go.muon(_model("llama-untied")))
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert scion[up] == f"{math.sqrt(2):.4g}" and scion[down] == f"{math.sqrt(0.5):.4g}"
    assert muon[up] == f"{math.sqrt(2):.4g}" and muon[down] == "1"
    assert scion["lm_head.weight"] == f"{1 / 32:.4g}"
    assert scion["model.embed_tokens.weight"] == f"{math.sqrt(32):.4g}"
    assert muon["lm_head.weight"] == "-"  # AdamW
