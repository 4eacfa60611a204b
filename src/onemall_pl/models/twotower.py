"""Two-tower retrieval towers (paper §2.1 "Retrieval Model", §3.1.3 live-streams).

A tower maps a dict of id features to one L2-normalised vector; the score of (user, item)
is the dot product of the two towers' vectors. :class:`FeatureTower` is the generic tower:
every field is an id (``[B]``) or a bag of ids (``[B, P]``, 0 = padding), embedded and
mean-pooled over the bag, the fields concatenated and passed through an MLP.

- user tower: ``FeatureTower`` over the user's click sequence (a bag of item ids; SASRec
  plugs in a causal transformer instead, anything with ``forward(feats) -> [B, d]`` fits);
- live-stream item tower: ``FeatureTower`` over the shop, the categories and the semantic-ID
  codes of the products the live-stream sells at that time.

Legend: B batch, P bag length, E field embedding dim, F number of fields, d output dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TowerConfig:
    fields: dict[str, int] = field(default_factory=dict)  # feature name -> vocabulary size (id 0 = padding)
    embed_dim: int = 32
    hidden: int = 128
    out_dim: int = 64

    def __post_init__(self):
        if not self.fields:
            raise ValueError("a tower needs at least one feature field")
        bad = {k: v for k, v in self.fields.items() if int(v) < 2}
        if bad:
            raise ValueError(f"vocabulary sizes must be >= 2 (id 0 is padding): {bad}")


class FeatureTower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.names = sorted(cfg.fields)
        self.embed = nn.ModuleDict({n: nn.Embedding(cfg.fields[n], cfg.embed_dim, padding_idx=0) for n in self.names})
        self.mlp = nn.Sequential(nn.Linear(len(self.names) * cfg.embed_dim, cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.hidden, cfg.out_dim))

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise ValueError(f"tower input lacks feature(s) {missing}; it has {sorted(feats)}")
        parts = []
        for n in self.names:
            ids = feats[n]
            e = self.embed[n](ids)
            if ids.ndim == 2:  # a bag: masked mean over P (an empty bag gives zeros)
                m_BP1 = (ids > 0).unsqueeze(-1).to(e.dtype)
                e = (e * m_BP1).sum(1) / m_BP1.sum(1).clamp_min(1.0)
            parts.append(e)
        h_BD = self.mlp(torch.cat(parts, -1))
        return F.normalize(h_BD, dim=-1)


class TwoTower(nn.Module):
    """Any user tower and any item tower with the same output dim; scores are dot products."""

    def __init__(self, user_tower: nn.Module, item_tower: nn.Module):
        super().__init__()
        self.user_tower, self.item_tower = user_tower, item_tower

    def forward(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_tower(user), self.item_tower(item)
