"""Residual k-means (paper §2.2, after QARM): the first levels of a semantic ID.

Training (paper Eq. 1): level ``l`` runs k-means on the residuals left by levels ``< l``,
    r^0 = m,   C^l = KMeans(r^l),   r^{l+1} = r^l - NearestRep(C^l, r^l)
Inference (paper Eq. 2): with the codebooks frozen,
    c^l = NearestCode(C^l, r^l),      SID = (c^0, c^1, ...)

:class:`ResKMeans` fits the codebooks with ``faiss.Kmeans`` (seeded; on the GPU when faiss
sees one) and encodes with a flat L2 index. The frozen codebooks then live as buffers of
:class:`~onemall_pl.quant.fsq.SIDTokenizer` for torch-side encoding.

Shapes: N items, D embedding dim, L levels, K codebook size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np


def check_embeddings(x: np.ndarray, *, dim: int | None = None, ids: np.ndarray | None = None,
                     what: str = "embeddings") -> np.ndarray:
    """``x`` as a C-contiguous float32 [N, D] array; a ValueError naming the bad row / item otherwise."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [num_items, dim], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what}: dimension {x.shape[1]} does not match the codebooks' dimension {dim} "
                         "(embeddings from another tokenizer run or another item type?)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        who = f"item_id {int(ids[row])} (row {row})" if ids is not None else f"row {row}"
        raise ValueError(f"{what}: {who} has a NaN or infinite value ({int(bad.sum())} such rows in all)")
    return x


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


class ResKMeans:
    """Residual k-means codebooks, one per level, fitted with faiss.

    Args:
        codebook_sizes: K per level, e.g. ``[64, 64]`` (paper: ``[4096, 4096]`` before the FSQ level).
        niter: Lloyd iterations per level.
        seed: k-means seed (the same seed and points give the same codebooks on the CPU).
        gpu: run k-means on the GPU; ``None`` = when faiss sees one.
        max_points_per_centroid: faiss subsamples to ``K * this`` points per level (0: use all).
    """

    def __init__(self, codebook_sizes: Sequence[int], *, niter: int = 20, seed: int = 0, gpu: bool | None = None,
                 max_points_per_centroid: int = 256):
        if not codebook_sizes or any(int(k) < 2 for k in codebook_sizes):
            raise ValueError(f"codebook_sizes must be a non-empty list of sizes >= 2, got {list(codebook_sizes)}")
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.niter, self.seed = niter, seed
        self.gpu = faiss_gpu_available() if gpu is None else gpu
        self.max_points_per_centroid = max_points_per_centroid
        self.centroids: list[np.ndarray] = []  # L x [K_l, D]

    @property
    def dim(self) -> int:
        assert self.centroids, "fit() first"
        return self.centroids[0].shape[1]

    def fit(self, x: np.ndarray, ids: np.ndarray | None = None) -> ResKMeans:
        x = check_embeddings(x, ids=ids)
        n, d = x.shape
        if n < max(self.codebook_sizes):
            raise ValueError(f"k-means needs at least as many points as centroids: {n} items for codebook "
                             f"sizes {self.codebook_sizes}; lower the sizes in the config")
        r = x.copy()
        self.centroids = []
        for level, k in enumerate(self.codebook_sizes):
            km = faiss.Kmeans(d, k, niter=self.niter, seed=self.seed + level, gpu=self.gpu, verbose=False,
                              max_points_per_centroid=self.max_points_per_centroid or n, min_points_per_centroid=1)
            km.train(r)  # Eq. 1: k-means on the current residuals
            c = np.ascontiguousarray(km.centroids, dtype=np.float32)
            self.centroids.append(c)
            r -= c[self._nearest(c, r)]  # r^{l+1} = r^l - NearestRep(C^l, r^l)
        return self

    @staticmethod
    def _nearest(c_KD: np.ndarray, r_ND: np.ndarray) -> np.ndarray:
        index = faiss.IndexFlatL2(c_KD.shape[1])
        index.add(c_KD)
        _, i = index.search(r_ND, 1)
        return i[:, 0]

    def encode(self, x: np.ndarray, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Eq. 2: codes [N, L] int32 and the residual left after the last level [N, D]."""
        assert self.centroids, "fit() or load() first"
        r = check_embeddings(x, dim=self.dim, ids=ids).copy()
        codes = np.empty((len(r), len(self.centroids)), dtype=np.int32)
        for level, c in enumerate(self.centroids):
            codes[:, level] = self._nearest(c, r)
            r -= c[codes[:, level]]
        return codes, r

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the chosen centroids: the reconstruction of the embedding."""
        return sum(c[codes[:, level]] for level, c in enumerate(self.centroids))

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, **{f"level{i}": c for i, c in enumerate(self.centroids)})

    @classmethod
    def load(cls, path: str | os.PathLike, **kw) -> ResKMeans:
        with np.load(Path(path)) as z:
            cents = [z[f"level{i}"] for i in range(len(z.files))]
        q = cls([len(c) for c in cents], **kw)
        q.centroids = cents
        return q
