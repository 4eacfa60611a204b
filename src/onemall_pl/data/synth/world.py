"""The embedded e-commerce world: a known ground truth, the logs it produces, and its oracle.

A :class:`World` holds the latent truth (DESIGN.md, "The embedded world"):

- a category tree L1 > L2 > L3 for commerce, and an entertainment branch whose L2s are
  genres (News, Comedy, Dance, Film/TV, Selfie, Makeup, Cooking, ...);
- shops (each sells in one or two L2s, has a quality, a colour and a style vector);
- items of four kinds, one id space: products (category, price, shop), e-commerce
  short-videos (each sells one product, has a content genre), live-streams (a shop's
  channel; what it sells changes over time: ``live_schedule``) and entertainment videos;
- popularity: Zipf weights per item type (and per category), with popular items a bit
  better on average (item quality);
- users: 2-5 L3 interests with Dirichlet weights, a current *focus* (one interest, held
  for half a day to a few days, drawn from a counter-based hash so it is a closed-form
  function of (user, time)), price sensitivity, click propensity, a style vector,
  a watching taste over genres (linked to their interests, plus generic genres everyone
  watches), a scenario mix and an activity level.

**The funnel** (one function, :meth:`World._funnel`, used both to sample the logs and by
the oracle, so the two agree exactly). For user ``u`` at time ``t`` and product ``p``
of L3 category ``c``::

    affinity(u, p, t) = log(eps + sum_k w_uk sim(c_uk, c))        # interests (1 / sim_l2 / sim_l1 / 0)
                        + focus_bonus [c == focus(u, t)]          # current intent
                        + style_weight <s_u, s_p> + q_p           # taste within a category, quality
                        - price_click_weight * sens_u * z_p       # z_p: price z-score in its category

    P(click)          = sigmoid(bias[scenario, type] + affinity + watch-taste term + b_u)
    P(order | click)  = sigmoid(order_bias + order_affinity_weight * affinity + q_shop - sens_u * z_p)
    GMV | order       = price (quantity 1)

A short-video uses the affinity of the product it sells, plus the user's taste for its
genre and its own quality. A live-stream uses the log-mean-exp of the affinities of the
products it sells *at time t* (``live_schedule``), plus genre taste and quality; an order
from a live is of one of those products (chosen in proportion to softmax(affinity) x
P(order | click)), so its GMV is that product's price. A scenario exposes its own item
type (product_card: products, short_video: e-commerce videos, live_stream: lives); any
other type shown in a scenario gets ``off_type_bias``; entertainment videos sell nothing
(expected click, order and GMV are 0).

**The exposure policy**: each request shows ``request_size`` distinct items of the
scenario's type; each is, with probability ``p_personal``, a popular item of one of the
user's interests (the legacy recommender knows users' long-term interests, not their
current focus), else a popular item overall (Zipf) -- popularity bias, with exploration.

**The watch log**: most requests are preceded by a few entertainment videos, watched
40-240 s apart; such a video is, with probability ``p_watch_linked``, of a genre linked to
the user's current focus (the L1's genres, e.g. Makeup for Beauty), else drawn from the
user's taste, where the generic genres (News, Comedy, Dance, Film/TV, Selfie) carry no
commerce signal -- the genres the paper filters out. Linked and liked genres are watched
longer. So "the latest long-viewed entertainment video 1-5 minutes before a product
click" pairs a video with a product through the user's current focus.

**What the tables show** (the rest stays in ``world/``): item ids are a random permutation
of ``0..n_items-1`` over all kinds (an id says nothing about type or category); user ids
are ``0..n_users-1``; a short-video's category and price are its product's; a live's
category is that of a representative product of its shop and its price the mean price of
the shop's products (what it sells, when, is in ``live_schedule``: 2-5 segments a day,
1-4 products each, mostly from its shop); entertainment videos have price 0, their
category in the entertainment branch and ``shop_id`` = ``n_shops + creator``. The
``users`` table holds observable profile columns only (age band, city tier, device tier,
the last loosely tied to price sensitivity), never the latent taste.

**Randomness and sharding**: the catalogue and users come from streams keyed by the seed
alone; the events of day ``d`` for user block ``b`` from a stream keyed by ``(seed, d, b)``.
So any set of (day, block) chunks can be generated in any order or process, shards are
unions of blocks, and the first days of a longer world equal a shorter world (the future
never changes the past).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from onemall_pl.data.schema import SCENARIOS
from onemall_pl.data.synth import images as I
from onemall_pl.data.synth import text as T
from onemall_pl.data.synth.presets import WorldConfig

PRODUCT, VIDEO, LIVE, ENT = 0, 1, 2, 3
TYPE_NAMES = ("product", "video", "live", "video")  # the data contract's item_type of each kind
SCENARIO_TYPE = np.array([PRODUCT, VIDEO, LIVE], np.int8)  # the item type each scenario exposes
DAY = 86_400
SLOTS = 4  # products a live-stream sells at once, at most
WORLD_DIR = "world"
FORMAT = 1
# When users open the app (share of requests per hour of day, UTC).
HOUR_WEIGHTS = np.array([1, .6, .4, .3, .3, .4, .8, 1.5, 2.2, 2.5, 2.6, 2.8, 3.2, 3, 2.7, 2.6, 2.7, 3, 3.4, 4,
                         4.4, 4.2, 3.2, 2], np.float64)
_HOUR_CUM = np.cumsum(HOUR_WEIGHTS) / HOUR_WEIGHTS.sum()
# Typical price (currency units) of each L1; L3s and products scatter around it.
_L1_PRICE = {"Apparel": 40, "Beauty": 25, "Electronics": 150, "Home": 35, "Kitchen": 30, "Food": 12,
             "Sports": 50, "Toys": 25, "Pets": 20, "Auto": 40, "Baby": 25, "Stationery": 8}
_BAND_EDGES = np.array([-0.84, -0.25, 0.25, 0.84])  # price z-score quintiles -> band 0..4

# Saved arrays (world/params.npz); everything else is derived from them in _derive().
_SAVED = (
    "cat_id", "cat_name", "cat_level", "cat_parent", "l1_name", "l1_cid", "l2_l1", "l2_noun", "l2_cid",
    "l3_l2", "l3_mod", "l3_words", "l3_cid", "l3_pop", "genre_cid", "ent_l1_cid", "ent_l3_cid", "genre_link",
    "shop_l2", "shop_l2b", "shop_q", "shop_hue", "shop_brand", "creator_name",
    "item_id", "item_type", "item_l3", "item_cat", "item_tpl", "item_prod", "item_genre", "item_shop",
    "item_price", "item_z", "item_band", "item_q", "item_pop", "item_dur", "prod_style",
    "seg_live", "seg_start", "seg_end", "seg_prod",
    "u_cats", "u_w", "u_sens", "u_bias", "u_act", "u_scen", "u_style", "u_taste", "u_period", "u_phase",
    "u_age", "u_city", "u_device",
)

AGE_BANDS = ("18-24", "25-34", "35-44", "45+")
CITY_TIERS = ("tier1", "tier2", "tier3", "tier4")
DEVICES = ("flagship", "mid", "budget")


# ----------------------------------------------------------------------------- helpers


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash01(*keys) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of integer ``keys`` (broadcast)."""
    h = np.zeros(np.broadcast_shapes(*(np.shape(k) for k in keys)), np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = _splitmix(h ^ np.asarray(k, np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _categorical(cum: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw: ``cum`` is ``[N, K]`` cumulative weights ending at 1."""
    return np.minimum((cum < r[:, None]).sum(1), cum.shape[1] - 1)


def _zipf(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    return (rng.permutation(n) + 1.0) ** -a


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray, n: int) -> np.ndarray:
    g = rng.gamma(np.broadcast_to(alpha, (n, len(alpha))))
    return g / g.sum(1, keepdims=True)


class GroupSampler:
    """Draws, for each requested group, one member with probability proportional to its weight.

    Groups without members answer -1.
    """

    def __init__(self, group: np.ndarray, weight: np.ndarray, n_groups: int, members: np.ndarray | None = None):
        members = np.arange(len(group)) if members is None else np.asarray(members)
        keep = group >= 0
        group, weight, members = group[keep], weight[keep], members[keep]
        o = np.lexsort((members, group))
        g, w, self.members = group[o].astype(np.int64), weight[o].astype(np.float64), members[o]
        cs = np.concatenate([[0.0], np.cumsum(w)])
        starts = np.searchsorted(g, np.arange(n_groups))
        ends = np.searchsorted(g, np.arange(n_groups), side="right")
        before, total = cs[starts], cs[ends] - cs[starts]
        self.group, self.n_groups, self.count = g, n_groups, ends - starts
        self.cdf = g + (cs[1:] - before[g]) / total[g] if len(g) else np.zeros(0)

    def sample(self, groups: np.ndarray, r: np.ndarray) -> np.ndarray:
        if not len(self.cdf):
            return np.full(len(groups), -1, np.int64)
        groups = np.asarray(groups, np.int64)
        pos = np.minimum(np.searchsorted(self.cdf, groups + r, side="right"), len(self.cdf) - 1)
        return np.where((groups >= 0) & (self.group[pos] == groups), self.members[pos], -1)


# ----------------------------------------------------------------------------- the world


class World:
    """The latent truth of a synthetic e-commerce world, its log generator and its oracle.

    Build one with :meth:`build` (from a :class:`WorldConfig` and a seed) or restore the one
    a dataset was generated from with :meth:`load`. Score any list with :meth:`expected`.
    """

    def __init__(self, config: WorldConfig, seed: int, arrays: dict[str, np.ndarray]):
        missing = [k for k in _SAVED if k not in arrays]
        if missing:
            raise ValueError(f"world parameters lack {missing}")
        self.config, self.seed = config, int(seed)
        for k in _SAVED:
            setattr(self, k, arrays[k])
        self._derive()

    # ------------------------------------------------------------------ sizes

    @property
    def n_items(self) -> int:
        return len(self.item_id)

    @property
    def n_users(self) -> int:
        return len(self.u_sens)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_users // self.config.block_users)

    @property
    def t_end(self) -> int:
        return self.config.t0 + self.config.n_days * DAY

    def type_range(self, kind: int) -> tuple[int, int]:
        """[lo, hi) of the internal indices of item kind ``PRODUCT | VIDEO | LIVE | ENT``."""
        c = self.config
        sizes = np.cumsum([0, c.n_products, c.n_videos, c.n_lives, c.n_ent_videos])
        return int(sizes[kind]), int(sizes[kind + 1])

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, config: WorldConfig, seed: int = 0) -> World:
        """Draw a world's catalogue, live schedule and users from ``seed``."""
        a: dict[str, np.ndarray] = {}
        _build_categories(config, seed, a)
        _build_shops(config, seed, a)
        _build_items(config, seed, a)
        _build_schedule(config, seed, a)
        _build_users(config, seed, a)
        return cls(config, seed, a)

    def save(self, dataset_dir: str | Path) -> None:
        """Write ``world/params.npz`` and ``world/config.json`` under ``dataset_dir``."""
        d = Path(dataset_dir) / WORLD_DIR
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "params.npz", **{k: getattr(self, k) for k in _SAVED})
        (d / "config.json").write_text(json.dumps({"format": FORMAT, "seed": self.seed,
                                                   "config": self.config.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, dataset_dir: str | Path) -> World:
        """The world a synthetic dataset was generated from (its oracle), from ``world/``."""
        d = Path(dataset_dir) / WORLD_DIR
        if not (d / "config.json").is_file() or not (d / "params.npz").is_file():
            raise ValueError(f"{d} has no world parameters (config.json, params.npz): is {dataset_dir} "
                             "a dataset made by `onemall data synth`?")
        meta = json.loads((d / "config.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}/config.json: world format {meta.get('format')}, this code reads {FORMAT}")
        with np.load(d / "params.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(WorldConfig.from_dict(meta["config"]), meta["seed"], arrays)

    def _derive(self) -> None:
        c = self.config
        self.id2idx = np.empty(self.n_items, np.int64)
        self.id2idx[self.item_id] = np.arange(self.n_items)
        self.l3_l1 = self.l2_l1[self.l3_l2]
        self.u_l2 = self.l3_l2[self.u_cats]
        self.u_l1 = self.l3_l1[self.u_cats]
        self.u_cumw = np.cumsum(self.u_w, 1)
        self.u_cumw[:, -1] = 1.0
        self.u_scen_cum = np.cumsum(self.u_scen, 1)
        self.u_scen_cum[:, -1] = 1.0
        self.u_taste_cum = np.cumsum(self.u_taste, 1)
        self.u_taste_cum[:, -1] = 1.0
        self.link_cum = np.cumsum(self.genre_link, 1)
        self.link_cum[:, -1] = 1.0
        self.n_genres = self.genre_link.shape[1]
        self.click_bias = np.asarray(c.click_bias, np.float64)
        n_l3, n_l2 = len(self.l3_l2), len(self.l2_l1)
        pr, vr, lr, er = (self.type_range(k) for k in (PRODUCT, VIDEO, LIVE, ENT))
        idx = np.arange(self.n_items)
        self.by_l3 = {PRODUCT: GroupSampler(self.item_l3[pr[0]:pr[1]], self.item_pop[pr[0]:pr[1]], n_l3,
                                            idx[pr[0]:pr[1]]),
                      VIDEO: GroupSampler(self.item_l3[vr[0]:vr[1]], self.item_pop[vr[0]:vr[1]], n_l3,
                                          idx[vr[0]:vr[1]])}
        self.live_by_l2 = GroupSampler(self.l3_l2[self.item_l3[lr[0]:lr[1]]], self.item_pop[lr[0]:lr[1]], n_l2,
                                       idx[lr[0]:lr[1]])
        self.popular = {k: GroupSampler(np.zeros(r[1] - r[0], np.int64), self.item_pop[r[0]:r[1]], 1,
                                        idx[r[0]:r[1]])
                        for k, r in ((PRODUCT, pr), (VIDEO, vr), (LIVE, lr), (ENT, er))}
        self.ent_by_genre = GroupSampler(self.item_genre[er[0]:er[1]].astype(np.int64), self.item_pop[er[0]:er[1]],
                                         self.n_genres, idx[er[0]:er[1]])
        # live schedule lookup: key = live * span + (start - t0), sorted
        self.live_lo = lr[0]
        span = c.n_days * DAY
        self._seg_span = span
        self._seg_key = self.seg_live.astype(np.int64) * span + (self.seg_start - c.t0)

    # ------------------------------------------------------------------ latent state

    def focus(self, u: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """The L3 category user ``u`` is after at time ``ts`` (a closed-form function)."""
        u = np.asarray(u)
        epoch = np.floor((np.asarray(ts) - self.config.t0 + self.u_phase[u]) / self.u_period[u]).astype(np.int64)
        r = hash01(self.seed, 0xF0C05, u, epoch)
        k = _categorical(self.u_cumw[u].reshape(-1, self.u_cumw.shape[1]), r.reshape(-1)).reshape(u.shape)
        return self.u_cats[u, k]

    def segment(self, live_idx: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Row of ``seg_*`` that live ``live_idx`` (internal item index) is in at ``ts``."""
        t = np.clip(np.asarray(ts), self.config.t0, self.t_end - 1) - self.config.t0
        key = (np.asarray(live_idx) - self.live_lo).astype(np.int64) * self._seg_span + t
        return np.searchsorted(self._seg_key, key, side="right") - 1

    def live_products(self, live_ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Item ids of the products each live sells at ``ts`` (``[N, 4]``, -1 padded)."""
        idx = self.index(np.asarray(live_ids))
        if (self.item_type[idx] != LIVE).any():
            raise ValueError("live_products: some ids are not live-streams")
        p = self.seg_prod[self.segment(idx, ts)]
        return np.where(p >= 0, self.item_id[np.maximum(p, 0)], -1)

    def _affinity(self, u: np.ndarray, p: np.ndarray, focus: np.ndarray) -> np.ndarray:
        """affinity(u, p, t) of the module docstring; ``p`` internal product indices (broadcast)."""
        c = self.config
        cat = self.item_l3[p]
        w = self.u_w[u]
        sim = np.where(self.u_cats[u] == cat[..., None], 1.0,
                       np.where(self.u_l2[u] == self.l3_l2[cat][..., None], c.sim_l2,
                                np.where(self.u_l1[u] == self.l3_l1[cat][..., None], c.sim_l1, 0.0)))
        a = np.log(c.interest_eps + (w * sim).sum(-1))
        a += c.focus_bonus * (cat == focus)
        a += c.style_weight * np.einsum("...d,...d->...", self.u_style[u], self.prod_style[p])
        a += self.item_q[p] - c.price_click_weight * self.u_sens[u] * self.item_z[p]
        return a

    def _order_prob(self, u: np.ndarray, p: np.ndarray, a: np.ndarray) -> np.ndarray:
        c = self.config
        return _sigmoid(c.order_bias + c.order_affinity_weight * a + self.shop_q[self.item_shop[p]]
                        - self.u_sens[u] * self.item_z[p])

    def _watch_taste(self, u: np.ndarray, g: np.ndarray) -> np.ndarray:
        return np.log(self.n_genres * self.u_taste[u, g] + 0.05)

    def _funnel(self, u: np.ndarray, ts: np.ndarray, scen: np.ndarray, it: np.ndarray,
                focus: np.ndarray | None = None, live_detail: bool = False):
        """P(click), P(order | click), E[GMV | order] of flat arrays of exposures.

        With ``live_detail`` also returns, for the live rows, (rows, products [n, SLOTS],
        weights [n, SLOTS] proportional to P(this product is the one ordered)).
        """
        c = self.config
        n = len(it)
        focus = self.focus(u, ts) if focus is None else focus
        typ = self.item_type[it]
        logit = np.full(n, -np.inf)
        p_oc = np.zeros(n)
        g_o = np.zeros(n)
        bias = self.click_bias[scen] + c.off_type_bias * (SCENARIO_TYPE[scen] != typ) + self.u_bias[u]
        rows = np.flatnonzero((typ == PRODUCT) | (typ == VIDEO))
        if len(rows):
            ur, ir = u[rows], it[rows]
            p = self.item_prod[ir]
            a = self._affinity(ur, p, focus[rows])
            vid = typ[rows] == VIDEO
            extra = np.where(vid, c.watch_weight * self._watch_taste(ur, np.maximum(self.item_genre[ir], 0))
                             + self.item_q[ir], 0.0)
            logit[rows] = bias[rows] + a + extra
            p_oc[rows] = self._order_prob(ur, p, a)
            g_o[rows] = self.item_price[p]
        detail = None
        rows = np.flatnonzero(typ == LIVE)
        if len(rows):
            ur, ir = u[rows], it[rows]
            prods = self.seg_prod[self.segment(ir, ts[rows])]
            valid = prods >= 0
            pm = np.maximum(prods, 0)
            a = self._affinity(ur[:, None], pm, focus[rows, None])
            a = np.where(valid, a, -np.inf)
            amax = a.max(1, keepdims=True)
            e = np.exp(a - amax) * valid
            lme = amax[:, 0] + np.log(e.sum(1) / valid.sum(1))
            logit[rows] = (bias[rows] + lme + c.watch_weight * self._watch_taste(ur, self.item_genre[ir])
                           + self.item_q[ir])
            pi = e / e.sum(1, keepdims=True)
            po = np.where(valid, self._order_prob(ur[:, None], pm, np.where(valid, a, 0.0)), 0.0)
            w = pi * po
            p_oc[rows] = w.sum(1)
            g_o[rows] = (w * self.item_price[pm]).sum(1) / np.maximum(p_oc[rows], 1e-12)
            if live_detail:
                detail = (rows, prods, w)
        p_click = _sigmoid(logit)  # entertainment rows: logit -inf -> 0
        return (p_click, p_oc, g_o, detail) if live_detail else (p_click, p_oc, g_o)

    # ------------------------------------------------------------------ the oracle

    def index(self, item_ids: np.ndarray) -> np.ndarray:
        """Internal indices of item ids (a ValueError names the first unknown id)."""
        ids = np.asarray(item_ids, np.int64)
        bad = (ids < 0) | (ids >= self.n_items)
        if bad.any():
            raise ValueError(f"unknown item id {int(ids[bad].flat[0])} (this world has ids 0..{self.n_items - 1})")
        return self.id2idx[ids]

    def expected(self, user_id, ts, scenario, item_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ground-truth expected click, order and GMV of showing ``item_ids`` to users.

        Arguments broadcast against each other (numpy rules): ``user_id`` int or array,
        ``ts`` seconds, ``scenario`` a name of ``SCENARIOS`` (or an array of names or codes
        0..2), ``item_ids`` any shape; an item id of -1 is padding and scores 0. Returns
        ``(p_click, p_order, e_gmv)`` arrays of the broadcast shape, where ``p_order`` is
        P(click and order) and ``e_gmv`` = E[GMV] = p_order * E[price | order].
        The sum of each over a list is the list's expected clicks / orders / GMV.
        """
        scen = _scenario_codes(scenario)
        u, t, s, ids = np.broadcast_arrays(np.asarray(user_id, np.int64), np.asarray(ts, np.int64), scen,
                                           np.asarray(item_ids, np.int64))
        shape = ids.shape
        u, t, s, ids = u.ravel(), t.ravel(), s.ravel(), ids.ravel()
        if ((u < 0) | (u >= self.n_users)).any():
            bad = u[(u < 0) | (u >= self.n_users)][0]
            raise ValueError(f"unknown user id {int(bad)} (this world has users 0..{self.n_users - 1})")
        pad = ids == -1
        it = self.index(np.where(pad, self.item_id[0], ids))
        p_click, p_oc, g_o = self._funnel(u, t, s, it)
        p_click[pad] = 0.0
        p_order = p_click * p_oc
        return p_click.reshape(shape), p_order.reshape(shape), (p_order * g_o).reshape(shape)

    def expected_batch(self, user_ids, ts, scenarios, item_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`expected` for ``R`` requests at once: ``user_ids``, ``ts``, ``scenarios`` of
        length R (or a single scenario name), ``item_ids`` ``[R, K]`` (-1 padded);
        returns three ``[R, K]`` arrays."""
        ids = np.asarray(item_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"item_ids must be [R, K], got shape {ids.shape}")
        scen = _scenario_codes(scenarios)
        return self.expected(np.asarray(user_ids)[:, None], np.asarray(ts)[:, None],
                             scen[:, None] if scen.ndim else scen, ids)

    # ------------------------------------------------------------------ logs

    def events_chunk(self, day: int, block: int) -> tuple[pa.Table, pa.Table]:
        """The exposures and the watch log of user block ``block`` on day ``day``.

        Deterministic in ``(seed, day, block)``; rows are sorted by time. Request ids are
        ``day << 44 | block << 24 | j`` (unique across days, blocks and shards).
        """
        c = self.config
        if not (0 <= day < c.n_days and 0 <= block < self.n_blocks):
            raise ValueError(f"chunk (day {day}, block {block}) outside the world "
                             f"({c.n_days} days, {self.n_blocks} blocks)")
        rng = np.random.default_rng([self.seed, 11, day, block])
        users = np.arange(block * c.block_users, min((block + 1) * c.block_users, self.n_users))
        # requests
        ru = np.repeat(users, rng.poisson(c.requests_per_day * self.u_act[users]))
        n_req = len(ru)
        assert n_req < 1 << 24, "too many requests in one chunk: lower block_users"
        hour = np.searchsorted(_HOUR_CUM, rng.random(n_req), side="right")
        rts = c.t0 + day * DAY + hour * 3600 + rng.integers(0, 3600, n_req)
        o = np.argsort(rts, kind="stable")
        ru, rts = ru[o], rts[o]
        rscen = _categorical(self.u_scen_cum[ru], rng.random(n_req)).astype(np.int8)
        rsize = rng.integers(c.request_size[0], c.request_size[1] + 1, n_req)
        rfocus = self.focus(ru, rts)
        rid = (np.int64(day) << np.int64(44)) | (np.int64(block) << np.int64(24)) | np.arange(n_req, dtype=np.int64)
        # exposures
        req = np.repeat(np.arange(n_req), rsize)
        u, scen = ru[req], rscen[req]
        it = self._expose(rng, u, SCENARIO_TYPE[scen], req)
        keep = it >= 0
        req, u, scen, it = req[keep], u[keep], scen[keep], it[keep]
        ts, focus = rts[req], rfocus[req]
        p_click, p_oc, g_o, live = self._funnel(u, ts, scen, it, focus, live_detail=True)
        n = len(it)
        click = rng.random(n) < p_click
        order = click & (rng.random(n) < p_oc)
        gmv = np.where(order, g_o, 0.0)
        if live is not None:  # an order from a live is of one of its current products
            rows, prods, w = live
            sel = order[rows]
            if sel.any():
                cum = np.cumsum(w[sel], 1)
                k = _categorical(cum / cum[:, -1:], rng.random(int(sel.sum())))
                gmv[rows[sel]] = self.item_price[prods[sel, k]]
        typ = self.item_type[it]
        logit = np.log(np.maximum(p_click, 1e-12)) - np.log1p(-np.minimum(p_click, 1 - 1e-9))
        noise = rng.normal(0.0, 1.0, n)
        watch = np.full(n, np.nan)
        v = typ == VIDEO
        watch[v] = self.item_dur[it[v]] * _sigmoid(logit[v] + 1.5 + noise[v] + 2.0 * click[v])
        lv = typ == LIVE
        watch[lv] = rng.exponential(1.0, int(lv.sum())) * (20.0 + 280.0 * click[lv]) * (0.5 + p_click[lv])
        events = pa.table({
            "request_id": rid[req], "user_id": u.astype(np.int64), "ts": ts.astype(np.int64),
            "scenario": _enum(scen, SCENARIOS), "item_id": self.item_id[it],
            "click": click.astype(np.int8), "order": order.astype(np.int8), "gmv": gmv.astype(np.float32),
            "watch_s": pa.array(watch.astype(np.float32), mask=np.isnan(watch)),
        })
        return events, self._watches(rng, day, users, ru, rts, rfocus)

    def _expose(self, rng: np.random.Generator, u: np.ndarray, typ: np.ndarray, req: np.ndarray) -> np.ndarray:
        """The exposure policy: items of type ``typ`` for each row, distinct within a request."""
        n = len(u)
        it = np.full(n, -1, np.int64)
        personal = rng.random(n) < self.config.p_personal
        cat = self.u_cats[u, _categorical(self.u_cumw[u], rng.random(n))]
        r = rng.random(n)
        for kind, sampler, group in ((PRODUCT, self.by_l3[PRODUCT], cat), (VIDEO, self.by_l3[VIDEO], cat),
                                     (LIVE, self.live_by_l2, self.l3_l2[cat])):
            m = personal & (typ == kind)
            it[m] = sampler.sample(group[m], r[m])
        for attempt in range(4):  # popular items for the rest, then redraw duplicates in a request
            todo = np.flatnonzero(it < 0)
            for kind in (PRODUCT, VIDEO, LIVE):
                m = todo[typ[todo] == kind]
                it[m] = self.popular[kind].sample(np.zeros(len(m), np.int64), rng.random(len(m)))
            key = req.astype(np.int64) * self.n_items + it
            o = np.argsort(key, kind="stable")
            dup = np.zeros(n, bool)
            dup[o[1:][key[o][1:] == key[o][:-1]]] = True
            if not dup.any():
                break
            it[dup] = -1
        return it

    def _watches(self, rng: np.random.Generator, day: int, users: np.ndarray, ru: np.ndarray, rts: np.ndarray,
                 rfocus: np.ndarray) -> pa.Table:
        c = self.config
        n_req = len(ru)
        m = np.where(rng.random(n_req) < c.p_watch_before, 1 + rng.binomial(2, 0.4, n_req), 0)
        wr = np.repeat(np.arange(n_req), m)
        gaps = rng.uniform(40.0, 240.0, len(wr))
        cs = np.cumsum(gaps)
        start = np.repeat(np.cumsum(m) - m, m)  # first watch of the same request
        wts = rts[wr] - np.round(cs - cs[start] + gaps[start]).astype(np.int64)
        wu = ru[wr]
        linked = rng.random(len(wr)) < c.p_watch_linked
        r = rng.random(len(wr))
        genre = np.where(linked, _categorical(self.link_cum[rfocus[wr]], r), _categorical(self.u_taste_cum[wu], r))
        # background watching, unrelated to shopping
        bu = np.repeat(users, rng.poisson(c.background_watches_per_day, len(users)))
        bts = c.t0 + day * DAY + rng.integers(0, DAY, len(bu))
        bgenre = _categorical(self.u_taste_cum[bu], rng.random(len(bu)))
        wu, wts = np.concatenate([wu, bu]), np.concatenate([wts, bts])
        genre, linked = np.concatenate([genre, bgenre]), np.concatenate([linked, np.zeros(len(bu), bool)])
        n = len(wu)
        r = rng.random(n)
        it = self.ent_by_genre.sample(genre, r)
        miss = it < 0  # a genre without videos (tiny worlds): any popular one
        it[miss] = self.popular[ENT].sample(np.zeros(int(miss.sum()), np.int64), r[miss])
        g = self.item_genre[it]
        frac = _sigmoid(-1.8 + self._watch_taste(wu, g) + 1.0 * linked + rng.normal(0.0, 1.0, n))
        watch_s = self.item_dur[it] * frac
        o = np.argsort(wts, kind="stable")
        return pa.table({"user_id": wu[o].astype(np.int64), "ts": wts[o].astype(np.int64),
                         "item_id": self.item_id[it[o]], "watch_s": watch_s[o].astype(np.float32)})

    # ------------------------------------------------------------------ catalogue tables

    def categories_table(self) -> pa.Table:
        return pa.table({"category_id": self.cat_id.astype(np.int32), "name": self.cat_name.tolist(),
                         "level": self.cat_level.astype(np.int8),
                         "parent_id": pa.array(self.cat_parent.astype(np.int32), mask=self.cat_parent < 0)})

    def users_table(self) -> pa.Table:
        """Observable profile columns only (the latent taste stays in ``world/``)."""
        return pa.table({"user_id": np.arange(self.n_users, dtype=np.int64),
                         "age_band": _enum(self.u_age, AGE_BANDS), "city_tier": _enum(self.u_city, CITY_TIERS),
                         "device": _enum(self.u_device, DEVICES)})

    def schedule_tables(self, rows: int = 1 << 20):
        """``live_schedule`` in batches: one row per (segment, product), by live then time."""
        for lo in range(0, len(self.seg_live), rows):
            sl = slice(lo, lo + rows)
            prods = self.seg_prod[sl]
            seg, k = np.nonzero(prods >= 0)
            live = self.seg_live[sl][seg].astype(np.int64) + self.live_lo
            yield pa.table({"live_id": self.item_id[live], "product_id": self.item_id[prods[seg, k]],
                            "start_ts": self.seg_start[sl][seg], "end_ts": self.seg_end[sl][seg]})

    def items_tables(self, rows: int = 2048):
        """``items`` in batches, with generated titles, texts and rendered images."""
        c = self.config
        templates = self._templates()
        pool = self._image_pool(templates) if c.image_pool else None
        words = {"l3": self.l3_words.tolist(), "l2": self.l2_noun.tolist(), "mod": self.l3_mod.tolist(),
                 "l1": self.l1_name.tolist(), "brand": self.shop_brand.tolist(), "creator": self.creator_name.tolist(),
                 "ptitle": []}  # product titles, kept for the videos that sell them (products come first)
        for b, lo in enumerate(range(0, self.n_items, rows)):
            rng = np.random.default_rng([self.seed, 21, b])
            r = random.Random(int(rng.integers(2**63)))
            yield self._items_batch(rng, r, np.arange(lo, min(lo + rows, self.n_items)), templates, pool, words)

    def _templates(self) -> np.ndarray:
        """One image template per commerce L3, then one per entertainment L3."""
        c = self.config
        s = c.image_size
        tpl = []
        n_l1 = len(self.l1_cid)
        l2_rank = np.zeros(len(self.l2_l1), np.int64)  # position of an L2 within its L1
        for i in range(n_l1):
            l2s = np.flatnonzero(self.l2_l1 == i)
            l2_rank[l2s] = np.arange(len(l2s))
        l3_rank = np.zeros(len(self.l3_l2), np.int64)
        for j in range(len(self.l2_l1)):
            l3s = np.flatnonzero(self.l3_l2 == j)
            l3_rank[l3s] = np.arange(len(l3s))
        for k in range(len(self.l3_l2)):
            i, j, r = self.l3_l1[k], l2_rank[self.l3_l2[k]], l3_rank[k]
            hue = i / n_l1
            tpl.append(I.template(pattern=int(j) % 6, freq=1 + int(r) + int(j) // 6, hue1=hue,
                                  hue2=hue + 0.12 + 0.05 * int(r), size=s))
        per = c.ent_l3_per_genre
        for e in range(len(self.ent_l3_cid)):
            g, f = divmod(e, per)
            hue = (g + 0.5) / self.n_genres
            tpl.append(I.template(pattern=6 + g % 2, freq=2 + f + (g // 2) % 3, hue1=hue, hue2=hue + 0.5,
                                  size=s, sat=0.35))
        return np.stack(tpl)

    def _image_pool(self, templates: np.ndarray) -> list[list[list[bytes]]]:
        """``pool[template][band]``: ``image_pool`` encoded variants each (large worlds)."""
        k = self.config.image_pool
        rng = np.random.default_rng([self.seed, 22])
        t, b = np.meshgrid(np.arange(len(templates)), np.arange(5), indexing="ij")
        t, b = np.repeat(t.ravel(), k), np.repeat(b.ravel(), k)
        pngs = []
        for lo in range(0, len(t), 4096):
            sl = slice(lo, lo + 4096)
            pngs += I.encode_png(I.render(templates, t[sl], 0.7 + 0.1 * b[sl], rng.random(len(t[sl])), rng))
        return [[pngs[(ti * 5 + bi) * k:(ti * 5 + bi + 1) * k] for bi in range(5)] for ti in range(len(templates))]

    def _items_batch(self, rng: np.random.Generator, r: random.Random, idx: np.ndarray, templates: np.ndarray,
                     pool, words: dict) -> pa.Table:
        c = self.config
        n_l3, n_shops = len(self.l3_l2), len(self.shop_q)
        typ, prod, l3, genre = self.item_type[idx], self.item_prod[idx], self.item_l3[idx], self.item_genre[idx]
        shop, tpl = self.item_shop[idx], self.item_tpl[idx]
        titles, texts = [], []
        ptitle = words["ptitle"]
        for t, p, k, g, s, e in zip(typ.tolist(), prod.tolist(), l3.tolist(), genre.tolist(), shop.tolist(),
                                    tpl.tolist()):
            if t == PRODUCT:
                assert p == len(ptitle), "products are generated first, in order"
                tt, tx = T.product_text(r, words["brand"][s], int(self.item_band[p]), words["l3"][k],
                                        words["l2"][self.l3_l2[k]], words["mod"][k], words["l1"][self.l3_l1[k]])
                ptitle.append(tt)
            elif t == VIDEO:
                tt, tx = T.video_text(r, ptitle[p], words["l2"][self.l3_l2[k]], words["l3"][k], T.GENRES[g])
            elif t == LIVE:
                tt, tx = T.live_text(r, words["brand"][s], words["l1"][self.l3_l1[k]], words["l2"][self.l3_l2[k]])
            else:
                tt, tx = T.entertainment_text(r, T.GENRES[g], T.GENRE_FORMATS[(e - n_l3) % c.ent_l3_per_genre],
                                              words["creator"][s - n_shops])
            titles.append(tt)
            texts.append(tx)
        # images: products and lives 1, videos 2..max_frames frames (cutting between product and genre looks)
        n_frames = np.where((typ == PRODUCT) | (typ == LIVE), 1,
                            rng.integers(min(2, c.max_frames), c.max_frames + 1, len(idx)))
        j = np.repeat(np.arange(len(idx)), n_frames)
        f = np.arange(len(j)) - np.repeat(np.cumsum(n_frames) - n_frames, n_frames)
        f_tpl = np.where((typ[j] == VIDEO) & (f % 2 == 1), n_l3 + genre[j].astype(np.int64) * c.ent_l3_per_genre,
                         tpl[j])
        sells = (typ[j] == PRODUCT) | (typ[j] == VIDEO)
        f_band = np.where(sells, self.item_band[np.maximum(prod[j], 0)], 2)
        f_hue = np.where(typ[j] == ENT, 0.0, self.shop_hue[np.minimum(shop[j], n_shops - 1)])
        f_shift = 3 * f
        if pool is None:
            shift = (np.asarray(f_shift)[:, None] + rng.integers(0, 4, (len(f_tpl), 2))) % c.image_size
            pngs = []
            for lo in range(0, len(f_tpl), 1024):  # bounded memory
                sl = slice(lo, lo + 1024)
                pngs += I.encode_png(I.render(templates, f_tpl[sl], 0.7 + 0.1 * f_band[sl], f_hue[sl], rng,
                                              shift=shift[sl]))
        else:
            var = rng.integers(0, c.image_pool, len(f_tpl))
            pngs = [pool[t][b][v] for t, b, v in zip(f_tpl, f_band, var)]
        offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int32)
        typ = self.item_type[idx]
        prod = self.item_prod[idx]
        has_prod = typ == VIDEO
        cat = self.item_cat[idx]
        return pa.table({
            "item_id": self.item_id[idx], "item_type": _enum(typ, TYPE_NAMES), "title": titles, "text": texts,
            "images": pa.ListArray.from_arrays(pa.array(offsets), pa.array(pngs, pa.binary())),
            "category": pa.ListArray.from_arrays(pa.array(np.arange(0, 3 * len(idx) + 1, 3, dtype=np.int32)),
                                                 pa.array(cat.ravel().astype(np.int32))),
            "price": self.item_price[idx].astype(np.float32),
            "shop_id": self.item_shop[idx].astype(np.int64),
            "product_id": pa.array(np.where(has_prod, self.item_id[np.maximum(prod, 0)], 0), mask=~has_prod),
        })


def _enum(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes, np.int32)), pa.array(list(names))).cast(
        pa.string())


def _scenario_codes(scenario) -> np.ndarray:
    s = np.asarray(scenario)
    if s.dtype.kind in "USO":
        names = np.array(SCENARIOS)
        order = np.argsort(names)
        pos = np.minimum(np.searchsorted(names[order], s.astype(str)), len(names) - 1)
        ok = names[order][pos] == s.astype(str)
        if not np.all(ok):
            raise ValueError(f"unknown scenario {s[~ok].flat[0] if s.ndim else s!r}; one of {SCENARIOS}")
        return order[pos].astype(np.int8)
    if ((s < 0) | (s >= len(SCENARIOS))).any():
        raise ValueError(f"scenario codes must be 0..{len(SCENARIOS) - 1} ({SCENARIOS})")
    return s.astype(np.int8)


# ----------------------------------------------------------------------------- building


def _build_categories(c: WorldConfig, seed: int, a: dict) -> None:
    rng = np.random.default_rng([seed, 1])
    chosen = np.sort(rng.choice(len(T.L1_CATEGORIES), c.n_l1, replace=False))
    l1_name, l2_l1, l2_noun, l3_l2, l3_mod = [], [], [], [], []
    link_genres = []
    for i, k in enumerate(chosen):
        name, nouns, genres = T.L1_CATEGORIES[k]
        l1_name.append(name)
        link_genres.append([T.GENRES.index(g) for g in genres])
        for noun in rng.choice(nouns, rng.integers(c.l2_per_l1[0], c.l2_per_l1[1] + 1), replace=False):
            j = len(l2_noun)
            l2_l1.append(i)
            l2_noun.append(str(noun))
            for mod in rng.choice(T.MODIFIERS, rng.integers(c.l3_per_l2[0], c.l3_per_l2[1] + 1), replace=False):
                l3_l2.append(j)
                l3_mod.append(str(mod))
    n_l1, n_l2, n_l3, n_g = len(l1_name), len(l2_noun), len(l3_l2), len(T.GENRES)
    n_e3 = n_g * c.ent_l3_per_genre
    # ids: L1s (commerce, then Entertainment), L2s (commerce, then genres), L3s (commerce, then formats)
    l1_cid = np.arange(1, n_l1 + 1)
    ent_l1 = n_l1 + 1
    l2_cid = np.arange(ent_l1 + 1, ent_l1 + 1 + n_l2)
    genre_cid = np.arange(l2_cid[-1] + 1, l2_cid[-1] + 1 + n_g)
    l3_cid = np.arange(genre_cid[-1] + 1, genre_cid[-1] + 1 + n_l3)
    ent_l3_cid = np.arange(l3_cid[-1] + 1, l3_cid[-1] + 1 + n_e3)
    l2_l1, l3_l2 = np.asarray(l2_l1), np.asarray(l3_l2)
    names = (l1_name + ["Entertainment"] + l2_noun + list(T.GENRES)
             + [f"{l2_noun[l3_l2[k]]} {l3_mod[k]}" for k in range(n_l3)]
             + [f"{T.GENRES[e // c.ent_l3_per_genre]} {T.GENRE_FORMATS[e % c.ent_l3_per_genre]}" for e in range(n_e3)])
    level = [1] * (n_l1 + 1) + [2] * (n_l2 + n_g) + [3] * (n_l3 + n_e3)
    parent = ([-1] * (n_l1 + 1) + l1_cid[l2_l1].tolist() + [ent_l1] * n_g + l2_cid[l3_l2].tolist()
              + genre_cid[np.arange(n_e3) // c.ent_l3_per_genre].tolist())
    # which genres a category's fans watch: its L1's linked genres (Dirichlet weights per L3), a little of the rest
    filtered = np.isin(np.array(T.GENRES), T.FILTERED_GENRES)
    link = np.zeros((n_l3, n_g))
    for k in range(n_l3):
        gs = link_genres[l2_l1[l3_l2[k]]]
        link[k, gs] = 0.9 * rng.dirichlet(np.ones(len(gs)))
        link[k, ~filtered] += 0.1 / (~filtered).sum()
    a.update(
        cat_id=np.arange(1, len(names) + 1, dtype=np.int32), cat_name=np.array(names), cat_level=np.array(level, np.int8),
        cat_parent=np.array(parent, np.int32), l1_name=np.array(l1_name), l1_cid=l1_cid.astype(np.int32),
        l2_l1=l2_l1.astype(np.int32), l2_noun=np.array(l2_noun), l2_cid=l2_cid.astype(np.int32),
        l3_l2=l3_l2.astype(np.int32), l3_mod=np.array(l3_mod), l3_cid=l3_cid.astype(np.int32),
        l3_words=np.array(T.made_up_words(rng, 3 * n_l3)).reshape(n_l3, 3), l3_pop=_zipf(rng, n_l3, c.category_zipf_a),
        genre_cid=genre_cid.astype(np.int32), ent_l1_cid=np.int32(ent_l1), ent_l3_cid=ent_l3_cid.astype(np.int32),
        genre_link=link.astype(np.float64),
    )


def _build_shops(c: WorldConfig, seed: int, a: dict) -> None:
    rng = np.random.default_rng([seed, 2])
    n_l2 = len(a["l2_l1"])
    l2_pop = np.bincount(a["l3_l2"], weights=a["l3_pop"], minlength=n_l2)
    first = rng.permutation(n_l2)[:c.n_shops]  # every L2 has a shop when there are enough shops
    rest = rng.choice(n_l2, c.n_shops - len(first), p=l2_pop / l2_pop.sum())
    shop_l2 = np.concatenate([first, rest])
    # a second L2 in the same L1 for some shops
    l2_of_l1 = GroupSampler(a["l2_l1"], np.ones(n_l2), len(a["l1_cid"]))
    second = l2_of_l1.sample(a["l2_l1"][shop_l2], rng.random(c.n_shops))
    shop_l2b = np.where((rng.random(c.n_shops) < 0.3) & (second != shop_l2), second, -1)
    a.update(shop_l2=shop_l2.astype(np.int32), shop_l2b=shop_l2b.astype(np.int32),
             shop_q=rng.normal(0, 0.3, c.n_shops), shop_hue=rng.random(c.n_shops),
             shop_brand=np.array(T.made_up_words(rng, c.n_shops)),
             creator_name=np.array(T.made_up_words(rng, max(1, c.n_ent_videos // 6))))
    a["_shop_style"] = rng.normal(0, 1, (c.n_shops, c.style_dim))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def _build_items(c: WorldConfig, seed: int, a: dict) -> None:
    n_l3, n_l2 = len(a["l3_l2"]), len(a["l2_l1"])
    P, V, L, E = c.n_products, c.n_videos, c.n_lives, c.n_ent_videos
    N = P + V + L + E
    l3_l1 = a["l2_l1"][a["l3_l2"]]
    n_shops = c.n_shops
    # products
    rng = np.random.default_rng([seed, 3])
    mu = np.log([_L1_PRICE[str(n)] for n in a["l1_name"]])[l3_l1] + rng.normal(0, 0.4, n_l3)
    p_l3 = rng.choice(n_l3, P, p=a["l3_pop"] / a["l3_pop"].sum())
    shop_entries = np.concatenate([a["shop_l2"], a["shop_l2b"]])
    shop_of_entry = np.concatenate([np.arange(n_shops), np.arange(n_shops)])
    shops_by_l2 = GroupSampler(shop_entries, np.ones(len(shop_entries)), n_l2, shop_of_entry)
    p_shop = shops_by_l2.sample(a["l3_l2"][p_l3], rng.random(P))
    p_shop = np.where(p_shop >= 0, p_shop, rng.integers(0, n_shops, P))
    z = rng.normal(0, 1, P)
    price = np.maximum(np.round(np.exp(mu[p_l3] + 0.5 * z)) - 0.01, 0.99)
    pop_p = _zipf(rng, P, c.zipf_a)
    q_p = 0.3 * _zscore(np.log(pop_p)) + rng.normal(0, 0.4, P)
    style = _unit(a.pop("_shop_style")[p_shop] + 0.8 * rng.normal(0, 1, (P, c.style_dim)))
    # e-commerce short-videos: popular products get more videos
    rng = np.random.default_rng([seed, 4])
    v_prod = rng.choice(P, V, p=pop_p / pop_p.sum())
    link_cum = np.cumsum(a["genre_link"], 1)
    filtered = np.flatnonzero(np.isin(np.array(T.GENRES), T.FILTERED_GENRES))
    v_genre = np.where(rng.random(V) < 0.7, _categorical(link_cum[p_l3[v_prod]], rng.random(V)),
                       filtered[rng.integers(0, len(filtered), V)])
    pop_v = _zipf(rng, V, c.zipf_a)
    q_v = 0.2 * _zscore(np.log(pop_v)) + rng.normal(0, 0.4, V)
    dur_v = rng.uniform(10, 90, V)
    # live-streams: a shop's channel, more likely for big shops
    rng = np.random.default_rng([seed, 5])
    shop_size = np.bincount(p_shop, minlength=n_shops).astype(np.float64)
    l_shop = rng.choice(n_shops, L, p=shop_size / shop_size.sum())
    prod_by_shop = GroupSampler(p_shop, pop_p, n_shops)
    l_rep = prod_by_shop.sample(l_shop, rng.random(L))  # a representative product: the live's category
    l_l3 = p_l3[l_rep]
    l_genre = _categorical(link_cum[l_l3], rng.random(L))
    shop_price = np.bincount(p_shop, weights=price, minlength=n_shops) / np.maximum(shop_size, 1)
    pop_l = _zipf(rng, L, c.zipf_a)
    q_l = 0.2 * _zscore(np.log(pop_l)) + rng.normal(0, 0.3, L)
    # entertainment videos: generic genres are the most produced
    rng = np.random.default_rng([seed, 6])
    gw = np.where(np.isin(np.array(T.GENRES), T.FILTERED_GENRES), 3.0, 1.0)
    e_genre = rng.choice(len(T.GENRES), E, p=gw / gw.sum())
    e_l3 = e_genre * c.ent_l3_per_genre + rng.integers(0, c.ent_l3_per_genre, E)
    e_creator = rng.integers(0, len(a["creator_name"]), E)
    pop_e = _zipf(rng, E, c.zipf_a)
    dur_e = rng.uniform(15, 180, E)
    # global arrays: products, videos, lives, entertainment
    item_type = np.concatenate([np.full(P, PRODUCT), np.full(V, VIDEO), np.full(L, LIVE), np.full(E, ENT)])
    item_l3 = np.concatenate([p_l3, p_l3[v_prod], l_l3, np.full(E, -1)])
    cl3 = np.maximum(item_l3, 0)
    item_cat = np.stack([a["l1_cid"][l3_l1[cl3]], a["l2_cid"][a["l3_l2"][cl3]], a["l3_cid"][cl3]], 1)
    ent = item_type == ENT
    item_cat[ent] = np.stack([np.full(E, a["ent_l1_cid"]), a["genre_cid"][e_genre], a["ent_l3_cid"][e_l3]], 1)
    band = np.digitize(z, _BAND_EDGES)
    rng = np.random.default_rng([seed, 9])
    a.update(
        item_id=rng.permutation(N).astype(np.int64),
        item_type=item_type.astype(np.int8), item_l3=item_l3.astype(np.int32), item_cat=item_cat.astype(np.int32),
        item_tpl=np.where(ent, n_l3 + np.concatenate([np.zeros(P + V + L, np.int64), e_l3]), cl3).astype(np.int32),
        item_prod=np.concatenate([np.arange(P), v_prod, np.full(L + E, -1)]).astype(np.int32),
        item_genre=np.concatenate([np.full(P, -1), v_genre, l_genre, e_genre]).astype(np.int16),
        item_shop=np.concatenate([p_shop, p_shop[v_prod], l_shop, n_shops + e_creator]).astype(np.int64),
        item_price=np.concatenate([price, price[v_prod], shop_price[l_shop], np.zeros(E)]).astype(np.float32),
        item_z=np.concatenate([z, z[v_prod], np.zeros(L + E)]).astype(np.float32),
        item_band=np.concatenate([band, band[v_prod], np.full(L + E, 2)]).astype(np.int8),
        item_q=np.concatenate([q_p, q_v, q_l, np.zeros(E)]).astype(np.float32),
        item_pop=np.concatenate([pop_p, pop_v, pop_l, pop_e]),
        item_dur=np.concatenate([np.zeros(P), dur_v, np.zeros(L), dur_e]).astype(np.float32),
        prod_style=style.astype(np.float32),
    )


def _build_schedule(c: WorldConfig, seed: int, a: dict) -> None:
    """What each live-stream sells: 2-5 segments a day, each selling 1-4 products (mostly its shop's)."""
    L, P = c.n_lives, c.n_products
    n_l2 = len(a["l2_l1"])
    lo = c.n_products + c.n_videos
    l_shop = a["item_shop"][lo:lo + L]
    p_shop = a["item_shop"][:P]
    pop = a["item_pop"][:P]
    by_shop = GroupSampler(p_shop, pop, c.n_shops)
    by_l2 = GroupSampler(a["l3_l2"][a["item_l3"][:P]], pop, n_l2)
    l_l2 = a["l3_l2"][a["item_l3"][lo:lo + L]]
    parts = []
    for d in range(c.n_days):  # one stream per day: a longer world extends a shorter one
        rng = np.random.default_rng([seed, 7, d])
        nseg = rng.integers(2, 6, L)
        live = np.repeat(np.arange(L), nseg)
        s = len(live)
        u = rng.random(s)
        first = np.cumsum(nseg) - nseg
        u[first] = 0.0
        o = np.lexsort((u, live))
        live, u = live[o], u[o]
        day0 = c.t0 + d * DAY
        start = day0 + np.floor(u * DAY).astype(np.int64)
        end = np.append(start[1:], 0)
        last = np.append(live[1:] != live[:-1], True)
        end[last] = day0 + DAY
        count = rng.integers(1, SLOTS + 1, s)
        prods = np.full((s, SLOTS), -1, np.int64)
        for k in range(SLOTS):
            r = rng.random(s)
            own = by_shop.sample(l_shop[live], r)
            cross = by_l2.sample(l_l2[live], r)
            pick = np.where((rng.random(s) < 0.15) & (cross >= 0) & (k > 0), cross, own)
            prods[:, k] = np.where(k < count, pick, -1)
        prods.sort(1)
        dup = np.concatenate([np.zeros((s, 1), bool), prods[:, 1:] == prods[:, :-1]], 1)
        prods[dup] = -1
        prods = -np.sort(-prods, 1)  # valid first
        parts.append((live, start, end, prods))
    live, start, end, prods = (np.concatenate([p[i] for p in parts]) for i in range(4))
    o = np.lexsort((start, live))
    a.update(seg_live=live[o].astype(np.int32), seg_start=start[o], seg_end=end[o], seg_prod=prods[o].astype(np.int32))


def _build_users(c: WorldConfig, seed: int, a: dict) -> None:
    rng = np.random.default_rng([seed, 8])
    U, K = c.n_users, c.n_interests[1]
    n_l3 = len(a["l3_l2"])
    l3_l1 = a["l2_l1"][a["l3_l2"]]
    n_int = rng.integers(c.n_interests[0], K + 1, U)
    cats = rng.choice(n_l3, (U, K), p=a["l3_pop"] / a["l3_pop"].sum())
    same = GroupSampler(l3_l1, a["l3_pop"], len(a["l1_cid"]))
    near = same.sample(np.repeat(l3_l1[cats[:, 0]], K), rng.random(U * K)).reshape(U, K)
    pick_near = (rng.random((U, K)) < c.p_interest_same_l1) & (np.arange(K) > 0)
    cats = np.where(pick_near, near, cats)
    w = rng.gamma(c.interest_alpha, size=(U, K)) * (np.arange(K) < n_int[:, None])
    w = w / w.sum(1, keepdims=True)
    sens = np.exp(rng.normal(np.log(0.8), 0.5, U))
    n_g = len(T.GENRES)
    base = np.where(np.isin(np.array(T.GENRES), T.FILTERED_GENRES), 3.0, 0.3)
    taste = 0.5 * _dirichlet_rows(rng, base, U)
    for k in range(K):
        taste += 0.5 * w[:, k, None] * a["genre_link"][cats[:, k]]
    taste = taste.astype(np.float32)
    act = np.exp(rng.normal(0, 0.7, U))
    period = rng.uniform(*c.focus_days, U) * DAY
    device = np.digitize(np.log(sens) + rng.normal(0, 0.3, U), [np.log(0.6), np.log(1.1)])
    a.update(
        u_cats=cats.astype(np.int32), u_w=w, u_sens=sens, u_bias=rng.normal(0, 0.3, U), u_act=act / act.mean(),
        u_scen=_dirichlet_rows(rng, np.array([1.5, 1.0, 0.6]), U),
        u_style=_unit(rng.normal(0, 1, (U, c.style_dim))).astype(np.float32), u_taste=taste,
        u_period=period, u_phase=rng.random(U) * period,
        u_age=rng.integers(0, len(AGE_BANDS), U).astype(np.int8),
        u_city=rng.choice(len(CITY_TIERS), U, p=[0.2, 0.3, 0.3, 0.2]).astype(np.int8),
        u_device=device.astype(np.int8),
    )
    assert taste.shape == (U, n_g)
