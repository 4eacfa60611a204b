"""The ranking model, used as the reward model of RL post-training (paper §2.1, §3.3).

Paper §2.1: the ranking model sees all three feature groups of an exposure, which the
retrieval model cannot: (i) user features (latest exposure / click / buy sequences),
(ii) target-item features (item id, category tags, shop, price), (iii) user x item cross
features (e.g. "latest clicks with the same tag as the target item"). Its predictions
(CTR / CVR / CTCVR / EGPM) are fused into one reward by Eq. 8 (``onemall_pl.reward.fuse_reward``).

The architecture is the standard industrial one, written out here:

1. Item representation: id, L1..L3 category, shop, price band, item type embeddings and
   log-price, concatenated and projected to ``d_model`` (one item tower for targets and for
   history items alike). Item side features are buffers filled from the catalogue, so
   callers pass dense item indices only.
2. User interest: DIN target attention (Zhou et al. 2018) of the target item over each
   behaviour sequence (exposure, click, order). Like DIN, the attention weights are
   *not* softmax-normalised, so the pooled vector keeps the intensity of an interest.
3. Cross features: per target item, how many of the user's recent exposures / clicks /
   orders share its item id, L1, L2, L3 category and shop (log1p counts), computed here
   from the gathered ids, vectorised over candidates.
4. Heads, ESMM (Ma et al. 2018): p_ctr = sigmoid(ctr tower), p_cvr = sigmoid(cvr tower) and
   p_ctcvr = p_ctr * p_cvr. The click loss is taken on p_ctr and the order loss on p_ctcvr,
   both over the entire exposure space, so CVR is learnt without the sample-selection bias
   of training it on clicks only.
5. EGPM (expected GMV per thousand exposures) = 1000 * p_ctcvr * E[gmv | order]. The gmv
   tower predicts log E[gmv | order] and is trained on ordered exposures only with the
   Gamma negative log-likelihood under a log link (``y / mu + log mu``), whose minimiser is
   the conditional *mean* (a squared loss on log gmv would estimate the geometric mean and
   bias EGPM low). A direct regression of gmv over all exposures was not chosen: >99% of
   its targets are zero and it would duplicate what the CTCVR head already learns.

Legend: B requests, N candidate items per request, L history length, I catalogue items,
D = d_model, E = d_emb, H = hidden width, F = number of cross features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SEQUENCES = ("exposure", "click", "order")  # the behaviour sequences, in this order everywhere
CROSS_KEYS = ("item", "l1", "l2", "l3", "shop")  # what a history item may share with the target


@dataclass
class Config:
    """Sizes come from the data (``EventsDataModule.sizes``, linked by the CLI); widths are free."""

    num_items: int = 1
    num_categories_l1: int = 1  # dense per level, 0 = "no category at this level"
    num_categories_l2: int = 1
    num_categories_l3: int = 1
    num_shops: int = 1
    num_price_bands: int = 1
    num_item_types: int = 3
    num_scenarios: int = 3
    d_emb: int = 16  # width of each field embedding
    d_model: int = 32  # width of an item vector
    attn_hidden: int = 32  # DIN attention unit
    tower_hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0

    @property
    def num_cross(self) -> int:
        return len(SEQUENCES) * len(CROSS_KEYS)

    @property
    def category_sizes(self) -> list[int]:
        return [self.num_categories_l1, self.num_categories_l2, self.num_categories_l3]


def mlp(d_in: int, hidden: list[int], d_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU(), nn.Dropout(dropout)]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class ItemTower(nn.Module):
    """1. Item id + catalogue side features -> an item vector (targets and history items alike)."""

    def __init__(self, cfg: Config):
        super().__init__()
        E = cfg.d_emb
        self.id = nn.Embedding(cfg.num_items, E)
        self.cat = nn.ModuleList(nn.Embedding(n, E) for n in cfg.category_sizes)
        self.shop = nn.Embedding(cfg.num_shops, E)
        self.band = nn.Embedding(cfg.num_price_bands, E)
        self.itype = nn.Embedding(cfg.num_item_types, E)
        self.proj = nn.Linear(E * (4 + len(self.cat)) + 1, cfg.d_model)
        # Side features of every catalogue item, filled by `set_item_features` (saved with the weights).
        I = cfg.num_items
        self.register_buffer("cat_IC", torch.zeros(I, len(self.cat), dtype=torch.long))
        self.register_buffer("shop_I", torch.zeros(I, dtype=torch.long))
        self.register_buffer("band_I", torch.zeros(I, dtype=torch.long))
        self.register_buffer("type_I", torch.zeros(I, dtype=torch.long))
        self.register_buffer("logprice_I", torch.zeros(I))

    @torch.no_grad()
    def set_item_features(self, category: torch.Tensor, shop: torch.Tensor, price_band: torch.Tensor,
                          item_type: torch.Tensor, price: torch.Tensor) -> None:
        """Copy the catalogue's side features (rows indexed by dense item index)."""
        checks = [(f"category L{j + 1}", category[:, j], e.num_embeddings) for j, e in enumerate(self.cat)]
        for name, t, hi in (*checks, ("shop", shop, self.shop.num_embeddings),
                            ("price_band", price_band, self.band.num_embeddings),
                            ("item_type", item_type, self.itype.num_embeddings)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
                raise ValueError(f"item {name} ids must lie in [0, {hi}); got [{int(t.min())}, {int(t.max())}] "
                                 "(the model config's sizes do not match the catalogue)")
        self.cat_IC.copy_(category)
        self.shop_I.copy_(shop)
        self.band_I.copy_(price_band)
        self.type_I.copy_(item_type)
        self.logprice_I.copy_(torch.log1p(price.float()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Item indices of any shape (...) -> item vectors (..., D)."""
        cat = self.cat_IC[idx]
        fields = [self.id(idx), *(emb(cat[..., j]) for j, emb in enumerate(self.cat)),
                  self.shop(self.shop_I[idx]), self.band(self.band_I[idx]), self.itype(self.type_I[idx]),
                  self.logprice_I[idx].unsqueeze(-1)]
        return self.proj(torch.cat(fields, -1))


class TargetAttention(nn.Module):
    """2. DIN's activation unit: a(q, k) = MLP([q, k, q - k, q * k]); pooled = sum_l a(q, k_l) k_l.

    The first linear layer of the unit is split by input block,
    W [q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k),
    so the (B, N, L, 4D) concatenation is never materialised (same function, less memory
    when N candidates are scored against L history items).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        D, H = cfg.d_model, cfg.attn_hidden
        self.w_q = nn.Linear(D, H)
        self.w_k = nn.Linear(D, H, bias=False)
        self.w_p = nn.Linear(D, H, bias=False)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(H, 1))

    def forward(self, q_BND: torch.Tensor, k_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        h_BNLH = (self.w_q(q_BND).unsqueeze(2) + self.w_k(k_BLD).unsqueeze(1)
                  + self.w_p(q_BND.unsqueeze(2) * k_BLD.unsqueeze(1)))
        a_BNL = self.out(h_BNLH).squeeze(-1) * mask_BL.unsqueeze(1).to(q_BND.dtype)
        return torch.einsum("bnl,bld->bnd", a_BNL, k_BLD)


class RankingModel(nn.Module):
    """Multi-task ranking model: CTR, CVR, CTCVR (ESMM) and EGPM for N candidates per request."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, E = cfg.d_model, cfg.d_emb
        self.items = ItemTower(cfg)
        self.attn = nn.ModuleList(TargetAttention(cfg) for _ in SEQUENCES)
        self.scenario = nn.Embedding(cfg.num_scenarios, E)
        d_in = D + len(SEQUENCES) * D + E + cfg.num_cross + len(SEQUENCES)
        self.ctr = mlp(d_in, cfg.tower_hidden, 1, cfg.dropout)
        self.cvr = mlp(d_in, cfg.tower_hidden, 1, cfg.dropout)
        self.gmv = mlp(d_in + 1, cfg.tower_hidden, 1, cfg.dropout)  # + log price of the target

    def set_item_features(self, **features: torch.Tensor) -> None:
        self.items.set_item_features(**features)

    def cross_features(self, seqs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                       item_BN: torch.Tensor) -> torch.Tensor:
        """3. log1p counts of history items sharing the target's id / L1 / L2 / L3 / shop: (B, N, F).

        Category id 0 means "none at this level" and never matches."""
        it = self.items

        def keys(idx: torch.Tensor) -> list[torch.Tensor]:
            cat = it.cat_IC[idx]
            return [idx, *(cat[..., j] for j in range(cat.shape[-1])), it.shop_I[idx]]

        tgt = keys(item_BN)  # each (B, N)
        out = []
        for s in SEQUENCES:
            m_B1L = masks[s].unsqueeze(1)
            for key, t_BN, h_BL in zip(CROSS_KEYS, tgt, keys(seqs[s])):
                m = m_B1L & (h_BL > 0).unsqueeze(1) if key in ("l1", "l2", "l3") else m_B1L
                out.append(((t_BN.unsqueeze(2) == h_BL.unsqueeze(1)) & m).sum(-1))
        return torch.log1p(torch.stack(out, -1).float())

    def forward(self, seqs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], scenario_B: torch.Tensor,
                item_BN: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score N candidate items for each of B requests.

        Args:
            seqs: ``{"exposure", "click", "order"}`` -> (B, L_s) dense item indices (any pad index).
            masks: the same keys -> (B, L_s) bool, True on real history items.
            scenario_B: scenario index of each request.
            item_BN: dense indices of the candidate items.
        Returns: ``logit_ctr``, ``logit_cvr``, ``log_gmv`` (log E[gmv | order]) and the probabilities
            ``ctr``, ``cvr``, ``ctcvr`` and ``egpm`` (expected GMV per 1000 exposures), each (B, N).
        """
        B, N = item_BN.shape
        # The item tower runs once per distinct item of the batch (targets and histories share
        # most items), then its vectors are gathered: same values, far less work than per position.
        flat = [item_BN.reshape(-1), *(seqs[s].reshape(-1) for s in SEQUENCES)]
        uniq, inv = torch.unique(torch.cat(flat), return_inverse=True)
        vec_UD = self.items(uniq)
        parts = torch.split(inv, [t.numel() for t in flat])
        q_BND = vec_UD[parts[0]].view(B, N, vec_UD.shape[-1])
        k_BLD = {s: vec_UD[p].view(*seqs[s].shape, vec_UD.shape[-1]) for s, p in zip(SEQUENCES, parts[1:])}
        pooled = [attn(q_BND, k_BLD[s], masks[s]) for attn, s in zip(self.attn, SEQUENCES)]
        lens_B3 = torch.stack([masks[s].sum(-1) for s in SEQUENCES], -1).float()
        x = torch.cat([q_BND, *pooled,
                       self.scenario(scenario_B).unsqueeze(1).expand(B, N, -1),
                       self.cross_features(seqs, masks, item_BN),
                       torch.log1p(lens_B3).unsqueeze(1).expand(B, N, -1)], -1)
        logit_ctr = self.ctr(x).squeeze(-1)
        logit_cvr = self.cvr(x).squeeze(-1)
        log_gmv = self.gmv(torch.cat([x, self.items.logprice_I[item_BN].unsqueeze(-1)], -1)).squeeze(-1)
        # 4. ESMM: CTCVR = CTR * CVR over the entire exposure space.
        ctr, cvr = torch.sigmoid(logit_ctr), torch.sigmoid(logit_cvr)
        ctcvr = ctr * cvr
        # 5. EGPM = 1000 * P(order | exposure) * E[gmv | order].
        egpm = 1000.0 * ctcvr * torch.exp(log_gmv)
        return {"logit_ctr": logit_ctr, "logit_cvr": logit_cvr, "log_gmv": log_gmv,
                    "ctr": ctr, "cvr": cvr, "ctcvr": ctcvr, "egpm": egpm}


def esmm_loss(out: dict[str, torch.Tensor], click: torch.Tensor, order: torch.Tensor, gmv: torch.Tensor,
              gmv_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The ranking loss: BCE(CTR, click) + BCE(CTCVR, order) + gmv_weight * Gamma-NLL(gmv | order).

    All arguments have the same shape (labels float or int). The CTCVR term is computed in log
    space (log p_ctcvr = logsigmoid(ctr) + logsigmoid(cvr)) so it stays finite when p_ctcvr -> 0.
    The gmv term is averaged over ordered exposures and is 0 when the batch has none.
    """
    click, order, gmv = click.float(), order.float(), gmv.float()
    l_ctr = F.binary_cross_entropy_with_logits(out["logit_ctr"], click)
    logp = F.logsigmoid(out["logit_ctr"]) + F.logsigmoid(out["logit_cvr"])
    log1mp = torch.log(-torch.expm1(logp.clamp(max=-1e-7)))  # log(1 - p), stable
    l_ctcvr = -(order * logp + (1 - order) * log1mp).mean()
    ordered = (order > 0) & (gmv > 0)
    mu = out["log_gmv"][ordered]
    l_gmv = (gmv[ordered] * torch.exp(-mu) + mu - torch.log(gmv[ordered])).mean() if ordered.any() \
        else out["log_gmv"].sum() * 0.0  # Gamma NLL (shape 1), shifted so its minimum is 1
    total = l_ctr + l_ctcvr + gmv_weight * l_gmv
    return {"loss": total, "ctr": l_ctr, "ctcvr": l_ctcvr, "gmv": l_gmv}

