"""``onemall data build``: samples (histories strictly before each request, splits) and item2item
(Swing, watching pairs, caps), checked against direct re-computations on a small world."""

import collections
import json

import numpy as np
import pyarrow as pa
import pytest

from onemall_pl.data import build as B
from onemall_pl.data.importer import write_dataset
from onemall_pl.data.schema import DataError, DatasetInfo
from onemall_pl.io import read_dataset_info, read_table

N_PRODUCTS, N_VIDEOS, N_USERS = 30, 12, 25
NEWS = 9  # a video category named "News": filtered out of the watching pairs


def _world(seed=0, n_requests=400):
    """A small e-commerce log: products in 3 L1 categories, short-videos (half entertainment), a
    watch log near the clicks, requests with several exposures and many equal timestamps."""
    rng = np.random.default_rng(seed)
    n = N_PRODUCTS + N_VIDEOS
    videos = np.arange(N_PRODUCTS, n)
    cat = [[1 + i % 3, 10 + i % 6] for i in range(N_PRODUCTS)] + [[NEWS if v % 4 == 0 else 4] for v in videos]
    items = pa.table({
        "item_id": np.arange(n, dtype=np.int64), "item_type": ["product"] * N_PRODUCTS + ["video"] * N_VIDEOS,
        "title": [f"item {i}" for i in range(n)], "text": [None] * n, "images": pa.nulls(n, pa.list_(pa.binary())),
        "category": pa.array(cat, pa.list_(pa.int32())), "price": rng.uniform(1, 50, n).astype(np.float32),
        "shop_id": rng.integers(0, 5, n), "product_id": [None] * N_PRODUCTS
        + [int(rng.integers(N_PRODUCTS)) if v % 2 else None for v in videos],
    })
    categories = pa.table({"category_id": pa.array([1, 2, 3, 4, NEWS] + list(range(10, 16)), pa.int32()),
                           "name": ["A", "B", "C", "Fun", "News"] + [f"sub{i}" for i in range(6)],
                           "level": pa.array([1] * 5 + [2] * 6, pa.int8()),
                           "parent_id": pa.array([None] * 5 + [1, 2, 3, 1, 2, 3], pa.int32())})
    rows = collections.defaultdict(list)
    for r in range(n_requests):
        user, ts = int(rng.integers(N_USERS)), int(rng.integers(0, 200)) * 30  # many equal times
        taste = user % 3
        for it in rng.choice(N_PRODUCTS, size=int(rng.integers(1, 5)), replace=False):
            click = rng.random() < (0.6 if it % 3 == taste else 0.15)
            for k, v in (("request_id", r), ("user_id", user), ("ts", ts), ("item_id", int(it)), ("click", click),
                         ("order", click and rng.random() < 0.3), ("scenario", ["product_card", "short_video"][r % 2])):
                rows[k].append(v)
    ev = pa.table({k: v for k, v in rows.items()})
    m = ev.num_rows
    events = pa.table({"request_id": ev["request_id"].cast(pa.int64()), "user_id": ev["user_id"].cast(pa.int64()),
                       "ts": ev["ts"].cast(pa.int64()), "scenario": ev["scenario"], "item_id": ev["item_id"].cast(pa.int64()),
                       "click": ev["click"].cast(pa.int8()), "order": ev["order"].cast(pa.int8()),
                       "gmv": np.zeros(m, np.float32), "watch_s": pa.nulls(m, pa.float32())})
    clicks = [(u, t) for u, t, c in zip(rows["user_id"], rows["ts"], rows["click"]) if c]
    w = [(u, t - int(rng.integers(0, 400)), int(rng.choice(videos)), float(rng.choice([5.0, 25.0, 60.0])))
         for u, t in clicks for _ in range(2)]
    watches = pa.table({"user_id": pa.array([x[0] for x in w], pa.int64()), "ts": pa.array([x[1] for x in w], pa.int64()),
                        "item_id": pa.array([x[2] for x in w], pa.int64()),
                        "watch_s": pa.array([x[3] for x in w], pa.float32())})
    return {"items": items, "events": events, "watches": watches, "categories": categories}


def _dataset(tmp_path, split_rule="", source="import", name="world", **kw):
    d = tmp_path / name
    write_dataset(d, _world(**kw), DatasetInfo(name=name, source=source, split_rule=split_rule))
    return d


def _naive_histories(ev, max_len):
    """Per request id: (user, ts, {exposure, click, order: latest max_len items strictly before ts})."""
    rows = ev.to_pylist()
    req = {}
    for r in rows:
        u, t = req.get(r["request_id"], (r["user_id"], r["ts"]))
        req[r["request_id"]] = (u, min(t, r["ts"]))
    out = {}
    for rid, (u, t) in req.items():
        before = [(r["ts"], i, r) for i, r in enumerate(rows) if r["user_id"] == u and r["ts"] < t]
        before.sort(key=lambda x: (x[0], x[1]))
        seq = {"exposure": [r["item_id"] for *_, r in before], "click": [r["item_id"] for *_, r in before if r["click"]],
               "order": [r["item_id"] for *_, r in before if r["order"]]}
        out[rid] = (u, t, {k: v[-max_len:] if max_len else [] for k, v in seq.items()})
    return out


def test_request_histories_match_a_direct_computation():
    ev = _world()["events"]
    for max_len in (0, 3, 1000):
        h = B.request_histories(ev, max_len, max_len, max_len)
        naive = _naive_histories(ev, max_len)
        assert h.column("request_id").to_pylist() == sorted(naive)
        for r in h.to_pylist():
            u, t, seq = naive[r["request_id"]]
            assert (r["user_id"], r["ts"]) == (u, t)
            assert (r["seq_exposure"], r["seq_click"], r["seq_order"]) == (seq["exposure"], seq["click"], seq["order"])
    batches = list(B.iter_request_histories(ev, 5, 5, 5, max_list_values=300))
    assert len(batches) > 3
    assert pa.concat_tables(batches).sort_by("request_id").equals(B.request_histories(ev, 5, 5, 5))
    sub = B.request_histories(ev, 5, 5, 5, request_ids=np.array([3, 7, 100]))
    assert sub.column("request_id").to_pylist() == [3, 7, 100]
    assert sub.to_pylist() == B.request_histories(ev, 5, 5, 5).take(pa.array([3, 7, 100])).to_pylist()


def test_samples_no_leakage_targets_and_time_split(tmp_path):
    d = _dataset(tmp_path)
    B.build(d, max_exposure=8, max_click=4, max_order=2)
    s = read_table(d, "samples")
    ev = read_table(d, "events").to_pylist()
    by_user = collections.defaultdict(list)
    for e in ev:
        by_user[e["user_id"]].append(e)
    t0, t1 = min(e["ts"] for e in ev), max(e["ts"] for e in ev)
    positives = {e["request_id"] for e in ev if e["click"] or e["order"]}
    kept = set()
    for r in s.to_pylist():
        kept.add(r["request_id"])
        assert len(r["seq_exposure"]) <= 8 and len(r["seq_click"]) <= 4 and len(r["seq_order"]) <= 2
        assert r["seq_exposure"] or r["seq_click"] or r["seq_order"]
        for col, flag in (("seq_exposure", None), ("seq_click", "click"), ("seq_order", "order")):
            for item in r[col]:  # no leakage: each element is an event of this user strictly before ts
                assert any(e["item_id"] == item and e["ts"] < r["ts"] and (flag is None or e[flag])
                           for e in by_user[r["user_id"]]), (r, col, item)
        own = [e for e in ev if e["request_id"] == r["request_id"]]
        assert r["targets"] == list(dict.fromkeys(e["item_id"] for e in own if e["click"] or e["order"]))
        expected = "test" if r["ts"] >= t0 + 0.9 * (t1 - t0) else "valid" if r["ts"] >= t0 + 0.8 * (t1 - t0) else "train"
        assert r["split"] == expected
    dropped = positives - kept  # only requests with nothing before them are dropped
    assert dropped and all(not any(e["ts"] < min(x["ts"] for x in ev if x["request_id"] == rid)
                                   for e in by_user[next(x["user_id"] for x in ev if x["request_id"] == rid)])
                           for rid in dropped)
    info = read_dataset_info(d)
    assert info.tables["samples"] == s.num_rows and info.params["build"]["split"] == B.TIME_RULE
    assert sum(info.params["build"]["samples_stats"]["dropped_empty_history"].values()) == len(dropped)


def test_leave_one_out_split(tmp_path):
    d = _dataset(tmp_path, split_rule=B.LOO_RULE)
    B.build(d)
    s = read_table(d, "samples").to_pylist()
    ev = read_table(d, "events").to_pylist()
    per_user = collections.defaultdict(list)
    for rid in sorted({e["request_id"] for e in ev if e["click"] or e["order"]}):
        e = next(x for x in ev if x["request_id"] == rid)
        per_user[e["user_id"]].append((e["ts"], rid))
    expect = {}
    for reqs in per_user.values():
        reqs.sort()
        for k, (_, rid) in enumerate(reversed(reqs)):
            expect[rid] = ["test", "valid"][k] if k < 2 else "train"
    assert all(r["split"] == expect[r["request_id"]] for r in s)
    counts = collections.Counter(r["split"] for r in s)
    assert counts["test"] == counts["valid"] == N_USERS


def test_user_buckets_give_the_same_samples(tmp_path):
    d = _dataset(tmp_path)
    ev = read_table(d, "events")
    info = read_dataset_info(d)
    one = pa.concat_tables(B.iter_samples(ev, info, 6, 6, 6))
    stats = {}
    many = pa.concat_tables(B.iter_samples(ev, info, 6, 6, 6, stats, max_list_values=500))
    assert stats["buckets"] > 3
    key = lambda t: sorted(t.to_pylist(), key=lambda r: r["request_id"])
    assert key(one) == key(many)


def _naive_swing(user, item, alpha=1.0):
    users_of = collections.defaultdict(set)
    items_of = collections.defaultdict(set)
    for u, i in zip(user, item):
        users_of[i].add(u)
        items_of[u].add(i)
    s = {}
    for i in users_of:
        for j in users_of:
            if i == j:
                continue
            common = sorted(users_of[i] & users_of[j])
            s[i, j] = sum(len(items_of[u]) ** -0.5 * len(items_of[v]) ** -0.5 / (alpha + len(items_of[u] & items_of[v]))
                          for a, u in enumerate(common) for v in common[a + 1:])
    return s


def test_swing_matches_its_formula():
    rng = np.random.default_rng(1)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, 12, 120), rng.integers(0, 9, 120))}
    user, item = map(np.array, zip(*sorted(pairs)))
    s = B.swing(user, item, 9, B.Item2ItemConfig(swing_alpha=0.5), np.random.default_rng(0)).toarray()
    naive = _naive_swing(user, item, alpha=0.5)
    assert max(naive.values()) > 0
    for (i, j), v in naive.items():
        assert s[i, j] == pytest.approx(v, abs=1e-9)
    assert np.all(np.diag(s) == 0)


def test_cap_appearances():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20, 2000), rng.integers(20, 200, 2000)
    keep = B.cap_appearances(a, b, 7, rng)
    counts = collections.Counter(np.r_[a[keep], b[keep]].tolist())
    assert max(counts.values()) <= 7
    assert sum(v == 7 for v in counts.values()) >= 15  # refill rounds use the room: most hubs are full


def test_item2item(tmp_path):
    d = _dataset(tmp_path)
    cfg = B.Item2ItemConfig(max_watch_pairs_per_user=10**6)
    B.build(d, max_pair_appearances=10**6, item2item_config=cfg)
    p = read_table(d, "item2item").to_pylist()
    items = read_table(d, "items").to_pylist()
    itype = {i["item_id"]: i["item_type"] for i in items}
    com = [(r["item_a"], r["item_b"]) for r in p if r["relation"] == "commercial"]
    watch = {(r["item_a"], r["item_b"]) for r in p if r["relation"] == "watching"}
    assert com and all(itype[a] == itype[b] == "product" and a < b for a, b in com)
    assert len(set(com)) == len(com)
    # watching pairs, recomputed: latest long view of an allowed video 60-300 s before a product click
    w = read_table(d, "watches").to_pylist()
    news = {i["item_id"] for i in items if NEWS in i["category"]}
    expect = set()
    for e in read_table(d, "events").to_pylist():
        if not e["click"]:
            continue
        cand = [(x["ts"], k, x["item_id"]) for k, x in enumerate(w) if x["user_id"] == e["user_id"]
                and x["watch_s"] >= cfg.long_view_s and x["item_id"] not in news and 60 < e["ts"] - x["ts"] < 300]
        if cand:
            expect.add((max(cand)[2], e["item_id"]))
    assert watch == expect and len(watch) > 5
    assert any(itype[v] == "video" and items[v]["product_id"] is not None for v, _ in watch)  # e-commerce videos too
    stats = read_dataset_info(d).params["build"]["item2item_stats"]
    assert stats["watching"] == len(watch) and stats["commercial"] == len(com)


def test_item2item_caps(tmp_path):
    d = _dataset(tmp_path)
    B.build(d, max_pair_appearances=3, item2item_config=B.Item2ItemConfig(max_watch_pairs_per_user=1))
    p = read_table(d, "item2item")
    for rel in ("commercial", "watching"):
        q = p.filter(pa.compute.equal(p["relation"], rel))
        counts = collections.Counter(q["item_a"].to_pylist() + q["item_b"].to_pylist())
        assert q.num_rows and max(counts.values()) <= 3


def test_build_is_atomic_and_rebuilds(tmp_path, monkeypatch):
    d = _dataset(tmp_path)
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    info = (d / "dataset.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("killed while building item2item")

    monkeypatch.setattr(B, "item2item", boom)
    with pytest.raises(RuntimeError, match="killed"):
        B.build(d)
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before and (d / "dataset.json").read_text() == info
    assert [p.name for p in tmp_path.iterdir()] == ["world"]
    monkeypatch.undo()
    B.build(d, max_click=2)
    B.build(d, max_click=3)  # a rebuild replaces the derived tables
    assert json.loads((d / "dataset.json").read_text())["params"]["build"]["max_click"] == 3
    assert max(len(x) for x in read_table(d, "samples")["seq_click"].to_pylist()) == 3
    assert len(list((d / "samples").glob("*.parquet"))) == 1
    assert read_table(d, "events").num_rows == read_dataset_info(d).tables["events"]


def test_build_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="dataset.json"):
        B.build(tmp_path / "nope")
    d = _dataset(tmp_path)
    events = d / "events" / "part-00000.parquet"
    events.write_bytes(events.read_bytes()[:60])
    with pytest.raises(DataError, match=r"part-00000.parquet.*table 'events'"):
        B.build(d)
    assert not (d / "samples").exists()


def test_build_on_the_simulated_world(tmp_path):
    from onemall_pl.data.synth import generate

    d = tmp_path / "micro"
    generate(d, preset="micro", seed=0)
    B.build(d, max_exposure=64, max_click=16, max_order=8)
    s = read_table(d, "samples")
    assert s.num_rows > 50 and set(s["split"].to_pylist()) == {"train", "valid", "test"}
    # No leakage: each element of a sequence is matched by a distinct event of the same user and
    # item strictly before the request (an item seen k times needs k earlier events).
    ev = read_table(d, "events")
    pc = pa.compute
    for col, flag in (("seq_exposure", None), ("seq_click", "click"), ("seq_order", "order")):
        parent = pc.list_parent_indices(s[col])
        occ = pa.table({"req": parent, "user_id": s["user_id"].take(parent), "req_ts": s["ts"].take(parent),
                        "item_id": pc.list_flatten(s[col])})
        occ = occ.group_by(["req", "user_id", "req_ts", "item_id"]).aggregate([([], "count_all")])
        e = (ev if flag is None else ev.filter(pc.equal(ev[flag], 1))).select(["user_id", "item_id", "ts"])
        j = occ.join(e, ["user_id", "item_id"], join_type="left outer")
        j = j.filter(pc.less(j["ts"], j["req_ts"]))
        earlier = j.group_by(["req", "item_id"]).aggregate([([], "count_all")]).rename_columns(["req", "item_id", "n"])
        both = occ.join(earlier, ["req", "item_id"], join_type="left outer")
        assert occ.num_rows > 0 and pc.all(pc.greater_equal(pc.fill_null(both["n"], 0), both["count_all"])).as_py(), col
    items = read_table(d, "items")
    cats = read_table(d, "categories")
    name = dict(zip(cats["category_id"].to_pylist(), cats["name"].to_pylist()))
    cat = dict(zip(items["item_id"].to_pylist(), items["category"].to_pylist()))
    itype = dict(zip(items["item_id"].to_pylist(), items["item_type"].to_pylist()))
    p = read_table(d, "item2item").to_pylist()
    watch = [(r["item_a"], r["item_b"]) for r in p if r["relation"] == "watching"]
    assert watch and all(itype[v] == "video" and itype[q] == "product" for v, q in watch)
    excluded = set(B.Item2ItemConfig().excluded_video_categories)
    assert not any(name[c] in excluded for v, _ in watch for c in cat[v])
