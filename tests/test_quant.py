"""Quantizers: Res-Kmeans, the binary FSQ level, collision stats, live-stream SIDs (fast, CPU)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from onemall_pl.quant import (
    FSQConfig,
    ResKMeans,
    SIDTokenizer,
    check_embeddings,
    collision_stats,
    reverse_map,
    stats_by_type,
)


def clustered(n=1500, d=16, k=20, seed=0, dups=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, d))[rng.integers(0, k, n)] * 3 + rng.normal(size=(n, d))
    if dups:
        x[-dups:] = x[rng.integers(0, n - dups, dups)] + 1e-3 * rng.normal(size=(dups, d))
    return x.astype(np.float32)


def test_reskmeans_deterministic_for_a_seed():
    x = clustered()
    a = ResKMeans([16, 16], seed=3).fit(x)
    b = ResKMeans([16, 16], seed=3).fit(x)
    c = ResKMeans([16, 16], seed=4).fit(x)
    assert all(np.array_equal(p, q) for p, q in zip(a.centroids, b.centroids))
    assert np.array_equal(a.encode(x)[0], b.encode(x)[0])
    assert not np.array_equal(a.centroids[0], c.centroids[0])


def test_reskmeans_residual_shrinks_and_torch_encoder_agrees():
    x = clustered()
    q = ResKMeans([16, 16, 16]).fit(x)
    codes, r = q.encode(x)
    assert codes.shape == (len(x), 3) and codes.dtype == np.int32
    assert ((x - q.decode(codes)) ** 2).sum() < 0.5 * ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(r, x - q.decode(codes), atol=1e-4)
    tok = SIDTokenizer(x.shape[1], [16, 16, 16])
    tok.set_codebooks(q.centroids)
    assert (tok.encode(torch.from_numpy(x)).numpy() == codes).mean() > 0.999


def test_reskmeans_errors():
    with pytest.raises(ValueError, match="at least as many points"):
        ResKMeans([64]).fit(clustered(n=30))
    with pytest.raises(ValueError, match="codebook_sizes"):
        ResKMeans([])


def test_bad_embeddings_name_the_item():
    x = np.ones((4, 8), np.float32)
    x[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"item_id 12 \(row 2\) has a NaN"):
        check_embeddings(x, ids=np.array([10, 11, 12, 13]))
    with pytest.raises(ValueError, match="dimension 8 does not match .* 16"):
        check_embeddings(np.ones((2, 8)), dim=16)
    tok = SIDTokenizer(16, [4])
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        tok.encode(torch.ones(2, 8))


def test_read_embeddings_wrong_dim_and_nan(tmp_path):
    from onemall_pl.quantize import read_embeddings

    def write(rows):
        pq.write_table(pa.table({"item_id": pa.array([1, 2], pa.int64()), "item_type": ["product"] * 2,
                                 "embedding": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "e.parquet")
        return tmp_path / "e.parquet"

    with pytest.raises(ValueError, match=r"item_id 2 \(row 1\) has an embedding of dimension 3, expected 4"):
        read_embeddings(write([[0.0] * 4, [0.0] * 3]), 4)
    with pytest.raises(ValueError, match=r"item_id 1 \(row 0\) has a NaN"):
        read_embeddings(write([[float("nan")] * 4, [0.0] * 4]), 4)


def test_fsq_codes_straight_through_and_deterministic():
    torch.manual_seed(0)
    f1 = SIDTokenizer(8, [4], FSQConfig(8, bits=5, hidden=16)).fsq
    torch.manual_seed(0)
    f2 = SIDTokenizer(8, [4], FSQConfig(8, bits=5, hidden=16)).fsq
    r = torch.randn(64, 8)
    out = f1(r)
    assert torch.equal(out["codes"], f2(r)["codes"]) and out["codes"].max() < 32 and out["codes"].min() >= 0
    assert set(out["bits"].detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal((out["bits"].detach().long() * 2 ** torch.arange(5)).sum(-1), out["codes"])
    f1.loss(out)["loss"].backward()
    assert f1.encoder[0].weight.grad is not None and f1.encoder[0].weight.grad.abs().sum() > 0


def _train_fsq(tok, x, steps=300, seed=0):
    torch.manual_seed(seed)
    _, r = tok.residual(x)
    tok.fsq.set_stats(r)
    opt = torch.optim.AdamW(tok.fsq.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(r), (128,))
        loss = tok.fsq.loss(tok.fsq(r[idx]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fsq_last_level_lowers_conflicts_vs_kmeans():
    """Table 5 in miniature: same first levels, a last level of 2**6 codes by k-means or by FSQ."""
    x = clustered(n=1500, d=16, k=20)
    km = ResKMeans([16, 16, 64]).fit(x)
    base = collision_stats(km.encode(x)[0], [16, 16, 64])
    tok = SIDTokenizer(16, [16, 16], FSQConfig(16, bits=6, hidden=64))
    tok.set_codebooks(km.centroids[:2])
    xt = torch.from_numpy(x)
    _train_fsq(tok, xt)
    fsq = collision_stats(tok.encode(xt).numpy(), [16, 16, 64])
    assert fsq["conflict_rate"] < base["conflict_rate"], (fsq, base)
    assert fsq["exclusive_rate"] > base["exclusive_rate"]
    # frozen: a new item gets a valid SID without retraining, and the codebooks are untouched
    before = [c.clone() for c in tok.codebooks()]
    new = tok.encode(torch.randn(5, 16))
    assert new.shape == (5, 3) and (new >= 0).all() and (new < torch.tensor([16, 16, 64])).all()
    assert all(torch.equal(a, b) for a, b in zip(before, tok.codebooks()))


def test_collision_stats_by_hand():
    codes = np.array([[0, 1], [0, 1], [1, 2], [2, 0]])
    s = collision_stats(codes, [3, 4])
    assert s["conflict_rate"] == 0.5 and s["exclusive_rate"] == pytest.approx(2 / 3)
    assert s["num_sids"] == 3 and s["max_items_per_sid"] == 2
    lv0, lv1 = s["levels"]
    assert lv0["used"] == 3 and lv0["utilisation"] == 1.0
    assert lv1["used"] == 3 and lv1["utilisation"] == 0.75
    p = np.array([2, 1, 1]) / 4
    assert lv0["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    # a product and a video with the same codes do not collide (one SID space per type)
    by = stats_by_type(codes, np.array(["product", "product", "video", "product"]), [3, 4])
    assert by["overall"]["conflict_rate"] == 0.5 and by["video"]["conflict_rate"] == 0.0
    by = stats_by_type(codes, np.array(["product", "video", "video", "product"]), [3, 4])
    assert by["overall"]["conflict_rate"] == 0.0 and by["overall"]["exclusive_rate"] == 1.0


def test_reverse_map_ranks_by_popularity_then_id():
    ids = np.array([5, 3, 9, 7])
    codes = np.array([[0, 1], [0, 1], [0, 1], [2, 2]])
    t = reverse_map(ids, np.array(["product"] * 4), codes, popularity=np.array([1.0, 1.0, 4.0, 0.0]))
    rows = {tuple(r["sid"]): r for r in t.to_pylist()}
    assert rows[(0, 1)]["item_ids"] == [9, 3, 5] and rows[(0, 1)]["scores"] == [4.0, 1.0, 1.0]
    assert rows[(2, 2)]["item_ids"] == [7]
    assert t.schema.field("sid").type == pa.list_(pa.int32())


def test_live_sid_changes_with_selling_products():
    from onemall_pl.models.twotower import FeatureTower, TowerConfig
    from onemall_pl.quantize import LiveWorld, live_vectors

    rng = np.random.default_rng(0)
    n_p, n_l = 200, 40
    p_ids = np.arange(100, 100 + n_p)
    l_ids = np.arange(1000, 1000 + n_l)
    ids = np.concatenate([p_ids, l_ids])
    items = pa.table({"item_id": ids, "item_type": ["product"] * n_p + ["live"] * n_l,
                      "category": [[int(i % 7), int(i % 11), int(i % 13)] for i in ids],
                      "shop_id": rng.integers(0, 5, len(ids))})
    rows = [(int(lv), int(p), s * 100, (s + 1) * 100) for lv in l_ids for s in range(2)
            for p in rng.choice(p_ids, 3, replace=False)]
    sched = pa.table({k: pa.array(v, pa.int64()) for k, v in
                      zip(("live_id", "product_id", "start_ts", "end_ts"), zip(*rows))})
    codes = {int(p): rng.integers(0, 8, 2) for p in p_ids}
    world = LiveWorld(items, sched, codes, [8, 8], max_products=4)
    assert world.selling(int(l_ids[0]), 50).tolist() == [r[1] for r in rows[:3]]
    torch.manual_seed(0)
    tower = FeatureTower(TowerConfig(world.fields(), 16, 32, 8)).eval()
    snaps = world.snapshot_times()
    x = live_vectors(tower, world, np.array([s[0] for s in snaps]), np.array([s[1] for s in snaps]))
    tok = SIDTokenizer(8, [8, 8])
    tok.set_codebooks(ResKMeans([8, 8]).fit(x).centroids)

    def sids(ts):
        return tok.encode(torch.from_numpy(live_vectors(tower, world, l_ids, np.full(n_l, ts)))).numpy()

    a, a2, b = sids(50), sids(99), sids(150)
    assert np.array_equal(a, a2)  # same products on sale: same SID
    assert (a != b).any(1).mean() > 0.5  # other products: the SID moves
