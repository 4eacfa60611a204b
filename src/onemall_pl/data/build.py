"""``onemall data build``: the derived tables ``samples`` and ``item2item`` of a dataset.

    onemall data build data/synth [--max_exposure 256 --max_click 256 --max_order 256]

**Histories** (:func:`request_histories`). For each request, the user's exposures, clicks
and orders whose event time is *strictly before* the request's time (a request's time is
the earliest ``ts`` of its events), the latest ``max_*`` of each, oldest first. Events at
the same time as the request never enter its sequences, whatever their split, so no
sample sees its own or a later outcome. The ranking / reward stage calls the same function
for every request; ``samples`` keeps only requests with a positive.

**samples**: one row per request with at least one click or order; ``targets`` = the
request's clicked or ordered items (unique, in log order). A request whose three sequences
are all empty (a user's first interaction) is dropped, in every split: there is nothing
to condition on (SASRec / TIGER drop it too); ``dataset.json`` counts them. Split rule:

- ``leave-one-out`` (MovieLens, Amazon, or any dataset whose ``split_rule`` starts with it):
  per user, the last request with a positive is test, the second last valid, the rest
  train (ties in time broken by ``request_id``), as in SASRec / TIGER.
- ``time`` (the simulator, imported logs): with ``t0, t1`` the first and last event time,
  requests at or after ``t0 + 0.9 (t1 - t0)`` are test, those at or after
  ``t0 + 0.8 (t1 - t0)`` valid, the rest train.

Samples are built in buckets of users (``user_id % n``) so a 10M-event log never holds
all sequences in memory at once.

**item2item** (paper 3.1.1), two relations:

- ``commercial``, product-card pairs from co-engagement (click or order) with **Swing**
  (Yang et al. 2020, "Large Scale Product Graph Construction for Recommendation in
  E-commerce"): ``s(i, j) = sum over user pairs u < v who both engaged i and j of
  w_u w_v / (alpha + |I_u & I_v|)`` with ``w_u = |I_u|^-1/2``. For cost, each user keeps
  the latest ``max_user_items`` engaged products and each product a random
  ``max_item_users`` of its users. Each product keeps its ``top_k`` Swing neighbours; an
  engaged product with no Swing neighbour (too few co-engagements, as for many MovieLens
  titles) takes its ``top_k`` most co-engaged products of the same L1 category instead.
- ``watching``, (short-video, product) pairs: for each clicked product, the user's latest
  short-video from ``watches`` that was long-viewed (``watch_s >= long_view_s``) and
  watched more than ``min_gap_s`` (60 s) and less than ``max_gap_s`` (300 s) before the
  click. As the paper notes, the short-video may be an entertainment or an e-commerce one
  (any ``item_type="video"``). Filters: videos in the categories named
  ``excluded_video_categories`` (News, Comedy, Dance, Film/TV, Selfie) are dropped; a user
  contributes at most ``max_watch_pairs_per_user`` distinct pairs (random); repeated
  pairs are kept once; high-frequency products are down-sampled by the cap below.

Both relations are down-sampled so each item appears at most ``max_pair_appearances``
times per relation (paper: 40). The pairs are unique, so the tokenizer can hold some out.

The new tables are written into a copy of the dataset folder (hard links of its other
files) that replaces it in one rename (:func:`~onemall_pl.io.atomic_dir`): a failed build
leaves the dataset as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from onemall_pl.data.schema import SPLITS, DataError, DatasetInfo
from onemall_pl.io import (
    DATASET_JSON,
    ShardWriter,
    atomic_dir,
    read_dataset_info,
    read_table,
    write_dataset_info,
)

LOO_RULE = "leave-one-out per user: last interaction test, second last valid"
TIME_RULE = "time: requests in the last 10% of the time span are test, the 10% before valid, the rest train"
TEST_FRACTION = 0.1
VALID_FRACTION = 0.1
DERIVED = ("samples", "item2item")
_EMPTY = np.zeros(0, np.int64)


@dataclass
class Item2ItemConfig:
    """Knobs of the item2item pairs (defaults as documented in the module docstring)."""

    swing_alpha: float = 1.0
    """Swing smoothing of the user-pair overlap."""
    max_user_items: int = 50
    """Swing: each user's latest engaged products kept (fan-out limit)."""
    max_item_users: int = 100
    """Swing: users sampled per product (cost limit: pairs grow with its square)."""
    top_k: int = 10
    """Neighbours kept per product."""
    long_view_s: float = 20.0
    """A watch is long-viewed at this many seconds or more."""
    min_gap_s: int = 60
    """Watching: the watch must precede the click by more than this (paper: 1 minute)..."""
    max_gap_s: int = 300
    """... and by less than this (paper: 5 minutes)."""
    excluded_video_categories: tuple[str, ...] = ("News", "Comedy", "Dance", "Film/TV", "Selfie")
    max_watch_pairs_per_user: int = 10


# ----------------------------------------------------------------------------- histories


def _requests(events: pa.Table) -> dict[str, np.ndarray]:
    """Per request (sorted by id): id, user, ts (earliest event), scenario index, first event row."""
    rid = events.column("request_id").to_numpy()
    order = np.argsort(rid, kind="stable")
    rid_s = rid[order]
    first = np.flatnonzero(np.r_[True, rid_s[1:] != rid_s[:-1]])
    user = events.column("user_id").to_numpy()[order]
    if (bad := np.flatnonzero(user != np.repeat(user[first], np.diff(np.r_[first, len(rid_s)])))).size:
        row = int(order[bad[0]])
        raise DataError(f"request {int(rid[row])} has events of several users", table="events",
                        column="user_id", row=row)
    ts = np.minimum.reduceat(events.column("ts").to_numpy()[order], first) if len(first) else _EMPTY
    return {"request_id": rid_s[first], "user_id": user[first], "ts": ts, "row": order[first]}


def _windows(keys: np.ndarray, values: np.ndarray, q_end: np.ndarray, q_begin: np.ndarray,
             max_len: int) -> pa.ListArray:
    """For each query, ``values[max(begin, end - max_len):end]`` where ``end``/``begin`` are the
    positions of the query's (user, ts) key and of the user's first key in sorted ``keys``."""
    end = np.searchsorted(keys, q_end, side="left")
    start = np.maximum(np.searchsorted(keys, q_begin, side="left"), end - max_len)
    lengths = end - start
    offsets = np.r_[0, np.cumsum(lengths)]
    assert offsets[-1] < 2**31, "too many sequence elements in one table: use fewer requests per call"
    idx = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values[idx], pa.int64()))


def request_histories(events: pa.Table, max_exposure: int, max_click: int, max_order: int, *,
                      request_ids: np.ndarray | None = None) -> pa.Table:
    """One row per request: ``request_id, user_id, ts, scenario, seq_exposure, seq_click, seq_order``.

    Each ``seq_*`` holds the user's latest ``max_*`` exposed / clicked / ordered item ids
    with event time strictly before the request's time, oldest first. ``request_ids``
    restricts the rows to those requests, in that order (the histories still use all of
    ``events``); otherwise rows are sorted by ``request_id``. Vectorised: one sort per behaviour, one binary search
    per request.
    """
    for name, m in (("max_exposure", max_exposure), ("max_click", max_click), ("max_order", max_order)):
        if m < 0:
            raise ValueError(f"{name} must be >= 0, got {m}")
    req = _requests(events)
    if request_ids is not None:
        pos = np.searchsorted(req["request_id"], request_ids)
        pos = np.minimum(pos, len(req["request_id"]) - 1)
        if len(req["request_id"]) == 0 or (req["request_id"][pos] != request_ids).any():
            raise ValueError("request_ids holds ids that are not in events")
        req = {k: v[pos] for k, v in req.items()}
    ts = events.column("ts").to_numpy()
    user = events.column("user_id").to_numpy()
    item = events.column("item_id").to_numpy()
    # Dense (user, time) keys: user rank * n_times + time rank, ordered as (user, ts).
    times = np.unique(ts)
    users, user_rank = np.unique(user, return_inverse=True)
    n_t = len(times) + 1
    assert len(users) * n_t < 2**62, "too many (user, time) keys for int64"
    key = user_rank.astype(np.int64) * n_t + np.searchsorted(times, ts)
    q_user = np.searchsorted(users, req["user_id"]).astype(np.int64) * n_t
    q_key = q_user + np.searchsorted(times, req["ts"])
    rows = np.arange(len(ts))
    out = {"request_id": req["request_id"], "user_id": req["user_id"], "ts": req["ts"],
           "scenario": events.column("scenario").take(pa.array(req["row"]))}
    for col, max_len, mask in (("seq_exposure", max_exposure, None),
                               ("seq_click", max_click, events.column("click").to_numpy() > 0),
                               ("seq_order", max_order, events.column("order").to_numpy() > 0)):
        k, it, r = (key, item, rows) if mask is None else (key[mask], item[mask], rows[mask])
        o = np.lexsort((r, k))  # chronological, log order within a second
        out[col] = _windows(k[o], it[o], q_key, q_user, max_len)
    return pa.table(out)


def iter_request_histories(events: pa.Table, max_exposure: int, max_click: int, max_order: int, *,
                           request_ids: np.ndarray | None = None,
                           max_list_values: int = 50_000_000) -> Iterator[pa.Table]:
    """:func:`request_histories` in batches, one bucket of users (``user_id % n``) at a time.

    ``n`` is chosen so a batch holds at most about ``max_list_values`` sequence elements
    (and at most ~4M events), which keeps a 10M-event log in a few GB.
    """
    req = _requests(events)
    rid = req["request_id"] if request_ids is None else np.asarray(request_ids, np.int64)
    pos = np.minimum(np.searchsorted(req["request_id"], rid), max(len(req["request_id"]) - 1, 0))
    if len(rid) and (len(req["request_id"]) == 0 or (req["request_id"][pos] != rid).any()):
        raise ValueError("request_ids holds ids that are not in events")
    user = req["user_id"][pos]
    n = max(1, math.ceil(len(rid) * (max_exposure + max_click + max_order) / max_list_values),
            math.ceil(events.num_rows / 4_000_000))
    n = min(n, max(1, len(np.unique(user))))
    ev_bucket = events.column("user_id").to_numpy() % n
    for b in range(n):
        sel = user % n == b
        if sel.any():
            ev = events.take(pa.array(np.flatnonzero(ev_bucket == b))) if n > 1 else events
            yield request_histories(ev, max_exposure, max_click, max_order, request_ids=rid[sel])


# ----------------------------------------------------------------------------- samples


def _targets(events: pa.Table) -> tuple[np.ndarray, pa.ListArray]:
    """(request ids with a positive, sorted; their unique clicked/ordered items in log order)."""
    pos = np.flatnonzero((events.column("click").to_numpy() > 0) | (events.column("order").to_numpy() > 0))
    rid = events.column("request_id").to_numpy()[pos]
    item = events.column("item_id").to_numpy()[pos]
    o = np.lexsort((pos, item, rid))
    keep = np.r_[True, (rid[o][1:] != rid[o][:-1]) | (item[o][1:] != item[o][:-1])]
    o = o[keep]
    o = o[np.lexsort((pos[o], rid[o]))]
    rid, item = rid[o], item[o]
    first = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]]) if len(rid) else _EMPTY
    offsets = np.r_[first, len(rid)].astype(np.int32)
    return rid[first], pa.ListArray.from_arrays(pa.array(offsets), pa.array(item, pa.int64()))


def is_leave_one_out(info: DatasetInfo) -> bool:
    return info.source in ("ml100k", "amazon") or info.split_rule.startswith("leave-one-out")


def assign_splits(user: np.ndarray, ts: np.ndarray, request_id: np.ndarray, *, leave_one_out: bool,
                  t0: int, t1: int) -> np.ndarray:
    """Index into ``SPLITS`` (0 train, 1 valid, 2 test) for requests with a positive."""
    split = np.zeros(len(user), np.int8)
    if leave_one_out:
        o = np.lexsort((request_id, ts, user))
        u = user[o]
        last = np.r_[u[1:] != u[:-1], True]
        second = np.r_[last[1:] & ~last[:-1], False] & ~last
        split[o[second]] = 1
        split[o[last]] = 2
    else:
        span = t1 - t0
        split[ts >= t0 + (1 - TEST_FRACTION - VALID_FRACTION) * span] = 1
        split[ts >= t0 + (1 - TEST_FRACTION) * span] = 2
    return split


def iter_samples(events: pa.Table, info: DatasetInfo, max_exposure: int, max_click: int, max_order: int,
                 stats: dict | None = None, max_list_values: int = 50_000_000) -> Iterator[pa.Table]:
    """Batches of ``samples`` rows, one bucket of users at a time (see the module docstring)."""
    stats = stats if stats is not None else {}
    rid, targets = _targets(events)
    req = _requests(events)
    at = np.searchsorted(req["request_id"], rid)
    ev_ts = events.column("ts").to_numpy()
    split = assign_splits(req["user_id"][at], req["ts"][at], rid, leave_one_out=is_leave_one_out(info),
                          t0=int(ev_ts.min()), t1=int(ev_ts.max()))
    stats.update(buckets=0, requests_with_positive=len(rid), dropped_empty_history={s: 0 for s in SPLITS})
    split_names = pa.array(SPLITS)
    for h in iter_request_histories(events, max_exposure, max_click, max_order, request_ids=rid,
                                    max_list_values=max_list_values):
        stats["buckets"] += 1
        sel = np.searchsorted(rid, h.column("request_id").to_numpy())
        lens = sum(pc.list_value_length(h.column(c)).to_numpy() for c in ("seq_exposure", "seq_click", "seq_order"))
        keep = lens > 0
        for s, n in zip(SPLITS, np.bincount(split[sel][~keep], minlength=3)):
            stats["dropped_empty_history"][s] += int(n)
        h = h.append_column("targets", targets.take(pa.array(sel)))
        h = h.append_column("split", split_names.take(pa.array(split[sel])))
        yield h.filter(pa.array(keep))


# ----------------------------------------------------------------------------- item2item


def cap_appearances(a: np.ndarray, b: np.ndarray, cap: int, rng: np.random.Generator,
                    rounds: int = 4) -> np.ndarray:
    """Indices of a random subset of pairs ``(a, b)`` where each item appears at most ``cap`` times.

    Vectorised greedy: pairs in random order are kept while both items have room; a few
    rounds refill the room left by pairs dropped for the other item.
    """
    n = len(a)
    kept = np.zeros(n, bool)
    items, inv = np.unique(np.r_[a, b], return_inverse=True)
    ia, ib = inv[:n], inv[n:]
    used = np.zeros(len(items), np.int64)
    for _ in range(rounds):
        cand = rng.permutation(np.flatnonzero(~kept))
        if not len(cand):
            break
        side = np.r_[ia[cand], ib[cand]]  # appearance stream: pair k's two items at k and k + m
        m = len(cand)
        o = np.argsort(np.r_[np.arange(m), np.arange(m)] * 2 + np.r_[np.zeros(m, int), np.ones(m, int)],
                       kind="stable")
        s = side[o]
        so = np.argsort(s, kind="stable")
        first = np.searchsorted(s[so], s[so])
        rank = np.empty(2 * m, np.int64)
        rank[so] = np.arange(2 * m) - first  # occurrence number of the item in the stream
        rank_pair = np.empty(2 * m, np.int64)
        rank_pair[o] = rank
        ok = (used[ia[cand]] + rank_pair[:m] < cap) & (used[ib[cand]] + rank_pair[m:] < cap)
        if not ok.any():
            break
        kept[cand[ok]] = True
        used += np.bincount(np.r_[ia[cand[ok]], ib[cand[ok]]], minlength=len(items))
    return np.flatnonzero(kept)


def _top_k_per_row(m: sp.coo_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    o = np.lexsort((-m.data, m.row))
    r, c = m.row[o], m.col[o]
    first = np.searchsorted(r, r)
    keep = np.arange(len(r)) - first < k
    return r[keep], c[keep]


def swing(user: np.ndarray, item: np.ndarray, n_items: int, cfg: Item2ItemConfig,
          rng: np.random.Generator) -> sp.csr_matrix:
    """Swing similarity (items x items, zero diagonal) from unique (user, item) engagements,
    ``user`` and ``item`` dense indices. See the module docstring for the formula."""
    # Cost limit: a random max_item_users users per item.
    o = rng.permutation(len(user))
    user, item = user[o], item[o]
    o = np.argsort(item, kind="stable")
    user, item = user[o], item[o]
    rank = np.arange(len(item)) - np.searchsorted(item, item)
    user, item = user[rank < cfg.max_item_users], item[rank < cfg.max_item_users]
    n_users = int(user.max()) + 1 if len(user) else 0
    w_u = 1.0 / np.sqrt(np.maximum(np.bincount(user, minlength=n_users), 1))
    # Every (u < v, i) with u, v both engaged with i, one block of items per user count.
    starts = np.flatnonzero(np.r_[True, item[1:] != item[:-1]]) if len(item) else _EMPTY
    sizes = np.diff(np.r_[starts, len(item)])
    pair_ids, pair_items = [], []
    for k in np.unique(sizes[sizes >= 2]):
        blocks = starts[sizes == k]
        us = np.sort(user[blocks[:, None] + np.arange(k)], axis=1)
        iu, iv = np.triu_indices(k, 1)
        pair_ids.append((us[:, iu] * n_users + us[:, iv]).ravel())
        pair_items.append(np.repeat(item[blocks], len(iu)))
    if not pair_ids:
        return sp.csr_matrix((n_items, n_items))
    pid, pit = np.concatenate(pair_ids), np.concatenate(pair_items)
    uniq, pinv, overlap = np.unique(pid, return_inverse=True, return_counts=True)
    rows_ok = overlap[pinv] >= 2  # a user pair sharing one item adds nothing off the diagonal
    weight = w_u[uniq // n_users] * w_u[uniq % n_users] / (cfg.swing_alpha + overlap)
    c = sp.csr_matrix((np.ones(rows_ok.sum()), (pinv[rows_ok], pit[rows_ok])), shape=(len(uniq), n_items))
    s = (c.T @ sp.diags(weight) @ c).tocsr()
    s.setdiag(0)
    s.eliminate_zeros()
    return s


def commercial_pairs(events: pa.Table, items: pa.Table, cfg: Item2ItemConfig, cap: int,
                     rng: np.random.Generator, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Product-product pairs (item ids) from Swing over click / order co-engagement."""
    item_ids = items.column("item_id").to_numpy()
    is_product = pc.equal(items.column("item_type"), "product").to_numpy(zero_copy_only=False)
    products = np.sort(item_ids[is_product])
    pos = (events.column("click").to_numpy() > 0) | (events.column("order").to_numpy() > 0)
    ev_item = events.column("item_id").to_numpy()
    pos &= np.isin(ev_item, products)
    user, item, ts = events.column("user_id").to_numpy()[pos], ev_item[pos], events.column("ts").to_numpy()[pos]
    # Unique (user, item) at its latest time; each user's latest max_user_items.
    o = np.lexsort((-ts, item, user))
    user, item, ts = user[o], item[o], ts[o]
    first = np.r_[True, (user[1:] != user[:-1]) | (item[1:] != item[:-1])]
    user, item, ts = user[first], item[first], ts[first]
    o = np.lexsort((-ts, user))
    user, item = user[o], item[o]
    keep = np.arange(len(user)) - np.searchsorted(user, user) < cfg.max_user_items
    user, item = user[keep], item[keep]
    if not len(user):
        return _EMPTY, _EMPTY
    _, u_idx = np.unique(user, return_inverse=True)
    i_idx = np.searchsorted(products, item)
    s = swing(u_idx, i_idx, len(products), cfg, rng)
    r, c = _top_k_per_row(s.tocoo(), cfg.top_k)
    # Fallback: engaged products without a Swing neighbour take co-engaged ones of the same L1.
    lonely = np.setdiff1d(np.unique(i_idx), np.unique(r))
    n_fallback = 0
    if len(lonely):
        a = sp.csr_matrix((np.ones(len(u_idx)), (u_idx, i_idx)), shape=(int(u_idx.max()) + 1, len(products)))
        co = (a[:, lonely].T @ a).tocoo()
        l1 = _first_category(items, products)
        same = (l1[lonely[co.row]] == l1[co.col]) & (l1[co.col] >= 0) & (lonely[co.row] != co.col)
        co = sp.coo_matrix((co.data[same], (co.row[same], co.col[same])), shape=co.shape)
        fr, fc = _top_k_per_row(co, cfg.top_k)
        n_fallback = len(np.unique(fr))
        r, c = np.r_[r, lonely[fr]], np.r_[c, fc]
    a_, b_ = np.minimum(r, c), np.maximum(r, c)
    pairs = np.unique(a_.astype(np.int64) * len(products) + b_)
    a_, b_ = products[pairs // len(products)], products[pairs % len(products)]
    keep = cap_appearances(a_, b_, cap, rng)
    stats.update(commercial_candidates=len(a_), commercial_fallback_items=n_fallback)
    return a_[keep], b_[keep]


def _first_category(items: pa.Table, ids: np.ndarray) -> np.ndarray:
    """L1 category of each of ``ids`` (-1 when the item has none)."""
    item_ids = items.column("item_id").to_numpy()
    l1 = _list_first(items.column("category"))
    o = np.argsort(item_ids)
    return l1[o][np.searchsorted(item_ids[o], ids)]


def _list_first(col: pa.ChunkedArray) -> np.ndarray:
    lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = col.offsets.to_numpy()[:-1]
    values = col.values.to_numpy(zero_copy_only=False) if len(col.values) else np.zeros(1, np.int32)
    return np.where(lens > 0, values[np.minimum(offsets, max(len(values) - 1, 0))], -1).astype(np.int64)


def watching_pairs(events: pa.Table, watches: pa.Table, items: pa.Table, categories: pa.Table | None,
                   cfg: Item2ItemConfig, cap: int, rng: np.random.Generator,
                   stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(short-video, product) pairs from the watch log, see the module docstring."""
    item_ids = items.column("item_id").to_numpy()
    itype = items.column("item_type")
    videos = item_ids[pc.equal(itype, "video").to_numpy(zero_copy_only=False)]
    products = item_ids[pc.equal(itype, "product").to_numpy(zero_copy_only=False)]
    if categories is not None and cfg.excluded_video_categories:
        excluded = categories.column("category_id").to_numpy()[
            pc.is_in(categories.column("name"), pa.array(list(cfg.excluded_video_categories))).to_numpy(
                zero_copy_only=False)]
        is_video = pc.equal(itype, "video").to_numpy(zero_copy_only=False)
        cat = items.column("category").filter(pa.array(is_video))
        flat_item = np.repeat(videos, pc.list_value_length(cat).to_numpy(zero_copy_only=False))
        flat_cat = pc.list_flatten(cat).to_numpy()
        videos = np.setdiff1d(videos, flat_item[np.isin(flat_cat, excluded)])
    w_item = watches.column("item_id").to_numpy()
    ok = (watches.column("watch_s").to_numpy() >= cfg.long_view_s) & np.isin(w_item, videos)
    w_user, w_ts, w_item = watches.column("user_id").to_numpy()[ok], watches.column("ts").to_numpy()[ok], w_item[ok]
    clk = (events.column("click").to_numpy() > 0) & np.isin(events.column("item_id").to_numpy(), products)
    c_user, c_ts = events.column("user_id").to_numpy()[clk], events.column("ts").to_numpy()[clk]
    c_item = events.column("item_id").to_numpy()[clk]
    stats.update(long_views=int(ok.sum()), product_clicks=int(clk.sum()))
    if not len(w_user) or not len(c_user):
        return _EMPTY, _EMPTY
    # (user, ts) keys: the latest watch with ts < click_ts - min_gap, then check the max gap.
    users, w_u = np.unique(w_user, return_inverse=True)
    t0 = min(w_ts.min(), c_ts.min()) - cfg.max_gap_s
    width = int(max(w_ts.max(), c_ts.max()) - t0) + 1
    assert len(users) * width < 2**62, "too many (user, time) keys for int64"
    w_key = w_u.astype(np.int64) * width + (w_ts - t0)
    o = np.argsort(w_key, kind="stable")
    w_key, w_item, w_ts = w_key[o], w_item[o], w_ts[o]
    c_u = np.searchsorted(users, c_user)
    known = (c_u < len(users)) & (users[np.minimum(c_u, len(users) - 1)] == c_user)
    at = np.searchsorted(w_key, c_u.astype(np.int64) * width + (c_ts - cfg.min_gap_s - t0), side="left") - 1
    at_ok = np.maximum(at, 0)
    hit = known & (at >= 0) & (w_key[at_ok] // width == c_u) & (c_ts - w_ts[at_ok] < cfg.max_gap_s)
    u, v, p = c_user[hit], w_item[at_ok[hit]], c_item[hit]
    # Unique (user, video, product); at most max_watch_pairs_per_user per user; pairs kept once.
    trip = np.unique(np.stack([u, v, p], 1), axis=0)
    trip = trip[rng.permutation(len(trip))]
    o = np.argsort(trip[:, 0], kind="stable")
    trip = trip[o]
    trip = trip[np.arange(len(trip)) - np.searchsorted(trip[:, 0], trip[:, 0]) < cfg.max_watch_pairs_per_user]
    pairs = np.unique(trip[:, 1:], axis=0) if len(trip) else np.zeros((0, 2), np.int64)
    keep = cap_appearances(pairs[:, 0], pairs[:, 1], cap, rng)
    stats.update(watching_candidates=int(hit.sum()), watching_unique_pairs=len(pairs))
    return pairs[keep, 0], pairs[keep, 1]


def item2item(items: pa.Table, events: pa.Table, watches: pa.Table | None, categories: pa.Table | None,
              max_pair_appearances: int, seed: int, cfg: Item2ItemConfig | None = None,
              stats: dict | None = None) -> pa.Table:
    """The ``item2item`` table: commercial pairs, then watching pairs when there is a watch log."""
    cfg = cfg or Item2ItemConfig()
    stats = stats if stats is not None else {}
    rng = np.random.default_rng(seed)
    a, b = commercial_pairs(events, items, cfg, max_pair_appearances, rng, stats)
    parts = [pa.table({"item_a": a, "item_b": b, "relation": pa.array(["commercial"] * len(a), pa.string())})]
    if watches is not None:
        a, b = watching_pairs(events, watches, items, categories, cfg, max_pair_appearances, rng, stats)
        parts.append(pa.table({"item_a": a, "item_b": b, "relation": pa.array(["watching"] * len(a), pa.string())}))
    out = pa.concat_tables(parts)
    stats.update(commercial=int(pc.sum(pc.equal(out.column("relation"), "commercial")).as_py() or 0),
                 watching=int(pc.sum(pc.equal(out.column("relation"), "watching")).as_py() or 0))
    return out


# ----------------------------------------------------------------------------- build


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


SAMPLES_ROW_GROUP = 8192


def build(dataset: Path, max_exposure: int = 256, max_click: int = 256, max_order: int = 256,
          max_pair_appearances: int = 40, seed: int = 0, item2item_config: Item2ItemConfig | None = None) -> None:
    """Add ``samples`` and ``item2item`` to the dataset folder and update ``dataset.json``, atomically."""
    dataset = Path(dataset)
    if max_pair_appearances < 1:
        raise ValueError(f"max_pair_appearances must be >= 1, got {max_pair_appearances}")
    info = read_dataset_info(dataset)
    cfg = item2item_config or Item2ItemConfig()
    t_start = time.perf_counter()
    events = read_table(dataset, "events")
    items = read_table(dataset, "items", ["item_id", "item_type", "category"], validate=False)
    optional = {name: read_table(dataset, name) if (dataset / name).is_dir() else None
                for name in ("watches", "categories")}
    split_rule = LOO_RULE if is_leave_one_out(info) else TIME_RULE
    sample_stats, pair_stats = {}, {}
    skip = {*DERIVED, DATASET_JSON}
    with atomic_dir(dataset) as tmp:
        shutil.copytree(dataset, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=lambda d, names: [n for n in names if Path(d) == dataset and
                                                 (n in skip or n.startswith("."))])
        # small row groups: the training stream reads one row group at a time, and a row of
        # three 256-id sequences decodes to ~6 KB (ParquetStream docstring)
        with ShardWriter(tmp, "samples", row_group_size=SAMPLES_ROW_GROUP) as w:
            for batch in iter_samples(events, info, max_exposure, max_click, max_order, sample_stats):
                w.write(batch)
        n_samples = w.rows
        t_samples = time.perf_counter()
        with ShardWriter(tmp, "item2item") as w:
            w.write(item2item(items, events, optional["watches"], optional["categories"], max_pair_appearances,
                              seed, cfg, pair_stats))
        n_pairs = w.rows
        if n_samples == 0:
            raise DataError("no request has a click or an order (after dropping empty histories): "
                            "nothing to train on", table="events", file=str(dataset / "events"))
        info.tables.update(samples=n_samples, item2item=n_pairs)
        info.split_rule = info.split_rule or split_rule
        info.params["build"] = {
            "max_exposure": max_exposure, "max_click": max_click, "max_order": max_order,
            "max_pair_appearances": max_pair_appearances, "seed": seed, "split": split_rule,
            "item2item": dataclasses.asdict(cfg), "samples_stats": sample_stats, "item2item_stats": pair_stats,
        }
        write_dataset_info(tmp, info)
    t_end = time.perf_counter()
    print(f"built {dataset}: samples {n_samples:,} ({t_samples - t_start:.1f}s), item2item {n_pairs:,} "
          f"({pair_stats.get('commercial', 0):,} commercial, {pair_stats.get('watching', 0):,} watching; "
          f"{t_end - t_samples:.1f}s)")
