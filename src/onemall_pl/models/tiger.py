"""TIGER (Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023).

Two networks, both plain ``nn.Module``s:

1. :class:`RQVAE`, the item tokenizer (TIGER Sec. 3.1). An MLP encoder maps an item's
   content embedding x to a latent z; a residual quantizer picks one codeword per level,
       r_0 = z,   c_l = argmin_k ||r_l - e^l_k||,   r_{l+1} = r_l - e^l_{c_l},   z_q = sum_l e^l_{c_l}
   and an MLP decoder reconstructs x from z_q. Loss (TIGER Eq. 1-2):
       L = ||x - x_hat||^2 + sum_l ||sg[r_l] - e^l_{c_l}||^2 + beta ||r_l - sg[e^l_{c_l}]||^2
   with the straight-through estimator z + sg[z_q - z] feeding the decoder. Codebooks are
   initialised by k-means on the first training batch's latents (TIGER Sec. 4.1, "k-means
   clustering-based initialization"). The collision suffix (the 4th code that makes two
   items' SIDs differ) is assigned after training, in ``onemall_pl.baselines.rqvae``.

2. :class:`TigerT5`, the sequence model (TIGER Sec. 3.2): a T5 encoder-decoder built from a
   ``transformers.T5Config`` (no pretrained weights). The encoder reads the user's history as
   SID tokens (each level has its own token range) after an optional hashed user-id token;
   the decoder generates the next item's SID, one token per level.

Token layout of the shared vocabulary: 0 pad (also the decoder start), 1 eos, then per
level l the ``codebook_sizes[l]`` tokens starting at ``level_offsets[l]``; then the hashed
user tokens. Legend: B batch, L encoder length, S SID levels, N items, D width.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- RQ-VAE


@dataclass
class RQVAEConfig:
    in_dim: int = 0
    """Width of the item content embeddings. Derived from the data."""
    hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    """Encoder MLP widths (the decoder mirrors them); TIGER: 512, 256, 128."""
    latent_dim: int = 32
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    """Codewords per residual level; TIGER: three levels of 256."""
    beta: float = 0.25
    """Commitment weight (TIGER: 0.25)."""


def sq_dist(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """||a - b||^2 summed over the features, averaged over the rows (TIGER Eq. 1-2). Summing keeps the
    reconstruction term on the scale of the latent terms whatever the input width: a per-element
    mean divides it by the width (384 for MiniLM) and lets the codebook terms collapse the codes."""
    return (a_ND - b_ND).pow(2).sum(-1).mean()


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ResidualQuantizer(nn.Module):
    """One codebook per level over the residual of the previous levels."""

    def __init__(self, dim: int, codebook_sizes: list[int]):
        super().__init__()
        self.codebooks = nn.ParameterList([nn.Parameter(torch.randn(k, dim) * dim ** -0.5) for k in codebook_sizes])
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def kmeans_init(self, z_ND: torch.Tensor, seed: int = 0) -> None:
        """Residual k-means (faiss) on ``z_ND``: level l's codebook = centroids of the residuals."""
        from onemall_pl.quant.reskmeans import ResKMeans

        sizes = [cb.shape[0] for cb in self.codebooks]
        km = ResKMeans(sizes, seed=seed).fit(z_ND.detach().float().cpu().numpy())
        for cb, c in zip(self.codebooks, km.centroids):
            cb.copy_(torch.from_numpy(c).to(cb))
        self.initialised.fill_(True)

    def forward(self, z_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_q_ND, codes_NS, codebook_loss, commit_loss)``, the losses summed over levels.

        The codebook term ||sg[r_l] - e_l||^2 moves codewords to the residuals; the commitment
        term ||r_l - sg[e_l]||^2 moves the encoder's residuals to their codewords.
        """
        r_ND, zq_ND = z_ND, torch.zeros_like(z_ND)
        codes, codebook, commit = [], z_ND.new_zeros(()), z_ND.new_zeros(())
        for cb_KD in self.codebooks:
            c_N = torch.cdist(r_ND.detach(), cb_KD.detach()).argmin(dim=1)
            e_ND = cb_KD[c_N]
            codebook = codebook + sq_dist(e_ND, r_ND.detach())
            commit = commit + sq_dist(r_ND, e_ND.detach())
            codes.append(c_N)
            zq_ND = zq_ND + e_ND
            r_ND = r_ND - e_ND.detach()
        return zq_ND, torch.stack(codes, 1), codebook, commit


class RQVAE(nn.Module):
    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        if cfg.in_dim <= 0:
            raise ValueError(f"RQVAEConfig.in_dim must be positive, got {cfg.in_dim}")
        self.cfg = cfg
        self.encoder = _mlp([cfg.in_dim, *cfg.hidden, cfg.latent_dim])
        self.quantizer = ResidualQuantizer(cfg.latent_dim, list(cfg.codebook_sizes))
        self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), cfg.in_dim])

    def forward(self, x_ND: torch.Tensor) -> dict[str, torch.Tensor]:
        z_ND = self.encoder(x_ND)
        zq_ND, codes_NS, codebook_loss, commit = self.quantizer(z_ND)
        x_hat_ND = self.decoder(z_ND + (zq_ND - z_ND).detach())  # straight-through
        recon = sq_dist(x_hat_ND, x_ND)
        return {"loss": recon + codebook_loss + self.cfg.beta * commit, "recon": recon,
                "codebook": codebook_loss, "commit": commit, "codes": codes_NS, "x_hat": x_hat_ND}

    @torch.no_grad()
    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, S)`` of the quantizer's levels (no collision suffix)."""
        return self.quantizer(self.encoder(x_ND))[1]


# ----------------------------------------------------------------------------- T5 sequence model


@dataclass
class TigerConfig:
    codebook_sizes: list[int] = field(default_factory=list)
    """Codes per SID level, collision suffix included. Derived from the RQ-VAE artifact."""
    n_user_tokens: int = 2000
    """Hashed user-id tokens prepended to the history (TIGER: 2000); 0 = none."""
    max_items: int = 20
    """History items read by the encoder (the latest ones; TIGER: 20)."""
    d_model: int = 128
    d_ff: int = 1024
    n_heads: int = 6
    d_kv: int = 64
    n_layers: int = 4
    """Encoder layers, and as many decoder layers (TIGER: 4 each)."""
    dropout: float = 0.1


PAD_TOKEN, EOS_TOKEN, N_SPECIAL = 0, 1, 2


class TigerT5(nn.Module):
    """History SIDs -> next item's SID, with a T5 encoder-decoder built from ``T5Config``."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        if not cfg.codebook_sizes or any(k < 1 for k in cfg.codebook_sizes):
            raise ValueError(f"TigerConfig.codebook_sizes must list positive sizes, got {cfg.codebook_sizes}")
        self.cfg = cfg
        offsets = np.concatenate([[0], np.cumsum(cfg.codebook_sizes)[:-1]]) + N_SPECIAL
        self.register_buffer("level_offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        self.user_offset = N_SPECIAL + int(sum(cfg.codebook_sizes))
        self.vocab_size = self.user_offset + cfg.n_user_tokens
        self.t5_config = T5Config(
            vocab_size=self.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
            num_layers=cfg.n_layers, num_decoder_layers=cfg.n_layers, num_heads=cfg.n_heads,
            dropout_rate=cfg.dropout, feed_forward_proj="relu", tie_word_embeddings=False,
            pad_token_id=PAD_TOKEN, eos_token_id=EOS_TOKEN, decoder_start_token_id=PAD_TOKEN)
        self.t5 = T5ForConditionalGeneration(self.t5_config)

    @property
    def n_levels(self) -> int:
        return len(self.cfg.codebook_sizes)

    def sid_tokens(self, sids_BS: torch.Tensor) -> torch.Tensor:
        """Codes (per level, from 0) -> vocabulary tokens; a code < 0 (padding) -> PAD."""
        tok = sids_BS + self.level_offsets[: sids_BS.shape[-1]]
        return torch.where(sids_BS < 0, PAD_TOKEN, tok)

    def encoder_inputs(self, hist_sids_BHS: torch.Tensor, user_B: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids_BL, attention_mask_BL)``: [user token] + the history's SID tokens, flattened.

        ``hist_sids_BHS`` holds each history item's codes (``-1`` for padding items; padding may
        sit anywhere, it is masked out).
        """
        B, H, S = hist_sids_BHS.shape
        if S != self.n_levels:
            raise ValueError(f"history SIDs have {S} levels, the model was built for {self.n_levels}")
        ids_BL = self.sid_tokens(hist_sids_BHS).reshape(B, H * S)
        if self.cfg.n_user_tokens and user_B is not None:
            user_tok_B1 = (self.user_offset + user_B % self.cfg.n_user_tokens)[:, None]
            ids_BL = torch.cat([user_tok_B1, ids_BL], 1)
        # move the padding to the left, keeping the order of the tokens: T5's relative positions
        # then see the user token right before the history
        order_BL = torch.argsort((ids_BL != PAD_TOKEN).to(torch.int8), dim=1, stable=True)
        ids_BL = ids_BL.gather(1, order_BL)
        return ids_BL, ids_BL != PAD_TOKEN

    def forward(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor,
                target_sids_BS: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over the target's SID tokens (teacher forcing)."""
        labels_BS = self.sid_tokens(target_sids_BS)
        return self.t5(input_ids=input_ids_BL, attention_mask=attention_mask_BL, labels=labels_BS).loss

    def encode(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
        """Encoder states ``(B, L, D)``, computed once per request before decoding."""
        return self.t5.get_encoder()(input_ids=input_ids_BL, attention_mask=attention_mask_BL).last_hidden_state

    def decode(self, decoder_ids_BT: torch.Tensor, enc_BLD: torch.Tensor, attention_mask_BL: torch.Tensor,
               past_key_values=None):
        """One decoder call: ``(logits of the last position (B, V), new KV cache)``.

        With ``past_key_values`` only the newest decoder token is fed.
        """
        if past_key_values is not None:
            decoder_ids_BT = decoder_ids_BT[:, -1:]
        out = self.t5(encoder_outputs=(enc_BLD,), attention_mask=attention_mask_BL,
                      decoder_input_ids=decoder_ids_BT, past_key_values=past_key_values, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def level_logits(self, logits_BV: torch.Tensor, level: int) -> torch.Tensor:
        """The slice of the vocabulary holding level ``level``'s codes: ``(B, codebook_sizes[level])``."""
        start = int(self.level_offsets[level])
        return logits_BV[:, start:start + self.cfg.codebook_sizes[level]]

    def beam_model(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> T5StepModel:
        """The step model that ``onemall_pl.retrieval.beam_search`` drives (see :class:`T5StepModel`)."""
        return T5StepModel(self, input_ids_BL, attention_mask_BL)


class T5StepModel:
    """TigerT5 as a ``retrieval.beam.StepModel``: the encoder runs once per request; each step
    feeds only the newest decoder token of every beam, with the decoder's KV cache (self- and
    cross-attention) reordered to follow the surviving beams."""

    def __init__(self, model: TigerT5, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor):
        self.model, self.mask_BL = model, attention_mask_BL
        self.enc_BLD = model.encode(input_ids_BL, attention_mask_BL)
        self.rows = torch.arange(len(input_ids_BL), device=input_ids_BL.device)  # request of each beam row
        self.cache = None

    def _logp(self, logits_NV: torch.Tensor, level: int) -> torch.Tensor:
        # full-vocabulary softmax (as Hugging Face scores beams), then the level's codes
        return self.model.level_logits(logits_NV.float().log_softmax(-1), level)

    def start(self) -> torch.Tensor:
        B = len(self.rows)
        start_B1 = torch.full((B, 1), PAD_TOKEN, dtype=torch.long, device=self.rows.device)
        logits, self.cache = self.model.decode(start_B1, self.enc_BLD, self.mask_BL)
        return self._logp(logits, 0)

    def step(self, parent_BK: torch.Tensor, token_BK: torch.Tensor, level: int) -> torch.Tensor:
        B, K = token_BK.shape
        k_prev = len(self.rows) // B
        flat = (parent_BK + torch.arange(B, device=parent_BK.device)[:, None] * k_prev).flatten()
        self.cache.reorder_cache(flat)
        self.rows = self.rows[flat]
        tok_N1 = token_BK.reshape(-1, 1) + self.model.level_offsets[level]
        logits, self.cache = self.model.decode(tok_N1, self.enc_BLD[self.rows], self.mask_BL[self.rows], self.cache)
        return self._logp(logits, level + 1).view(B, K, -1)
