import pytest
import torch

from onemall_pl.models.ranking import SEQUENCES, Config, RankingModel, esmm_loss


def tiny_model(seed: int = 0) -> RankingModel:
    torch.manual_seed(seed)
    cfg = Config(num_items=20, num_categories_l1=4, num_categories_l2=6, num_categories_l3=9, num_shops=4, num_price_bands=3, d_emb=4, d_model=8,
                 attn_hidden=8, tower_hidden=[16])
    m = RankingModel(cfg)
    I = cfg.num_items
    g = torch.Generator().manual_seed(1)
    m.set_item_features(category=torch.randint(0, 4, (I, 3), generator=g),
                        shop=torch.randint(0, 4, (I,), generator=g),
                        price_band=torch.randint(0, 3, (I,), generator=g),
                        item_type=torch.randint(0, 3, (I,), generator=g),
                        price=torch.rand(I, generator=g) * 100)
    return m


def user_batch(B: int, lens=(6, 4, 2), seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    seqs = {s: torch.randint(0, 20, (B, L), generator=g) for s, L in zip(SEQUENCES, lens)}
    masks = {s: torch.rand(B, L, generator=g) < 0.7 for s, L in zip(SEQUENCES, lens)}
    return seqs, masks, torch.randint(0, 3, (B,), generator=g)


def test_forward_shapes_and_esmm_consistency():
    m = tiny_model()
    seqs, masks, scen = user_batch(5)
    items = torch.randint(0, 20, (5, 7))
    out = m(seqs, masks, scen, items)
    for k in ("logit_ctr", "logit_cvr", "log_gmv", "ctr", "cvr", "ctcvr", "egpm"):
        assert out[k].shape == (5, 7), k
    assert torch.allclose(out["ctcvr"], out["ctr"] * out["cvr"])
    assert torch.all(out["ctcvr"] <= out["ctr"]) and torch.all(out["ctcvr"] <= out["cvr"])
    assert torch.allclose(out["egpm"], 1000 * out["ctcvr"] * out["log_gmv"].exp())


def test_candidates_are_scored_independently():
    """Scoring N candidates at once equals scoring them one by one (no leak across candidates)."""
    m = tiny_model().eval()
    seqs, masks, scen = user_batch(3)
    items = torch.randint(0, 20, (3, 6))
    full = m(seqs, masks, scen, items)["ctcvr"]
    for j in range(6):
        one = m(seqs, masks, scen, items[:, j:j + 1])["ctcvr"]
        assert torch.allclose(full[:, j:j + 1], one, atol=1e-6)


def test_padding_is_ignored():
    m = tiny_model().eval()
    seqs, masks, scen = user_batch(2)
    items = torch.randint(0, 20, (2, 4))
    a = m(seqs, masks, scen, items)["ctr"]
    seqs2 = {s: torch.where(masks[s], seqs[s], (seqs[s] + 7) % 20) for s in SEQUENCES}
    assert torch.allclose(a, m(seqs2, masks, scen, items)["ctr"], atol=1e-6)
    # all-empty histories are fine too
    empty = {s: torch.zeros_like(masks[s]) for s in SEQUENCES}
    assert torch.isfinite(m(seqs, empty, scen, items)["egpm"]).all()


def test_cross_features_count_shared_keys():
    m = tiny_model()
    seqs, masks, _scen = user_batch(1, lens=(3, 3, 3))
    item = seqs["click"][:, :1]  # the target was clicked before (if that slot is not padding)
    masks = {s: torch.ones_like(masks[s]) for s in SEQUENCES}
    x = m.cross_features(seqs, masks, item)  # (1, 1, 3 * 5)
    n_click_same_item = (seqs["click"][0] == item[0, 0]).sum()
    assert x[0, 0, 5 + 0] == torch.log1p(n_click_same_item.float())
    shop = m.items.shop_I
    assert x[0, 0, 5 + 4] == torch.log1p((shop[seqs["click"][0]] == shop[item[0, 0]]).sum().float())
    # category 0 is "none at this level": two items without an L1 do not share one
    cat = m.items.cat_IC[:, 0]
    l1 = cat[item[0, 0]]
    n_l1 = ((cat[seqs["click"][0]] == l1) & (l1 > 0)).sum().float()
    assert x[0, 0, 5 + 1] == torch.log1p(n_l1)
    m.items.cat_IC[:, 0] = 0
    assert m.cross_features(seqs, masks, item)[0, 0, [1, 6, 11]].sum() == 0


def test_esmm_loss_finite_and_gradients_reach_every_tower():
    m = tiny_model()
    seqs, masks, scen = user_batch(8)
    items = torch.randint(0, 20, (8, 1))
    out = m(seqs, masks, scen, items)
    click = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0]).view(8, 1)
    order = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0]).view(8, 1)
    gmv = order * 50.0
    losses = esmm_loss(out, click, order, gmv)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for tower in (m.ctr, m.cvr, m.gmv):
        assert tower[0].weight.grad.abs().sum() > 0
    # no orders in the batch: the gmv term is 0 and still differentiable
    none = esmm_loss(m(seqs, masks, scen, items), click, order * 0, gmv * 0)
    assert none["gmv"] == 0


def test_gamma_loss_minimiser_is_the_conditional_mean():
    """The gmv head's loss is minimised at log E[gmv], not E[log gmv] (EGPM needs the mean)."""
    gmv = torch.tensor([10.0, 100.0, 1000.0])

    def grad_at(value: float) -> float:
        mu = torch.tensor(value, requires_grad=True)
        out = {"logit_ctr": torch.zeros(3), "logit_cvr": torch.zeros(3), "log_gmv": mu.expand(3)}
        esmm_loss(out, torch.ones(3), torch.ones(3), gmv)["gmv"].backward()
        return mu.grad.item()

    assert grad_at(gmv.mean().log().item()) == pytest.approx(0.0, abs=1e-5)
    assert grad_at(gmv.log().mean().item()) < -0.5  # the geometric mean is too low: the loss pushes up


def test_set_item_features_rejects_out_of_range_ids():
    m = tiny_model()
    I = m.cfg.num_items
    with pytest.raises(ValueError, match="shop"):
        m.set_item_features(category=torch.zeros(I, 3, dtype=torch.long), shop=torch.full((I,), 4),
                            price_band=torch.zeros(I, dtype=torch.long),
                            item_type=torch.zeros(I, dtype=torch.long), price=torch.ones(I))
