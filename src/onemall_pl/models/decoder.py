"""The OneMall model (paper §3.2, Figure 4, Eq. 3-7): a decoder over semantic-ID tokens.

    user side   each behaviour sequence (exposure, click, order) -> item tokens -> Query-Former
                (Eq. 3) -> Q tokens each; context = [scenario token, Q x 3 behaviours]
    item tower  the target's side features (SID levels, category L1-L3, price band, shop) as a
                short field sequence -> Query-Former -> flatten -> item embedding (Eq. 4)
    decoder     over [BOS, s1, s2, s3]: causal self-attention, cross-attention to the user
                context (Eq. 5), sparse-MoE FFN (Eq. 6); ``DecoderBlock`` is the FSDP wrap unit
    heads       position l predicts level l+1 over that level's codebook; the hidden state after
                s3 (which has read the whole target SID) is the user side of the contrastive task
    loss (Eq. 7)  NTP over the SID levels + lambda * in-batch contrastive (user vs item tower)

Variant for Table 6: ``compress=False`` skips the Query-Formers and concatenates the full
sequences into the cross-attention context.

Batch contract (dense tensors; the pretrain stage builds them from ``samples`` + the item
catalogue, the model never reads Parquet). ``S`` = SID levels, item features per position::

    batch = {
      "scenario": long [B]                      index into SCENARIOS (schema.py)
      "exposure" | "click" | "order": {          one per behaviour, right-padded, most recent first
          "sid":   long [B, L, S]                the item's semantic ID (level-local codes)
          "cat":   long [B, L, 3]                category ids L1..L3 (< n_categories)
          "price": long [B, L]                   price band (< n_price_bands)
          "shop":  long [B, L]                   shop index (< n_shops)
          "mask":  bool [B, L]                   True = a real item (a row may be all False)
      },
      "target": {                                training only: the request's positives
          "sid", "cat", "price", "shop"          as above, shape [B, T, ...]
          "item":  long [B, T]                   item ids (only to drop duplicate in-batch negatives)
          "mask":  bool [B, T]                   True = a real target (>= 1 per request)
      },
    }

Several targets per request are all used: (request, target) pairs are flattened to ``N``
rows; the user context is computed once per request and each block's cross-attention keys
and values are indexed by the row's request (``req_N``), never recomputed.

Legend: B requests, T targets per request, N (request, target) pairs, L sequence length,
S SID levels, C context length, D model width, Di item-feature width, F item fields,
H heads, d head dim, K beams, V codebook size of a level, E contrastive embedding width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from onemall_pl.artifacts import ArtifactError
from onemall_pl.models.moe import MoE, MoEConfig, make_ffn
from onemall_pl.models.qformer import Attention, QFormer

BEHAVIOURS = ("exposure", "click", "order")
N_CATEGORY_LEVELS = 3


@dataclass
class OneMallConfig:
    # vocabularies (linked from the data / quantize manifests by the pretrain stage)
    codebook_sizes: tuple[int, ...] = (64, 64, 64)
    """Codes per SID level (quantize manifest ``codebook_sizes``)."""
    n_categories: int = 64
    """Category ids of every level are < this."""
    n_price_bands: int = 16
    n_shops: int = 256
    n_scenarios: int = 3
    max_seq_len: int = 32
    """Longest behaviour sequence (size of the position table)."""
    # user / item encoders (Eq. 3, 4)
    item_dim: int = 32
    """Di: width of item tokens and of the Query-Formers (paper: 128)."""
    n_queries: int = 4
    """Q per behaviour Query-Former (paper: ~10)."""
    qformer_layers: int = 1
    qformer_heads: int = 4
    item_queries: int = 2
    """Queries of the item tower's Query-Former (Eq. 4)."""
    compress: bool = True
    """False = the Table 6 ablation: full sequences concatenated, no Query-Former."""
    # decoder (Eq. 5, 6)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 256
    """Hidden width of the dense FFN and of each expert (Table 1 "FFN-Dim")."""
    n_experts: int = 1
    """1 = dense FFN; > 1 = sparse MoE (Table 1 "Expert" E/k)."""
    top_k: int = 1
    n_shared_experts: int = 0
    router_score: str = "sigmoid"
    bias_update_rate: float = 1e-3
    gated_ffn: bool = False
    """False = 2-matrix GELU MLP (Table 1's parameter counts imply it, see PRESETS); True = SwiGLU."""
    tie_heads: bool = True
    """Share each level's output head with its input embedding table."""
    # objective (Eq. 7)
    emb_dim: int = 64
    """E: width of the contrastive user / item embeddings."""
    contrastive_weight: float = 0.5
    """lambda in Eq. 7 (not given in the paper)."""
    temperature: float = 0.05

    def __post_init__(self):
        self.codebook_sizes = tuple(int(c) for c in self.codebook_sizes)
        if len(self.codebook_sizes) < 1 or min(self.codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be >= 1 code per level, got {self.codebook_sizes}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        _ = self.moe  # validates the expert settings

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, hidden=self.ffn_hidden, n_experts=self.n_experts, top_k=self.top_k,
                         n_shared=self.n_shared_experts, score_func=self.router_score,
                         bias_update_rate=self.bias_update_rate, gated=self.gated_ffn)

    @property
    def context_len(self) -> int:
        """C: cross-attention keys per request (scenario token + compressed or full sequences)."""
        per = self.n_queries if self.compress else self.max_seq_len
        return 1 + per * len(BEHAVIOURS)

    def to_dict(self) -> dict:
        return asdict(self)


# Table 1 gives layers, widths, heads and experts; the rest is ours. How parameters are counted
# (``count_params``): every tensor, embedding tables and Query-Formers included, tied head/embedding
# weights once; active = minus the routed experts a token skips. With 2-matrix GELU FFNs and tied
# heads the rows come out (``tests/test_decoder.py`` checks them within 35%):
#   0.05B ~ 0.052B, 0.1B ~ 0.085B, 0.5B-A0.1B ~ 0.45B (active 0.12B), 1.3B-A0.1B ~ 0.86B (active 0.12B).
# The table is not self-consistent: going from 12 to 24 experts (4 layers) adds 0.8B, i.e. 16.7M per
# expert, while 0.1B -> 0.5B-A0.1B implies ~9M per expert; a d=1024, F=4096 MLP expert has 8.4M
# (SwiGLU: 12.6M, which fits 1.3B but overshoots 0.05B, 0.5B and the active 0.1B).
_PAPER = {"codebook_sizes": (4096, 4096, 4096), "n_categories": 1000, "n_price_bands": 32, "n_shops": 10_000,
          "max_seq_len": 400, "item_dim": 128, "n_queries": 50, "qformer_layers": 1, "qformer_heads": 4,
          "item_queries": 4, "dim": 1024, "n_heads": 8, "ffn_hidden": 4096, "emb_dim": 256}

PRESETS: dict[str, OneMallConfig] = {
    # CPU presets for tests and the tiny pipeline
    "tiny": OneMallConfig(),
    "tiny-moe": OneMallConfig(n_experts=4, top_k=2),
    "small": OneMallConfig(dim=128, n_layers=4, n_heads=4, ffn_hidden=512, item_dim=64, n_queries=8,
                           max_seq_len=64, emb_dim=64),
    "small-moe": OneMallConfig(dim=128, n_layers=4, n_heads=4, ffn_hidden=512, item_dim=64, n_queries=8,
                               max_seq_len=64, emb_dim=64, n_experts=4, top_k=2),
    # paper Table 1 rows (GPU); Att-Dim 1024, FFN-Dim 4096, 8 heads, 3 x 4096 codes
    "0.05B": OneMallConfig(**_PAPER, n_layers=2),
    "0.1B": OneMallConfig(**_PAPER, n_layers=4),
    "0.5B-A0.1B": OneMallConfig(**_PAPER, n_layers=4, n_experts=12, top_k=2),
    "1.3B-A0.1B": OneMallConfig(**_PAPER, n_layers=4, n_experts=24, top_k=2),
}


def preset(name: str, **overrides) -> OneMallConfig:
    """A named preset, with fields overridden (e.g. ``codebook_sizes`` from the manifest)."""
    if name not in PRESETS:
        raise ValueError(f"unknown OneMall preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def check_codebooks(cfg: OneMallConfig, manifest) -> None:
    """Fail early if the model's vocabulary differs from the quantize manifest's codebooks."""
    sizes = tuple(int(c) for c in manifest.size("codebook_sizes"))
    if sizes != cfg.codebook_sizes:
        where = getattr(manifest, "path", "") or "the quantize manifest"
        raise ArtifactError(f"{where}: semantic IDs have codebook_sizes {list(sizes)} but the model's vocabulary "
                            f"is codebook_sizes {list(cfg.codebook_sizes)}; take the sizes from the manifest "
                            f"(the pretrain stage links them) or re-run quantize")


# ---------------------------------------------------------------------------------------------
# Item tokens: sum of the SID-level and side-feature embeddings (+ behaviour, position)


class ItemEmbedding(nn.Module):
    """Embeds item features into F = S + 3 + 2 field vectors ``[..., F, Di]``."""

    def __init__(self, cfg: OneMallConfig):
        super().__init__()
        d = cfg.item_dim
        self.sid = nn.ModuleList(nn.Embedding(c, d) for c in cfg.codebook_sizes)
        self.cat = nn.ModuleList(nn.Embedding(cfg.n_categories, d) for _ in range(N_CATEGORY_LEVELS))
        self.price = nn.Embedding(cfg.n_price_bands, d)
        self.shop = nn.Embedding(cfg.n_shops, d)

    @property
    def n_fields(self) -> int:
        return len(self.sid) + len(self.cat) + 2

    def fields(self, f: dict) -> torch.Tensor:
        sid, cat = f["sid"], f["cat"]
        out = [emb(sid[..., i]) for i, emb in enumerate(self.sid)]
        out += [emb(cat[..., i]) for i, emb in enumerate(self.cat)]
        out += [self.price(f["price"]), self.shop(f["shop"])]
        return torch.stack(out, dim=-2)

    def forward(self, f: dict) -> torch.Tensor:
        return self.fields(f).sum(-2)


# ---------------------------------------------------------------------------------------------
# Decoder block: causal self-attention, cross-attention to the user (Eq. 5), MoE FFN (Eq. 6)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: OneMallConfig):
        super().__init__()
        self.self_norm, self.self_attn = nn.RMSNorm(cfg.dim), Attention(cfg.dim, cfg.n_heads)
        self.cross_norm, self.ctx_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.cross_attn = Attention(cfg.dim, cfg.n_heads)
        self.ffn_norm, self.ffn = nn.RMSNorm(cfg.dim), make_ffn(cfg.moe)

    def context_kv(self, ctx_BCD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of a user context, ``[B, H, C, d]`` each."""
        return self.cross_attn.project_kv(self.ctx_norm(ctx_BCD))

    def cross(self, x_NLD, kv, mask_BC, req_N):
        """Eq. 5. ``req_N`` maps rows to requests; None = rows are ``B x G`` groups (beams) of requests."""
        k, v = kv
        h = self.cross_norm(x_NLD)
        if req_N is not None:
            return self.cross_attn.attend(h, k[req_N], v[req_N], None if mask_BC is None else mask_BC[req_N])
        B, (N, L, D) = k.shape[0], h.shape
        out = self.cross_attn.attend(h.reshape(B, N // B * L, D), k, v, mask_BC)  # beams share K/V
        return out.view(N, L, D)

    def forward(self, x_NLD: torch.Tensor, ctx_BCD: torch.Tensor, ctx_mask_BC: torch.Tensor | None,
                req_N: torch.Tensor) -> torch.Tensor:
        """Training / scoring: all SID positions at once (causal)."""
        x_NLD = x_NLD + self.self_attn(self.self_norm(x_NLD), is_causal=True)
        x_NLD = x_NLD + self.cross(x_NLD, self.context_kv(ctx_BCD), ctx_mask_BC, req_N)
        return x_NLD + self.ffn(self.ffn_norm(x_NLD))

    def step(self, x_N1D, kv, ctx_mask_BC, past: tuple | None):
        """Decoding one position with a self-attention cache; returns (x, new cache)."""
        h = self.self_norm(x_N1D)
        k, v = self.self_attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x_N1D = x_N1D + self.self_attn.attend(h, k, v)  # the new token sees every earlier one
        x_N1D = x_N1D + self.cross(x_N1D, kv, ctx_mask_BC, None)
        return x_N1D + self.ffn(self.ffn_norm(x_N1D)), (k, v)


@dataclass
class OneMallOutput:
    logits: list[torch.Tensor]  # per level l: [N, V_l]
    targets_NS: torch.Tensor
    user_NE: torch.Tensor  # normalised
    item_NE: torch.Tensor  # normalised
    item_N: torch.Tensor  # item ids
    req_N: torch.Tensor  # request of each row


class OneMall(nn.Module):
    def __init__(self, cfg: OneMallConfig):
        super().__init__()
        self.cfg = cfg
        D, Di = cfg.dim, cfg.item_dim
        # item tokens (shared by the behaviour sequences and the item tower)
        self.item_emb = ItemEmbedding(cfg)
        self.behaviour_emb = nn.Embedding(len(BEHAVIOURS), Di)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, Di)
        self.scenario_emb = nn.Embedding(cfg.n_scenarios, D)
        # Eq. 3: one Query-Former per behaviour, or (Table 6 ablation) a projection of the full sequence
        if cfg.compress:
            self.seq_encoders = nn.ModuleDict({b: QFormer(Di, cfg.n_queries, cfg.qformer_layers, cfg.qformer_heads,
                                                          out_dim=D) for b in BEHAVIOURS})
        else:
            self.seq_proj = nn.Linear(Di, D, bias=False)
        # Eq. 4: item tower over the item's field sequence
        self.field_emb = nn.Parameter(torch.zeros(self.item_emb.n_fields, Di))
        self.item_qformer = QFormer(Di, cfg.item_queries, cfg.qformer_layers, cfg.qformer_heads)
        self.item_proj = nn.Linear(cfg.item_queries * Di, cfg.emb_dim, bias=False)
        # decoder over [BOS, s1 .. sS]
        self.bos = nn.Parameter(torch.zeros(D))
        self.sid_tok = nn.ModuleList(nn.Embedding(c, D) for c in cfg.codebook_sizes)
        self.tok_pos = nn.Embedding(cfg.levels + 1, D)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(D)
        self.heads = nn.ModuleList(nn.Linear(D, c, bias=False) for c in cfg.codebook_sizes)
        self.user_proj = nn.Linear(D, cfg.emb_dim, bias=False)
        self.apply(self._init)
        if cfg.tie_heads:
            for head, emb in zip(self.heads, self.sid_tok):
                head.weight = emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, MoE):
            m.experts.reset_parameters()

    # --- user side (Eq. 3) ---------------------------------------------------------------------
    def sequence_tokens(self, seq: dict, behaviour: int) -> torch.Tensor:
        """Item tokens ``[B, L, Di]`` of one behaviour sequence."""
        L = seq["mask"].shape[1]
        if L > self.cfg.max_seq_len:
            raise ValueError(f"a behaviour sequence has {L} positions but max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(L, device=seq["mask"].device)
        return self.item_emb(seq) + self.behaviour_emb.weight[behaviour] + self.pos_emb(pos)

    def encode_user(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-attention context ``[B, C, D]`` and its key mask (None = all keys valid)."""
        parts = [self.scenario_emb(batch["scenario"])[:, None]]
        masks = [batch["scenario"].new_ones(len(batch["scenario"]), 1, dtype=torch.bool)]
        for i, b in enumerate(BEHAVIOURS):
            seq = batch[b]
            x_BLD = self.sequence_tokens(seq, i)
            if self.cfg.compress:
                parts.append(self.seq_encoders[b](x_BLD, seq["mask"]))  # Eq. 3: [B, Q, D]
            else:
                parts.append(self.seq_proj(x_BLD))
                masks.append(seq["mask"].bool())
        return torch.cat(parts, dim=1), (torch.cat(masks, dim=1) if len(masks) > 1 else None)

    # --- item tower (Eq. 4) --------------------------------------------------------------------
    def encode_items(self, feats: dict) -> torch.Tensor:
        """Normalised item embeddings ``[N, E]`` from item features with leading shape [N]."""
        f_NFD = self.item_emb.fields(feats) + self.field_emb
        q = self.item_qformer(f_NFD)
        return F.normalize(self.item_proj(q.flatten(1)), dim=-1)

    # --- decoder (Eq. 5, 6) --------------------------------------------------------------------
    def embed_sids(self, sid_NS: torch.Tensor) -> torch.Tensor:
        """Decoder input ``[N, S+1, D]`` = [BOS, s1 .. sS] + position."""
        N = sid_NS.shape[0]
        toks = [self.bos.expand(N, 1, -1)] + [emb(sid_NS[:, i])[:, None] for i, emb in enumerate(self.sid_tok)]
        return torch.cat(toks, dim=1) + self.tok_pos.weight

    def decode(self, sid_NS, ctx_BCD, ctx_mask_BC, req_N) -> torch.Tensor:
        x = self.embed_sids(sid_NS)
        for block in self.blocks:
            x = block(x, ctx_BCD, ctx_mask_BC, req_N)
        return self.norm(x)

    def forward(self, batch: dict) -> OneMallOutput:
        tgt = batch["target"]
        req_N, t_N = tgt["mask"].bool().nonzero(as_tuple=True)
        pick = {k: tgt[k][req_N, t_N] for k in ("sid", "cat", "price", "shop", "item")}
        ctx, ctx_mask = self.encode_user(batch)
        h = self.decode(pick["sid"], ctx, ctx_mask, req_N)  # [N, S+1, D]
        logits = [head(h[:, i]) for i, head in enumerate(self.heads)]
        user = F.normalize(self.user_proj(h[:, -1]), dim=-1)
        return OneMallOutput(logits, pick["sid"], user, self.encode_items(pick), pick["item"], req_N)

    # --- objective (Eq. 7) ---------------------------------------------------------------------
    def loss(self, out: OneMallOutput) -> dict[str, torch.Tensor]:
        """``ntp`` (mean CE over SID levels) + lambda * ``contrastive`` (user -> item, in-batch)."""
        ntp = torch.stack([F.cross_entropy(lg.float(), out.targets_NS[:, i]) for i, lg in enumerate(out.logits)]).mean()
        sim_NN = (out.user_NE @ out.item_NE.T).float() / self.cfg.temperature
        same_item = out.item_N[:, None] == out.item_N[None, :]
        sim_NN = sim_NN.masked_fill(same_item & ~torch.eye(len(sim_NN), dtype=torch.bool, device=sim_NN.device),
                                    float("-inf"))  # the same item under another request is no negative
        labels = torch.arange(len(sim_NN), device=sim_NN.device)
        con = F.cross_entropy(sim_NN, labels)
        return {"loss": ntp + self.cfg.contrastive_weight * con, "ntp": ntp, "contrastive": con,
                "contrastive_acc": (sim_NN.argmax(-1) == labels).float().mean()}

    # --- retrieval ---------------------------------------------------------------------------
    def beam_model(self, batch: dict) -> OneMallDecoding:
        """A step model for :func:`onemall_pl.retrieval.beam.beam_search` over this batch's requests."""
        return OneMallDecoding(self, batch)


class OneMallDecoding:
    """Incremental decoding for beam search (the ``StepModel`` protocol of ``retrieval.beam``).

    The user context and every block's cross-attention K/V are computed once per request;
    the K beams of a request attend to them as one group of queries (no copy per beam). The
    self-attention K/V of earlier SID positions are cached and reordered with the beams.
    """

    def __init__(self, model: OneMall, batch: dict):
        self.m = model
        ctx, self.ctx_mask = model.encode_user(batch)
        self.kv = [blk.context_kv(ctx) for blk in model.blocks]
        self.B = ctx.shape[0]
        self.past: list = [None] * len(model.blocks)

    def _run(self, x_N1D: torch.Tensor, level: int) -> torch.Tensor:
        for i, blk in enumerate(self.m.blocks):
            x_N1D, self.past[i] = blk.step(x_N1D, self.kv[i], self.ctx_mask, self.past[i])
        return self.m.heads[level](self.m.norm(x_N1D[:, 0])).float().log_softmax(-1)

    def start(self) -> torch.Tensor:
        """Log-probs ``[B, V_1]`` of the first level."""
        x = (self.m.bos + self.m.tok_pos.weight[0]).expand(self.B, 1, -1)
        return self._run(x, 0)

    def step(self, parent_BK: torch.Tensor, token_BK: torch.Tensor, level: int) -> torch.Tensor:
        """Beams continue from ``parent_BK`` (index among the previous beams of the request) with
        ``token_BK`` (a code of ``level``); returns log-probs ``[B, K, V_{level+1}]``."""
        B, K = token_BK.shape
        k_prev = self.past[0][0].shape[0] // B
        flat = (parent_BK + torch.arange(B, device=parent_BK.device)[:, None] * k_prev).flatten()
        self.past = [(k.index_select(0, flat), v.index_select(0, flat)) for k, v in self.past]
        x = self.m.sid_tok[level](token_BK.flatten())[:, None] + self.m.tok_pos.weight[level + 1]
        return self._run(x, level + 1).view(B, K, -1)


# ---------------------------------------------------------------------------------------------
# sizes: parameter counts (Table 1) and FLOPs per sample (Table 6)


def count_params(model: nn.Module) -> dict[str, int]:
    """``total`` = every parameter (embedding tables, heads, Query-Formers included; tied weights
    once); ``active`` = parameters one token uses: total minus the ``E - k`` routed experts it
    skips in each MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.cfg.n_experts
            skipped += (m.cfg.n_experts - m.cfg.top_k) * per_expert
    return {"total": total, "active": total - skipped}


def example_batch(cfg: OneMallConfig, batch_size: int = 2, seq_len: int | None = None, n_targets: int = 1,
                  device="cpu", generator: torch.Generator | None = None) -> dict:
    """A random batch of the contract above (full-length sequences), for tests and FLOP counts."""
    L = seq_len or cfg.max_seq_len
    g = generator

    def feats(*lead):
        sid = torch.stack([torch.randint(c, lead, generator=g) for c in cfg.codebook_sizes], dim=-1)
        return {"sid": sid, "cat": torch.randint(cfg.n_categories, (*lead, N_CATEGORY_LEVELS), generator=g),
                "price": torch.randint(cfg.n_price_bands, lead, generator=g),
                "shop": torch.randint(cfg.n_shops, lead, generator=g)}

    batch = {"scenario": torch.randint(cfg.n_scenarios, (batch_size,), generator=g)}
    for b in BEHAVIOURS:
        batch[b] = feats(batch_size, L) | {"mask": torch.ones(batch_size, L, dtype=torch.bool)}
    batch["target"] = feats(batch_size, n_targets) | {
        "item": torch.arange(batch_size * n_targets).view(batch_size, n_targets),
        "mask": torch.ones(batch_size, n_targets, dtype=torch.bool)}
    return _to(batch, device)


def _to(x, device):
    return {k: _to(v, device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def flops_per_sample(cfg: OneMallConfig, batch_size: int = 2, device="cpu") -> dict[str, float]:
    """Forward FLOPs per request (one target, full-length sequences), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass: ``train`` = the training
    forward (user encoder, decoder over S+1 tokens, item tower); ``user_context`` = Eq. 3 plus the
    cross-attention K/V projections, the part a Query-Former shrinks."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = OneMall(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
        for b in model.buffers():
            b.zero_()
    model.eval()
    batch = example_batch(cfg, batch_size, device=device, generator=torch.Generator().manual_seed(0))
    out = {}  # (FlopCounterMode's module tracker needs autograd on, so no torch.no_grad here)
    with FlopCounterMode(display=False) as fc:
        model(batch)
    out["train"] = fc.get_total_flops() / batch_size
    with FlopCounterMode(display=False) as fc:
        ctx, _ = model.encode_user(batch)
        for blk in model.blocks:
            blk.context_kv(ctx)
    out["user_context"] = fc.get_total_flops() / batch_size
    out["context_len"] = cfg.context_len
    return out


if __name__ == "__main__":  # python -m onemall_pl.models.decoder: parameter counts of every preset
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            n = count_params(OneMall(cfg))
        print(f"{name:<12} total {n['total'] / 1e6:9.2f}M   active {n['active'] / 1e6:9.2f}M")
