"""Attention and the Query-Former (paper §3.2, Eq. 3 and 4; BLIP-2's Q-Former, Li et al. 2023).

A Query-Former compresses a long sequence into a few continuous tokens: ``Q`` learnable
queries attend to the ``L`` sequence tokens, so the decoder's cross-attention later sees
``Q << L`` keys (paper: ``Q ~ 10``, ``L ~ 500``, ``D ~ 128``):

    h_QD = QFormer(Q_QD, x_LD)                                   (Eq. 3: one per behaviour sequence)
    e_item = Linear(Flatten(QFormer(Q', f_FD)))                  (Eq. 4: item-side features f)

Each layer (pre-norm): self-attention over the queries, cross-attention from the queries to
the sequence, SwiGLU FFN. A learned "null" key is always present, so a request with an empty
sequence (a new user has no orders) attends to it instead of producing NaNs.

Legend: B batch, L sequence length, Q queries, D width, H heads, d head dim, C context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onemall_pl.models.moe import FeedForward


class Attention(nn.Module):
    """Multi-head attention over ``scaled_dot_product_attention``; self or cross (``kv_dim``)."""

    def __init__(self, dim: int, n_heads: int, kv_dim: int | None = None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"attention width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def heads(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        return x_BLD.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # B H L d

    def project_kv(self, ctx_BCD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, C, d]`` of a context (computed once, reusable)."""
        k, v = self.kv(ctx_BCD).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def attend(self, x_BLD: torch.Tensor, k_BHCd: torch.Tensor, v_BHCd: torch.Tensor,
               mask_BC: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Queries from ``x`` against given keys/values; ``mask_BC`` True = key takes part."""
        q = self.heads(self.q(x_BLD))
        attn_mask = None if mask_BC is None else mask_BC[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k_BHCd, v_BHCd, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(o.transpose(1, 2).flatten(2))

    def forward(self, x_BLD: torch.Tensor, ctx_BCD: torch.Tensor | None = None,
                mask_BC: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        k, v = self.project_kv(x_BLD if ctx_BCD is None else ctx_BCD)
        return self.attend(x_BLD, k, v, mask_BC, is_causal)


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_mult: int = 4):
        super().__init__()
        self.self_norm, self.self_attn = nn.RMSNorm(dim), Attention(dim, n_heads)
        self.q_norm, self.x_norm, self.cross_attn = nn.RMSNorm(dim), nn.RMSNorm(dim), Attention(dim, n_heads)
        self.ffn_norm, self.ffn = nn.RMSNorm(dim), FeedForward(dim, ffn_mult * dim)

    def forward(self, q_BQD: torch.Tensor, x_BLD: torch.Tensor, mask_BL: torch.Tensor | None) -> torch.Tensor:
        q_BQD = q_BQD + self.self_attn(self.self_norm(q_BQD))
        q_BQD = q_BQD + self.cross_attn(self.q_norm(q_BQD), self.x_norm(x_BLD), mask_BL)
        return q_BQD + self.ffn(self.ffn_norm(q_BQD))


class QFormer(nn.Module):
    """``Q`` learnable queries compress ``[B, L, D]`` (with a padding mask) into ``[B, Q, out_dim]``."""

    def __init__(self, dim: int, n_queries: int, n_layers: int = 1, n_heads: int = 4,
                 out_dim: int | None = None, ffn_mult: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.null = nn.Parameter(torch.zeros(1, 1, dim))  # the always-present key
        self.layers = nn.ModuleList(QFormerLayer(dim, n_heads, ffn_mult) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False) if out_dim is not None else nn.Identity()

    def forward(self, x_BLD: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        B = x_BLD.shape[0]
        x_BLD = torch.cat([self.null.expand(B, 1, -1), x_BLD], dim=1)
        if mask_BL is not None:
            mask_BL = torch.cat([mask_BL.new_ones(B, 1), mask_BL.bool()], dim=1)
        q_BQD = self.queries.expand(B, -1, -1)
        for layer in self.layers:
            q_BQD = layer(q_BQD, x_BLD, mask_BL)
        return self.proj(self.norm(q_BQD))
