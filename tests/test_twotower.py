"""The reusable two-tower module: towers, in-batch softmax with logQ, recall@K, param groups, faiss index."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from onemall_pl.models.twotower import FeatureTower, TowerConfig
from onemall_pl.twotower import TwoTowerModule, export_index


def test_feature_tower_bags_ignore_padding():
    torch.manual_seed(0)
    tower = FeatureTower(TowerConfig({"shop": 5, "seq": 10}, embed_dim=4, hidden=8, out_dim=6))
    a = tower({"shop": torch.tensor([1, 2]), "seq": torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])})
    b = tower({"shop": torch.tensor([1, 2]), "seq": torch.tensor([[0, 3, 4], [0, 0, 5]])})
    assert a.shape == (2, 6)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['shop'\]"):
        tower({"seq": torch.tensor([[1]])})
    with pytest.raises(ValueError, match="vocabulary sizes"):
        TowerConfig({"x": 1})


def _module(n_items=12, lr=1e-2, **kw):
    torch.manual_seed(0)
    user = FeatureTower(TowerConfig({"clicks": n_items + 1}, 16, 32, 16))
    item = FeatureTower(TowerConfig({"item": n_items + 1}, 16, 32, 16))
    return TwoTowerModule(user, item, lr=lr, **kw)


def test_logits_mask_duplicates_and_logq():
    m = _module(logq_correction=True)
    batch = {"user": {"clicks": torch.tensor([[1, 2], [3, 0], [4, 4]])}, "item": {"item": torch.tensor([5, 6, 5])},
             "item_id": torch.tensor([5, 6, 5]), "logq": torch.log(torch.tensor([0.5, 0.25, 0.5]))}
    lg = m.logits(batch)
    assert torch.isinf(lg[0, 2]) and torch.isinf(lg[2, 0]) and torch.isfinite(lg.diagonal()).all()
    m.logq_correction = False
    lg2 = m.logits(batch)
    torch.testing.assert_close(lg[0, 1], lg2[0, 1] - np.log(0.25))


def test_item_tower_learns_slower():
    m = _module(lr=1e-3, item_lr_scale=0.1)
    groups = m.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(1e-4)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.model.item_tower.parameters()}


def _task(n=512, n_items=12, seed=0):
    """A user who clicked items of group g next clicks an item of group g (groups of 3 items)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, n_items // 3, n)
    hist = torch.tensor(g[:, None] * 3 + rng.integers(0, 3, (n, 4)) + 1)
    target = torch.tensor(g * 3 + rng.integers(0, 3, n) + 1)
    return [{"user": {"clicks": hist[i]}, "item": {"item": target[i]}, "item_id": target[i]} for i in range(n)]


def test_training_raises_recall(tmp_path):
    m = _module()
    val = DataLoader(_task(seed=1), batch_size=64)
    # inference_mode=False: `validate` then `fit` on one module would otherwise leave the metric
    # states as inference tensors (reset under inference mode), which `fit` cannot update
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         inference_mode=False)
    before = trainer.validate(m, val, verbose=False)[0]
    trainer.fit(m, DataLoader(_task(), batch_size=64, shuffle=True), val)
    after = trainer.callback_metrics
    assert after["val/loss"] < before["val/loss"] - 0.3
    # in-batch recall@1 of 64 candidates: chance is ~1/64 (x3 for the 3 items of a group)
    assert after["val/recall@10"] > before["val/recall@10"] and after["val/recall@10"] > 0.5


def test_export_index_searches_by_item_id(tmp_path):
    x = np.eye(4, dtype=np.float32)
    index = export_index(x, np.array([10, 20, 30, 40]), tmp_path / "items.faiss")
    _, ids = index.search(x[2:3], 1)
    assert ids[0, 0] == 30 and (tmp_path / "items.faiss").exists()
