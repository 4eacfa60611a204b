"""How well a set of semantic IDs separates items (paper Table 5), and the SID -> items map.

- conflict rate: share of items whose full SID is shared with another item (of the same type).
- exclusive rate: share of distinct SIDs that map to exactly one item.
- per level: utilisation (share of the codebook used) and perplexity exp(H) of the code
  distribution (K for a uniform use of K codes; also reported divided by K).

SIDs live in one space per item type (products, videos and live-streams are quantized from
different inputs, see ``onemall_pl.quantize``), so a collision is counted between items of the
same type; the ``overall`` figures pool the types (the per-level ones pool the code counts,
which is what a model sharing one vocabulary per level sees).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def _group(codes_NL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group id per item (same full SID -> same id) and the size of each group."""
    codes_NL = np.ascontiguousarray(codes_NL, dtype=np.int64)
    if len(codes_NL) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(codes_NL, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def level_stats(codes_N: np.ndarray, k: int) -> dict:
    counts = np.bincount(np.asarray(codes_N, dtype=np.int64), minlength=k)
    p = counts[counts > 0] / max(counts.sum(), 1)
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0
    return {"codebook_size": int(k), "used": int((counts > 0).sum()), "utilisation": float((counts > 0).mean()),
            "perplexity": perplexity, "perplexity_ratio": perplexity / k}


def collision_stats(codes_NL: np.ndarray, codebook_sizes: Sequence[int]) -> dict:
    """Conflict / exclusive rates and per-level stats of one SID space."""
    codes_NL = np.asarray(codes_NL)
    assert codes_NL.ndim == 2 and codes_NL.shape[1] == len(codebook_sizes), (codes_NL.shape, codebook_sizes)
    return _stats(codes_NL, *_group(codes_NL), codebook_sizes)


def _stats(codes_NL: np.ndarray, inverse: np.ndarray, counts: np.ndarray, codebook_sizes: Sequence[int]) -> dict:
    """The stats of SIDs grouped as ``_group`` gives them (``inverse``: each item's group)."""
    n = len(codes_NL)
    return {
        "num_items": int(n),
        "num_sids": len(counts),
        "conflict_rate": float((counts[inverse] > 1).mean()) if n else 0.0,
        "exclusive_rate": float((counts == 1).mean()) if n else 0.0,
        "max_items_per_sid": int(counts.max()) if n else 0,
        "levels": [level_stats(codes_NL[:, i], k) for i, k in enumerate(codebook_sizes)],
    }


def stats_by_type(codes_NL: np.ndarray, item_types: np.ndarray, codebook_sizes: Sequence[int]) -> dict:
    """``{"overall": ..., "<type>": ...}``; overall counts collisions within a type only."""
    item_types = np.asarray(item_types)
    out = {}
    for t in sorted(set(item_types.tolist())):
        out[t] = collision_stats(codes_NL[item_types == t], codebook_sizes)
    # overall: prefix a type column so that a product and a video never "collide"
    _, type_idx = np.unique(item_types, return_inverse=True)
    keyed = np.concatenate([type_idx.reshape(-1, 1), np.asarray(codes_NL)], 1)
    out["overall"] = _stats(np.asarray(codes_NL), *_group(keyed), codebook_sizes)
    return out


SID_ITEMS_SCHEMA = pa.schema([
    pa.field("item_type", pa.string(), nullable=False),
    pa.field("sid", pa.list_(pa.int32()), nullable=False),
    pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
    pa.field("scores", pa.list_(pa.float64()), nullable=False),
])


def reverse_map(item_ids: np.ndarray, item_types: np.ndarray, codes_NL: np.ndarray,
                popularity: np.ndarray | None = None) -> pa.Table:
    """One row per (item_type, SID) with all its items, best first.

    Ranking rule inside a collision: higher ``popularity`` first (the stage passes the item's
    click count in the events log), ties by smaller ``item_id``. ``scores`` holds the popularity
    of each listed item, so that a decoder can re-rank or sample.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    item_types = np.asarray(item_types).astype(str)
    codes_NL = np.asarray(codes_NL, dtype=np.int64)
    pop = np.zeros(len(item_ids)) if popularity is None else np.asarray(popularity, dtype=np.float64)
    types, type_idx = np.unique(item_types, return_inverse=True)
    keyed = np.concatenate([type_idx.reshape(-1, 1), codes_NL], 1)
    inverse, counts = _group(keyed)
    # sort by (group, -popularity, item_id): np.lexsort's last key is the primary one
    order = np.lexsort((item_ids, -pop, inverse))
    starts = np.concatenate([[0], np.cumsum(counts)])
    first = order[starts[:-1]]  # one representative row per group, in group order
    ids_sorted, pop_sorted = item_ids[order], pop[order]
    offsets = pa.array(starts.astype(np.int32))
    return pa.Table.from_arrays([
        pa.array(types[type_idx[first]].tolist(), pa.string()),
        pa.array(codes_NL[first].astype(np.int32).tolist(), pa.list_(pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(ids_sorted, pa.int64())),
        pa.ListArray.from_arrays(offsets, pa.array(pop_sorted, pa.float64())),
    ], schema=SID_ITEMS_SCHEMA)
