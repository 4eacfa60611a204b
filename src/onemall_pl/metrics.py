"""Retrieval metrics shared by every model that returns a top-K list (OneMall, SASRec, TIGER).

All functions take the retrieved lists ``topk_BK`` (item ids, best first; ``-1`` pads a list
shorter than K, e.g. a beam that found fewer valid items) and the held-out positives
``targets_BT`` (item ids, ``-1`` pads requests with fewer than T targets), and return one
value per request, so a caller averages them globally or per scenario.

- HR@K (paper Sec. 4, "simulation hit rate"): the share of a request's held-out positive
  items found in its top-K, averaged over requests. With one target per request
  (leave-one-out) it is the literature's HR@K = Recall@K, so :func:`recall_at_k` is the
  same function.
- NDCG@K (literature): DCG of the hits (gain 1, discount ``1/log2(rank + 2)``) over the
  ideal DCG of ``min(T, K)`` hits.

Legend: B requests, K retrieved per request, T targets per request, N items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import Metric

from onemall_pl.data.schema import SCENARIOS

PAD = -1


def target_ranks(topk_BK: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """0-based position of each target in its request's top-K list; K where absent (and for pads)."""
    K = topk_BK.shape[1]
    match_BTK = (targets_BT[:, :, None] == topk_BK[:, None, :]) & (targets_BT[:, :, None] != PAD)
    pos_K = torch.arange(K, device=topk_BK.device)
    return torch.where(match_BTK, pos_K, K).amin(dim=-1) if K else torch.zeros_like(targets_BT)


def hr_at_k(topk_BK: torch.Tensor, targets_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Per request: the share of its targets found in the first ``k`` retrieved items."""
    valid_BT = targets_BT != PAD
    n_B = valid_BT.sum(1)
    if (n_B == 0).any():
        raise ValueError("a request has no target: every evaluated request needs a held-out positive")
    hits_B = ((target_ranks(topk_BK[:, :k], targets_BT) < k) & valid_BT).sum(1)
    return hits_B.float() / n_B.float()


recall_at_k = hr_at_k


def ndcg_at_k(topk_BK: torch.Tensor, targets_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Per request: NDCG@k with binary relevance of the targets."""
    valid_BT = targets_BT != PAD
    rank_BT = target_ranks(topk_BK[:, :k], targets_BT)
    gain_BT = torch.where((rank_BT < k) & valid_BT, 1.0 / torch.log2(rank_BT.float() + 2.0), 0.0)
    discounts = torch.tensor([1.0 / math.log2(i + 2.0) for i in range(max(k, 1))], device=topk_BK.device)
    ideal_B = torch.cumsum(discounts, 0)[(valid_BT.sum(1).clamp(min=1, max=k) - 1)]
    return gain_BT.sum(1) / ideal_B


def topk_excluding(scores_BN: torch.Tensor, k: int, exclude_BH: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` best columns of ``scores_BN`` (full ranking), skipping ``exclude_BH``.

    ``exclude_BH`` holds column indices to drop per row (e.g. the user's history), ``-1`` pads.
    """
    if exclude_BH is not None and exclude_BH.numel():
        scores_BN = scores_BN.clone()
        rows_BH = torch.arange(scores_BN.shape[0], device=scores_BN.device)[:, None].expand_as(exclude_BH)
        keep = exclude_BH >= 0
        scores_BN[rows_BH[keep], exclude_BH[keep]] = float("-inf")
    return scores_BN.topk(min(k, scores_BN.shape[1]), dim=1).indices


def pad_lists(lists, width: int | None = None, value: int = PAD) -> torch.Tensor:
    """A list of int lists as a ``(len, width)`` int64 tensor padded with ``value`` (right)."""
    width = max((len(x) for x in lists), default=0) if width is None else width
    out = torch.full((len(lists), width), value, dtype=torch.long)
    for i, x in enumerate(lists):
        x = list(x)[:width]
        if x:
            out[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out


class RetrievalMetrics(Metric):
    """HR@K and NDCG@K averaged over requests, overall and per scenario (DDP-synced sums).

    ``update(topk_BK, targets_BT, scenario_B)`` with ``scenario_B`` the index of each request's
    scenario in ``scenarios``; ``compute()`` -> ``{"overall": {"HR@50": ...}, "<scenario>": {...}}``
    (a scenario without requests is left out) plus ``"requests"`` counts.
    """

    full_state_update = False

    def __init__(self, scenarios: Sequence[str] = SCENARIOS, hr_k: Sequence[int] = (50, 100, 500),
                 ndcg_k: Sequence[int] = (), **kw):
        super().__init__(**kw)
        self.scenarios, self.hr_k, self.ndcg_k = tuple(scenarios), tuple(hr_k), tuple(ndcg_k)
        S = len(self.scenarios)
        self.add_state("hr", torch.zeros(S, len(self.hr_k), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg", torch.zeros(S, len(self.ndcg_k), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros(S, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, topk_BK: torch.Tensor, targets_BT: torch.Tensor, scenario_B: torch.Tensor) -> None:
        s_B = scenario_B.long()
        for j, k in enumerate(self.hr_k):
            self.hr[:, j].index_add_(0, s_B, hr_at_k(topk_BK, targets_BT, k).double())
        for j, k in enumerate(self.ndcg_k):
            self.ndcg[:, j].index_add_(0, s_B, ndcg_at_k(topk_BK, targets_BT, k).double())
        self.n.index_add_(0, s_B, torch.ones_like(s_B, dtype=torch.float64))

    def _row(self, hr: torch.Tensor, ndcg: torch.Tensor, n: torch.Tensor) -> dict[str, float]:
        out = {f"HR@{k}": float(hr[j] / n) for j, k in enumerate(self.hr_k)}
        out.update({f"NDCG@{k}": float(ndcg[j] / n) for j, k in enumerate(self.ndcg_k)})
        return out

    def compute(self) -> dict:
        if self.n.sum() == 0:
            raise ValueError("RetrievalMetrics.compute() before any request was added")
        out = {"overall": self._row(self.hr.sum(0), self.ndcg.sum(0), self.n.sum())}
        for i, s in enumerate(self.scenarios):
            if self.n[i] > 0:
                out[s] = self._row(self.hr[i], self.ndcg[i], self.n[i])
        out["requests"] = {"overall": int(self.n.sum()), **{s: int(self.n[i]) for i, s in enumerate(self.scenarios)
                                                             if self.n[i] > 0}}
        return out


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """``{"overall": {"HR@50": x}}`` -> ``{"<prefix>HR@50": x, "<prefix>product_card/HR@50": ...}``."""
    out = {}
    for scope, row in result.items():
        if scope == "requests":
            continue
        for name, v in row.items():
            out[f"{prefix}{name}" if scope == "overall" else f"{prefix}{scope}/{name}"] = v
    return out


def pack_left(ids_BK: torch.Tensor, keep_BK: torch.Tensor) -> torch.Tensor:
    """Keep ``ids_BK[keep_BK]`` in order, moved to the left of each row; the rest becomes -1."""
    order_BK = torch.argsort((~keep_BK).to(torch.int8), dim=1, stable=True)
    return torch.where(keep_BK.gather(1, order_BK), ids_BK.gather(1, order_BK), PAD)


def replay(retriever, dataset: str | Path, split: str = "test", *, hr_k: Sequence[int] = (50, 100, 500),
           ndcg_k: Sequence[int] = (), exclude_history: bool = False, history_column: str = "seq_click",
           batch_size: int = 256, limit: int | None = None) -> dict:
    """Replay the held-out requests of ``split`` through a retriever: HR@K and NDCG@K, overall
    and per scenario (:class:`RetrievalMetrics`).

    ``retriever.retrieve(rows, k)`` takes Arrow rows of ``samples`` and returns ``(B, k)`` raw
    item ids, best first (-1 pads): every model (OneMall, SASRec, TIGER) is scored on the same
    requests by the same code. ``exclude_history``: the items of each request's
    ``history_column`` (all of them) are dropped from its list before scoring (the retriever is
    asked for as many more), the literature's full-ranking protocol. ``limit``: the first
    requests only.
    """
    from onemall_pl.data.datasets import ParquetMapDataset, collate_sequences

    k = max([*hr_k, *ndcg_k])
    ds = ParquetMapDataset(dataset, "samples", filter={"split": split})
    if len(ds) == 0:
        raise ValueError(f"{dataset}: no {split!r} samples to evaluate")
    t = ds.table if limit is None else ds.table.slice(0, limit)
    metrics = RetrievalMetrics(SCENARIOS, hr_k=hr_k, ndcg_k=ndcg_k)
    for start in range(0, t.num_rows, batch_size):
        rows = t.slice(start, batch_size)
        b = collate_sequences(rows, {}, set_columns={"targets": None, history_column: None},
                              scalar_columns=["scenario"], pad_value=PAD)
        if exclude_history:
            hist_BH = b[history_column]
            top_BK = retriever.retrieve(rows, k + hist_BH.shape[1])
            drop_BK = (top_BK[:, :, None] == hist_BH[:, None, :]).any(-1) | (top_BK == PAD)
            top_BK = pack_left(top_BK, ~drop_BK)[:, :k]
        else:
            top_BK = retriever.retrieve(rows, k)
        metrics.update(top_BK, b["targets"], b["scenario"])
    return metrics.compute()
