"""The embedded world simulator: valid tables, determinism, planted structure, oracle, shards, no leakage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from onemall_pl.data.importer import validate
from onemall_pl.data.schema import SCENARIOS
from onemall_pl.data.synth import PRESETS, World, generate, parse_shard
from onemall_pl.data.synth import text as T
from onemall_pl.data.synth.images import decode_png
from onemall_pl.data.synth.world import DAY, ENT, LIVE, PRODUCT, VIDEO
from onemall_pl.io import read_dataset_info, read_table

TABLES = ("items", "live_schedule", "events", "watches", "users", "categories")
MICRO = PRESETS["micro"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "micro"
    generate(out, "micro", seed=0)
    return out


@pytest.fixture(scope="module")
def tables(micro):
    return {t: read_table(micro, t) for t in TABLES}


@pytest.fixture(scope="module")
def world(micro):
    return World.load(micro)


def _sorted_events(t: pa.Table) -> pa.Table:
    return t.sort_by([("request_id", "ascending"), ("item_id", "ascending")])


def test_tables_follow_the_contract(micro, tables):
    validate(tables)  # unique keys, every event / watch / schedule / video product id is a known item
    info = read_dataset_info(micro)
    assert info.source == "synth" and info.split_rule.startswith("time")
    assert info.tables == {t: tables[t].num_rows for t in TABLES}
    assert info.params["preset"] == "micro" and info.params["seed"] == 0
    items = tables["items"].to_pandas()
    assert set(items.item_type) == {"product", "video", "live"}
    assert len(items) == MICRO.n_products + MICRO.n_videos + MICRO.n_lives + MICRO.n_ent_videos
    assert (items.category.map(len) == 3).all() and items.title.str.len().min() > 5
    n_img = items.images.map(len)
    assert (n_img[items.item_type == "product"] == 1).all()
    assert n_img[items.item_type == "video"].between(1, 6).all()
    img = decode_png(items.images.iloc[0][0])
    assert img.shape == (MICRO.image_size, MICRO.image_size, 3)
    # events: a request is one user, time and scenario, 5-10 distinct items of the scenario's type
    ev = tables["events"].to_pandas()
    g = ev.groupby("request_id")
    assert (g[["user_id", "ts", "scenario"]].nunique() == 1).all().all()
    sizes = g.size()
    assert sizes.max() <= MICRO.request_size[1] and sizes.median() >= MICRO.request_size[0]
    assert not ev.duplicated(["request_id", "item_id"]).any()
    itype = ev.item_id.map(items.set_index("item_id").item_type)
    for scenario, kind in zip(SCENARIOS, ("product", "video", "live")):
        assert (itype[ev.scenario == scenario] == kind).all()
    assert (ev.order <= ev.click).all()
    price = ev.item_id.map(items.set_index("item_id").price)
    prod = itype == "product"
    np.testing.assert_allclose(ev.gmv[prod], (price * ev.order)[prod], rtol=1e-6)
    assert ev.watch_s[prod].isna().all() and ev.watch_s[~prod].notna().all()
    assert (ev.gmv[(itype == "live") & (ev.order == 1)] > 0).all()
    # users: observable profile only
    assert set(tables["users"].column_names) == {"user_id", "age_band", "city_tier", "device"}
    names = set(tables["categories"].column("name").to_pylist())
    assert set(T.FILTERED_GENRES) <= names and "Entertainment" in names


def test_same_seed_same_world_other_seed_other_world(micro, tables, tmp_path):
    generate(tmp_path / "again", "micro", seed=0)
    for t in TABLES:
        assert read_table(tmp_path / "again", t).equals(tables[t]), t
    generate(tmp_path / "other", "micro", seed=1)
    assert not read_table(tmp_path / "other", "events").equals(tables["events"])


def test_clicks_follow_interests_and_popularity_is_long_tailed(world, tables):
    ev = tables["events"]
    u = ev.column("user_id").to_numpy()
    it = world.index(ev.column("item_id").to_numpy())
    click = ev.column("click").to_numpy()
    shows_product = world.item_type[it] != LIVE  # a live's category is only its main one
    in_interest = (world.u_cats[u] == world.item_l3[it][:, None]).any(1) & shows_product
    out = ~in_interest & shows_product
    assert in_interest.sum() > 200 and out.sum() > 200
    assert click[in_interest].mean() > 5 * click[out].mean()
    # long tail: the 10% most exposed products get far more than 10% of product exposures
    cnt = np.sort(np.bincount(it[world.item_type[it] == PRODUCT], minlength=MICRO.n_products))[::-1]
    assert cnt[: len(cnt) // 10].sum() > 0.3 * cnt.sum()


def test_videos_sell_their_product_and_lives_change_what_they_sell(world, tables):
    items = tables["items"].to_pandas().set_index("item_id")
    videos = items[items.product_id.notna()]
    assert len(videos) == MICRO.n_videos
    sold = items.loc[videos.product_id.astype(np.int64)]
    assert (sold.item_type == "product").all()
    assert (videos.category.map(tuple).values == sold.category.map(tuple).values).all()
    assert (videos.price.values == sold.price.values).all()
    # the OCR text names the product's words (its L2 noun)
    noun = [world.l2_noun[world.l3_l2[world.item_l3[world.index(i)]]] for i in videos.index]
    assert np.mean([n.lower() in t.lower() for n, t in zip(noun, videos.text)]) > 0.95
    # entertainment videos sell nothing and live in the entertainment branch
    ent = items[(items.item_type == "video") & items.product_id.isna()]
    assert len(ent) == MICRO.n_ent_videos and (ent.category.map(lambda c: c[0]) == int(world.ent_l1_cid)).all()
    # live schedules: several product sets per live over time
    ls = tables["live_schedule"].to_pandas()
    sets = ls.groupby(["live_id", "start_ts"]).product_id.apply(frozenset)
    n_sets = sets.groupby(level=0).nunique()
    assert len(n_sets) == MICRO.n_lives and (n_sets > 3).mean() > 0.9
    assert (ls.end_ts > ls.start_ts).mean() > 0.99
    # ... and the oracle follows them: a live's current products are the schedule's
    lid = int(ls.live_id.iloc[0])
    rows = ls[ls.live_id == lid]
    for start, grp in list(rows.groupby("start_ts"))[:3]:
        now = world.live_products(np.array([lid]), np.array([start]))[0]
        assert set(now[now >= 0]) == set(grp.product_id)


def test_watch_log_pairs_videos_with_the_products_clicked_after(world, tables):
    ev, wa = tables["events"], tables["watches"]
    it = world.index(ev.column("item_id").to_numpy())
    clk = (ev.column("click").to_numpy() > 0) & (world.item_type[it] == PRODUCT)
    cu, ct, cp = ev.column("user_id").to_numpy()[clk], ev.column("ts").to_numpy()[clk], it[clk]
    long = wa.column("watch_s").to_numpy() >= MICRO.long_view_s
    wu, wt = wa.column("user_id").to_numpy()[long], wa.column("ts").to_numpy()[long]
    wi = world.index(wa.column("item_id").to_numpy()[long])
    assert (world.item_type[wi] == ENT).all()
    o = np.lexsort((wt, wu))
    wu, wt, wi = wu[o], wt[o], wi[o]
    # the paper's rule: latest long view more than 1 and less than 5 minutes before the click
    span = int(max(wt.max(), ct.max()) - min(wt.min(), ct.min())) + 1000
    key = wu * span + (wt - wt.min())
    at = np.searchsorted(key, cu * span + (ct - 60 - wt.min()), side="left") - 1
    a = np.maximum(at, 0)
    hit = (at >= 0) & (wu[a] == cu) & (ct - wt[a] < 300)
    assert hit.sum() > 30
    genre, l1 = world.item_genre[wi[a[hit]]], world.l3_l1[world.item_l3[cp[hit]]]
    linked = {i: {T.GENRES.index(g) for g in {n: gs for n, _, gs in T.L1_CATEGORIES}[str(name)]}
              for i, name in enumerate(world.l1_name)}
    is_linked = np.array([g in linked[c] for g, c in zip(genre, l1)])
    chance = np.mean([len(linked[c]) / len(T.GENRES) for c in l1])
    assert is_linked.mean() > 2 * chance


def test_load_restores_the_oracle_and_it_matches_the_logs(micro, world, tables):
    fresh = World.build(MICRO, seed=0)
    ev = tables["events"]
    args = (ev.column("user_id").to_numpy(), ev.column("ts").to_numpy(),
            ev.column("scenario").to_numpy(zero_copy_only=False).astype(str), ev.column("item_id").to_numpy())
    for a, b in zip(world.expected(*args), fresh.expected(*args)):
        np.testing.assert_array_equal(a, b)
    p_click, p_order, e_gmv = world.expected(*args)
    assert np.all((0 <= p_order) & (p_order <= p_click) & (p_click <= 1)) and np.all(e_gmv >= 0)
    # calibrated: expected totals match the sampled ones (within 4 standard errors)
    for p, y in ((p_click, ev.column("click").to_numpy()), (p_order, ev.column("order").to_numpy())):
        se = np.sqrt((p * (1 - p)).sum())
        assert abs(p.sum() - y.sum()) < 4 * se + 1


def test_oracle_ranks_clicked_items_and_history_based_lists_higher(world, tables):
    ev = tables["events"].to_pandas()
    rng = np.random.default_rng(0)
    clicked = ev[ev.click == 1]
    kind = world.item_type[world.index(clicked.item_id.values)]
    lo_hi = {k: world.type_range(k) for k in (PRODUCT, VIDEO, LIVE)}
    rand_idx = np.array([rng.integers(*lo_hi[k]) for k in kind])
    args = (clicked.user_id.values, clicked.ts.values, clicked.scenario.values.astype(str))
    p_pos = world.expected(*args, clicked.item_id.values)[0]
    p_rand = world.expected(*args, world.item_id[rand_idx])[0]
    assert p_pos.mean() > 2 * p_rand.mean() and (p_pos > p_rand).mean() > 0.7
    # learnable from observed data: for the last day's product_card requests, products of the
    # categories the user clicked before score higher than popular products.
    t_cut = MICRO.t0 + (MICRO.n_days - 1) * DAY
    past = ev[(ev.ts < t_cut) & (ev.click == 1)]
    past_cats = past.groupby("user_id").item_id.apply(
        lambda s: set(world.item_l3[world.index(s.values)][world.item_type[world.index(s.values)] != LIVE]))
    test = ev[(ev.ts >= t_cut) & (ev.scenario == "product_card")].drop_duplicates("request_id")
    test = test[test.user_id.isin(past_cats.index)]
    lo, hi = lo_hi[PRODUCT]
    products = np.arange(lo, hi)
    top_pop = products[np.argsort(-world.item_pop[lo:hi])[:10]]
    gains = []
    for r in test.itertuples():
        cats = list(past_cats[r.user_id])
        cand = products[np.isin(world.item_l3[products], cats)]
        if len(cand) < 10:
            continue
        hist = cand[np.argsort(-world.item_pop[cand])[:10]]
        e_hist = world.expected(r.user_id, r.ts, "product_card", world.item_id[hist])[0].sum()
        e_pop = world.expected(r.user_id, r.ts, "product_card", world.item_id[top_pop])[0].sum()
        gains.append(e_hist - e_pop)
    assert len(gains) > 10 and np.mean(gains) > 0 and np.mean(np.array(gains) > 0) > 0.6


def test_expected_api(world):
    ids = world.item_id[[0, 1, world.type_range(VIDEO)[0], world.type_range(LIVE)[0], world.type_range(ENT)[0]]]
    pc_, po, g = world.expected(3, MICRO.t0 + 5000, "product_card", ids)
    assert pc_.shape == (5,) and pc_[-1] == 0 and po[-1] == 0 and g[-1] == 0
    batch = np.stack([ids, np.r_[ids[:4], -1]])
    b = world.expected_batch(np.array([3, 4]), np.array([MICRO.t0 + 5000] * 2), "short_video", batch)
    assert b[0].shape == (2, 5) and b[0][1, -1] == 0
    np.testing.assert_allclose(b[0][0], world.expected(3, MICRO.t0 + 5000, "short_video", ids)[0])
    # a product shown in its own scenario beats the same product shown where products are not exposed
    prods = world.item_id[np.arange(*world.type_range(PRODUCT))]
    own = world.expected(3, MICRO.t0, "product_card", prods)[0]
    off = world.expected(3, MICRO.t0, "short_video", prods)[0]
    assert (own > off).all()
    with pytest.raises(ValueError, match="unknown item id"):
        world.expected(0, MICRO.t0, "product_card", [world.n_items + 5])
    with pytest.raises(ValueError, match="unknown user id"):
        world.expected(world.n_users, MICRO.t0, "product_card", ids)
    with pytest.raises(ValueError, match="unknown scenario"):
        world.expected(0, MICRO.t0, "feed", ids)


def test_shards_union_is_the_dataset(micro, tables, tmp_path):
    out = tmp_path / "sharded"
    assert world_blocks() >= 2
    generate(out, "micro", seed=0, shard="1/2")
    assert not (out / "dataset.json").exists()  # incomplete until every shard is done
    generate(out, "micro", seed=0, shard="0/2")
    info = read_dataset_info(out)
    assert info.params["shards"] == 2 and info.tables == read_dataset_info(micro).tables
    for t in ("events", "watches"):
        files = sorted(p.name for p in (out / t).glob("*.parquet"))
        assert any(f.startswith("part-00000-") for f in files) and any(f.startswith("part-00001-") for f in files)
    union = _sorted_events(read_table(out, "events"))
    assert union.equals(_sorted_events(tables["events"]))
    rid = union.column("request_id").to_numpy()
    users = union.group_by("request_id").aggregate([("user_id", "count_distinct")])
    assert users.column("user_id_count_distinct").to_numpy().max() == 1 and len(np.unique(rid)) == users.num_rows
    for t in ("items", "live_schedule", "users", "categories"):
        assert read_table(out, t).equals(tables[t]), t
    a, b = World.load(out), World.load(micro)
    assert np.array_equal(a.u_w, b.u_w) and np.array_equal(a.item_id, b.item_id)
    with pytest.raises(ValueError, match="another"):
        generate(out, "micro", seed=1, shard="0/2")


def world_blocks() -> int:
    return -(-MICRO.n_users // MICRO.block_users)


def test_no_leakage_the_future_does_not_change_the_past(tmp_path):
    short, long = dataclasses.replace(MICRO, n_days=3), dataclasses.replace(MICRO, n_days=4)
    generate(tmp_path / "short", config=short, seed=0)
    generate(tmp_path / "long", config=long, seed=0)
    cut = MICRO.t0 + 3 * DAY
    for table, col in (("events", "ts"), ("live_schedule", "start_ts")):
        s, lg = read_table(tmp_path / "short", table), read_table(tmp_path / "long", table)
        lg = lg.filter(pc.less(lg.column(col), cut))
        assert s.num_rows > 0
        key = [("request_id", "ascending"), ("item_id", "ascending")] if table == "events" else \
            [("live_id", "ascending"), ("start_ts", "ascending"), ("product_id", "ascending")]
        assert s.sort_by(key).equals(lg.sort_by(key)), table
    # ids say nothing about an item's type or category
    w = World.load(tmp_path / "short")
    assert abs(np.corrcoef(w.item_id, w.item_type)[0, 1]) < 0.2
    assert abs(np.corrcoef(w.item_id, w.item_cat[:, 2])[0, 1]) < 0.2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("3")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("2/2")
    with pytest.raises(ValueError, match="unknown preset"):
        generate(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="n_l1"):
        dataclasses.replace(MICRO, n_l1=13)
    with pytest.raises(ValueError, match="no world parameters"):
        World.load(tmp_path)
