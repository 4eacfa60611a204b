"""The last SID level by FSQ (paper §3.1.3, §4.5): an MLP that maps the k-means residual to bits.

Paper: "For the last layer FSQ, we train a binary 16-bit MLP to quantify the Residual
embedding as a 4096 code". A binary code of b bits has 2^b values, so 16 bits and 4096 codes
do not agree; we make ``bits`` the setting and default to 12 (= 4096 codes, the paper's
codebook size; ``configs/quantize/paper.yaml``). FSQ (Mentzer et al., 2023) with 2 levels per
dimension is exactly this: the code points are the fixed corners of a hypercube, so, unlike
k-means, no centre can collapse onto another (paper §4.5).

    z_NB   = Enc(standardise(r_ND))                  encoder MLP, B = bits logits
    p_NB   = sigmoid(z_NB)                           soft bits
    b_NB   = 1[z > 0] + p - sg(p)                    straight-through binarisation to {0,1}^B
    code_N = sum_i b_i 2^i                           the last SID level, in [0, 2^B)
    r'_ND  = Dec(2 b - 1)                            decoder MLP reconstructs the residual
    loss   = MSE(r', standardise(r))
           + w_bal * mean_i (4 (mean_N p_i - 1/2)^2)  each bit on for half the items
           + w_dec * mean_{i != j} corr(p_i, p_j)^2   bits independent
The last two terms push the 2^B codes towards a uniform distribution (a balanced,
decorrelated bit vector is the product of fair coins), which is what lowers collisions; set
both weights to 0 for the plain reconstruction objective.

:class:`SIDTokenizer` is the whole frozen quantizer of one input space: Res-Kmeans codebooks
(buffers) followed by the FSQ level, or k-means only (the pure Res-Kmeans variant).

Legend: N items, D input dim, B bits, K codebook size, L levels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FSQConfig:
    dim: int  # residual dimension (= the input embedding's)
    bits: int = 12  # last-level codebook size 2**bits
    hidden: int = 256
    layers: int = 2  # hidden layers in each of the encoder and decoder MLPs
    balance_weight: float = 0.1
    decorrelation_weight: float = 0.1

    def __post_init__(self):
        if not 1 <= self.bits <= 30:
            raise ValueError(f"fsq bits must be in [1, 30], got {self.bits}")


def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    dims = [d_in] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        mods += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU()]
    mods.append(nn.Linear(dims[-1], d_out))
    return nn.Sequential(*mods)


class BinaryFSQ(nn.Module):
    def __init__(self, cfg: FSQConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mu_D", torch.zeros(cfg.dim))  # input standardisation, set from data
        self.register_buffer("sigma_D", torch.ones(cfg.dim))
        self.register_buffer("powers_B", 2 ** torch.arange(cfg.bits, dtype=torch.int64))
        self.encoder = _mlp(cfg.dim, cfg.hidden, cfg.bits, cfg.layers)
        self.decoder = _mlp(cfg.bits, cfg.hidden, cfg.dim, cfg.layers)

    @property
    def codebook_size(self) -> int:
        return 2 ** self.cfg.bits

    @torch.no_grad()
    def set_stats(self, r_ND: torch.Tensor) -> None:
        """Standardise inputs by the training residuals' per-dimension mean and std."""
        self.mu_D.copy_(r_ND.mean(0))
        self.sigma_D.copy_(r_ND.std(0).clamp_min(1e-6))

    def forward(self, r_ND: torch.Tensor) -> dict[str, torch.Tensor]:
        x_ND = (r_ND - self.mu_D) / self.sigma_D
        z_NB = self.encoder(x_ND)
        p_NB = torch.sigmoid(z_NB)
        b_NB = (z_NB > 0).to(p_NB.dtype) + (p_NB - p_NB.detach())  # straight-through: value exact, grad of p
        recon_ND = self.decoder(2 * b_NB - 1)
        return {"target": x_ND, "recon": recon_ND, "p": p_NB, "bits": b_NB,
                "codes": ((z_NB > 0).long() * self.powers_B).sum(-1)}

    def loss(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mse = F.mse_loss(out["recon"], out["target"])
        p_NB = out["p"]
        balance = (4 * (p_NB.mean(0) - 0.5) ** 2).mean()
        if p_NB.shape[1] > 1 and p_NB.shape[0] > 1:
            c_NB = p_NB - p_NB.mean(0)
            cov_BB = c_NB.T @ c_NB / (p_NB.shape[0] - 1)
            std_B = cov_BB.diagonal().clamp_min(1e-8).sqrt()
            corr_BB = cov_BB / (std_B[:, None] * std_B[None, :])
            off = ~torch.eye(p_NB.shape[1], dtype=torch.bool, device=p_NB.device)
            decor = corr_BB[off].pow(2).mean()
        else:
            decor = p_NB.new_zeros(())
        total = mse + self.cfg.balance_weight * balance + self.cfg.decorrelation_weight * decor
        return {"loss": total, "mse": mse, "balance": balance, "decorrelation": decor}

    @torch.no_grad()
    def encode(self, r_ND: torch.Tensor) -> torch.Tensor:
        z_NB = self.encoder((r_ND - self.mu_D) / self.sigma_D)
        return ((z_NB > 0).long() * self.powers_B).sum(-1)


def nearest(c_KD: torch.Tensor, r_ND: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """Index of the nearest centroid (L2) for each row: paper Eq. 2's NearestCode."""
    c2_K = (c_KD * c_KD).sum(-1)
    out = []
    for s in range(0, len(r_ND), chunk):
        r = r_ND[s:s + chunk]
        out.append((c2_K[None, :] - 2 * r @ c_KD.T).argmin(-1))  # ||r||^2 is constant per row
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=r_ND.device)


class SIDTokenizer(nn.Module):
    """Frozen Res-Kmeans codebooks (levels 0..L-2) + a trainable FSQ last level, for one input space.

    With ``fsq=None`` all levels are k-means (the pure Res-Kmeans variant of Table 5).
    """

    def __init__(self, dim: int, kmeans_sizes: Sequence[int], fsq: FSQConfig | None = None):
        super().__init__()
        self.dim = dim
        self.kmeans_sizes = [int(k) for k in kmeans_sizes]
        for level, k in enumerate(self.kmeans_sizes):
            self.register_buffer(f"codebook{level}", torch.zeros(k, dim))
        if fsq is not None and fsq.dim != dim:
            raise ValueError(f"FSQ dim {fsq.dim} != tokenizer dim {dim}")
        self.fsq = BinaryFSQ(fsq) if fsq is not None else None

    @property
    def codebook_sizes(self) -> list[int]:
        return self.kmeans_sizes + ([self.fsq.codebook_size] if self.fsq is not None else [])

    def codebooks(self) -> list[torch.Tensor]:
        return [getattr(self, f"codebook{level}") for level in range(len(self.kmeans_sizes))]

    @torch.no_grad()
    def set_codebooks(self, centroids: Sequence[np.ndarray]) -> None:
        if [len(c) for c in centroids] != self.kmeans_sizes:
            raise ValueError(f"codebooks of sizes {[len(c) for c in centroids]}, expected {self.kmeans_sizes}")
        for buf, c in zip(self.codebooks(), centroids):
            buf.copy_(torch.as_tensor(c, dtype=buf.dtype))

    def residual(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1-2 with the frozen codebooks: k-means codes [N, Lk] and the residual [N, D]."""
        if x_ND.ndim != 2 or x_ND.shape[1] != self.dim:
            raise ValueError(f"expected inputs of shape [N, {self.dim}], got {tuple(x_ND.shape)}")
        r_ND = x_ND
        codes = []
        for c_KD in self.codebooks():
            i_N = nearest(c_KD, r_ND)
            codes.append(i_N)
            r_ND = r_ND - c_KD[i_N]
        codes_NL = torch.stack(codes, 1) if codes else x_ND.new_empty((len(x_ND), 0), dtype=torch.long)
        return codes_NL, r_ND

    @torch.no_grad()
    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The full SID [N, L] (int64)."""
        codes_NL, r_ND = self.residual(x_ND)
        if self.fsq is None:
            return codes_NL
        return torch.cat([codes_NL, self.fsq.encode(r_ND)[:, None]], 1)
