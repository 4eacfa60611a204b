"""Stage 2: semantic IDs (paper §2.2, §3.1.3, Table 5).

    onemall quantize fit     -c configs/quantize/tiny.yaml     # k-means levels, live two-tower, FSQ level
    onemall quantize export  -c configs/quantize/tiny.yaml     # -> artifacts/<dataset>/quantize/
    onemall quantize ablate  --artifact artifacts/synth/quantize        # Table 5: ResKmeans vs ResKmeans+FSQ
    onemall quantize refresh-live --artifact artifacts/synth/quantize --at 1700000000
    onemall quantize predict --artifact artifacts/synth/quantize --embeddings new.parquet --out new_sids.parquet

Inputs per item type (§3.1.3), each quantized by its own tokenizer (its own input space):

- product: its product embedding from stage 1 (D).
- video (e-commerce short-video): concat(its product's embedding, its video embedding) (2D).
  Entertainment videos (no ``product_id``) are not e-commerce items and get no SID; they are
  counted in the manifest (``metrics.inputs.skipped_entertainment_videos``).
- live (live-stream): the item-tower embedding of a two-tower model trained on live-stream
  clicks. The item tower sees the live-stream's shop and the categories and semantic-ID codes
  of the products it sells at that time (``live_schedule``), so its SID moves when its products
  change; ``refresh-live --at TS`` recomputes them. The item tower learns at a lower rate
  (``item_lr_scale``), as in the paper, to keep the codes from churning. The user tower pools
  the user's click sequence (items strictly before the click).

The item tower's space is not the LLM embeddings', so live-streams get their own codebooks
(fitted on item-tower vectors of every (live-stream, schedule change) snapshot, not only the
current one). Simplification: the product SID codes fed to the item tower are the k-means
levels (the FSQ level is the fine, near-uniform disambiguation code, "sacrificing semantic
information", §4.5, and would only add noise as a feature); this also lets the live tokenizer be
fitted in the same run as the product one.

Each type's tokenizer is Res-Kmeans for the first levels (faiss, deterministic for a seed) and a
binary FSQ last level trained with Lightning (``onemall_pl.quant.fsq``); ``model.fsq_bits: null``
makes every level k-means (the Table 5 baseline). All types share ``codebook_sizes`` (one
vocabulary per level for the downstream model); a SID is unique within an item type, so a
decoder maps (item type, SID) to items: the scenario says which type it retrieves.

Fit order: ``QuantizeDataModule.prepare_data`` (rank 0, cached under ``cache_dir``) builds the
inputs, fits the k-means levels of products and videos, trains the live two-tower (its own
single-device Trainer) and fits the live k-means levels; then the Trainer trains the FSQ levels
of all types together (one CombinedLoader batch holds a batch of each type).

Artifact ``artifacts/<dataset>/quantize/``:

- ``sid_table/part-00000.parquet``  item_id int64, item_type string, sid list<int32>
- ``sid_items/part-00000.parquet``  the reverse map: item_type, sid, item_ids (ranked), scores.
  Items sharing a SID are ranked by click count in the events log (most clicked first), then
  by item_id; ``scores`` holds the click counts.
- ``tokenizers.pt`` (codebooks + FSQ weights of each type, the FSQ checkpoint),
  ``codebooks/<type>.npz`` (the k-means levels, numpy), ``twotower.pt`` (live item tower and
  its feature vocabularies).
- manifest sizes: ``codebook_sizes``, ``num_levels``, ``dims``; metrics: conflict / exclusive
  rates, per-level utilisation and perplexity, per item type and overall.

``refresh-live`` republishes the whole folder (atomically, in place by default, or ``--out``)
with the live-stream rows recomputed at ``--at``; its manifest records ``live_at`` and gets a
new id, so downstream stages see the change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from onemall_pl.artifacts import ArtifactError, Manifest, load_manifest, stage_dir, write_artifact
from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.data.datasets import MapLoader
from onemall_pl.io import atomic_dir, atomic_file, read_table, write_json
from onemall_pl.models.twotower import FeatureTower, TowerConfig
from onemall_pl.quant import FSQConfig, ResKMeans, SIDTokenizer, check_embeddings, reverse_map, stats_by_type
from onemall_pl.stage import StageCLI

TYPES = ("product", "video", "live")
SID_TABLE_SCHEMA = pa.schema([pa.field("item_id", pa.int64(), nullable=False),
                              pa.field("item_type", pa.string(), nullable=False),
                              pa.field("sid", pa.list_(pa.int32()), nullable=False)])

# ----------------------------------------------------------------------------- inputs per type


def read_embeddings(path: str | Path, dim: int | None = None) -> tuple[pa.Table, np.ndarray]:
    """An ``embeddings`` Parquet (file or folder): the table and its vectors [N, D], checked."""
    t = pq.read_table(path)
    need = {"item_id", "item_type", "embedding"}
    if not need <= set(t.column_names):
        raise ValueError(f"{path}: an embeddings table needs columns {sorted(need)}, it has {t.column_names}")
    if "product_id" not in t.column_names:
        t = t.append_column("product_id", pa.nulls(t.num_rows, pa.int64()))
    ids = t.column("item_id").to_numpy()
    col = t.column("embedding").combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{path}: item_id {ids[row]} (row {row}) has no embedding")
    lens = pc.list_value_length(col).to_numpy()
    dim = int(lens[0]) if dim is None and len(lens) else dim
    bad = np.flatnonzero(lens != dim)
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"{path}: item_id {ids[row]} (row {row}) has an embedding of dimension {lens[row]}, "
                         f"expected {dim} (the tokenizer manifest's embedding_dim)")
    x = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), dim)
    return t, check_embeddings(x, ids=ids, what=str(path))


def static_inputs(t: pa.Table, x_ND: np.ndarray, extra_products: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Product and video inputs (§3.1.3) from an embeddings table; live rows are ignored here.

    ``extra_products`` (ids, vectors) supplies product embeddings a video may refer to that are
    not in ``t`` (for ``predict`` over new videos of known products).
    """
    ids = t.column("item_id").to_numpy()
    types = np.asarray(t.column("item_type").to_pylist())
    pid = t.column("product_id")
    has_pid = pid.is_valid().to_numpy(zero_copy_only=False) if pid.null_count else np.ones(len(ids), bool)
    pid = pc.fill_null(pid, -1).to_numpy()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    prod = types == "product"
    if prod.any():
        out["product"] = (ids[prod], x_ND[prod])
    video = (types == "video") & has_pid
    if video.any():
        known_ids, known_x = ids[prod], x_ND[prod]
        if extra_products is not None:
            known_ids = np.concatenate([known_ids, extra_products[0]])
            known_x = np.concatenate([known_x, extra_products[1]])
        order = np.argsort(known_ids, kind="stable")
        pos = np.searchsorted(known_ids[order], pid[video])
        pos = np.minimum(pos, max(len(order) - 1, 0))
        found = (known_ids[order][pos] == pid[video]) if len(order) else np.zeros(len(pos), bool)
        if not found.all():
            row = int(np.flatnonzero(video)[np.flatnonzero(~found)[0]])
            raise ValueError(f"video item_id {ids[row]} (row {row}) sells product {pid[row]}, which has no "
                             "product embedding (a short-video's input is concat(product emb, video emb))")
        out["video"] = (ids[video], np.concatenate([known_x[order][pos], x_ND[video]], 1))  # §3.1.3
    info = {"skipped_entertainment_videos": int(((types == "video") & ~has_pid).sum()),
            "ignored_live_rows": int((types == "live").sum())}
    return out, info


# ----------------------------------------------------------------------------- live-stream features


@dataclass
class LiveConfig:
    """The live-stream two-tower model and its training (the item tower feeds the live SIDs)."""

    out_dim: int = 32  # item-tower vector = the live tokenizer's input dimension
    embed_dim: int = 32
    hidden: int = 128
    max_seq_len: int = 50  # user tower: last clicks before the request
    max_products: int = 16  # item tower: products on sale at that time (latest started first)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    item_lr_scale: float = 0.3  # paper: lower learning rate for the item tower
    temperature: float = 0.1
    val_fraction: float = 0.1  # the latest clicks, for recall@K
    at: int | None = None  # the live SIDs' timestamp; default: the last event's
    accelerator: str = "auto"


class LiveWorld:
    """What the live-stream item tower sees at a time ``ts``: shop, and the products on sale."""

    def __init__(self, items: pa.Table, schedule: pa.Table, product_codes: dict[int, np.ndarray],
                 num_codes: list[int], max_products: int, vocab: dict | None = None):
        it_ids = items.column("item_id").to_numpy()
        it_type = np.asarray(items.column("item_type").to_pylist())
        shop = items.column("shop_id").to_numpy()
        cats = items.column("category").to_pylist()
        self.live_ids = np.sort(it_ids[it_type == "live"])
        if vocab is None:  # built at fit time and saved with the model, so refresh-live uses the same ids
            vocab = {"shops": np.unique(shop).tolist(),
                     "cats": [sorted({c[lv] for c in cats if c is not None and len(c) > lv}) for lv in range(3)]}
        self.vocab = vocab
        shops = np.asarray(vocab["shops"], dtype=np.int64)
        self.shop_of = {int(i): self._index(shops, s) for i, s in zip(it_ids, shop)}
        self.cat_of = {}
        for i, c in zip(it_ids, cats):
            c = c or []
            self.cat_of[int(i)] = [self._index(np.asarray(vocab["cats"][lv], dtype=np.int64), c[lv])
                                   if len(c) > lv else 0 for lv in range(3)]
        self.codes = product_codes
        self.num_codes = list(num_codes)
        self.max_products = max_products
        self.by_live: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        lid = schedule.column("live_id").to_numpy()
        order = np.argsort(lid, kind="stable")
        cols = [schedule.column(c).to_numpy()[order] for c in ("product_id", "start_ts", "end_ts")]
        bounds = np.flatnonzero(np.diff(lid[order])) + 1
        for chunk in np.split(np.arange(len(order)), bounds):
            if len(chunk):
                self.by_live[int(lid[order][chunk[0]])] = tuple(c[chunk] for c in cols)

    @staticmethod
    def _index(vocab: np.ndarray, v) -> int:
        p = int(np.searchsorted(vocab, v))
        return p + 1 if p < len(vocab) and vocab[p] == v else 0  # 0: padding / unknown

    def fields(self) -> dict[str, int]:
        f = {"shop": len(self.vocab["shops"]) + 1}
        f.update({f"cat{lv}": len(self.vocab["cats"][lv]) + 1 for lv in range(3)})
        f.update({f"sid{lv}": k + 1 for lv, k in enumerate(self.num_codes)})
        return f

    def selling(self, live_id: int, ts: int) -> np.ndarray:
        """Products on sale at ``ts`` (start_ts <= ts < end_ts), the latest started first."""
        if live_id not in self.by_live:
            return np.zeros(0, dtype=np.int64)
        p, s, e = self.by_live[live_id]
        on = (s <= ts) & (ts < e)
        return p[on][np.argsort(-s[on], kind="stable")][: self.max_products]

    def snapshot_times(self) -> list[tuple[int, int]]:
        """(live, ts) at every schedule change: the points the live codebooks are fitted on."""
        return [(lid, int(t)) for lid, (_, s, e) in self.by_live.items() for t in np.unique(np.concatenate([s, e]))]

    def features(self, live_ids: np.ndarray, ts: np.ndarray) -> dict[str, torch.Tensor]:
        n, p, lk = len(live_ids), self.max_products, len(self.num_codes)
        shop = np.zeros(n, dtype=np.int64)
        cat = np.zeros((3, n, p), dtype=np.int64)
        sid = np.zeros((lk, n, p), dtype=np.int64)
        for r, (lid, t) in enumerate(zip(live_ids.tolist(), ts.tolist())):
            shop[r] = self.shop_of.get(lid, 0)
            for j, prod in enumerate(self.selling(lid, t).tolist()):
                cat[:, r, j] = self.cat_of.get(prod, [0, 0, 0])
                c = self.codes.get(prod)
                if c is not None:
                    sid[:, r, j] = c[:lk] + 1
        feats = {"shop": torch.from_numpy(shop)}
        feats.update({f"cat{lv}": torch.from_numpy(cat[lv]) for lv in range(3)})
        feats.update({f"sid{lv}": torch.from_numpy(sid[lv]) for lv in range(lk)})
        return feats


def click_sequences(events: pa.Table, catalog: ItemCatalog, users: np.ndarray, ts: np.ndarray,
                    max_len: int) -> torch.Tensor:
    """[B, max_len] dense item indices (+1; 0 pads) of each user's last clicks strictly before ts."""
    is_click = pc.equal(events.column("click"), 1)
    rows = np.flatnonzero(is_click.to_numpy(zero_copy_only=False))
    clicks = events.filter(is_click)
    u = clicks.column("user_id").to_numpy()
    t = clicks.column("ts").to_numpy()
    it = catalog.index_of(clicks.column("item_id").to_numpy(), table="events", column="item_id", rows=rows) + 1
    order = np.lexsort((t, u))
    u, t, it = u[order], t[order], it[order]
    out = np.zeros((len(users), max_len), dtype=np.int64)
    lo = np.searchsorted(u, users, side="left")
    hi = np.searchsorted(u, users, side="right")
    for r in range(len(users)):
        end = lo[r] + np.searchsorted(t[lo[r]:hi[r]], ts[r], side="left")  # strictly before
        seq = it[max(lo[r], end - max_len):end]
        out[r, max_len - len(seq):] = seq
    return torch.from_numpy(out)


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, data: dict):
        self.data = data
        self.n = len(data["item_id"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return {k: ({kk: vv[i] for kk, vv in v.items()} if isinstance(v, dict) else v[i])
                for k, v in self.data.items()}


def train_live_twotower(world: LiveWorld, items: pa.Table, events: pa.Table, cfg: LiveConfig,
                        root_dir: Path, seed: int):
    """Fit the live-stream two-tower on live_stream clicks; returns (module, metrics)."""
    from onemall_pl.twotower import TwoTowerModule

    ev = events.filter(pc.and_(pc.equal(events.column("scenario"), "live_stream"),
                               pc.equal(events.column("click"), 1)))
    ev = ev.filter(pc.is_in(ev.column("item_id"), pa.array(world.live_ids)))
    if ev.num_rows < 2 * cfg.batch_size // 4:
        raise ValueError(f"only {ev.num_rows} live_stream clicks on live items in the events: too few to train "
                         "the live-stream two-tower (set data.live: null to skip live-streams)")
    ev = ev.sort_by("ts")
    users, ts, lives = (ev.column(c).to_numpy() for c in ("user_id", "ts", "item_id"))
    catalog = ItemCatalog(items)
    data = {"user": {"clicks": click_sequences(events, catalog, users, ts, cfg.max_seq_len)},
            "item": world.features(lives, ts), "item_id": torch.tensor(lives)}
    freq = np.unique(lives[: int(len(lives) * (1 - cfg.val_fraction))], return_counts=True)
    q = dict(zip(freq[0].tolist(), (freq[1] / freq[1].sum()).tolist()))
    data["logq"] = torch.tensor([np.log(q.get(i, 1.0 / len(lives))) for i in lives.tolist()], dtype=torch.float32)
    n_val = max(1, int(len(lives) * cfg.val_fraction))
    split = len(lives) - n_val

    def sub(d: dict, s: slice) -> dict:
        return {k: (sub(v, s) if isinstance(v, dict) else v[s]) for k, v in d.items()}

    train_dl = DataLoader(_DictDataset(sub(data, slice(0, split))), batch_size=cfg.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed), drop_last=split > cfg.batch_size)
    val_dl = DataLoader(_DictDataset(sub(data, slice(split, None))), batch_size=cfg.batch_size)
    pl.seed_everything(seed, workers=True, verbose=False)
    user = FeatureTower(TowerConfig({"clicks": len(catalog) + 1}, cfg.embed_dim, cfg.hidden, cfg.out_dim))
    item = FeatureTower(TowerConfig(world.fields(), cfg.embed_dim, cfg.hidden, cfg.out_dim))
    module = TwoTowerModule(user, item, lr=cfg.lr, item_lr_scale=cfg.item_lr_scale, temperature=cfg.temperature)
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root_dir))
    trainer.fit(module, train_dl, val_dl)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics.update(train_clicks=split, val_clicks=n_val)
    return module.cpu().eval(), metrics


@torch.no_grad()
def live_vectors(item_tower: torch.nn.Module, world: LiveWorld, live_ids: np.ndarray, ts: np.ndarray,
                 chunk: int = 4096) -> np.ndarray:
    out = [item_tower(world.features(live_ids[s:s + chunk], ts[s:s + chunk])).numpy()
           for s in range(0, len(live_ids), chunk)]
    return np.concatenate(out) if out else np.zeros((0, item_tower.out_dim), np.float32)


def load_live_tower(path: Path, items: pa.Table, schedule: pa.Table, product_codes: dict[int, np.ndarray]):
    """The saved live item tower and the ``LiveWorld`` with the vocabularies it was trained with."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    tower = FeatureTower(TowerConfig(**blob["item_config"]))
    tower.load_state_dict(blob["item_state"])
    world = LiveWorld(items, schedule, product_codes, blob["num_codes"], blob["max_products"], vocab=blob["vocab"])
    return tower.eval(), world, blob


# ----------------------------------------------------------------------------- data module


def _read_data_table(data_dir: Path | None, table: str, columns: list[str] | None = None) -> pa.Table:
    if data_dir is None:
        raise ValueError(f"data.data_dir is needed to read the {table} table (live-streams, popularity)")
    return read_table(data_dir, table, columns=columns)


def click_popularity(data_dir: Path | None, item_ids: np.ndarray) -> np.ndarray:
    """Click count of each item in the events log (0 without a dataset): the collision ranking key."""
    if data_dir is None or not (Path(data_dir) / "events").is_dir():
        return np.zeros(len(item_ids))
    ev = read_table(data_dir, "events", columns=["item_id", "click"])
    ids, clicks = ev.column("item_id").to_numpy(), ev.column("click").to_numpy().astype(np.int64)
    u, inv = np.unique(ids, return_inverse=True)
    cnt = np.bincount(inv, weights=clicks, minlength=len(u))
    pos = np.minimum(np.searchsorted(u, item_ids), max(len(u) - 1, 0))
    return np.where((len(u) > 0) & (u[pos] == item_ids), cnt[pos] if len(u) else 0, 0.0)


class QuantizeDataModule(pl.LightningDataModule):
    """Per-type quantizer inputs and their k-means levels (prepared once, cached on disk).

    Args:
        tokenizer_dir: the stage-1 artifact (``artifacts/<dataset>/tokenizer``).
        data_dir: the dataset folder (items, live_schedule, events); needed for live-streams and
            for the popularity ranking of collisions.
        kmeans_sizes: codebook size of each k-means level (the FSQ level's is the model's 2**fsq_bits).
        niter: k-means iterations per level.
        seed: k-means and two-tower seed.
        live: the live-stream two-tower; ``null`` gives live-streams no SID.
        batch_size: FSQ training batch (per item type).
        cache_dir: where ``prepare_data`` keeps its results (default ``runs/<dataset>/quantize/prepared``).
    """

    def __init__(self, tokenizer_dir: Path = Path("artifacts/synth/tokenizer"), data_dir: Path | None = None,
                 kmeans_sizes: list[int] = [64, 64], niter: int = 20, seed: int = 0,  # noqa: B006
                 live: LiveConfig | None = LiveConfig(),  # noqa: B008
                 batch_size: int = 256, cache_dir: Path | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_dir, self.data_dir = Path(tokenizer_dir), Path(data_dir) if data_dir else None
        self.kmeans_sizes, self.niter, self.seed, self.live = list(kmeans_sizes), niter, seed, live
        self.batch_size = batch_size
        self.upstream = load_manifest(self.tokenizer_dir, stage="tokenizer")
        self.dataset = self.upstream.dataset
        self.embedding_dim = int(self.upstream.size("embedding_dim"))
        self.cache_dir = Path(cache_dir) if cache_dir else Path("runs") / self.dataset / "quantize" / "prepared"
        types = set(pq.read_table(self.upstream.file("embeddings"), columns=["item_type"]).column("item_type")
                    .to_pylist())
        self.types = [t for t in ("product", "video") if t in types]
        if live is not None and self.data_dir is not None:
            it = read_table(self.data_dir, "items", columns=["item_type"]).column("item_type")
            if pc.any(pc.equal(it, "live")).as_py():
                self.types.append("live")
        self.dims = {"product": self.embedding_dim, "video": 2 * self.embedding_dim,
                     "live": live.out_dim if live else 0}
        self.dims = {t: self.dims[t] for t in self.types}
        self.inputs: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        self.kmeans: dict[str, list[np.ndarray]] = {}

    def config(self) -> dict:
        return {"tokenizer_dir": str(self.tokenizer_dir), "data_dir": str(self.data_dir) if self.data_dir else None,
                "kmeans_sizes": self.kmeans_sizes, "niter": self.niter, "seed": self.seed,
                "live": dataclasses.asdict(self.live) if self.live else None, "batch_size": self.batch_size}

    def _key(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k != "batch_size"}
        return hashlib.sha256(json.dumps({"cfg": cfg, "upstream": self.upstream.id}, sort_keys=True)
                              .encode()).hexdigest()[:16]

    def prepare_data(self) -> None:
        key_file = self.cache_dir / "key.json"
        if key_file.exists() and json.loads(key_file.read_text()).get("key") == self._key():
            return
        with atomic_dir(self.cache_dir) as tmp:
            self._prepare(tmp)
            write_json(tmp / "key.json", {"key": self._key(), "config": self.config()})

    def _prepare(self, out: Path) -> None:
        t, x = read_embeddings(self.upstream.file("embeddings"), self.embedding_dim)
        inputs, info = static_inputs(t, x)
        arrays, cents = {}, {}
        for typ, (ids, xs) in inputs.items():
            km = ResKMeans(self.kmeans_sizes, niter=self.niter, seed=self.seed).fit(xs, ids)
            arrays[f"{typ}_ids"], arrays[f"{typ}_x"] = ids, xs
            cents.update({f"{typ}_level{i}": c for i, c in enumerate(km.centroids)})
            if typ == "product":
                product_codes = dict(zip(ids.tolist(), km.encode(xs, ids)[0]))
        if "live" in self.types:
            if "product" not in inputs:
                raise ValueError("live-stream SIDs need product SIDs, and the embeddings hold no product")
            items = _read_data_table(self.data_dir, "items")
            schedule = _read_data_table(self.data_dir, "live_schedule")
            events = _read_data_table(self.data_dir, "events", ["user_id", "ts", "scenario", "item_id", "click"])
            cfg = self.live
            world = LiveWorld(items, schedule, product_codes, self.kmeans_sizes, cfg.max_products)
            module, tt_metrics = train_live_twotower(world, items, events, cfg, out / "twotower_run", self.seed)
            shutil.rmtree(out / "twotower_run", ignore_errors=True)
            snaps = world.snapshot_times()
            at = int(cfg.at if cfg.at is not None else pc.max(events.column("ts")).as_py())
            snaps += [(int(lid), at) for lid in world.live_ids]
            s_live = np.array([s[0] for s in snaps], dtype=np.int64)
            s_ts = np.array([s[1] for s in snaps], dtype=np.int64)
            xs = live_vectors(module.model.item_tower, world, s_live, s_ts)
            km = ResKMeans(self.kmeans_sizes, niter=self.niter, seed=self.seed).fit(xs)
            cents.update({f"live_level{i}": c for i, c in enumerate(km.centroids)})
            arrays["live_ids"], arrays["live_x"] = s_live, xs  # training points: all snapshots
            arrays["live_at_ids"] = world.live_ids
            arrays["live_at_x"] = live_vectors(module.model.item_tower, world, world.live_ids,
                                               np.full(len(world.live_ids), at))
            torch.save({"item_config": dataclasses.asdict(module.model.item_tower.cfg),
                        "item_state": module.model.item_tower.state_dict(),
                        "user_config": dataclasses.asdict(module.model.user_tower.cfg),
                        "user_state": module.model.user_tower.state_dict(),
                        "vocab": world.vocab, "num_codes": self.kmeans_sizes, "max_products": cfg.max_products,
                        "at": at}, out / "twotower.pt")
            info.update(live_at=at, live_snapshots=len(snaps), twotower=tt_metrics)
        np.savez(out / "inputs.npz", **arrays)
        np.savez(out / "kmeans.npz", **cents)
        write_json(out / "info.json", info)

    def setup(self, stage: str | None = None) -> None:
        if self.inputs:
            return
        if not (self.cache_dir / "key.json").exists():
            self.prepare_data()  # outside a Trainer (export, ablate)
        with np.load(self.cache_dir / "inputs.npz") as z:
            for t in self.types:
                self.inputs[t] = (z[f"{t}_ids"], torch.from_numpy(z[f"{t}_x"]))
            if "live" in self.types:
                self.live_at = (z["live_at_ids"], torch.from_numpy(z["live_at_x"]))
        with np.load(self.cache_dir / "kmeans.npz") as z:
            for t in self.types:
                self.kmeans[t] = [z[f"{t}_level{i}"] for i in range(len(self.kmeans_sizes))]
        self.info = json.loads((self.cache_dir / "info.json").read_text())

    def sid_inputs(self) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """The items that get a SID: products, e-commerce videos, live-streams at ``live_at``."""
        out = {t: v for t, v in self.inputs.items() if t != "live"}
        if "live" in self.types:
            out["live"] = self.live_at
        return out

    def train_dataloader(self):
        # one loader per item type (Lightning cycles the shorter ones), each seeded per epoch, sharded
        # by rank and resumable mid-epoch (the positions are in every checkpoint)
        W = self.trainer.world_size if self.trainer is not None else 1
        return {t: MapLoader(TensorDataset(x), min(self.batch_size, len(x) // W), seed=self.seed, drop_last=True)
                for t, (_, x) in self.inputs.items()}


# ----------------------------------------------------------------------------- the FSQ module


class QuantizeModule(pl.LightningModule):
    """One :class:`SIDTokenizer` per item type; trains their FSQ levels (k-means levels come from the data module).

    Args:
        dims: input dimension per item type (linked from the data module).
        kmeans_sizes: k-means codebook sizes (linked from the data module).
        fsq_bits: bits of the FSQ last level (codebook 2**bits; paper 4096 = 12 bits); ``null``
            for no FSQ level (pure Res-Kmeans).
        hidden: FSQ MLP width.
        layers: hidden layers of the FSQ encoder and decoder.
        balance_weight: weight of the bit-balance term.
        decorrelation_weight: weight of the bit-decorrelation term.
        lr: AdamW learning rate.
        artifacts_root: exports go to ``<artifacts_root>/<dataset>/quantize``.
    """

    def __init__(self, dims: dict[str, int] | None = None, kmeans_sizes: list[int] = [64, 64],  # noqa: B006
                 fsq_bits: int | None = 8, hidden: int = 256, layers: int = 2, balance_weight: float = 0.1,
                 decorrelation_weight: float = 0.1, lr: float = 1e-3, artifacts_root: Path = Path("artifacts")):
        super().__init__()
        self.save_hyperparameters()
        if not dims:
            raise ValueError("model.dims is empty: it is linked from the data module (item types and their dims)")
        self.tokenizers = torch.nn.ModuleDict({
            t: SIDTokenizer(d, kmeans_sizes, FSQConfig(d, fsq_bits, hidden, layers, balance_weight,
                                                        decorrelation_weight) if fsq_bits else None)
            for t, d in dims.items()})
        self.codebook_sizes = list(kmeans_sizes) + ([2 ** fsq_bits] if fsq_bits else [])
        # per-type loss terms, averaged over the epoch (logging each term at each step costs more than the step)
        self.terms = torch.nn.ModuleDict({f"{t}_{k}": MeanMetric() for t in dims
                                          for k in ("mse", "balance", "decorrelation")})

    def init_from_data(self, dm: QuantizeDataModule) -> None:
        """Copy the fitted k-means levels in and set the FSQ input statistics."""
        dm.setup()
        if set(dm.types) != set(self.tokenizers):
            raise ValueError(f"the model has tokenizers for {sorted(self.tokenizers)}, the data has {dm.types}")
        for t, tok in self.tokenizers.items():
            tok.set_codebooks(dm.kmeans[t])
            if tok.fsq is not None:
                tok.fsq.set_stats(tok.residual(dm.inputs[t][1])[1])

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.init_from_data(self.trainer.datamodule)

    def training_step(self, batch: dict, batch_idx: int):
        if not any(tok.fsq is not None for tok in self.tokenizers.values()):
            return None  # pure Res-Kmeans: nothing to train
        total = 0.0
        for t, (x_ND,) in batch.items():
            tok = self.tokenizers[t]
            with torch.no_grad():
                _, r_ND = tok.residual(x_ND)
            losses = tok.fsq.loss(tok.fsq(r_ND))
            total = total + losses["loss"]
            for k in ("mse", "balance", "decorrelation"):
                self.terms[f"{t}_{k}"].update(losses[k].detach())
        self.log("train/loss", total, prog_bar=True)
        return total

    def on_train_epoch_end(self) -> None:
        for name, metric in self.terms.items():
            if metric.update_called:
                t, k = name.split("_", 1)
                self.log(f"train/{t}/{k}", metric.compute())
            metric.reset()
        dm = self.trainer.datamodule
        for t, (_, x) in dm.inputs.items():  # monitor: conflicts among (up to) the first 100k points
            codes = self.tokenizers[t].encode(x[:100_000].to(self.device)).cpu().numpy()
            st = stats_by_type(codes, np.full(len(codes), t), self.codebook_sizes)[t]
            self.log(f"train/{t}/conflict_rate", st["conflict_rate"])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr) if params else None

    @torch.no_grad()
    def export_artifact(self, trainer, datamodule: QuantizeDataModule, out: Path | None = None) -> Manifest | None:
        if datamodule is None:
            raise ValueError("quantize export needs the data module (pass the same config as fit)")
        dm = datamodule
        dm.setup()
        if all(float(cb.abs().sum()) == 0 for tok in self.tokenizers.values() for cb in tok.codebooks()):
            self.init_from_data(dm)  # exporting without a checkpoint: k-means levels, untrained FSQ
        self.cpu().eval()
        out = out or stage_dir(self.hparams.artifacts_root, dm.dataset, "quantize")
        ids, types, codes = [], [], []
        for t, (i, x) in dm.sid_inputs().items():
            ids.append(i)
            types.append(np.full(len(i), t))
            codes.append(self.tokenizers[t].encode(x).numpy())
        ids, types, codes = np.concatenate(ids), np.concatenate(types), np.concatenate(codes)
        config = {"data": dm.config(), "model": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in self.hparams.items()}}
        extra = {"live_at": dm.info.get("live_at"), "inputs": dm.info}
        files = {"twotower.pt": dm.cache_dir / "twotower.pt"} if "live" in dm.types else {}
        if trainer is not None and not trainer.is_global_zero:
            return None  # rank 0 writes
        return publish(out, dm.upstream, config, dict(self.tokenizers), self.codebook_sizes, ids, types, codes,
                       click_popularity(dm.data_dir, ids), extra, files)


def publish(out: Path, upstream: Manifest, config: dict, tokenizers: dict[str, SIDTokenizer],
            codebook_sizes: list[int], ids: np.ndarray, types: np.ndarray, codes: np.ndarray,
            popularity: np.ndarray, extra_metrics: dict, files: dict[str, Path]) -> Manifest:
    """Write the quantize artifact folder (atomically) from the SIDs and the tokenizers."""
    if codes.size and (codes.min() < 0 or (codes >= np.asarray(codebook_sizes)).any()):
        raise AssertionError("a code out of its codebook")
    sid_table = pa.Table.from_arrays([pa.array(ids, pa.int64()), pa.array(types.tolist(), pa.string()),
                                      pa.array(codes.astype(np.int32).tolist(), pa.list_(pa.int32()))],
                                     schema=SID_TABLE_SCHEMA)
    metrics = {"collisions": stats_by_type(codes, types, codebook_sizes), **extra_metrics}
    cfg_json = {t: {"dim": tok.dim, "kmeans_sizes": tok.kmeans_sizes,
                    "fsq": dataclasses.asdict(tok.fsq.cfg) if tok.fsq is not None else None}
                for t, tok in tokenizers.items()}

    def build(tmp: Path) -> None:
        (tmp / "sid_table").mkdir()
        pq.write_table(sid_table, tmp / "sid_table" / "part-00000.parquet")
        (tmp / "sid_items").mkdir()
        pq.write_table(reverse_map(ids, types, codes, popularity), tmp / "sid_items" / "part-00000.parquet")
        torch.save({"tokenizers": cfg_json, "state_dict": {t: tok.state_dict() for t, tok in tokenizers.items()}},
                   tmp / "tokenizers.pt")
        (tmp / "codebooks").mkdir()
        for t, tok in tokenizers.items():
            np.savez(tmp / "codebooks" / f"{t}.npz",
                     **{f"level{i}": c.cpu().numpy() for i, c in enumerate(tok.codebooks())})
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        write_json(tmp / "config.json", config)

    sizes = {"codebook_sizes": list(codebook_sizes), "num_levels": len(codebook_sizes),
             "dims": {t: tok.dim for t, tok in tokenizers.items()}, "num_items": len(ids)}
    return write_artifact(out, build, stage="quantize", dataset=upstream.dataset, config=config,
                          upstream=[upstream], sizes=sizes, metrics=metrics)


# ----------------------------------------------------------------------------- reading the artifact


def load_tokenizers(artifact: str | Path) -> tuple[Manifest, dict[str, SIDTokenizer]]:
    """The frozen per-type tokenizers of a quantize artifact."""
    m = load_manifest(artifact, stage="quantize")
    blob = torch.load(m.file("tokenizers.pt"), map_location="cpu", weights_only=True)
    toks = {}
    for t, c in blob["tokenizers"].items():
        tok = SIDTokenizer(c["dim"], c["kmeans_sizes"], FSQConfig(**c["fsq"]) if c["fsq"] else None)
        tok.load_state_dict(blob["state_dict"][t])
        toks[t] = tok.eval()
    return m, toks


def read_sid_table(artifact: str | Path) -> pa.Table:
    m = load_manifest(artifact, stage="quantize")
    return pq.read_table(m.file("sid_table"))


def predict(artifact: Path, embeddings: Path, out: Path | None = None) -> pa.Table:
    """SIDs of new items with the frozen codebooks, no retraining.

    Args:
        artifact: a quantize artifact folder.
        embeddings: an embeddings Parquet of the new items (item_id, item_type, embedding, product_id), as
            stage 1 writes it. A video's product may be in this table or among the artifact's
            upstream embeddings. Live-streams get their SIDs from ``refresh-live``.
        out: where to write the new items' sid_table Parquet (optional).
    """
    m, toks = load_tokenizers(artifact)
    upstream = load_manifest(m.config["data"]["tokenizer_dir"], stage="tokenizer")
    dim = int(upstream.size("embedding_dim"))
    t, x = read_embeddings(embeddings, dim)
    if (np.asarray(t.column("item_type").to_pylist()) == "live").any():
        raise ValueError(f"{embeddings}: live-streams have no embedding-based SID; use `onemall quantize "
                         "refresh-live`")
    extra = None
    if pc.any(pc.equal(t.column("item_type"), "video")).as_py():
        ut, ux = read_embeddings(upstream.file("embeddings"), dim)
        keep = np.asarray(ut.column("item_type").to_pylist()) == "product"
        extra = (ut.column("item_id").to_numpy()[keep], ux[keep])
    inputs, _ = static_inputs(t, x, extra_products=extra)
    tables = []
    for typ, (ids, xs) in inputs.items():
        codes = toks[typ].encode(torch.from_numpy(xs)).numpy().astype(np.int32)
        tables.append(pa.Table.from_arrays([pa.array(ids, pa.int64()), pa.array([typ] * len(ids), pa.string()),
                                            pa.array(codes.tolist(), pa.list_(pa.int32()))], schema=SID_TABLE_SCHEMA))
    res = pa.concat_tables(tables) if tables else SID_TABLE_SCHEMA.empty_table()
    if out is not None:
        with atomic_file(out, "wb") as f:
            pq.write_table(res, f)
    return res


def refresh_live(artifact: Path, at: int, out: Path | None = None, data_dir: Path | None = None) -> Manifest:
    """Recompute the live-stream SIDs for the products on sale at ``at`` (frozen tower and codebooks).

    Args:
        artifact: the quantize artifact folder.
        at: the timestamp (same unit as the events' ``ts``).
        out: the artifact folder to write (default: ``artifact``, replaced atomically).
        data_dir: the dataset folder (default: the one the artifact was fitted on).
    """
    m, toks = load_tokenizers(artifact)
    if "live" not in toks:
        raise ValueError(f"{artifact} has no live-stream tokenizer (fitted with data.live: null?)")
    data_dir = Path(data_dir or m.config["data"]["data_dir"])
    sid = pq.read_table(m.file("sid_table"))
    ids, codes = sid.column("item_id").to_numpy(), sid_codes(sid)
    types = np.asarray(sid.column("item_type").to_pylist())
    lk = len(toks["product"].kmeans_sizes)
    prod = types == "product"
    product_codes = dict(zip(ids[prod].tolist(), codes[prod, :lk]))
    tower, world, _ = load_live_tower(m.file("twotower.pt"), read_table(data_dir, "items"),
                                      read_table(data_dir, "live_schedule"), product_codes)
    x = live_vectors(tower, world, world.live_ids, np.full(len(world.live_ids), int(at)))
    live_codes = toks["live"].encode(torch.from_numpy(x)).numpy()
    old = types == "live"
    prev = dict(zip(ids[old].tolist(), map(tuple, codes[old].tolist())))
    changed = sum(prev.get(i) != tuple(c) for i, c in zip(world.live_ids.tolist(), live_codes.tolist()))
    ids = np.concatenate([ids[~old], world.live_ids])
    types = np.concatenate([types[~old], np.full(len(world.live_ids), "live")])
    codes = np.concatenate([codes[~old], live_codes])
    extra = {k: v for k, v in m.metrics.items() if k != "collisions"}
    extra.update(live_at=int(at), live_changed=int(changed))
    config = {**m.config, "live_at": int(at)}
    upstream = load_manifest(m.config["data"]["tokenizer_dir"], stage="tokenizer")
    sizes = m.size("codebook_sizes")
    return publish(Path(out or artifact), upstream, config, toks, sizes, ids, types, codes,
                   click_popularity(data_dir, ids), extra, {"twotower.pt": m.file("twotower.pt")})


def live_index(artifact: Path, at: int, out: Path, data_dir: Path | None = None) -> int:
    """Write a faiss index of the live-streams' item-tower vectors at ``at`` (ANN retrieval of live-streams).

    Args:
        artifact: the quantize artifact folder.
        at: the timestamp whose products on sale the vectors reflect.
        out: the index file to write.
        data_dir: the dataset folder (default: the one the artifact was fitted on).
    """
    from onemall_pl.twotower import export_index

    m = load_manifest(artifact, stage="quantize")
    if "twotower.pt" not in m.files:
        raise ValueError(f"{artifact} has no live-stream two-tower (fitted with data.live: null?)")
    data_dir = Path(data_dir or m.config["data"]["data_dir"])
    sid = pq.read_table(m.file("sid_table"))
    types = np.asarray(sid.column("item_type").to_pylist())
    prod = types == "product"
    lk = len(m.config["data"]["kmeans_sizes"])
    product_codes = dict(zip(sid.column("item_id").to_numpy()[prod].tolist(), sid_codes(sid)[prod, :lk]))
    tower, world, _ = load_live_tower(m.file("twotower.pt"), read_table(data_dir, "items"),
                                      read_table(data_dir, "live_schedule"), product_codes)
    x = live_vectors(tower, world, world.live_ids, np.full(len(world.live_ids), int(at)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    export_index(x, world.live_ids, out)
    return len(world.live_ids)


def sid_codes(sid_table: pa.Table) -> np.ndarray:
    n = sid_table.num_rows
    return np.asarray(sid_table.column("sid").combine_chunks().flatten().to_numpy(), dtype=np.int64).reshape(n, -1)


# ----------------------------------------------------------------------------- Table 5 and bench


def ablate(artifact: Path = Path("artifacts/synth/quantize"), out: Path | None = None) -> dict:
    """Paper Table 5 on our data: pure Res-Kmeans vs Res-Kmeans + FSQ, same levels and sizes.

    The Res-Kmeans+FSQ codes are the artifact's; the baseline fits k-means for every level
    (the last one with the FSQ level's 2**bits centroids) on the same points and seed.

    Args:
        artifact: a quantize artifact fitted with an FSQ level.
        out: folder for ``table5.json`` and ``table5.md`` (default ``<artifact>/../reports``).
    """
    m, toks = load_tokenizers(artifact)
    if any(tok.fsq is None for tok in toks.values()):
        raise ValueError(f"{artifact} was fitted without an FSQ level: Table 5 compares against ResKmeans+FSQ")
    data = m.config["data"]
    dm = QuantizeDataModule(tokenizer_dir=Path(data["tokenizer_dir"]), data_dir=data["data_dir"],
                            kmeans_sizes=data["kmeans_sizes"], niter=data["niter"], seed=data["seed"],
                            live=LiveConfig(**data["live"]) if data["live"] else None)
    dm.setup()
    sizes = m.size("codebook_sizes")
    sid = pq.read_table(m.file("sid_table"))
    fsq_types = np.asarray(sid.column("item_type").to_pylist())
    fsq_codes = sid_codes(sid)
    ids_all, types_all, codes_all = [], [], []
    for t, (ids, x) in dm.sid_inputs().items():
        train_x = dm.inputs[t][1].numpy()
        km = ResKMeans(sizes, niter=dm.niter, seed=dm.seed).fit(train_x)
        ids_all.append(ids)
        types_all.append(np.full(len(ids), t))
        codes_all.append(km.encode(x.numpy())[0])
    km_stats = stats_by_type(np.concatenate(codes_all), np.concatenate(types_all), sizes)
    fsq_stats = stats_by_type(fsq_codes, fsq_types, sizes)
    rows = {"ResKmeans": km_stats, "ResKmeans+FSQ": fsq_stats}
    result = {"codebook_sizes": sizes, "dataset": m.dataset, "artifact": m.id,
              "rows": {v: {t: {"conflict": s["conflict_rate"], "exclusive": s["exclusive_rate"],
                                "num_items": s["num_items"]} for t, s in st.items()} for v, st in rows.items()}}
    kinds = ["overall"] + [t for t in TYPES if t in km_stats]
    lines = [f"# Table 5 on `{m.dataset}` (codebook sizes {sizes})", "",
             "| variant | " + " | ".join(f"{k} conflict | {k} exclusive" for k in kinds) + " |",
             "|---|" + "---|---|" * len(kinds)]
    for v, st in rows.items():
        lines.append(f"| {v} | " + " | ".join(f"{st[k]['conflict_rate']:.1%} | {st[k]['exclusive_rate']:.1%}"
                                               for k in kinds) + " |")
    out = Path(out) if out else Path(artifact).parent / "reports"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "table5.json", result)
    with atomic_file(out / "table5.md") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def bench(n: int = 20_000, dim: int = 64, k: int = 256, niter: int = 20, seed: int = 0,
          fsq_bits: int = 12, threads: int | None = None) -> dict:
    """Measured figures: faiss vs scikit-learn k-means on the same points, and SID encoding speed.

    Both k-means run Lloyd iterations from random initial centroids, ``k`` clusters, ``niter``
    iterations, one run (scikit-learn: ``init="random", n_init=1, tol=0``; faiss uses all the
    points: ``max_points_per_centroid`` large). Encoding: a [k, k] Res-Kmeans + FSQ tokenizer
    (untrained FSQ weights: the speed does not depend on them) over the n points, on the CPU.
    ``threads`` caps faiss (OpenMP), scikit-learn (threadpoolctl) and torch alike (default: all
    cores). On a machine whose cores are busy with other work, OpenMP's spinning threads make
    faiss far slower with more than one thread: compare with ``threads=1`` there.
    """
    import faiss
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    threads = threads or os.cpu_count() or 1
    old_torch = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)

    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(64, dim))[rng.integers(0, 64, n)] + rng.normal(size=(n, dim)) * 0.5).astype(np.float32)
    t0 = time.perf_counter()
    km = faiss.Kmeans(dim, k, niter=niter, seed=seed, max_points_per_centroid=n, verbose=False)
    km.train(x)
    t_faiss = time.perf_counter() - t0
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        sk = KMeans(n_clusters=k, init="random", n_init=1, max_iter=niter, tol=0.0, random_state=seed,
                    algorithm="lloyd").fit(x)
        t_sk = time.perf_counter() - t0
    inertia_faiss = float(((x - km.centroids[ResKMeans._nearest(km.centroids, x)]) ** 2).sum())
    q = ResKMeans([k, k], niter=niter, seed=seed).fit(x)
    tok = SIDTokenizer(dim, [k, k], FSQConfig(dim, fsq_bits))
    tok.set_codebooks(q.centroids)
    tok.eval()
    xt = torch.from_numpy(x)
    tok.encode(xt[:1024])  # warm-up
    t0 = time.perf_counter()
    codes = tok.encode(xt)
    t_enc = time.perf_counter() - t0
    assert codes.shape == (n, 3)
    torch.set_num_threads(old_torch)
    return {"n": n, "dim": dim, "k": k, "niter": niter, "threads": threads,
            "faiss_kmeans_s": t_faiss, "sklearn_kmeans_s": t_sk, "sklearn_over_faiss": t_sk / t_faiss,
            "faiss_inertia": inertia_faiss, "sklearn_inertia": float(sk.inertia_),
            "encode_items_per_s": n / t_enc, "encode_levels": [k, k, 2 ** fsq_bits]}


# ----------------------------------------------------------------------------- command line


class QuantizeCLI(StageCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.kmeans_sizes", "model.kmeans_sizes")
        parser.link_arguments("data.dims", "model.dims", apply_on="instantiate")


EXTRA = {"ablate": ablate, "refresh-live": refresh_live, "predict": predict}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA:
        from jsonargparse import CLI

        CLI(EXTRA[argv[0]], args=argv[1:], as_positional=False)
        return
    try:
        QuantizeCLI(QuantizeModule, QuantizeDataModule, args=argv)
    except ArtifactError as e:
        print(f"onemall quantize: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
