import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import roc_auc_score

from onemall_pl.artifacts import load_manifest
from onemall_pl.data.build import TIME_RULE
from onemall_pl.data.schema import DataError, DatasetInfo
from onemall_pl.io import write_dataset_info, write_table
from onemall_pl.reward import (
    EventsDataModule,
    Fusion,
    GroupedAUROC,
    RewardModule,
    RewardScorer,
    fuse_reward,
    grouped_auc,
    main,
    oracle_agreement,
)

# ----------------------------------------------------------------------------- a planted world


def planted_dataset(root: Path, n_items: int = 60, n_users: int = 80, n_requests: int = 12, per_request: int = 6,
                    seed: int = 0, unknown_item: bool = False) -> Path:
    """Users click items of their favourite L1 (p 0.6, else 0.05); cheap items sell more often."""
    rng = np.random.default_rng(seed)
    l1 = rng.integers(0, 4, n_items)
    items = pa.table({
        "item_id": np.arange(n_items, dtype=np.int64) * 7 + 3,
        "item_type": ["product"] * n_items, "title": [f"item {i}" for i in range(n_items)],
        "text": [None] * n_items, "images": pa.nulls(n_items, pa.list_(pa.binary())),
        "category": pa.array([[int(a) + 1, 10 + int(a) * 3 + int(b), 100 + i % 9]
                              for i, (a, b) in enumerate(zip(l1, rng.integers(0, 3, n_items)))], pa.list_(pa.int32())),
        "price": rng.uniform(5, 100, n_items).astype(np.float32),
        "shop_id": rng.integers(0, 6, n_items).astype(np.int64),
        "product_id": pa.nulls(n_items, pa.int64())})
    fav = np.arange(n_users) % 4
    rows = {k: [] for k in ("request_id", "user_id", "ts", "scenario", "item_id", "click", "order", "gmv", "watch_s")}
    rid = 0
    for u in range(n_users):
        times = np.sort(rng.choice(np.arange(1_000, 100_000, 60), n_requests, replace=False))
        for t in times:
            it = rng.choice(n_items, per_request, replace=False)
            click = rng.random(per_request) < np.where(l1[it] == fav[u], 0.6, 0.05)
            price = items.column("price").to_numpy()[it]
            order = click & (rng.random(per_request) < np.where(price < 50, 0.5, 0.15))
            rows["request_id"] += [rid] * per_request
            rows["user_id"] += [u] * per_request
            rows["ts"] += [int(t)] * per_request
            rows["scenario"] += ["product_card"] * per_request
            rows["item_id"] += (it * 7 + 3).tolist()
            rows["click"] += click.astype(np.int8).tolist()
            rows["order"] += order.astype(np.int8).tolist()
            rows["gmv"] += (price * order).tolist()
            rows["watch_s"] += [None] * per_request
            rid += 1
    if unknown_item:
        rows["item_id"][17] = 999_999
    events = pa.table(rows)
    d = root / "planted"
    write_table(d, "items", items)
    write_table(d, "events", events)
    write_dataset_info(d, DatasetInfo(name="planted", source="import", split_rule=TIME_RULE,
                                      tables={"items": items.num_rows, "events": events.num_rows}))
    return d


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_dataset(tmp_path_factory.mktemp("reward"))


def small_module(dm: EventsDataModule, **kw) -> RewardModule:
    from onemall_pl.models.ranking import Config

    net = Config(d_emb=4, d_model=16, attn_hidden=16, tower_hidden=[32])
    return RewardModule(net=net, sizes=dm.sizes, lr=5e-3, **kw)


def trainer(root: Path, epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    pl.seed_everything(0)
    dm = EventsDataModule(str(planted), max_exposure=20, max_click=10, max_order=5, batch_size=128,
                          eval_batch_size=512, num_price_bands=4)
    module = small_module(dm)
    t = trainer(tmp_path_factory.mktemp("run"), epochs=4)
    t.fit(module, datamodule=dm)
    return t, module, dm


# ----------------------------------------------------------------------------- Eq. 8


def test_fusion_hand_example():
    """Normalised scores (2, 2, 2) and (1, 2, 4), factors 1: weighted = sum, harmonic = 3 / sum(1/s)."""
    norm = (0.05, 0.005, 2.5)
    ctr, ctcvr, egpm = torch.tensor([0.1, 0.05]), torch.tensor([0.01, 0.01]), torch.tensor([5.0, 10.0])
    w = fuse_reward(ctr, ctcvr, egpm, Fusion("weighted"), norm)
    h = fuse_reward(ctr, ctcvr, egpm, Fusion("harmonic"), norm)
    assert torch.allclose(w, torch.tensor([6.0, 7.0]))
    assert torch.allclose(h, torch.tensor([2.0, 3 / 1.75]))
    # factors: weighted is linear in them; harmonic weights the reciprocals
    assert torch.allclose(fuse_reward(ctr, ctcvr, egpm, Fusion("weighted", 2.0, 0.0, 1.0), norm), torch.tensor([6.0, 6.0]))
    assert torch.allclose(fuse_reward(ctr, ctcvr, egpm, Fusion("harmonic", 1.0, 0.0, 1.0), norm),
                          torch.tensor([2.0, 2 / 1.25]))
    # normalize off: the factors carry the magnitudes (the paper's Table 4 top-10 base row, alpha 1, beta 30, gamma 1)
    r = fuse_reward(torch.tensor(0.07816), torch.tensor(0.00243), torch.tensor(0.0983),
                    Fusion("weighted", 1.0, 30.0, 1.0, normalize=False), norm)
    assert r.item() == pytest.approx(0.2493, abs=2e-3)


@pytest.mark.parametrize("form", ["weighted", "harmonic"])
def test_fusion_is_increasing_in_each_score(form):
    g = torch.Generator().manual_seed(0)
    base = [torch.rand(100, generator=g) * s + 1e-3 for s in (0.1, 0.01, 10.0)]
    r0 = fuse_reward(*base, Fusion(form, 1.0, 2.0, 0.5), (0.05, 0.005, 5.0))
    for k in range(3):
        up = [b.clone() for b in base]
        up[k] = up[k] * 1.1
        assert torch.all(fuse_reward(*up, Fusion(form, 1.0, 2.0, 0.5), (0.05, 0.005, 5.0)) > r0)


def test_fusion_rejects_bad_config():
    with pytest.raises(ValueError, match="form"):
        Fusion("mean")
    with pytest.raises(ValueError, match="factors"):
        Fusion("weighted", -1.0)


# ----------------------------------------------------------------------------- GAUC


def test_grouped_auc_matches_sklearn_per_group():
    rng = np.random.default_rng(0)
    n = 600
    groups = rng.integers(0, 25, n)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.round(rng.random(n) + 0.3 * y, 1)  # rounded: ties inside groups
    y[groups == 3] = 0  # a one-class group is left out
    want_num = want_den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            want_num += roc_auc_score(y[m], p[m]) * m.sum()
            want_den += m.sum()
    got = grouped_auc(torch.tensor(p), torch.tensor(y), torch.tensor(groups))
    assert got.item() == pytest.approx(want_num / want_den, abs=1e-6)
    metric = GroupedAUROC()
    for a in range(0, n, 128):  # batched updates give the same value
        metric.update(torch.tensor(p[a:a + 128]), torch.tensor(y[a:a + 128]), torch.tensor(groups[a:a + 128]))
    assert metric.compute().item() == pytest.approx(got.item(), abs=1e-6)


def test_head_metrics_match_sklearn_even_for_egpm_scale():
    """EGPM is in currency per 1000 exposures, far outside [0, 1]: its AUC must still be its ranking's."""
    from onemall_pl.reward import head_metrics, update_head_metrics

    rng = np.random.default_rng(1)
    n = 300
    click = (rng.random(n) < 0.3).astype(np.int64)
    order = click * (rng.random(n) < 0.4)
    gmv = order * rng.uniform(10, 100, n)
    egpm = rng.uniform(100, 20000, n) + 5000 * order
    ctr = rng.random(n) * 0.5 + 0.3 * click
    out = {"ctr": torch.tensor(ctr), "cvr": torch.tensor(rng.random(n)), "ctcvr": torch.tensor(ctr * 0.1),
           "egpm": torch.tensor(egpm), "log_gmv": torch.tensor(np.log(gmv + 1))}
    batch = {"click": torch.tensor(click), "order": torch.tensor(order), "gmv": torch.tensor(gmv),
             "user_id": torch.tensor(rng.integers(0, 10, n))}
    metrics = head_metrics()
    update_head_metrics(metrics, out, batch)
    assert metrics["egpm_auc"].compute().item() == pytest.approx(roc_auc_score(order, egpm), abs=1e-6)
    assert metrics["ctr_auc"].compute().item() == pytest.approx(roc_auc_score(click, ctr), abs=1e-6)
    cvr_rows = click > 0
    assert metrics["cvr_auc"].compute().item() == pytest.approx(
        roc_auc_score(order[cvr_rows], out["cvr"].numpy()[cvr_rows]), abs=1e-6)


def test_grouped_auc_no_valid_group_is_nan():
    assert math.isnan(grouped_auc(torch.rand(4), torch.ones(4), torch.tensor([0, 0, 1, 1])).item())


# ----------------------------------------------------------------------------- data


def test_datamodule_splits_sizes_and_batches(planted):
    dm = EventsDataModule(str(planted), max_exposure=20, max_click=10, max_order=5, batch_size=64,
                          num_price_bands=4)
    assert dm.sizes["num_items"] == 60 and dm.sizes["num_categories_l1"] == 5 and dm.sizes["num_price_bands"] == 4
    dm.setup("fit")
    c = dm.split_counts
    assert c["train"] > c["valid"] > 0 and c["test"] > 0 and sum(c.values()) == 80 * 12 * 6
    b = next(iter(dm.train_dataloader()))
    assert b["seq_exposure"].shape == (64, 20) and b["seq_click_mask"].dtype == torch.bool
    assert b["item"].max() < 60 and b["scenario"].dtype == torch.long
    # histories are strictly earlier: a request's first exposure history never holds its own items... and
    # the very first request of every user has empty histories
    assert 0 < dm.base_rates["ctr"] < 1 and dm.base_rates["egpm"] > 0


def test_leave_one_out_split_follows_the_samples(tmp_path):
    """Leave-one-out datasets: a user's requests from their test (valid) sample's time on are test (valid)."""
    from onemall_pl.data.build import build
    from onemall_pl.io import read_dataset_info, read_table

    d = planted_dataset(tmp_path, n_users=10)
    info = read_dataset_info(d)
    info.split_rule = "leave-one-out per user"
    write_dataset_info(d, info)
    build(d)
    dm = EventsDataModule(str(d), num_price_bands=4)
    dm.setup("fit")
    samples = read_table(d, "samples").to_pandas()
    ex = dm.exposures.to_pandas()
    for u, g in ex.groupby("user_id"):
        s = samples[samples.user_id == u]
        t_test = s[s.split == "test"].ts.min()
        t_valid = s[s.split == "valid"].ts.min()
        want = np.where(g.ts >= t_test, "test", np.where(g.ts >= t_valid, "valid", "train"))
        assert (g.split.values == want).all(), u
    assert set(ex.split) == {"train", "valid", "test"}


def test_unknown_item_in_events_is_a_data_error(tmp_path):
    d = planted_dataset(tmp_path, n_users=8, unknown_item=True)
    dm = EventsDataModule(str(d), num_price_bands=4)
    with pytest.raises(DataError, match=r"unknown item id 999999.*table 'events'|table 'events'.*999999"):
        dm.setup("fit")


def test_interaction_only_log_is_refused(tmp_path):
    d = planted_dataset(tmp_path, n_users=8)
    from onemall_pl.io import read_table

    ev = read_table(d, "events")
    ev = ev.set_column(ev.schema.get_field_index("click"), "click", pa.array(np.ones(ev.num_rows, np.int8)))
    write_table(tmp_path / "allclick", "events", ev)
    write_table(tmp_path / "allclick", "items", read_table(d, "items"))
    write_dataset_info(tmp_path / "allclick", DatasetInfo(name="allclick", source="import", split_rule=TIME_RULE))
    with pytest.raises(DataError, match="negatives"):
        EventsDataModule(str(tmp_path / "allclick"), num_price_bands=4).setup("fit")


# ----------------------------------------------------------------------------- training, export, scorer


def test_training_on_planted_signal_beats_chance(trained):
    _t, module, dm = trained
    m = module.evaluate(dm.test_dataloader())
    assert m["ctr_auc"] > 0.7, m
    assert m["ctr_gauc"] > 0.6, m
    assert all(np.isfinite(v) for v in m.values())


def test_export_and_scorer_round_trip(trained, tmp_path):
    t, module, dm = trained
    manifest = module.export_artifact(t, dm, tmp_path / "reward")
    m = load_manifest(tmp_path / "reward", stage="reward")
    assert m.id == manifest.id and m.sizes["num_items"] == 60
    for split in ("valid", "test"):
        assert set(m.metrics[split]) == {f"{h}_{k}" for h in ("ctr", "cvr", "ctcvr", "egpm")
                                         for k in ("auc", "gauc")} | {"gmv_pearson"}
    assert m.metrics["test"]["gmv_pearson"] > 0.5  # gmv = the item's price in the planted world
    torch.load(m.file("model.pt"), weights_only=True)

    scorer = RewardScorer.from_artifact(tmp_path / "reward")
    batch = next(iter(dm.test_dataloader()))
    module.eval()
    with torch.no_grad():
        want = module(batch)
    ids = dm.catalog.item_ids
    user = {}
    for s in ("seq_exposure", "seq_click", "seq_order"):  # raw ids, -1 pads (left-padded, as collated)
        user[s] = torch.where(batch[f"{s}_mask"], torch.as_tensor(ids[batch[s].numpy()]), -1)
    user["scenario"] = batch["scenario"]
    got = scorer.score(user, torch.as_tensor(ids[batch["item"].numpy()])[:, None])
    for k in ("ctr", "cvr", "ctcvr", "egpm"):
        torch.testing.assert_close(got[k][:, 0], want[k], rtol=1e-5, atol=1e-7)
    norm = tuple(dm.base_rates[k] for k in ("ctr", "ctcvr", "egpm"))
    torch.testing.assert_close(got["reward"][:, 0], fuse_reward(want["ctr"], want["ctcvr"], want["egpm"], Fusion(), norm))


def test_scorer_many_candidates_lists_and_pads(trained, tmp_path):
    t, module, dm = trained
    module.export_artifact(t, dm, tmp_path / "reward")
    scorer = RewardScorer.from_artifact(tmp_path / "reward", fusion={"form": "harmonic"}, max_pairs=50)
    ids = dm.catalog.item_ids
    user = {"seq_exposure": [ids[:30].tolist(), []], "seq_click": [ids[:3].tolist(), [int(ids[5])]],
            "seq_order": [[], []], "scenario": ["product_card", "short_video"]}
    cands = torch.as_tensor(np.stack([ids[:40], ids[20:60]]))
    cands[1, -1] = -1
    out = scorer.score(user, cands)
    assert set(out) == {"ctr", "cvr", "ctcvr", "egpm", "reward"}
    assert all(v.shape == (2, 40) for v in out.values())
    assert out["reward"][1, -1] == 0 and torch.all(out["ctr"][:, :-1] > 0)
    assert scorer.fusion.form == "harmonic"
    # chunked scoring (max_pairs=50 -> one request per chunk) equals one pass; truncation keeps the latest
    one = RewardScorer.from_artifact(tmp_path / "reward", fusion={"form": "harmonic"})
    torch.testing.assert_close(one.score(user, cands)["reward"], out["reward"])
    latest = dict(user, seq_exposure=[ids[10:30].tolist(), []])  # max_exposure is 20
    torch.testing.assert_close(one.score(latest, cands)["ctr"], out["ctr"])
    with pytest.raises(ValueError, match="not in the reward model's catalogue"):
        scorer.score(user, torch.tensor([[1, 2], [3, 4]]))


def test_cli_fit_and_export(planted, tmp_path):
    """`onemall reward fit` / `export` with the shipped tiny config, on the planted world."""
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "reward" / "tiny.yaml")
    over = ["--data.data_dir", str(planted), "--data.num_price_bands", "4", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--model.artifacts_root", str(tmp_path / "art"),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    main(["fit", "-c", cfg, *over])
    main(["export", "-c", cfg, *over])
    m = load_manifest(tmp_path / "art" / "planted" / "reward", stage="reward")
    assert m.sizes["num_shops"] == 6 and 0 <= m.metrics["test"]["ctr_auc"] <= 1
    assert m.config["model"]["net"]["num_items"] == 60


@pytest.mark.slow
def test_synth_world_predictions_agree_with_its_oracle(tmp_path):
    """On the simulator's micro world, the trained model beats chance and ranks like the ground truth."""
    from onemall_pl.data.synth import generate

    generate(tmp_path / "micro", "micro", seed=0)
    pl.seed_everything(0)
    dm = EventsDataModule(str(tmp_path / "micro"), max_exposure=20, max_click=10, max_order=5, batch_size=128,
                          eval_batch_size=1024, num_price_bands=8)
    module = small_module(dm)
    t = trainer(tmp_path / "run", epochs=6)
    t.fit(module, datamodule=dm)
    res = oracle_agreement(module, dm, dm.test_dataloader())
    assert res["model_ctr_auc"] > 0.6, res
    assert res["spearman_ctr"] > 0.4 and res["spearman_ctcvr"] > 0.3 and res["spearman_egpm"] > 0.3, res
    manifest = module.export_artifact(t, dm, tmp_path / "reward")
    assert manifest.metrics["oracle_test"] == pytest.approx(res)
