"""A nanoGPT-style decoder-only transformer, written to be read.

Pre-norm blocks (RMSNorm), fused-qkv causal self-attention through
:func:`torch.nn.functional.scaled_dot_product_attention`, a GELU MLP, learned or rotary
positions, and an optionally tied embedding / output layer. No linear layer has a bias, so the
parameters are exactly: token (and position) embeddings, hidden matrices, norm gains and the
head, each covered by a module-type rule of :func:`gluon_optim.assign_roles`.

The attention, MLP and block classes are shared with the ViT in :mod:`.vit`, which uses them
non-causally with LayerNorm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GPT",
    "MLP",
    "Block",
    "Experts",
    "GPTConfig",
    "MoE",
    "SelfAttention",
    "apply_rope",
    "gpt2_init_",
]


@dataclass(frozen=True)
class GPTConfig:
    """Shape and options of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (256 for the lab's byte-level text).
        block_size: the longest sequence the model accepts (the size of ``wpe``).
        n_layer, n_head, n_embd: depth, heads per attention layer and width.
        tied: share one matrix between the token embedding and the output head (GPT-2); the
            optimizer then sees a single parameter with role ``tied``.
        rope: rotary position embeddings instead of the learned table ``wpe``.
        rope_base: the rotary frequency base (10000 as in RoFormer).
        mlp_ratio: the MLP's hidden width over ``n_embd``.
        dropout: dropout on embeddings, attention weights and residual branches.
        n_expert: 0 for a dense MLP; otherwise every block's MLP is a mixture of ``n_expert``
            gated experts (:class:`MoE`), each of hidden width ``mlp_ratio * n_embd / 2``, so
            one expert has the dense MLP's parameter count.
        top_k: experts per token (``n_expert > 0``).
    """

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    tied: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    mlp_ratio: int = 4
    dropout: float = 0.0
    n_expert: int = 0
    top_k: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"GPTConfig: rope needs an even head size, got n_embd/n_head = "
                f"{self.n_embd // self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.top_k <= self.n_expert):
            raise ValueError(
                f"GPTConfig: need n_expert >= 0 and 1 <= top_k <= n_expert, got n_expert="
                f"{self.n_expert}, top_k={self.top_k}"
            )
        if self.n_expert and (self.mlp_ratio * self.n_embd) % 2:
            raise ValueError("GPTConfig: an expert's width mlp_ratio * n_embd / 2 must be whole")


def apply_rope(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate each head's (first half, second half) channel pairs by position-dependent angles.

    ``x`` is ``(B, H, T, D)`` with the positions ``0..T-1`` along ``T``. Channel ``i`` of the
    first half is paired with channel ``i`` of the second half (the GPT-NeoX layout) and rotated
    by ``t * base**(-i / (D/2))``. Rotating both queries and keys makes their dot product depend
    only on the offset between positions. The angles are computed here in float32 on every call:
    they cost ``T * D/2`` sines, and nothing stored can drift when the model is cast to bf16 or
    built on the meta device.
    """
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (D/2,)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()  # (T, D/2) each, broadcast over (B, H)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]  # (B, H, T, D/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, D)
    return rotated.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused ``qkv`` projection, SDPA, one output projection.

    ``causal=True`` masks the future (the GPT); ``causal=False`` attends everywhere (the ViT).
    Both projections are ``nn.Linear`` without bias, so their weights get the ``hidden`` role.
    """

    def __init__(
        self,
        dim: int,
        n_head: int,
        *,
        causal: bool,
        rope: bool = False,
        rope_base: float = 1e4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % n_head:
            raise ValueError(f"SelfAttention: dim={dim} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.causal = causal
        self.rope = rope
        self.rope_base = rope_base
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, C/H): heads become a batch dimension for SDPA.
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        out: Tensor = self.resid_drop(self.proj(y))  # (B, T, C)
        return out


class MLP(nn.Module):
    """``Linear -> GELU -> Linear``: GELU as in GPT-2 and ViT (modded-nanogpt uses ReLU^2)."""

    def __init__(self, dim: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, mlp_ratio * dim, bias=False)
        self.act = nn.GELU()
        self.proj = nn.Linear(mlp_ratio * dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc(x))  # (B, T, mlp_ratio*C)
        out: Tensor = self.drop(self.proj(h))  # (B, T, C)
        return out


class Experts(nn.Module):
    """``E`` gated (SwiGLU) experts stored as stacks, the layout of transformers' Mixtral.

    ``gate_up_proj`` is ``(E, 2 d_ff, d)``, each expert's ``[gate; up]`` along ``d_out``, and
    ``down_proj`` ``(E, d, d_ff)``. The three attributes below declare that layout the way
    transformers' experts classes do, which is what gives these weights the ``hidden`` role
    with one LMO unit per expert (``blocks="experts"``) in :func:`gluon_optim.assign_roles`.
    """

    is_transposed = False
    is_concatenated = True
    has_gate = True

    def __init__(self, n_expert: int, dim: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_expert, 2 * d_ff, dim))
        self.down_proj = nn.Parameter(torch.empty(n_expert, dim, d_ff))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """``sum_e weights[:, e] * expert_e(x)`` for ``x`` ``(N, d)``, ``weights`` ``(N, E)``.

        Every expert runs on the tokens routed to it only (an index per expert, as the
        transformers eager path does), so an expert no token chose gets no gradient.
        """
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            rows = weights[:, e].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gate, up = (x[rows] @ self.gate_up_proj[e].T).chunk(2, dim=-1)  # (n, d_ff) each
            h = F.silu(gate) * up @ self.down_proj[e].T  # (n, d)
            out.index_add_(0, rows, h * weights[rows, e, None])
        return out


class MoE(nn.Module):
    """A top-k mixture of experts: a linear router, softmax over the chosen experts' logits.

    No load-balancing loss: the lab trains it as a small test bed for the optimizer's per-expert
    step, not as a recipe.
    """

    def __init__(self, dim: int, n_expert: int, top_k: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_expert, bias=False)
        self.experts = Experts(n_expert, dim, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        logits = self.router(flat)  # (N, E)
        top, chosen = logits.topk(self.top_k, dim=-1)  # (N, k) each
        weights = torch.zeros_like(logits).scatter(1, chosen, top.softmax(dim=-1))  # (N, E)
        out: Tensor = self.drop(self.experts(flat, weights).reshape(B, T, C))
        return out


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Pre-norm (GPT-2, ViT) leaves the residual stream a plain sum of the branches, so every
    block has an identity path to the loss. ``norm`` builds the normalisation layer from the width
    (``nn.RMSNorm`` for the GPT, ``nn.LayerNorm`` for the ViT).
    """

    def __init__(
        self,
        dim: int,
        n_head: int,
        *,
        causal: bool,
        norm: Callable[[int], nn.Module] = nn.RMSNorm,
        mlp_ratio: int = 4,
        rope: bool = False,
        rope_base: float = 1e4,
        dropout: float = 0.0,
        n_expert: int = 0,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = SelfAttention(
            dim, n_head, causal=causal, rope=rope, rope_base=rope_base, dropout=dropout
        )
        self.norm2 = norm(dim)
        self.mlp: nn.Module = (
            MoE(dim, n_expert, top_k, mlp_ratio * dim // 2, dropout)
            if n_expert
            else MLP(dim, mlp_ratio, dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, C)
        out: Tensor = x + self.mlp(self.norm2(x))  # (B, T, C)
        return out


def gpt2_init_(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2's initialisation, in place.

    Linear and embedding weights ~ N(0, std^2), biases zero, norm layers left at gain 1. The
    two output projections of every :class:`Block` (attention and MLP) get ``std /
    sqrt(2 * n_layer)``: each block adds two branches to the residual stream, so this keeps the
    variance of the stream at the top independent of depth. Other module types (a ViT's patch
    conv) keep PyTorch's default.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
    for module in model.modules():
        if isinstance(module, Block):
            out = module.mlp.proj.weight if isinstance(module.mlp, MLP) else None
            if isinstance(module.mlp, MoE):
                out = module.mlp.experts.down_proj
            for weight in (module.attn.proj.weight, out):
                assert weight is not None
                nn.init.normal_(weight, mean=0.0, std=std / math.sqrt(2 * n_layer))


class GPT(nn.Module):
    """A decoder-only language model: token ids ``(B, T)`` -> next-token logits ``(B, T, V)``.

    ``head`` (the ``lm_head``) and ``embedding`` (the token table ``wte``) name the two layers
    that :func:`gluon_optim.assign_roles` needs to know about; with ``tied=True`` they share one
    weight, which then gets the role ``tied``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        # With rotary embeddings the positions live in the attention; there is no table.
        self.wpe: nn.Embedding | None = None if c.rope else nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(
                c.n_embd,
                c.n_head,
                causal=True,
                norm=nn.RMSNorm,
                mlp_ratio=c.mlp_ratio,
                rope=c.rope,
                rope_base=c.rope_base,
                dropout=c.dropout,
                n_expert=c.n_expert,
                top_k=c.top_k,
            )
            for _ in range(c.n_layer)
        )
        self.ln_f = nn.RMSNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tied:
            # One Parameter object in two modules: named_parameters() lists it once (as
            # wte.weight) and its gradient is the sum of both uses.
            self.lm_head.weight = self.wte.weight
        gpt2_init_(self, c.n_layer)

    # Properties rather than second registrations, so state_dict keys stay nanoGPT's
    # (lm_head.weight, not also head.weight).
    @property
    def head(self) -> nn.Linear:
        """The output layer (``lm_head``)."""
        return self.lm_head

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding (``wte``)."""
        return self.wte

    def forward(self, idx: Tensor) -> Tensor:
        """Logits for every position of ``idx`` (``(B, T)`` int64, ``T <= block_size``)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"GPT: sequence length {T} exceeds block_size {self.config.block_size}"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            pos = torch.arange(T, device=idx.device)  # (T,)
            x = x + self.wpe(pos)  # (B, T, C) + (T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits: Tensor = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits
