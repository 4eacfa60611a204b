"""The semantic-ID trie: which codes may follow a prefix, and which items a full SID names.

Built once from the quantize stage's ``sid_table`` (item -> SID). Stored as tensors so the
beam search asks it about all beams of all requests at once:

- level ``l`` has ``n_l`` nodes, the distinct SID prefixes of length ``l`` (level 0: the root),
  sorted, each with an integer key (mixed radix over the codebook sizes);
- ``ptr[l]`` (``n_l + 1``) delimits each node's children among the level ``l+1`` nodes (sorted
  prefixes keep a node's children contiguous); ``code[l+1]`` is each child's last code;
- leaves (level S) point into ``items`` (``item_ptr``): several items share a SID when the
  tokenizer collides, kept in the order of the ``sid_table`` (its reverse-map order).

Legend: N rows (beams), V codebook size of a level, S levels, B requests, K beams.
"""

from __future__ import annotations

import numpy as np
import torch


class SIDTrie:
    def __init__(self, sids: np.ndarray | torch.Tensor, item_ids: np.ndarray | torch.Tensor,
                 codebook_sizes: tuple[int, ...] | list[int]):
        sids = torch.tensor(np.asarray(sids), dtype=torch.long)
        items = torch.tensor(np.asarray(item_ids), dtype=torch.long)
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        S = len(self.codebook_sizes)
        if float(np.prod([float(c) for c in self.codebook_sizes])) >= 2.0 ** 62:
            raise ValueError(f"codebook_sizes {list(self.codebook_sizes)}: SID keys would overflow int64")
        if sids.ndim != 2 or sids.shape[1] != S:
            raise ValueError(f"SIDs must be [items, {S}] for codebook_sizes {list(self.codebook_sizes)}, "
                             f"got shape {list(sids.shape)}")
        if len(items) != len(sids) or len(sids) == 0:
            raise ValueError(f"need one SID per item and at least one item, got {len(sids)} SIDs, {len(items)} items")
        for lvl, c in enumerate(self.codebook_sizes):
            bad = (sids[:, lvl] < 0) | (sids[:, lvl] >= c)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(f"item {int(items[i])} has SID {sids[i].tolist()}: level {lvl + 1} code outside "
                                 f"codebook of size {c} (codebook_sizes {list(self.codebook_sizes)})")
        self.keys: list[torch.Tensor] = [torch.zeros(1, dtype=torch.long)]  # per level, sorted node keys
        self.ptr: list[torch.Tensor] = []  # per level l < S: [n_l + 1]
        self.code: list[torch.Tensor] = [torch.zeros(1, dtype=torch.long)]  # per level: last code of each node
        key = torch.zeros(len(sids), dtype=torch.long)
        for lvl, c in enumerate(self.codebook_sizes):
            parent_key = key
            key = key * c + sids[:, lvl]
            uniq, first = _unique_first(key)
            parent = torch.searchsorted(self.keys[-1], parent_key[first])
            self.ptr.append(torch.searchsorted(parent, torch.arange(len(self.keys[-1]) + 1)))
            self.keys.append(uniq)
            self.code.append(sids[first, lvl])
        leaf = torch.searchsorted(self.keys[-1], key)
        order = torch.argsort(leaf, stable=True)  # items of a leaf in sid_table order
        self.items = items[order]
        self.item_ptr = torch.searchsorted(leaf[order], torch.arange(len(self.keys[-1]) + 1))
        self.device = torch.device("cpu")

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_sid_table(cls, table, codebook_sizes, item_col: str = "item_id", sid_col: str = "sid") -> SIDTrie:
        """From an Arrow table with an item id column and a ``list<int>`` SID column."""
        import pyarrow as pa

        if isinstance(table, pa.Table):
            missing = [c for c in (item_col, sid_col) if c not in table.column_names]
            if missing:
                raise ValueError(f"sid_table lacks column(s) {missing} (has {table.column_names})")
            sid = table.column(sid_col).combine_chunks()
            lens = np.diff(sid.offsets.to_numpy())
            if (lens != len(codebook_sizes)).any():
                row = int(np.nonzero(lens != len(codebook_sizes))[0][0])
                raise ValueError(f"sid_table column {sid_col!r} row {row}: SID has {lens[row]} levels, "
                                 f"codebook_sizes has {len(codebook_sizes)}")
            sids = sid.flatten().to_numpy().reshape(-1, len(codebook_sizes))
            return cls(sids, table.column(item_col).to_numpy(), codebook_sizes)
        raise TypeError(f"expected a pyarrow.Table, got {type(table).__name__}")

    def to(self, device) -> SIDTrie:
        device = torch.device(device)
        for name in ("keys", "ptr", "code"):
            setattr(self, name, [t.to(device) for t in getattr(self, name)])
        self.items, self.item_ptr, self.device = self.items.to(device), self.item_ptr.to(device), device
        return self

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    def n_nodes(self, level: int) -> int:
        """Distinct prefixes of length ``level`` (1 at level 0)."""
        return len(self.keys[level])

    @property
    def n_items(self) -> int:
        return len(self.items)

    # --- the three questions the beam search asks ---------------------------------------------
    def mask(self, node_N: torch.Tensor, level: int) -> torch.Tensor:
        """Additive mask ``[N, V_{level+1}]``: 0 where a code extends the level-``level`` node, else -inf."""
        start, count = self.ptr[level][node_N], self.ptr[level][node_N + 1] - self.ptr[level][node_N]
        row = torch.repeat_interleave(torch.arange(len(node_N), device=node_N.device), count)
        offset = torch.cumsum(count, 0) - count  # first flat index of each row's run
        child = torch.repeat_interleave(start - offset, count) + torch.arange(len(row), device=node_N.device)
        out = torch.full((len(node_N), self.codebook_sizes[level]), float("-inf"), device=node_N.device)
        out[row, self.code[level + 1][child]] = 0.0
        return out

    def child(self, node_N: torch.Tensor, code_N: torch.Tensor, level: int) -> torch.Tensor:
        """The level-``level+1`` node reached from ``node_N`` by ``code_N`` (which must be valid)."""
        key = self.keys[level][node_N] * self.codebook_sizes[level] + code_N
        return torch.searchsorted(self.keys[level + 1], key)

    def sids(self, leaf_N: torch.Tensor) -> torch.Tensor:
        """The full SIDs ``[N, S]`` of leaves."""
        key, out = self.keys[-1][leaf_N], []
        for c in reversed(self.codebook_sizes):
            out.append(key % c)
            key = key // c
        return torch.stack(out[::-1], dim=-1)

    def leaf(self, sid_NS: torch.Tensor) -> torch.Tensor:
        """Leaf index of each SID, -1 where the SID names no item."""
        key = torch.zeros(sid_NS.shape[:-1], dtype=torch.long, device=sid_NS.device)
        for i, c in enumerate(self.codebook_sizes):
            key = key * c + sid_NS[..., i]
        pos = torch.searchsorted(self.keys[-1], key).clamp_max(len(self.keys[-1]) - 1)
        return torch.where(self.keys[-1][pos] == key, pos, -1)

    def items_of(self, leaf_BK: torch.Tensor, score_BK: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand ranked leaves to their items and keep the first ``k`` per request.

        Returns item ids ``[B, k]`` (-1 where a request has fewer items) and the score of the SID
        each item came from (-inf there).
        """
        B, K = leaf_BK.shape
        flat = leaf_BK.flatten()
        count = self.item_ptr[flat + 1] - self.item_ptr[flat]
        src = torch.repeat_interleave(torch.arange(B * K, device=flat.device), count)
        offset = torch.cumsum(count, 0) - count
        pos = torch.repeat_interleave(self.item_ptr[flat] - offset, count) + torch.arange(len(src), device=flat.device)
        req = src // K
        # rank of each item within its request: running count minus the request's first index
        per_req = count.view(B, K).sum(1)
        rank = torch.arange(len(src), device=flat.device) - torch.repeat_interleave(torch.cumsum(per_req, 0) - per_req, per_req)
        keep = rank < k
        items = torch.full((B, k), -1, dtype=torch.long, device=flat.device)
        scores = torch.full((B, k), float("-inf"), device=flat.device)
        items[req[keep], rank[keep]] = self.items[pos[keep]]
        scores[req[keep], rank[keep]] = score_BK.flatten()[src[keep]].float()
        return items, scores

    # --- for Hugging Face's prefix_allowed_tokens_fn (Python lists) ---------------------------
    def children_lists(self) -> dict[tuple[int, ...], list[int]]:
        """``{prefix tuple: [allowed next codes]}`` for every prefix (Python, built once)."""
        out = {}
        for lvl in range(self.levels):
            prefixes = self.sids_at(lvl).tolist()
            ptr, code = self.ptr[lvl].tolist(), self.code[lvl + 1].tolist()
            for i, p in enumerate(prefixes):
                out[tuple(p)] = code[ptr[i]:ptr[i + 1]]
        return out

    def sids_at(self, level: int) -> torch.Tensor:
        """The prefixes ``[n_level, level]`` of the level's nodes."""
        key, out = self.keys[level], []
        for c in reversed(self.codebook_sizes[:level]):
            out.append(key % c)
            key = key // c
        return torch.stack(out[::-1], dim=-1) if out else torch.zeros(1, 0, dtype=torch.long)


def _unique_first(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and, for each, the index of one row holding it."""
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    first = torch.full((len(uniq),), len(key), dtype=torch.long).scatter_reduce(
        0, inv, torch.arange(len(key)), reduce="amin")
    return uniq, first
