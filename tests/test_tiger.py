"""TIGER: the T5 step adapter is exact, the model overfits a tiny set, fit -> export -> replay on the micro world."""

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from onemall_pl.artifacts import load_manifest
from onemall_pl.baselines.sasrec import last_per_user
from onemall_pl.baselines.tiger import TigerData, TigerModule, TigerRetriever, main, tiger_batch
from onemall_pl.data.datasets import ParquetMapDataset
from onemall_pl.metrics import replay
from onemall_pl.models.tiger import TigerConfig, TigerT5
from onemall_pl.retrieval import SIDTrie, beam_search, exhaustive_search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The micro world with its RQ-VAE SIDs (text-embedding fallback: no tokenizer artifact)."""
    from onemall_pl.baselines.rqvae import main as rqvae_main
    from onemall_pl.data.build import build
    from onemall_pl.data.synth import generate

    root = tmp_path_factory.mktemp("tiger")
    data, art = root / "micro", root / "artifacts"
    generate(data, "micro", seed=0)
    build(dataset=data)
    common = ["-c", str(ROOT / "configs/rqvae/tiny.yaml"), "--data.dataset", str(data), "--data.artifacts", str(art),
              "--trainer.default_root_dir", str(root / "rq"), "--trainer.max_epochs", "20",
              "--model.codebook_sizes", "[8, 8, 8]", "--data.batch_size", "512"]
    rqvae_main(["fit", *common])
    rqvae_main(["export", *common])
    return data, art


def test_step_model_is_exact():
    torch.manual_seed(0)
    sizes = [4, 4, 4, 2]
    model = TigerT5(TigerConfig(codebook_sizes=sizes, n_user_tokens=10, d_model=32, d_ff=64, n_heads=2, d_kv=16,
                                n_layers=2, dropout=0.0)).eval()
    for p in model.parameters():  # spread the log-probs so there are no near-ties
        p.data.normal_(0, 0.5)
    sids = torch.unique(torch.stack([torch.randint(0, c, (40,)) for c in sizes], 1), dim=0)
    trie = SIDTrie(sids, torch.arange(len(sids)), sizes)
    ids, mask = model.encoder_inputs(torch.randint(-1, 2, (3, 5, 4)), torch.tensor([1, 2, 3]))
    wide = beam_search(model.beam_model(ids, mask), trie, len(sids))
    exact = exhaustive_search(model.beam_model(ids, mask), trie, 8)
    assert torch.equal(wide.sids[:, :8], exact.sids)
    # the beam's score is the teacher-forced log-likelihood of its SID
    labels = model.sid_tokens(wide.sids[:, 0])
    logits = model.t5(input_ids=ids, attention_mask=mask, labels=labels).logits
    ll = logits.log_softmax(-1).gather(2, labels[..., None])[..., 0].sum(1)
    assert torch.allclose(ll, wide.scores[:, 0], atol=1e-4)


def test_overfits_a_tiny_set(world):
    data_dir, art = world
    torch.manual_seed(0)
    data = TigerData(data_dir, artifacts=art, max_items=10, max_targets=1)
    rows = last_per_user(ParquetMapDataset(data_dir, "samples", filter={"split": "train"}).table)
    rows = rows.filter(pc.greater(pc.list_value_length(rows.column("seq_click")), 0)).slice(0, 16)  # distinct inputs

    batch = tiger_batch(rows, data.catalog, "seq_click", 10, 1, explode=True)
    module = TigerModule(codebook_sizes=data.codebook_sizes, max_items=10, n_user_tokens=100, d_model=32, d_ff=64,
                         n_heads=2, d_kv=16, n_layers=1, dropout=0.0, beam=8, hr_k=(1,), ndcg_k=())
    module.trie = data.trie()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    module.eval()
    eval_b = tiger_batch(rows, data.catalog, "seq_click", 10, 1, explode=False)
    top1 = module.retrieve(eval_b["hist_sids"], eval_b["user"], None, k=1, beam=8)
    assert (top1 == eval_b["targets"]).any(1).float().mean() >= 0.9


def test_fit_export_replay(world, tmp_path):
    data_dir, art = world
    common = ["-c", str(ROOT / "configs/tiger/tiny.yaml"), "--data.dataset", str(data_dir),
              "--data.artifacts", str(art), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--model.beam", "60",
              "--model.hr_k", "[10, 50]", "--model.d_model", "32", "--model.n_layers", "1"]
    main(["fit", *common])
    main(["export", *common])
    m = load_manifest(art / "micro" / "tiger", stage="tiger")
    assert m.upstream["rqvae"] == load_manifest(art / "micro" / "rqvae").id
    retriever = TigerRetriever.from_artifact(art / "micro" / "tiger", data_dir)
    again = replay(retriever, data_dir, "test", hr_k=(10, 50), ndcg_k=(10,), batch_size=16)
    assert again["overall"] == pytest.approx(m.metrics["test"]["overall"])
    rows = TigerData(data_dir, artifacts=art)._eval_loader("test", 4).dataset.table
    top = retriever.retrieve(rows, 20)
    assert (top >= 0).all() and all(len(set(r.tolist())) == 20 for r in top)  # 20 distinct valid items
