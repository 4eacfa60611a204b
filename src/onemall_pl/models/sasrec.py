"""SASRec's user tower (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018).

A causal transformer over the user's item sequence; the output at the last position is the
user vector, and the score of item i is its dot product with item i's embedding (the item
tower). It is the ANN baseline of the paper's Table 2 ("compresses user interests into
embeddings for nearest neighbour search").

    E_i        item embedding (shared with the item tower, as in SASRec Sec. III-A/E)
    x_t = sqrt(d) * E_{s_t} + P_t           embedding + learned position (Sec. III-B)
    h = CausalBlocks(dropout(x))            self-attention + point-wise FFN, causal (Sec. III-C/D)
    r_{t,i} = <h_t, E_i>                    relevance of item i at step t (Sec. III-E, Eq. 5)

The two towers plug into ``onemall_pl.models.twotower.TwoTower``: :class:`SASRecUserTower`
(``feats["seq"]``) and :class:`ItemIdTower` (``feats["item"]``) share the embedding E.

Departures, named: blocks are pre-LN ``nn.TransformerEncoderLayer`` (GELU), as in current
SASRec reimplementations; training uses softmax cross-entropy over all (or sampled) items
instead of the paper's binary loss with one negative (the stage chooses; see
``onemall_pl.baselines.sasrec``).

Legend: B batch, L sequence length (left-padded; index 0 is padding), D model width, N items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0  # item index 0 is padding; real items are 1..n_items


@dataclass
class SASRecConfig:
    n_items: int = 0
    """Number of items; item indices are 1..n_items (0 pads). Derived from the data."""
    max_len: int = 50
    """Longest sequence read (the latest ``max_len`` items)."""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    ffn_mult: int = 4
    normalize: bool = False
    """L2-normalise user and item vectors (cosine scores; pair with a temperature)."""


class ItemIdTower(nn.Module):
    """The item tower: item index -> its embedding E_i (``feats["item"]``, 1..n_items)."""

    def __init__(self, n_items: int, d_model: int, normalize: bool = False):
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, d_model, padding_idx=PAD)
        nn.init.normal_(self.emb.weight, std=d_model ** -0.5)
        with torch.no_grad():
            self.emb.weight[PAD].zero_()
        self.normalize = normalize

    @property
    def out_dim(self) -> int:
        return self.emb.embedding_dim

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        v = self.emb(feats["item"])
        return F.normalize(v, dim=-1) if self.normalize else v

    def all_items(self) -> torch.Tensor:
        """Vectors of items 1..n_items, ``(N, D)``: what the ANN index holds."""
        v = self.emb.weight[1:]
        return F.normalize(v, dim=-1) if self.normalize else v


class SASRecUserTower(nn.Module):
    """Item sequence (``feats["seq"]``, left-padded) -> user vector; reads the item tower's E."""

    def __init__(self, cfg: SASRecConfig, item_tower: ItemIdTower):
        super().__init__()
        if cfg.n_items <= 0:
            raise ValueError(f"SASRecConfig.n_items must be positive, got {cfg.n_items}")
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        assert item_tower.out_dim == cfg.d_model and item_tower.emb.num_embeddings == cfg.n_items + 1
        self.cfg = cfg
        self.item_emb = item_tower.emb  # shared: the same Parameter as the item tower's
        self.normalize = item_tower.normalize
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_mult * cfg.d_model, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, norm=nn.LayerNorm(cfg.d_model),
                                            enable_nested_tensor=False)

    @property
    def out_dim(self) -> int:
        return self.cfg.d_model

    def hidden(self, seq_BL: torch.Tensor) -> torch.Tensor:
        """Hidden state after every position, ``h_BLD``; ``h_BLD[:, t]`` has read ``seq_BL[:, :t+1]``."""
        L = seq_BL.shape[1]
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.cfg.max_len}")
        pad_BL = seq_BL == PAD
        x_BLD = self.item_emb(seq_BL) * math.sqrt(self.cfg.d_model)
        x_BLD = x_BLD + self.pos_emb(torch.arange(self.cfg.max_len - L, self.cfg.max_len, device=seq_BL.device))
        x_BLD = self.drop(x_BLD) * (~pad_BL)[..., None]
        # causal mask, plus padded keys; a padded query may see itself so no row is fully masked
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=seq_BL.device).triu(1)
        mask_BLL = causal_LL[None] | pad_BL[:, None, :]
        mask_BLL = mask_BLL & ~torch.eye(L, dtype=torch.bool, device=seq_BL.device)[None]
        mask = mask_BLL.repeat_interleave(self.cfg.n_heads, dim=0)  # (B*heads, L, L), as torch expects
        # padded positions are not zeroed: a user with no history (all padding) gets the learned
        # output of an empty sequence, the model's "most likely first item" vector
        h_BLD = self.blocks(x_BLD, mask=mask)
        return F.normalize(h_BLD, dim=-1) if self.normalize else h_BLD

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The user vector ``u_BD``: the hidden state after the latest item (position -1)."""
        return self.hidden(feats["seq"])[:, -1]
