"""The stages under ``configs/trainer/ddp.yaml`` on 2 CPU processes (gloo), on micro worlds built
here: quantize, rl and the baselines sasrec, rqvae, tiger (reward's test is tests/test_ddp.py's,
pretrain's and tokenizer's are beside their stages).

Per stage: every training row is given to exactly one rank per epoch (up to the few rows that
even out the shares or fall in a dropped last batch), both ranks end with the same weights, and
the artifact, exported from inside the DDP world by every rank, is written by rank 0 alone.

The two processes start once (:func:`test_ddp.fit_stages_ddp`: each rank runs the stages' CLIs
one after the other), as importing the stack costs more than these runs; the launch through the
command line, with Lightning re-launching it, is covered by the reward test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onemall_pl.artifacts import load_manifest, write_artifact
from test_ddp import ROOT, assert_disjoint_shares, fit_stages_ddp, row_digests, row_keys

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ONE_EPOCH = ["--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1",
             "--trainer.max_steps", "-1"]


def _rows(loader, paths) -> list[tuple[str, ...]]:
    """Every row of a one-process pass over ``loader``, keyed as :func:`test_ddp.row_keys`."""
    return [k for b in loader for k in row_keys(row_digests(b), paths)]


def _item_embeddings(data: Path, out: Path, dim: int = 16) -> Path:
    """A tokenizer artifact with a random embedding per item (the RQ-VAE's input, no text model)."""
    from onemall_pl.io import read_table

    ids = read_table(data, "items", ["item_id"], validate=False).column("item_id")
    x = np.random.default_rng(0).normal(size=(len(ids), dim)).astype(np.float32)
    t = pa.table({"item_id": ids, "embedding": pa.array(list(x), pa.list_(pa.float32()))})

    def build(tmp: Path) -> None:
        (tmp / "embeddings").mkdir()
        pq.write_table(t, tmp / "embeddings" / "part-00000.parquet")

    write_artifact(out, build, stage="tokenizer", dataset=data.name, sizes={"embedding_dim": dim})
    return out


def _rl_upstream(d: Path, art: Path, runs: Path) -> None:
    """quantize (category SIDs), pretrain and reward artifacts beside each other, briefly trained."""
    import lightning.pytorch as pl

    from onemall_pl.models.decoder import OneMallConfig
    from onemall_pl.models.ranking import Config
    from onemall_pl.pretrain import PretrainModule, SamplesDataModule
    from onemall_pl.reward import EventsDataModule, RewardModule
    from test_pretrain import fixture_sid_artifact

    def trainer(root, **kw):
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                          num_sanity_val_steps=0, limit_val_batches=0, **kw)

    q = fixture_sid_artifact(d, art / "quantize")
    pl.seed_everything(0)
    dm = SamplesDataModule(str(d), str(q), batch_size=16, eval_batch_size=32, max_exposure=8, max_click=8,
                           max_order=4, max_targets=2)
    pre = PretrainModule(net=OneMallConfig(dim=16, n_heads=2, ffn_hidden=32, item_dim=8, n_queries=2, emb_dim=8),
                         sizes=dm.sizes, sid_source=dm.sid_source, warmup_steps=1, beam=20, hr_k=(5, 20),
                         beam_requests=8)
    t = trainer(runs / "pretrain", max_steps=2)
    t.fit(pre, datamodule=dm)
    pre.export_artifact(t, dm, art / "pretrain")
    edm = EventsDataModule(str(d), max_exposure=8, max_click=8, max_order=4, batch_size=256, eval_batch_size=1024)
    rew = RewardModule(net=Config(d_emb=4, d_model=8, attn_hidden=8, tower_hidden=[8]), sizes=edm.sizes)
    t = trainer(runs / "reward", max_steps=2)
    t.fit(rew, datamodule=edm)
    rew.export_artifact(t, edm, art / "reward")


@pytest.fixture(scope="module")
def runs(micro_world, tmp_path_factory):
    """The inputs of every stage, then the five fits on one 2-rank world; ``{stage: (records, out, inputs)}``."""
    from test_quantize_stage import _args as quantize_args
    from test_quantize_stage import make_world

    root = tmp_path_factory.mktemp("ddp_stages")
    d, art = micro_world, root / "artifacts"
    _item_embeddings(d, art / "micro" / "tokenizer")
    _rl_upstream(d, art / "micro", root / "upstream")
    qroot = root / "q"
    tok, qdata = make_world(qroot, n_products=300, n_videos=100, n_lives=12, n_users=60)
    out = {s: root / s for s in ("sasrec", "rqvae", "tiger", "quantize", "rl")}
    run = lambda s: str(root / "run" / s)
    stages = [
        ("sasrec", ["-c", str(ROOT / "configs/sasrec/tiny.yaml"), *ONE_EPOCH, "--data.dataset", str(d),
                    "--trainer.default_root_dir", run("sasrec"), "--model.loss", "in_batch", "--model.d_model", "16",
                    "--model.n_layers", "1", "--data.max_len", "10", "--data.batch_size", "8",
                    "--model.hr_k", "[10, 50]", "--model.ndcg_k", "[10]"]),
        ("rqvae", ["-c", str(ROOT / "configs/rqvae/tiny.yaml"), *ONE_EPOCH, "--trainer.max_epochs", "3",
                   "--data.dataset", str(d), "--data.artifacts", str(art), "--data.source", "tokenizer",
                   "--trainer.default_root_dir", run("rqvae"), "--model.hidden", "[32]", "--model.latent_dim", "8",
                   "--model.codebook_sizes", "[8, 8, 8]", "--data.batch_size", "64"]),
        ("tiger", ["-c", str(ROOT / "configs/tiger/tiny.yaml"), *ONE_EPOCH, "--data.dataset", str(d),
                   "--data.rqvae", str(out["rqvae"] / "artifact"), "--trainer.default_root_dir", run("tiger"),
                   "--data.batch_size", "8", "--model.beam", "20", "--model.hr_k", "[10]", "--model.ndcg_k", "[10]",
                   "--model.d_model", "16", "--model.d_ff", "32", "--model.n_heads", "2", "--model.d_kv", "8",
                   "--model.n_layers", "1", "--model.n_user_tokens", "50", "--model.warmup_steps", "2"]),
        ("quantize", ["-c", str(ROOT / "configs/quantize/tiny.yaml"), *quantize_args(qroot, tok, qdata),
                      *ONE_EPOCH, "--trainer.max_epochs", "2", "--data.live.epochs", "1"]),
        ("rl", ["-c", str(ROOT / "configs/rl/tiny_grpo.yaml"), *ONE_EPOCH, "--data.data_dir", str(d),
                "--data.sid_artifact", str(art / "micro" / "quantize"), "--data.batch_size", "16",
                "--trainer.default_root_dir", run("rl"), "--model.rl.group_size", "8", "--model.rl.grpo_samples", "4",
                "--model.rl.eval_requests", "8", "--model.beam", "20", "--model.hr_k", "[5, 20]",
                "--model.beam_requests", "8", "--model.artifacts_root", str(root / "rl_artifacts")]),
    ]
    seen = fit_stages_ddp([(s, args, out[s], True) for s, args in stages])
    inputs = {"data": d, "artifacts": art, "quantize_world": (qroot, tok, qdata)}
    return {s: (seen[out[s]], out[s], inputs) for s in out}


def test_sasrec(runs):
    """SASRec with the two-tower module's in-batch softmax (negatives gathered across ranks)."""
    from onemall_pl.baselines.sasrec import SequenceData

    seen, out, inputs = runs["sasrec"]
    keys = ("seq", "targets", "scenario")
    want = _rows(SequenceData(inputs["data"], max_len=10, batch_size=64).train_dataloader(), keys)
    assert len(want) > 30
    assert_disjoint_shares(seen, want, keys)
    m = load_manifest(out / "artifact", stage="sasrec")
    assert m.sizes["d_model"] == 16 and 0 <= m.metrics["test"]["overall"]["HR@50"] <= 1


def test_rqvae(runs):
    """RQ-VAE: each rank takes its share of the items, every epoch; the k-means initialisation
    clusters the first batch of both ranks, so the codebooks stay identical (same weights)."""
    from onemall_pl.baselines.rqvae import ItemEmbeddingData, read_sid_table

    seen, out, inputs = runs["rqvae"]
    dm = ItemEmbeddingData(inputs["data"], artifacts=inputs["artifacts"], source="tokenizer", batch_size=4096)
    want = _rows(dm.train_dataloader(), ["0"])
    for e in range(3):  # a rank's epochs are equal thirds of what it was given
        epoch = [{"seen": {k: v[len(v) * e // 3:len(v) * (e + 1) // 3] for k, v in s["seen"].items()}} for s in seen]
        assert_disjoint_shares(epoch, want, ["0"])
    ids, sids = read_sid_table(load_manifest(out / "artifact", stage="rqvae"))
    assert len(ids) == len(want) and len({tuple(s) for s in sids.tolist()}) == len(ids)


def test_tiger(runs):
    """TIGER (the Parquet stream, one training example per target) on the SIDs of the 2-rank RQ-VAE."""
    from onemall_pl.baselines.tiger import TigerData

    seen, out, inputs = runs["tiger"]
    rq = runs["rqvae"][1] / "artifact"
    keys = ("hist_sids", "user", "scenario", "target_sids")
    want = _rows(TigerData(inputs["data"], rqvae=rq, batch_size=1).train_dataloader(), keys)
    # the stream's even shares leave out at most 1 request (its targets: up to max_targets rows)
    assert_disjoint_shares(seen, want, keys, extra=0, missing=16)
    assert load_manifest(out / "artifact", stage="tiger").upstream["rqvae"] == load_manifest(rq).id


def test_quantize(runs):
    """The FSQ levels: each item type's loader sharded by rank (products, the longest, checked: the
    other types cycle within the epoch); the live two-tower is trained once, on rank 0, when
    the data are prepared."""
    from onemall_pl.quantize import QuantizeDataModule

    seen, out, inputs = runs["quantize"]
    qroot, tok, qdata = inputs["quantize_world"]
    dm = QuantizeDataModule(tok, qdata, kmeans_sizes=[16, 16], cache_dir=qroot / "runs" / "prepared")
    dm.setup()
    n = len(dm.inputs["product"][0])
    batch = min(32, n // 2)
    want = [(r,) for r in row_digests([dm.inputs["product"][1]])["0"]]
    for e in range(2):  # drop_last: each rank's tail beyond whole batches is left out
        epoch = [{"seen": {k: v[len(v) * e // 2:len(v) * (e + 1) // 2] for k, v in s["seen"].items()}} for s in seen]
        assert_disjoint_shares(epoch, want, ["product.0"], extra=0, missing=n - 2 * (n // 2 // batch) * batch)
    m = load_manifest(out / "artifact", stage="quantize")
    assert set(m.metrics["collisions"]) >= {"product", "video", "live"}


def test_rl(runs):
    """GRPO post-training: the training stream sharded by rank, the reference synced alike."""
    from onemall_pl.rl import RLDataModule

    seen, out, inputs = runs["rl"]
    art = inputs["artifacts"] / "micro"
    dm = RLDataModule(str(inputs["data"]), str(art / "quantize"), batch_size=1)
    keys = ("scenario", "exposure.sid", "click.sid", "order.sid", "target.item", "raw.seq_click")
    want = _rows(dm.train_dataloader(), keys)
    assert_disjoint_shares(seen, want, keys, extra=0)
    m = load_manifest(out / "artifact", stage="rl")
    assert m.upstream["pretrain"] == load_manifest(art / "pretrain").id and m.metrics["steps"] == seen[0]["steps"]
