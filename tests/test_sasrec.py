"""SASRec: a causal user tower, overfitting a tiny set, fit -> export -> faiss retrieval on the micro world."""

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from onemall_pl.artifacts import load_manifest
from onemall_pl.baselines.sasrec import SASRecModule, SASRecRetriever, SequenceData, last_per_user, main
from onemall_pl.metrics import replay
from onemall_pl.models.sasrec import ItemIdTower, SASRecConfig, SASRecUserTower

ROOT = Path(__file__).resolve().parents[1]


def test_user_tower_is_causal_and_reads_empty_history():
    cfg = SASRecConfig(n_items=10, max_len=6, d_model=16, n_heads=2, dropout=0.0)
    user = SASRecUserTower(cfg, ItemIdTower(10, 16)).eval()
    seq = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 0]])
    h = user.hidden(seq)
    changed = seq.clone()
    changed[1, -1] = 9
    assert torch.equal(h[1, :-1], user.hidden(changed)[1, :-1])  # the future is not read
    assert torch.isfinite(h).all() and user({"seq": seq}).shape == (3, 16)


@pytest.mark.parametrize("loss", ["full", "in_batch"])
def test_overfits_a_tiny_set(micro_world, loss):
    torch.manual_seed(0)
    data = SequenceData(micro_world, max_len=20)
    rows = last_per_user(data.split("train").table)
    rows = rows.filter(pc.greater(pc.list_value_length(rows.column("seq_click")), 0)).slice(0, 24)  # distinct inputs
    batch = data.collate(rows)
    model = SASRecModule(n_items=data.n_items, max_len=20, d_model=32, n_layers=1, n_heads=2, dropout=0.0,
                         loss=loss, normalize=loss == "in_batch", temperature=1.0 if loss == "full" else 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()
    model.eval()
    top1 = model.topk(batch["seq"], 1)
    assert (top1 == batch["targets"]).any(1).float().mean() >= 0.9  # the top item is one of the targets


def test_fit_export_retrieve(micro_world, tmp_path):
    art = tmp_path / "artifacts"
    common = ["-c", str(ROOT / "configs/sasrec/tiny.yaml"), "--data.dataset", str(micro_world),
              "--model.artifacts", str(art), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
              "--model.d_model", "16", "--model.n_layers", "1", "--data.max_len", "10"]
    main(["fit", *common])
    main(["export", *common])
    m = load_manifest(art / "micro" / "sasrec", stage="sasrec")
    assert m.sizes["d_model"] == 16 and set(m.metrics) == {"valid", "test"}
    test = m.metrics["test"]
    assert 0.0 <= test["overall"]["HR@50"] <= test["overall"]["HR@500"] <= 1.0
    retriever = SASRecRetriever.from_artifact(art / "micro" / "sasrec", micro_world)
    again = replay(retriever, micro_world, "test", hr_k=(50, 100, 500), ndcg_k=(10,))
    assert again["overall"] == pytest.approx(test["overall"])  # the artifact reproduces its metrics
    # faiss (flat inner product) ranks as the exact torch top-K does
    data = SequenceData(micro_world, max_len=10)
    rows = data.split("test").table.slice(0, 8)
    exact = retriever.module.topk(data.collate(rows)["seq"], 5)
    any_type = SASRecRetriever.from_artifact(art / "micro" / "sasrec", micro_world, by_scenario_type=False)
    assert torch.equal(torch.from_numpy(retriever.catalog.ids_of(exact - 1)), any_type.retrieve(rows, 5))
    # by default a request is answered from its scenario's item type, as OneMall does
    from onemall_pl.data.schema import ITEM_TYPES
    from onemall_pl.pretrain import SCENARIO_ITEM_TYPE

    top = retriever.retrieve(rows, 5)
    types = retriever.catalog.item_type[torch.from_numpy(retriever.catalog.index_of(top.numpy()))]
    want = [ITEM_TYPES.index(SCENARIO_ITEM_TYPE[s]) for s in rows.column("scenario").to_pylist()]
    assert (types == torch.tensor(want)[:, None]).all()
