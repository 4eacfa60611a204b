from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from onemall_pl.artifacts import load_manifest
from onemall_pl.baselines.rqvae import add_collision_suffix, live_stream_embeddings, main, read_sid_table
from onemall_pl.data.schema import DatasetInfo
from onemall_pl.io import read_table, write_dataset_info, write_table
from onemall_pl.models.tiger import RQVAE, RQVAEConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_items_dataset(tmp_path):
    """120 items whose titles come from 6 topics: the text embeddings cluster."""
    import pyarrow as pa

    topics = ["red running shoes", "wireless earbuds", "organic green tea", "leather wallet", "kids lego set",
              "stainless steel pan"]
    n = 120
    items = pa.table({"item_id": pa.array(np.arange(100, 100 + n), pa.int64()),
                      "item_type": ["product"] * n,
                      "title": [f"{topics[i % 6]} model {i}" for i in range(n)],
                      "text": [None] * n, "images": pa.nulls(n, pa.list_(pa.binary())),
                      "category": pa.array([[i % 6] for i in range(n)], pa.list_(pa.int32())),
                      "price": pa.array(np.ones(n), pa.float32()), "shop_id": pa.array(np.zeros(n), pa.int64()),
                      "product_id": pa.nulls(n, pa.int64())})
    d = tmp_path / "toy"
    d.mkdir()
    write_table(d, "items", items)
    write_dataset_info(d, DatasetInfo(name="toy", source="import", tables={"items": n}))
    return d


def clustered(n=400, d=24, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 2
    return centres[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def test_rqvae_beats_its_kmeans_initialisation():
    torch.manual_seed(0)
    x = clustered()
    m = RQVAE(RQVAEConfig(in_dim=24, hidden=[64, 32], latent_dim=8, codebook_sizes=[16, 8, 8]))
    m.quantizer.kmeans_init(m.encoder(x[:256]))
    m.eval()
    with torch.no_grad():
        at_init = float(m(x)["recon"])
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(300):
        out = m(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        after = m(x)
    assert float(after["recon"]) < 0.5 * at_init
    assert float(after["recon"]) < float(x.var(0).sum())  # better than predicting the mean
    assert len(torch.unique(after["codes"][:, 0])) >= 8  # the first level did not collapse


def test_collision_suffix_makes_sids_unique():
    codes = np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 2, 3], [0, 0, 1]])
    ids = np.array([50, 10, 7, 30, 8])
    sids = add_collision_suffix(codes, ids)
    assert sids[:, :3].tolist() == codes.tolist()
    assert sids[:, 3].tolist() == [2, 0, 0, 1, 0]  # numbered in item_id order within a group
    assert len({tuple(s) for s in sids.tolist()}) == len(ids)


def test_stage_fit_and_export(tiny_items_dataset, tmp_path):
    art = tmp_path / "artifacts"
    common = ["-c", str(ROOT / "configs/rqvae/tiny.yaml"), "--data.dataset", str(tiny_items_dataset), "--data.artifacts", str(art),
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs", "30",
              "--model.codebook_sizes", "[8, 8, 8]", "--data.batch_size", "64"]
    main(["fit", *common])
    main(["export", *common])
    m = load_manifest(art / tiny_items_dataset.name / "rqvae", stage="rqvae")
    ids, sids = read_sid_table(m)
    assert sids.shape == (len(ids), 4)
    assert len({tuple(s) for s in sids.tolist()}) == len(ids)
    assert m.sizes["codebook_sizes"][:3] == [8, 8, 8] and m.sizes["codebook_sizes"][3] == sids[:, 3].max() + 1
    assert m.metrics["recon_error"] < m.metrics["recon_error_at_kmeans_init"]
    assert m.config["embedding_source"] == "text"
    assert pq.read_table(m.file("sid_table")).num_rows == len(ids)


def test_live_streams_take_the_mean_embedding_of_the_products_they_sell(micro_world):
    """Stage 1 embeds products and videos, not live-streams: RQ-VAE's input for a live-stream is the
    mean of its scheduled products' embeddings, so TIGER tokenizes every item from stage 1."""
    items = read_table(micro_world, "items", columns=["item_id", "item_type"])
    types = np.asarray(items.column("item_type").to_pylist())
    ids = items.column("item_id").to_numpy()[types != "live"]
    emb = np.random.default_rng(0).normal(size=(len(ids), 4)).astype(np.float32)
    all_ids, all_emb = live_stream_embeddings(micro_world, ids, emb)
    lives = set(items.column("item_id").to_numpy()[types == "live"].tolist())
    assert set(all_ids[len(ids):].tolist()) == lives
    sched = read_table(micro_world, "live_schedule", columns=["live_id", "product_id"]).to_pylist()
    live = int(all_ids[len(ids)])
    prods = [r["product_id"] for r in sched if r["live_id"] == live]
    pos = {int(i): r for r, i in enumerate(ids)}
    np.testing.assert_allclose(all_emb[len(ids)], emb[[pos[p] for p in prods]].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(all_emb[:len(ids)], emb)
