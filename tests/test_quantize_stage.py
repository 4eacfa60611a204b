"""Stage 2 end to end on a small synthetic world: fit, export, predict, refresh-live, ablate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onemall_pl.artifacts import load_manifest, write_artifact
from onemall_pl.io import write_table

pytestmark = pytest.mark.slow  # the whole stage on a small world: ~20-40 s on 2 CPU cores

D = 16


def _emb_table(ids, types, x, product_id):
    return pa.table({"item_id": pa.array(ids, pa.int64()), "item_type": pa.array(types, pa.string()),
                     "embedding": pa.array([r.tolist() for r in x], pa.list_(pa.float32())),
                     "product_id": pa.array(product_id, pa.int64())})


def make_world(root: Path, seed: int = 0, n_products: int = 500, n_videos: int = 200, n_lives: int = 30,
               n_users: int = 150) -> tuple[Path, Path]:
    """A tokenizer artifact (clustered embeddings, planted near-duplicates) and a dataset folder."""
    rng = np.random.default_rng(seed)
    n_cat = 8
    centers = rng.normal(size=(n_cat, D)) * 2.0
    p_cat = rng.integers(0, n_cat, n_products)
    p_x = centers[p_cat] + rng.normal(size=(n_products, D)) * 0.7
    dup = rng.choice(n_products - 40, 40, replace=False)
    p_x[-40:] = p_x[dup] + rng.normal(size=(40, D)) * 1e-3  # near-duplicates
    p_cat[-40:] = p_cat[dup]
    p_ids = np.arange(1000, 1000 + n_products)
    v_ids = np.arange(5000, 5000 + n_videos)
    v_prod = rng.choice(p_ids, n_videos)
    v_x = p_x[v_prod - 1000] + rng.normal(size=(n_videos, D)) * 0.5
    e_ids = np.arange(7000, 7020)  # entertainment videos: no product
    e_x = rng.normal(size=(20, D))
    l_ids = np.arange(9000, 9000 + n_lives)

    emb = _emb_table(np.concatenate([p_ids, v_ids, e_ids]),
                     ["product"] * n_products + ["video"] * n_videos + ["video"] * 20,
                     np.concatenate([p_x, v_x, e_x]).astype(np.float32),
                     [None] * n_products + v_prod.tolist() + [None] * 20)
    tok = root / "artifacts" / "fx" / "tokenizer"

    def build(tmp: Path) -> None:
        (tmp / "embeddings").mkdir()
        pq.write_table(emb, tmp / "embeddings" / "part-00000.parquet")

    write_artifact(tok, build, stage="tokenizer", dataset="fx", sizes={"embedding_dim": D})

    # dataset tables
    l_shop = rng.integers(0, 10, n_lives)
    ids = np.concatenate([p_ids, v_ids, e_ids, l_ids])
    types = ["product"] * n_products + ["video"] * (n_videos + 20) + ["live"] * n_lives
    cats = [[int(c), int(c) * 10 + 1, int(c) * 100 + 1] for c in p_cat] + [[0, 1, 1]] * (n_videos + 20 + n_lives)
    items = pa.table({
        "item_id": ids, "item_type": types, "title": [f"item {i}" for i in ids], "text": [None] * len(ids),
        "images": pa.nulls(len(ids), pa.list_(pa.binary())), "category": pa.array(cats, pa.list_(pa.int32())),
        "price": pa.array(rng.uniform(1, 100, len(ids)), pa.float32()),
        "shop_id": np.concatenate([rng.integers(0, 10, n_products + n_videos + 20), l_shop]),
        "product_id": pa.array([None] * n_products + v_prod.tolist() + [None] * (20 + n_lives), pa.int64())})
    # each live-stream sells 3 products of one category per segment; the category changes with segments
    rows = []
    seg_cat = rng.integers(0, n_cat, (n_lives, 3))
    for li, lid in enumerate(l_ids):
        for s in range(3):
            pool = p_ids[p_cat == seg_cat[li, s]]
            for p in rng.choice(pool, 3, replace=False):
                rows.append((int(lid), int(p), s * 1000, (s + 1) * 1000))
    sched = pa.table({k: pa.array(v, pa.int64()) for k, v in
                      zip(("live_id", "product_id", "start_ts", "end_ts"), zip(*rows))})
    # users like one category: they click products of it, and live-streams selling it
    u_cat = rng.integers(0, n_cat, n_users)
    ev = []
    req = 0
    for u in range(n_users):
        for ts in np.sort(rng.integers(0, 3000, 30)):
            seg = int(ts) // 1000
            if rng.random() < 0.5:
                pool = p_ids[p_cat == u_cat[u]]
                ev.append((req, u, int(ts), "product_card", int(rng.choice(pool)), 1))
            else:
                good = l_ids[seg_cat[:, seg] == u_cat[u]]
                lid = int(rng.choice(good)) if len(good) and rng.random() < 0.8 else int(rng.choice(l_ids))
                ev.append((req, u, int(ts), "live_stream", lid, 1))
            req += 1
    r, u, t, sc, it, c = zip(*ev)
    events = pa.table({"request_id": pa.array(r, pa.int64()), "user_id": pa.array(u, pa.int64()),
                       "ts": pa.array(t, pa.int64()), "scenario": sc, "item_id": pa.array(it, pa.int64()),
                       "click": pa.array(c, pa.int8()), "order": pa.array([0] * len(r), pa.int8()),
                       "gmv": pa.array([0.0] * len(r), pa.float32()), "watch_s": pa.nulls(len(r), pa.float32())})
    data = root / "data" / "fx"
    for name, table in (("items", items), ("live_schedule", sched), ("events", events)):
        write_table(data, name, table)
    return tok, data


def _args(root: Path, tok: Path, data: Path, *extra: str) -> list[str]:
    return ["--data.tokenizer_dir", str(tok), "--data.data_dir", str(data), "--data.kmeans_sizes", "[16, 16]",
            "--data.cache_dir", str(root / "runs" / "prepared"), "--data.live.epochs", "3",
            "--data.live.batch_size", "64", "--data.live.accelerator", "cpu", "--data.live.at", "500",
            "--model.fsq_bits", "6", "--model.hidden", "64", "--data.batch_size", "32", "--model.artifacts_root", str(root / "artifacts"),
            "--trainer.max_epochs", "12", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root / "runs"),
            "--seed_everything", "0", *extra]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from onemall_pl.quantize import main

    root = tmp_path_factory.mktemp("q")
    tok, data = make_world(root)
    main(["fit", "-c", "configs/quantize/tiny.yaml", *_args(root, tok, data)])
    main(["export", "-c", "configs/quantize/tiny.yaml", *_args(root, tok, data)])
    return root, tok, data, root / "artifacts" / "fx" / "quantize"


def test_export_artifact(fitted):
    _root, tok, _data, art = fitted
    m = load_manifest(art, stage="quantize")
    assert m.sizes["codebook_sizes"] == [16, 16, 64] and m.sizes["num_levels"] == 3
    sid = pq.read_table(m.file("sid_table"))
    assert sid.schema.field("sid").type == pa.list_(pa.int32())
    types = sid.column("item_type").to_pylist()
    assert types.count("product") == 500 and types.count("video") == 200 and types.count("live") == 30
    assert 7000 not in set(sid.column("item_id").to_pylist())  # entertainment videos get no SID
    assert m.metrics["inputs"]["skipped_entertainment_videos"] == 20
    coll = m.metrics["collisions"]
    for k in ("overall", "product", "video", "live"):
        assert 0 <= coll[k]["conflict_rate"] <= 1 and 0 < coll[k]["exclusive_rate"] <= 1
        assert [lv["codebook_size"] for lv in coll[k]["levels"]] == [16, 16, 64]
        assert all(1 <= lv["perplexity"] <= lv["codebook_size"] for lv in coll[k]["levels"])
    # 40 planted near-duplicate products cannot all be told apart
    assert coll["product"]["conflict_rate"] > 0
    # reverse map covers every item once, ranked by clicks then id
    rev = pq.read_table(m.file("sid_items")).to_pylist()
    assert sum(len(r["item_ids"]) for r in rev) == sid.num_rows
    for r in rev:
        key = [(-s, i) for s, i in zip(r["scores"], r["item_ids"])]
        assert key == sorted(key)
    assert m.upstream["tokenizer"] == load_manifest(tok).id


def test_fsq_lowers_conflict_table5(fitted):
    from onemall_pl.quantize import ablate

    root, _, _, art = fitted
    res = ablate(art, out=root / "reports")
    km, fsq = res["rows"]["ResKmeans"]["overall"], res["rows"]["ResKmeans+FSQ"]["overall"]
    assert fsq["conflict"] < km["conflict"]
    assert (root / "reports" / "table5.md").exists()
    assert json.loads((root / "reports" / "table5.json").read_text())["codebook_sizes"] == [16, 16, 64]


def test_predict_new_items_without_retraining(fitted, tmp_path):
    from onemall_pl.quantize import predict, read_sid_table

    _, _, _, art = fitted
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, D)).astype(np.float32)
    f = tmp_path / "new.parquet"
    pq.write_table(_emb_table([1, 2, 3], ["product", "product", "video"], x, [None, None, 1]), f)
    before = load_manifest(art).id
    out = predict(art, f, tmp_path / "sids.parquet")
    assert out.column("item_id").to_pylist() == [1, 2, 3]
    sizes = load_manifest(art).sizes["codebook_sizes"]
    for s in out.column("sid").to_pylist():
        assert len(s) == 3 and all(0 <= c < k for c, k in zip(s, sizes))
    assert load_manifest(art).id == before and read_sid_table(art).num_rows == 730
    # a known product's embedding gets its own SID back
    sid = read_sid_table(art).to_pylist()
    emb = pq.read_table(load_manifest(art).config["data"]["tokenizer_dir"] + "/embeddings").slice(0, 1)
    pq.write_table(emb, tmp_path / "known.parquet")
    assert predict(art, tmp_path / "known.parquet").column("sid").to_pylist()[0] == sid[0]["sid"]


def test_bad_embeddings_clear_error(fitted, tmp_path):
    from onemall_pl.quantize import predict

    _, _, _, art = fitted
    x = np.ones((2, D), np.float32)
    x[1, 3] = np.nan
    pq.write_table(_emb_table([11, 12], ["product"] * 2, x, [None, None]), tmp_path / "nan.parquet")
    with pytest.raises(ValueError, match="item_id 12 .*NaN"):
        predict(art, tmp_path / "nan.parquet")
    pq.write_table(_emb_table([11], ["product"], np.ones((1, D + 1), np.float32), [None]), tmp_path / "dim.parquet")
    with pytest.raises(ValueError, match="item_id 11 .*dimension 17, expected 16"):
        predict(art, tmp_path / "dim.parquet")


def test_refresh_live_changes_sid_with_products(fitted, tmp_path):
    from onemall_pl.quantize import read_sid_table, refresh_live

    _, _, _, art = fitted
    out1, out2 = tmp_path / "at500", tmp_path / "at2500"
    refresh_live(art, 500, out=out1)
    refresh_live(art, 2500, out=out2)  # every live-stream sells other products then
    t1 = {r["item_id"]: r["sid"] for r in read_sid_table(out1).to_pylist() if r["item_type"] == "live"}
    t2 = {r["item_id"]: r["sid"] for r in read_sid_table(out2).to_pylist() if r["item_type"] == "live"}
    base = {r["item_id"]: r["sid"] for r in read_sid_table(art).to_pylist() if r["item_type"] == "live"}
    assert t1 == base  # fitted at 500: same products, same SIDs
    assert sum(t1[i] != t2[i] for i in t1) > len(t1) // 2
    m2 = load_manifest(out2, stage="quantize")
    assert m2.metrics["live_at"] == 2500 and m2.metrics["live_changed"] > 0
    assert m2.id != load_manifest(out1).id


def test_twotower_index_of_live_streams(fitted, tmp_path):
    import faiss

    from onemall_pl.twotower import main

    _, _, _, art = fitted
    main(["index", "--artifact", str(art), "--at", "2500", "--out", str(tmp_path / "live.faiss")])
    index = faiss.read_index(str(tmp_path / "live.faiss"))
    assert index.ntotal == 30
    _, ids = index.search(np.ones((1, index.d), np.float32), 5)
    assert set(ids[0].tolist()) <= set(range(9000, 9030))
