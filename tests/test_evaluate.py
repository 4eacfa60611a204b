"""``onemall evaluate compare`` (paper Table 2): SASRec, TIGER and OneMall from their artifacts, replayed on
the same held-out requests of the micro world, end to end; and the tables' layout."""

from pathlib import Path

import lightning.pytorch as pl
import pytest

from onemall_pl.artifacts import load_manifest
from onemall_pl.evaluate import compare, compare_tables
from test_pretrain import fixture_sid_artifact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """micro world -> quantize (fixture) -> pretrain, sasrec, rqvae -> tiger, each trained briefly."""
    from onemall_pl.baselines import rqvae, sasrec, tiger
    from onemall_pl.data import build as B
    from onemall_pl.data.synth import generate
    from onemall_pl.models.decoder import OneMallConfig
    from onemall_pl.pretrain import PretrainModule, SamplesDataModule

    root = tmp_path_factory.mktemp("compare")
    d, art = root / "micro", root / "artifacts"
    generate(d, preset="micro", seed=0)
    B.build(d, max_exposure=64, max_click=16, max_order=8)
    q = fixture_sid_artifact(d, art / "micro" / "quantize")
    pl.seed_everything(0)
    dm = SamplesDataModule(str(d), str(q), batch_size=32, eval_batch_size=64, max_exposure=12, max_click=8,
                           max_order=4, max_targets=4)
    pre = PretrainModule(net=OneMallConfig(dim=32, n_heads=4, ffn_hidden=64, item_dim=16, n_queries=2, emb_dim=16),
                         sizes=dm.sizes, sid_source=dm.sid_source, lr=3e-3, warmup_steps=5, beam=50, hr_k=(5, 50),
                         beam_requests=16)
    t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root / "runs", num_sanity_val_steps=0, max_steps=40,
                   limit_val_batches=0)
    t.fit(pre, datamodule=dm)
    pre.export_artifact(t, dm, art / "micro" / "pretrain")
    run = ["--trainer.default_root_dir", str(root / "runs"), "--trainer.max_epochs", "1",
           "--trainer.limit_val_batches", "0"]
    sas = ["-c", str(ROOT / "configs/sasrec/tiny.yaml"), "--data.dataset", str(d), "--model.artifacts", str(art),
           "--model.d_model", "16", "--model.n_layers", "1", "--data.max_len", "10", *run]
    sasrec.main(["fit", *sas])
    sasrec.main(["export", *sas, "--ckpt_path", "null"])
    rq = ["-c", str(ROOT / "configs/rqvae/tiny.yaml"), "--data.dataset", str(d), "--data.artifacts", str(art),
          "--model.codebook_sizes", "[8, 8, 8]", *run]
    rqvae.main(["fit", *rq])
    rqvae.main(["export", *rq])
    tg = ["-c", str(ROOT / "configs/tiger/tiny.yaml"), "--data.dataset", str(d), "--data.artifacts", str(art),
          "--model.beam", "50", "--model.hr_k", "[5, 50]", "--model.d_model", "32", "--model.n_layers", "1",
          "--data.eval_limit", "8", *run]
    tiger.main(["fit", *tg])
    tiger.main(["export", *tg, "--ckpt_path", "null"])
    return d, art


@pytest.mark.slow
def test_compare_end_to_end(world):
    d, art = world
    out = compare(d, art, hr_k=(5, 50), beam=50, requests=24, batch_size=8)
    res = out["compare"]
    assert set(res) == {"SASRec", "TIGER", "OneMall"}
    for name, r in res.items():
        assert r["table2"]["requests"]["overall"] == 24, name  # the same requests for every model
        assert 0.0 <= r["table2"]["overall"]["HR@5"] <= r["table2"]["overall"]["HR@50"] <= 1.0
        assert "literature" not in r  # the micro world is split by time, not leave-one-out
    # per-scenario counts agree across models
    counts = {name: r["table2"]["requests"] for name, r in res.items()}
    assert len({tuple(sorted(c.items())) for c in counts.values()}) == 1
    m = load_manifest(art / "micro" / "evaluate", stage="evaluate")
    assert "compare.md" in m.files and m.metrics["compare"]["TIGER"]["table2"] == res["TIGER"]["table2"]
    assert {"sasrec", "tiger", "pretrain"} <= set(m.upstream)


def test_tables_layout():
    row = {"HR@50": 0.25, "HR@100": 0.5, "NDCG@5": 0.1, "NDCG@10": 0.2, "HR@5": 0.2, "HR@10": 0.3}
    res = {m: {"table2": {"product_card": row, "overall": row, "requests": {"overall": 3, "product_card": 3}},
               "literature": {"overall": row}} for m in ("SASRec", "OneMall")}
    md = compare_tables(res, (50, 100), (5, 10), "toy", "test")
    assert "| product_card | SASRec | 25.0% | 50.0% |" in md and "|  | OneMall | 25.0% | 50.0% |" in md
    assert "| SASRec | 0.2000 | 0.3000 | 0.1000 | 0.2000 |" in md
