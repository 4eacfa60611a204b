"""Stage 1 (tokenizer): data module, InfoNCE, held-out recall, CLI fit / resume / export.

A planted world: groups of items that share a made-up word in their titles and one image
colour; item2item pairs link items of the same group, so a fine-tuned encoder can learn them.
The text backbone is a 2-layer Qwen2 built from a config (random init, MiniLM's tokenizer)
and the frozen vision backbone a narrow Swin at 32x32: the whole file runs in seconds.
"""

import io
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from onemall_pl.artifacts import load_manifest
from onemall_pl.data.schema import DataError
from onemall_pl.io import write_table
from onemall_pl.models.encoder import EncoderConfig
from onemall_pl.tokenizer import (
    Item2ItemDataModule,
    TokenizerModule,
    info_nce,
    load_encoder,
    main,
    pair_recall,
)

TINY_QWEN = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522, "max_position_embeddings": 128}
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
ENCODER = {"text_config": TINY_QWEN, "max_length": 16, "vision_kwargs": TINY_SWIN, "image_size": 32}
WORDS = ["zorvak", "quillet", "brannow", "feltrix", "mokari", "suvelle", "tarrago", "wimbel", "ostrune",
         "plenact", "grivox", "hallumet", "jestori", "kovanti", "lurrish", "narvello", "pexton", "rundal",
         "sombrel", "tivvan", "ulgrest", "vantome", "yorrick", "zephal"]
COMMON = ["soft", "new", "classic", "best", "deal", "cheap", "shop", "style"]


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_world(folder: Path, groups: int = 24, seed: int = 0, titles: bool = True) -> Path:
    """Per group: 3 products + 1 short-video selling the first; plus an entertainment video without
    images and a live-stream. Pairs: product-product (commercial), video-product (watching)."""
    rng = np.random.default_rng(seed)
    rows, pairs = [], []
    for g in range(groups):
        colour = rng.integers(0, 255, 3)
        base = 100 * g
        for j in range(3):
            rows.append({"item_id": base + j, "item_type": "product",
                             "title": f"{WORDS[g]} {' '.join(rng.choice(COMMON, 3))}", "text": None,
                             "images": [_png(colour)], "category": [g % 4, g, g], "price": 9.5, "shop_id": g, "product_id": None})
        rows.append({"item_id": base + 3, "item_type": "video", "title": f"{' '.join(rng.choice(COMMON, 2))} {WORDS[g]}",
                         "text": f"asr {WORDS[g]} review", "images": [_png(colour)] * 8, "category": [g % 4, g, g],
                         "price": 9.5, "shop_id": g, "product_id": base})
        pairs += [(base, base + 1, "commercial"), (base + 1, base + 2, "commercial"),
                  (base, base + 2, "commercial"), (base + 3, base + 1, "watching")]
    rows.append({"item_id": 99_000, "item_type": "video", "title": "funny prank clip", "text": None, "images": None,
                     "category": [9, 9, 9], "price": 0.0, "shop_id": 0, "product_id": None})
    rows.append({"item_id": 99_001, "item_type": "live", "title": "live sale", "text": None, "images": None,
                     "category": [9, 9, 9], "price": 0.0, "shop_id": 0, "product_id": None})
    pairs += [(99_000, 1, "watching"), (1, 0, "commercial")]  # a repeat of (0, 1) in the other order
    items = pa.Table.from_pylist(rows)
    if not titles:
        items = items.drop_columns(["title"])
        pq.write_table(items, (folder / "items").mkdir(parents=True) or folder / "items" / "part-00000.parquet")
    else:
        write_table(folder, "items", items)
    write_table(folder, "item2item", pa.table({"item_a": [p[0] for p in pairs], "item_b": [p[1] for p in pairs],
                                               "relation": [p[2] for p in pairs]}))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("planted") / "planted")


def _dm(world, **kw) -> Item2ItemDataModule:
    dm = Item2ItemDataModule(str(world), encoder=EncoderConfig(**ENCODER), **{"batch_size": 8, **kw})
    dm.setup("fit")
    return dm


def test_split_is_seeded_disjoint_and_embeds_products_and_videos(world):
    dm = _dm(world, eval_fraction=0.25)
    n_items = 24 * 4 + 1
    assert len(dm.items["item_id"]) == n_items and "live" not in dm.items["item_type"]
    key = {tuple(sorted(p[:2])) for p in dm.train_pairs}
    held = {tuple(sorted(p[:2])) for p in dm.eval_pairs}
    assert not key & held and len(key) == len(dm.train_pairs) and len(held) == len(dm.eval_pairs)
    assert len(key) + len(held) == 24 * 4 + 1  # (1, 0) repeats (0, 1): one unordered pair
    again = _dm(world, eval_fraction=0.25)
    assert np.array_equal(again.eval_pairs, dm.eval_pairs)
    other = _dm(world, eval_fraction=0.25, seed=1)
    assert not np.array_equal(other.eval_pairs, dm.eval_pairs)
    assert len(dm.eval_rows) == n_items
    small = _dm(world, eval_fraction=0.25, eval_items=40)
    assert 40 >= len(small.eval_rows) >= len(np.unique(small.eval_pairs[:, :2]))


def test_pairs_batch_holds_both_sides(world):
    dm = _dm(world)
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"]["input_ids"].shape[0] == batch["b"]["input_ids"].shape[0] == 8
    assert batch["a"]["image_counts"].max() <= 6


def test_bad_data_is_named(tmp_path):
    no_titles = make_world(tmp_path / "nt", groups=3, titles=False)
    with pytest.raises(DataError, match="title"):
        _dm(no_titles)
    blank = make_world(tmp_path / "blank", groups=3)
    t = pq.read_table(blank / "items" / "part-00000.parquet")
    t = t.set_column(t.schema.get_field_index("title"), "title", pa.array(["  "] + t["title"].to_pylist()[1:]))
    pq.write_table(t, blank / "items" / "part-00000.parquet")
    with pytest.raises(DataError, match="empty title"):
        _dm(blank)
    unknown = make_world(tmp_path / "unk", groups=3)
    write_table(unknown, "item2item", pa.table({"item_a": [0, 99_001], "item_b": [1, 2],
                                                 "relation": ["commercial", "commercial"]}))
    with pytest.raises(DataError, match="item_a.*row 1|row 1.*99001"):
        _dm(unknown)


def test_pair_recall_exact():
    # 4 items on a circle; pair (0, 1) are nearest neighbours, (0, 2) are opposite
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]])
    r = pair_recall(e, np.array([[0, 1, 0], [0, 2, 1]]), ks=(1, 2))
    # queries: 0->1 hit@1; 1->0 hit@1; 0->2 rank 3 (1, 3 closer); 2->0: order 3? cos(2,3)=0 > cos(2,0)=-1 -> miss
    assert r["recall@1"] == 0.5 and r["commercial/recall@1"] == 1.0 and r["watching/recall@2"] == 0.0


def test_infonce_masks_repeated_items():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ids = torch.tensor([1, 2, 3, 4])
    loss, _ = info_nce(z, z, z, z, ids, ids + 10, ids, ids + 10, 0, 10.0)
    assert torch.isfinite(loss) and loss > 0
    # the same positive item in every column: no negatives left -> loss 0
    same = torch.tensor([5, 5, 5, 5])
    loss, acc = info_nce(z, z, z, z, ids, same, ids, same, 0, 10.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and acc.item() == 1.0
    # a rank's rows start at its offset in the gathered batch
    g = torch.cat([torch.nn.functional.normalize(torch.randn(4, 8), dim=1), z])
    gid = torch.cat([ids + 100, ids])
    l1, _ = info_nce(z, z, g, g, ids, ids, gid, gid, 4, 10.0)
    l0, _ = info_nce(z, z, torch.cat([z, g[:4]]), torch.cat([z, g[:4]]), ids, ids, torch.cat([ids, ids + 100]),
                     torch.cat([ids, ids + 100]), 0, 10.0)
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5)


def test_loss_decreases_on_planted_pairs(world):
    torch.manual_seed(0)
    dm = _dm(world, batch_size=16)
    m = TokenizerModule(EncoderConfig(**ENCODER), lr=3e-3, projector_lr=3e-3)
    m.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    batches = list(dm.train_dataloader())

    def mean_loss():
        m.eval()
        with torch.no_grad():
            return float(np.mean([m.contrastive(b["a"], b["b"])[0].item() for b in batches]))

    before = mean_loss()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    for _ in range(6):
        for b in batches:
            loss, _ = m.contrastive(b["a"], b["b"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = mean_loss()
    assert after < 0.7 * before, (before, after)
    assert all(not p.requires_grad for p in m.encoder.vision.parameters())
    assert not m.encoder.vision.training


def _config(tmp_path: Path, world: Path, **trainer) -> Path:
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "logger": False,
                       "enable_progress_bar": False, "enable_model_summary": False,
                       "default_root_dir": str(tmp_path / "run"), **trainer},
           "model": {"encoder": ENCODER, "lr": 1e-3, "projector_lr": 1e-3, "artifacts_root": str(tmp_path / "art")},
           "data": {"data_dir": str(world), "batch_size": 8, "eval_fraction": 0.2}}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_cli_fit_resume_export(world, tmp_path):
    cfg = _config(tmp_path, world)
    main(["fit", "-c", str(cfg), "--ckpt_path", "last"])  # no checkpoint yet: starts from scratch
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    before = state["state_dict"]["recall_before"]
    assert torch.isfinite(before[0]).all()
    # resume: the step count continues, the "before" of the first start is kept
    main(["fit", "-c", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "9"])
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 9 and torch.equal(state["state_dict"]["recall_before"], before)

    main(["export", "-c", str(cfg)])
    out = tmp_path / "art" / world.name / "tokenizer"
    m = load_manifest(out, stage="tokenizer")
    emb = pq.read_table(out / "embeddings")
    ids = emb["item_id"].to_pylist()
    assert sorted(ids) == sorted([100 * g + j for g in range(24) for j in range(4)] + [99_000])  # once each
    vec = np.stack(emb["embedding"].to_numpy(zero_copy_only=False))
    assert vec.shape == (len(ids), 32) and np.isfinite(vec).all()
    assert m.sizes["embedding_dim"] == 32 and m.sizes["num_items"] == len(ids)
    assert set(m.metrics["before"]) == set(m.metrics["after"]) >= {"recall@10", "recall@50"}
    assert m.metrics["before"]["recall@10"] == pytest.approx(float(before[0, 0]))
    vid = emb.filter(pa.compute.equal(emb["item_id"], 3))
    assert vid["product_id"].to_pylist() == [0] and vid["item_type"].to_pylist() == ["video"]
    # the saved encoder reproduces the exported embeddings
    enc, proc = load_encoder(out)
    items = pq.read_table(world / "items").to_pylist()[:5]
    with torch.no_grad():
        again = enc(**proc(items)).numpy()
    row = {i: k for k, i in enumerate(ids)}
    np.testing.assert_allclose(again, vec[[row[it["item_id"]] for it in items]], atol=1e-4)
    assert json.loads((out / "encoder.json").read_text())["image_size"] == 32


def test_export_without_checkpoint_measures_initial_weights(world, tmp_path):
    cfg = _config(tmp_path, world)
    main(["export", "-c", str(cfg), "--ckpt_path", "null", "--out", str(tmp_path / "base")])
    m = load_manifest(tmp_path / "base", stage="tokenizer")
    assert m.metrics["before"] == m.metrics["after"] and 0 <= m.metrics["after"]["recall@50"] <= 1


def test_missing_model_path_is_a_clear_error(world, tmp_path):
    with pytest.raises(ValueError, match="no such model folder"):
        TokenizerModule(EncoderConfig(text_model=str(tmp_path / "nope")))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_cpu_ranks_gather_negatives(world, tmp_path):
    """DDP on gloo with 2 processes: in-batch negatives and the "before" embeddings are gathered."""
    import os
    import subprocess
    import sys

    cfg = _config(tmp_path, world, max_steps=3)
    ddp = Path(__file__).resolve().parents[1] / "configs" / "trainer" / "ddp.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "onemall_pl.tokenizer", "fit", "-c", str(cfg), "-c", str(ddp),
                        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "3",
                        "--trainer.default_root_dir", str(tmp_path / "run")],
                       check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and torch.isfinite(state["state_dict"]["recall_before"][0]).all()
    # the items embedded rank by rank come back in order: same "before" as a single process
    main(["fit", "-c", str(cfg), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "one")])
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(one["state_dict"]["recall_before"], state["state_dict"]["recall_before"])


def test_predict_embeds_every_item_once(world):
    dm = _dm(world)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    out = trainer.predict(TokenizerModule(EncoderConfig(**ENCODER)), datamodule=dm)
    ids = torch.cat([o["item_id"] for o in out]).tolist()
    emb = torch.cat([o["embedding"] for o in out])
    assert sorted(ids) == sorted(dm.items["item_id"]) and len(set(ids)) == len(ids)
    assert emb.shape == (len(ids), 32) and torch.isfinite(emb).all()
