"""Stage 1, the e-commerce item tokenizer (paper 3.1.1-3.1.2): fine-tune the item encoder
(:mod:`onemall_pl.models.encoder`) with a symmetric InfoNCE loss on item2item pairs
(commercial: product-product; watching: short-video-product), then export one embedding per
product and short-video for stage 2.

    onemall tokenizer fit    -c configs/tokenizer/tiny.yaml [--ckpt_path last]
    onemall tokenizer export -c configs/tokenizer/tiny.yaml      # -> artifacts/<dataset>/tokenizer/
    onemall tokenizer predict -c configs/tokenizer/tiny.yaml     # embeddings as predictions (no artifact)

The artifact folder holds ``manifest.json`` (sizes ``embedding_dim`` / ``num_items``; metrics:
held-out pair Recall@10/@50 of the encoder before and after fine-tuning), ``embeddings/``
(Parquet: ``item_id``, ``item_type``, ``product_id`` (the product a short-video sells, to
join its product's embedding for stage 2's concat input), ``embedding``), and the fine-tuned
encoder (``text_model/`` and ``tokenizer/`` in Hugging Face format, ``vision.pt``,
``encoder.json``), which :func:`load_encoder` reads back to embed new items.

Held-out evaluation: a seeded share of the (deduplicated, unordered) item2item pairs never
enters training. For each held-out pair both items query the candidate pool (every embedded
item, or a seeded sample holding the held-out items: ``eval_items``) by cosine similarity,
the query itself excluded; Recall@K is the share of queries whose partner is in the top K.
"Before" is measured on the same pool with the encoder's initial weights at the start of
``fit`` (kept in the checkpoint), not assumed.

Items embedded: every ``product`` and ``video`` (e-commerce and entertainment short-videos);
live-streams are stage 2's business (two-tower item tower + their products' SIDs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from onemall_pl.artifacts import ArtifactError, load_manifest, write_artifact
from onemall_pl.data.datasets import MapLoader
from onemall_pl.data.schema import RELATIONS, DataError
from onemall_pl.io import read_table
from onemall_pl.metrics import recall_at_k, topk_excluding
from onemall_pl.models.encoder import EncoderConfig, ItemEncoder, ItemProcessor
from onemall_pl.stage import StageCLI

EMBEDDED_TYPES = ("product", "video")
RECALL_GROUPS = ("all", *RELATIONS)  # rows of the recall tables: all pairs, then per relation


# ----------------------------------------------------------------------------- data


class _Rows(Dataset):
    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


class _Collate:
    """Row indices (an item, or an (a, b) pair of items) -> encoder inputs; runs in workers."""

    def __init__(self, processor: ItemProcessor, items: dict[str, list]):
        self.processor, self.items = processor, items

    def _items(self, rows) -> dict:
        it = self.items
        x = self.processor([{"title": it["title"][r], "text": it["text"][r], "images": it["images"][r]}
                            for r in rows])
        x["item_id"] = torch.tensor([it["item_id"][r] for r in rows], dtype=torch.long)
        return x

    def __call__(self, batch: list) -> dict:
        rows = np.asarray(batch)
        if rows.ndim == 1:
            return {"x": self._items(rows), "rows": torch.from_numpy(rows)}
        return {"a": self._items(rows[:, 0]), "b": self._items(rows[:, 1]), "relation": torch.from_numpy(rows[:, 2])}


class Item2ItemDataModule(pl.LightningDataModule):
    """The ``items`` (products and short-videos) and ``item2item`` tables of a dataset folder,
    split into training pairs and held-out pairs (seeded, by unordered pair)."""

    def __init__(self, data_dir: str = "data/synth", encoder: EncoderConfig | None = None, batch_size: int = 32,
                 eval_batch_size: int = 64, eval_fraction: float = 0.1, max_eval_pairs: int | None = 2000,
                 eval_items: int | None = None, max_train_pairs: int | None = None,
                 relations: list[str] | None = None, num_workers: int = 0, seed: int = 0):
        """
        Args:
            data_dir: dataset folder (``onemall data ...``); its folder name names the dataset.
            encoder: linked from ``model.encoder`` (tokenisation and image preprocessing).
            batch_size: pairs per step and rank (in-batch negatives: 2 * batch_size * world - 2 per query).
            eval_fraction: share of the pairs held out (capped by ``max_eval_pairs``).
            eval_items: candidate pool size of the held-out retrieval (``None`` = every embedded item).
            max_train_pairs: use at most this many training pairs (seeded sample).
            relations: item2item relations to use (default: all).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
        for r in relations or ():
            if r not in RELATIONS:
                raise ValueError(f"relations: {r!r} is not one of {list(RELATIONS)}")
        self.encoder = encoder or EncoderConfig()
        self._ready = False

    @property
    def dataset_name(self) -> str:
        return Path(self.hparams.data_dir).resolve().name

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        h, d = self.hparams, self.hparams.data_dir
        items = read_table(d, "items")
        items = items.filter(pc.is_in(items["item_type"], pa.array(EMBEDDED_TYPES)))
        if items.num_rows == 0:
            raise DataError("no product or video items to embed", table="items", file=str(Path(d) / "items"))
        titles = items["title"].to_pylist()
        blank = [i for i, t in enumerate(titles) if not t.strip()]
        if blank:
            raise DataError(f"item {items['item_id'][blank[0]].as_py()} has an empty title ({len(blank)} such "
                            "items); the encoder reads every product's and video's title", table="items",
                            column="title", row=blank[0])
        ids = items["item_id"].to_numpy()
        order = np.argsort(ids, kind="stable")
        self.items = {"item_id": ids.tolist(), "title": titles, "text": items["text"].to_pylist(),
                      "images": items["images"].to_pylist(), "item_type": items["item_type"].to_pylist(),
                      "product_id": items["product_id"].to_pylist()}
        self.item_table = items.select(["item_id", "item_type", "product_id"])

        def rows_of(col: np.ndarray, table: str, column: str, what: str) -> np.ndarray:
            pos = np.clip(np.searchsorted(ids, col, sorter=order), 0, len(ids) - 1)
            rows = order[pos]
            bad = np.flatnonzero(ids[rows] != col)
            if len(bad):
                raise DataError(f"{what} {int(col[bad[0]])} is not a product or short-video of the items table "
                                f"({len(bad)} such rows)", table=table, column=column, row=int(bad[0]))
            return rows

        pids = items["product_id"].to_numpy(zero_copy_only=False)
        has_pid = ~pc.is_null(items["product_id"]).to_numpy(zero_copy_only=False)
        if has_pid.any():  # stage 2 joins a short-video to its product's embedding
            rows_of(pids[has_pid].astype(np.int64), "items", "product_id", "product_id")

        pairs = read_table(d, "item2item")
        if h.relations:
            pairs = pairs.filter(pc.is_in(pairs["relation"], pa.array(h.relations)))
        a = rows_of(pairs["item_a"].to_numpy(), "item2item", "item_a", "item")
        b = rows_of(pairs["item_b"].to_numpy(), "item2item", "item_b", "item")
        rel = np.asarray([RELATIONS.index(r) for r in pairs["relation"].to_pylist()], dtype=np.int64)
        # one row per unordered pair: (a, b) and (b, a) land on the same side of the split
        key = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
        _, first = np.unique(key, axis=0, return_index=True)
        keep = np.sort(first[key[first, 0] != key[first, 1]])
        if len(keep) < len(a):
            rank_zero_info(f"item2item: {len(a) - len(keep)} of {len(a)} pairs are self-pairs or repeats "
                           "(in either order); each unordered pair is used once")
        P = np.stack([a, b, rel], 1)[keep]
        if len(P) < 2:
            raise DataError(f"{len(P)} usable item2item pairs: need at least 2 (train + held-out)",
                            table="item2item")
        rng = np.random.default_rng(h.seed)
        P = P[rng.permutation(len(P))]
        n_eval = max(1, round(h.eval_fraction * len(P)))
        if h.max_eval_pairs is not None:
            n_eval = min(n_eval, h.max_eval_pairs)
        self.eval_pairs, self.train_pairs = P[:n_eval], P[n_eval:]
        if h.max_train_pairs is not None:
            self.train_pairs = self.train_pairs[:h.max_train_pairs]
        # candidate pool of the held-out retrieval: every item, or a sample that holds the held-out items
        pool = np.arange(len(ids))
        if h.eval_items is not None and h.eval_items < len(ids):
            need = np.unique(self.eval_pairs[:, :2])
            rest = np.setdiff1d(pool, need)
            extra = rng.choice(rest, size=max(0, min(len(rest), h.eval_items - len(need))), replace=False)
            pool = np.sort(np.concatenate([need, extra]))
        self.eval_rows = pool
        self.processor = ItemProcessor(self.encoder)
        self.collate = _Collate(self.processor, self.items)
        self._ready = True
        rank_zero_info(f"tokenizer data: {len(ids)} items, {len(self.train_pairs)} training pairs, "
                       f"{len(self.eval_pairs)} held-out pairs, retrieval pool {len(pool)}")

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _loader(self, rows: np.ndarray, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        W, r = self._world()
        # our own rank sharding (trainer configs set use_distributed_sampler: false); the training
        # loader is seeded per epoch and resumable mid-epoch (its position is in every checkpoint)
        kw = dict(collate_fn=self.collate, num_workers=self.hparams.num_workers,
                  persistent_workers=self.hparams.num_workers > 0)
        if shuffle:
            return MapLoader(_Rows(rows), batch_size, seed=self.hparams.seed, drop_last=drop_last, rank=r,
                             world_size=W, **kw)
        sampler = DistributedSampler(_Rows(rows), num_replicas=W, rank=r, shuffle=False, drop_last=drop_last)
        return DataLoader(_Rows(rows), batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kw)

    def train_dataloader(self) -> DataLoader:
        W, _ = self._world()
        need = self.hparams.batch_size * W
        if len(self.train_pairs) < need:
            raise ValueError(f"{len(self.train_pairs)} training pairs, fewer than one batch ({need} = batch_size x "
                             "world size): lower data.batch_size")
        # drop_last: every rank's batch has the same size, so in-batch negatives can be all-gathered
        return self._loader(self.train_pairs, self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        W, _ = self._world()
        bs = max(1, min(self.hparams.batch_size, len(self.eval_pairs) // W))
        return self._loader(self.eval_pairs, bs, shuffle=False, drop_last=W > 1)

    def item_loader(self, rows: np.ndarray, shard: bool = False) -> DataLoader:
        """Items (rows of ``self.items``) in order; ``shard``: this rank's ``rows[rank::world]``."""
        W, r = self._world() if shard else (1, 0)
        return DataLoader(_Rows(np.asarray(rows)[r::W]), batch_size=self.hparams.eval_batch_size,
                          collate_fn=self.collate, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.item_loader(np.arange(len(self.items["item_id"])), shard=True)


# ----------------------------------------------------------------------------- metrics


def pair_recall(emb_ND: torch.Tensor, pairs_P3: np.ndarray, ks: tuple[int, ...] = (10, 50),
                chunk: int = 1024) -> dict[str, float]:
    """Held-out pair retrieval: both items of each pair query all N items by cosine similarity
    (itself excluded); Recall@K = share of queries whose partner is in the top K.

    ``pairs_P3`` holds (row_a, row_b, relation index) with rows indexing ``emb_ND``.
    Returns ``{"recall@10": ..., "commercial/recall@10": ..., ...}`` (relations present only).
    """
    e_ND = F.normalize(emb_ND.float(), dim=1)
    P = torch.as_tensor(pairs_P3, dtype=torch.long, device=e_ND.device)
    q_Q = torch.cat([P[:, 0], P[:, 1]])
    t_Q = torch.cat([P[:, 1], P[:, 0]])
    rel_Q = torch.cat([P[:, 2], P[:, 2]])
    hits = {k: [] for k in ks}
    for s in range(0, len(q_Q), chunk):
        q = q_Q[s:s + chunk]
        topk_QK = topk_excluding(e_ND[q] @ e_ND.T, max(ks), q[:, None])
        for k in ks:
            hits[k].append(recall_at_k(topk_QK, t_Q[s:s + chunk, None], k))
    out = {}
    for k in ks:
        h_Q = torch.cat(hits[k])
        out[f"recall@{k}"] = round(float(h_Q.mean()), 6)
        for i, name in enumerate(RELATIONS):
            sel = rel_Q == i
            if sel.any():
                out[f"{name}/recall@{k}"] = round(float(h_Q[sel].mean()), 6)
    return out


def info_nce(za_BD: torch.Tensor, zb_BD: torch.Tensor, za_MD: torch.Tensor, zb_MD: torch.Tensor,
             ida_B: torch.Tensor, idb_B: torch.Tensor, ida_M: torch.Tensor, idb_M: torch.Tensor, offset: int,
             scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE (CLIP): a_i must pick b_i among all M gathered b's, and b_i pick a_i.

    ``z*_BD``: this rank's normalised embeddings; ``z*_MD``: all ranks' (this rank's rows start at
    ``offset``); ``id*``: item ids. Not negatives, so masked out: a gathered item equal to the
    positive or to the query (repeats in a batch), and the partner of another pair of the same
    query (a known positive). Returns (loss, a->b in-batch top-1 accuracy).
    """
    B = za_BD.shape[0]
    labels_B = offset + torch.arange(B, device=za_BD.device)
    losses, acc = [], None
    for q_BD, g_MD, q_id, pos_id, g_id, g_query_id in ((za_BD, zb_MD, ida_B, idb_B, idb_M, ida_M),
                                                       (zb_BD, za_MD, idb_B, ida_B, ida_M, idb_M)):
        logits_BM = scale * q_BD @ g_MD.T
        same_BM = ((g_id[None, :] == pos_id[:, None]) | (g_id[None, :] == q_id[:, None])
                   | (g_query_id[None, :] == q_id[:, None]))
        same_BM[torch.arange(B), labels_B] = False
        logits_BM = logits_BM.masked_fill(same_BM, float("-inf"))
        losses.append(F.cross_entropy(logits_BM, labels_B))
        if acc is None:
            acc = (logits_BM.argmax(1) == labels_B).float().mean()
    return (losses[0] + losses[1]) / 2, acc


# ----------------------------------------------------------------------------- module


class TokenizerModule(pl.LightningModule):
    """Symmetric InfoNCE (in-batch negatives gathered across ranks, learnable temperature) on
    item2item pairs; the vision backbone stays frozen, projector and text backbone train."""

    def __init__(self, encoder: EncoderConfig | None = None, lr: float = 5e-5, projector_lr: float = 1e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 0, temperature: float = 0.07,
                 learn_temperature: bool = True, ks: tuple[int, ...] = (10, 50), artifacts_root: str = "artifacts",
                 export_encoder: bool = True):
        """
        Args:
            encoder: the item encoder (also given to the data module: tokeniser, image size).
            lr: learning rate of the text backbone; ``projector_lr``: of the projector and temperature.
            temperature: initial InfoNCE temperature (CLIP-style, learned as log 1/t when ``learn_temperature``).
            ks: Recall@K cut-offs of the held-out evaluation.
            artifacts_root: ``export`` writes ``<artifacts_root>/<dataset>/tokenizer/``.
            export_encoder: also save the fine-tuned encoder into the artifact.
        """
        super().__init__()
        if isinstance(encoder, dict):  # from a checkpoint's hyper-parameters
            encoder = EncoderConfig(**encoder)
        encoder = encoder or EncoderConfig()
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = dataclasses.asdict(encoder)  # plain dict: checkpoints load with weights_only
        self.encoder = ItemEncoder(encoder)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / temperature)),
                                              requires_grad=learn_temperature)
        # held-out Recall@K of the initial weights, measured at fit start; NaN = not measured.
        # A buffer, so it travels with every checkpoint (resume, export).
        self.register_buffer("recall_before", torch.full((len(RECALL_GROUPS), len(ks)), float("nan")))

    def forward(self, x: dict) -> torch.Tensor:
        return self.encoder(x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_counts"])

    # --- loss: symmetric InfoNCE over the batch gathered from every rank
    def contrastive(self, a: dict, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        za_BD = F.normalize(self(a).float(), dim=-1)
        zb_BD = F.normalize(self(b).float(), dim=-1)
        ga, gb = self.all_gather((za_BD, zb_BD), sync_grads=True)  # (W, B, D) under DDP, (B, D) alone
        ida, idb = self.all_gather((a["item_id"], b["item_id"]))
        flat = lambda g, x: g.reshape(-1, *x.shape[1:])
        return info_nce(za_BD, zb_BD, flat(ga, za_BD), flat(gb, zb_BD), a["item_id"], b["item_id"],
                        flat(ida, a["item_id"]), flat(idb, b["item_id"]), self.global_rank * za_BD.shape[0],
                        self.logit_scale.exp().clamp(max=100.0))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, acc = self.contrastive(batch["a"], batch["b"])
        B = batch["relation"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/acc", acc, batch_size=B)
        self.log("train/temperature", 1 / self.logit_scale.exp().clamp(max=100.0), batch_size=B)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = self.contrastive(batch["a"], batch["b"])
        B = batch["relation"].shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=B)
        self.log("val/acc", acc, sync_dist=True, batch_size=B)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"item_id": batch["x"]["item_id"], "embedding": self(batch["x"]).float()}

    def configure_optimizers(self):
        h = self.hparams
        proj = [p for p in self.encoder.parameters() if p.requires_grad and not
                any(p is q for q in self.encoder.backbone.parameters())]
        text = [p for p in self.encoder.backbone.parameters() if p.requires_grad]
        groups = [{"params": text, "lr": h.lr, "weight_decay": h.weight_decay},
                  {"params": proj, "lr": h.projector_lr, "weight_decay": h.weight_decay}]
        if self.logit_scale.requires_grad:
            groups.append({"params": [self.logit_scale], "lr": h.projector_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW([g for g in groups if g["params"]])
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            t = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- held-out retrieval, before (fit start) and after (export) fine-tuning
    @torch.no_grad()
    def embed(self, loader: DataLoader, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """Embeddings (n, D) float32 of the loader's items, in order, on this module's device."""
        was_training = self.training
        self.eval()
        ctx = (trainer or self.trainer).precision_plugin.forward_context
        out = []
        for batch in loader:
            x = {k: v.to(self.device) for k, v in batch["x"].items()}
            with ctx():
                out.append(self(x).float())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros((0, self.encoder.dim), device=self.device)

    def embed_rows_sharded(self, dm: Item2ItemDataModule, rows: np.ndarray) -> torch.Tensor:
        """All ranks embed ``rows[rank::world]``, then every rank gets all (len(rows), D) embeddings."""
        W = self.trainer.world_size
        mine = self.embed(dm.item_loader(rows, shard=True))
        if W == 1:
            return mine
        n = math.ceil(len(rows) / W)
        g_WnD = self.all_gather(F.pad(mine, (0, 0, 0, n - mine.shape[0])))
        return g_WnD.transpose(0, 1).reshape(n * W, -1)[:len(rows)]  # rows[r + i*W] sits at i*W + r

    def retrieval_metrics(self, emb_pool: torch.Tensor, dm: Item2ItemDataModule) -> dict[str, float]:
        """Recall@K of the held-out pairs over the pool ``dm.eval_rows`` (``emb_pool`` in that order)."""
        where = np.full(len(dm.items["item_id"]), -1)
        where[dm.eval_rows] = np.arange(len(dm.eval_rows))
        pairs = np.stack([where[dm.eval_pairs[:, 0]], where[dm.eval_pairs[:, 1]], dm.eval_pairs[:, 2]], 1)
        assert (pairs[:, :2] >= 0).all(), "the retrieval pool holds every held-out item"
        return pair_recall(emb_pool, pairs, tuple(self.hparams.ks))

    def _recall_table(self, m: dict[str, float]) -> torch.Tensor:
        return torch.tensor([[m.get(f"{k}/recall@{c}" if k != "all" else f"recall@{c}", float("nan"))
                              for c in self.hparams.ks] for k in RECALL_GROUPS])

    def _recall_dict(self, t: torch.Tensor) -> dict[str, float]:
        return {(f"recall@{c}" if g == "all" else f"{g}/recall@{c}"): round(float(t[i, j]), 6)
                for i, g in enumerate(RECALL_GROUPS) for j, c in enumerate(self.hparams.ks)
                if not math.isnan(float(t[i, j]))}

    def on_train_start(self) -> None:
        # after any checkpoint restore: a resumed run keeps the "before" of its first start
        if not torch.isnan(self.recall_before[0, 0]):
            return
        dm = self.trainer.datamodule
        t0 = time.perf_counter()
        m = self.retrieval_metrics(self.embed_rows_sharded(dm, dm.eval_rows), dm)
        self.recall_before.copy_(self._recall_table(m))
        rank_zero_info(f"held-out pairs before fine-tuning ({time.perf_counter() - t0:.1f}s): "
                       + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        if self.logger is not None:
            self.logger.log_metrics({f"before/{k}": v for k, v in m.items()}, step=0)

    # --- the artifact
    def export_artifact(self, trainer: pl.Trainer, datamodule: Item2ItemDataModule | None, out: Path | None):
        if datamodule is None:
            raise ValueError("the tokenizer export needs its data module (the items to embed)")
        dm = datamodule
        dm.setup("predict")
        self.to(trainer.strategy.root_device)
        t0 = time.perf_counter()
        all_rows = np.arange(len(dm.items["item_id"]))
        emb_ND = self.embed(dm.item_loader(all_rows), trainer)
        seconds = time.perf_counter() - t0
        if not torch.isfinite(emb_ND).all():
            raise ValueError("the encoder produced non-finite embeddings (diverged checkpoint?)")
        after = self.retrieval_metrics(emb_ND[torch.as_tensor(dm.eval_rows, device=emb_ND.device)], dm)
        # no "before" in the weights: they are the initial ones (export without a checkpoint)
        before = after if torch.isnan(self.recall_before[0, 0]) else self._recall_dict(self.recall_before)
        if trainer.global_rank != 0:
            return None
        out = out or Path(self.hparams.artifacts_root) / dm.dataset_name / "tokenizer"
        emb = emb_ND.cpu().numpy()
        D = emb.shape[1]
        t = dm.item_table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), type=pa.float32()), D))

        def build(tmp: Path) -> None:
            (tmp / "embeddings").mkdir()
            for i, s in enumerate(range(0, max(t.num_rows, 1), 1_000_000)):
                pq.write_table(t.slice(s, 1_000_000), tmp / "embeddings" / f"part-{i:05d}.parquet",
                               compression="zstd")
            if self.hparams.export_encoder:
                save_encoder(self.encoder, dm.processor, tmp)

        types = t["item_type"].to_pylist()
        metrics = {"heldout_pairs": len(dm.eval_pairs), "train_pairs": len(dm.train_pairs),
                   "retrieval_pool": len(dm.eval_rows), "before": before, "after": after,
                   "embed_items_per_s": len(all_rows) / seconds}
        m = write_artifact(out, build, stage="tokenizer", dataset=dm.dataset_name,
                           config={"model": dict(self.hparams), "data": dict(dm.hparams)},
                           sizes={"embedding_dim": D, "num_items": t.num_rows,
                                  "num_products": types.count("product"), "num_videos": types.count("video")},
                           metrics=metrics)
        rank_zero_info(f"tokenizer artifact {out} (id {m.id}): {t.num_rows} items x {D}; held-out "
                       + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in after))
        return m


# ----------------------------------------------------------------------------- the encoder in the artifact


def save_encoder(encoder: ItemEncoder, processor: ItemProcessor, folder: Path) -> None:
    """``text_model/`` and ``tokenizer/`` (Hugging Face format, ``<EMB>`` included), ``vision.pt``
    (vision backbone + projector, when images are used), ``encoder.json`` (the :class:`EncoderConfig`)."""
    encoder.backbone.save_pretrained(folder / "text_model")
    processor.tokenizer.save_pretrained(folder / "tokenizer")
    if encoder.vision is not None:
        torch.save({k: v for k, v in encoder.state_dict().items() if not k.startswith("backbone.")},
                   folder / "vision.pt")
    (folder / "encoder.json").write_text(json.dumps(dataclasses.asdict(encoder.cfg), indent=2) + "\n")


def load_encoder(artifact_dir: str | Path) -> tuple[ItemEncoder, ItemProcessor]:
    """The fine-tuned encoder of a tokenizer artifact and its input processor (to embed new items)."""
    m = load_manifest(artifact_dir, stage="tokenizer")
    cfg = EncoderConfig(**json.loads(m.file("encoder.json").read_text()))
    cfg = dataclasses.replace(cfg, text_model=str(m.file("text_model")), tokenizer=str(m.file("tokenizer")),
                              text_kwargs={}, text_config=None, vision_checkpoint=None, vision_pretrained=False)
    enc = ItemEncoder(cfg)
    if enc.vision is not None:
        missing, unexpected = enc.load_state_dict(
            torch.load(m.file("vision.pt"), map_location="cpu", weights_only=True), strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            raise ArtifactError(f"{m.path}: vision.pt does not fit encoder.json (missing "
                                f"{[k for k in missing if not k.startswith('backbone.')][:5]}, unexpected {unexpected[:5]})")
    return enc.eval(), ItemProcessor(cfg)


# ----------------------------------------------------------------------------- benchmark


def _bench_items(n: int, data_dir: str | None, seed: int = 0) -> list[dict]:
    if data_dir is not None and (Path(data_dir) / "items").is_dir():
        t = read_table(data_dir, "items")
        t = t.filter(pc.is_in(t["item_type"], pa.array(EMBEDDED_TYPES))).slice(0, n)
        return t.select(["title", "text", "images"]).to_pylist()
    import io as _io

    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["red", "cotton", "shirt", "phone", "charger", "kitchen", "knife", "travel", "mug", "lamp", "pro"]
    items = []
    for i in range(n):
        buf = _io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        k = 1 if i % 2 == 0 else 6  # products: 1 image; videos: 6 frames + OCR/ASR text
        items.append({"title": " ".join(rng.choice(words, 8)), "images": [buf.getvalue()] * k,
                      "text": " ".join(rng.choice(words, 24)) if k > 1 else None})
    return items


def bench(config: str | None = None, data_dir: str | None = "data/synth", num_items: int = 256,
          batch_size: int = 64, device: str | None = None) -> dict:
    """Items embedded per second by the stage-1 encoder (preprocessing + forward, and forward only).

    Args:
        config: a tokenizer YAML whose ``model.encoder`` is used (default: ``configs/tokenizer/tiny.yaml``
            of this checkout, else the default encoder).
        data_dir: embed this dataset's first items (falls back to generated items when absent).
        device: ``cuda`` / ``cpu``; default cuda when available.
    """
    import yaml

    path = Path(config) if config else Path(__file__).resolve().parents[2] / "configs/tokenizer/tiny.yaml"
    enc_cfg = {}
    if path.is_file():
        enc_cfg = (yaml.safe_load(path.read_text()).get("model") or {}).get("encoder") or {}
    elif config:
        raise ValueError(f"config {config} does not exist")
    cfg = EncoderConfig(**enc_cfg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc, proc = ItemEncoder(cfg).to(dev).eval(), ItemProcessor(cfg)
    items = _bench_items(num_items, data_dir)
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    with torch.inference_mode():  # warm-up
        enc(**{k: v.to(dev) for k, v in proc(batches[0]).items()})
    t_pre = t_fwd = 0.0
    with torch.inference_mode():
        for b in batches:
            t0 = time.perf_counter()
            x = {k: v.to(dev) for k, v in proc(b).items()}
            t1 = time.perf_counter()
            enc(**x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_pre, t_fwd = t_pre + t1 - t0, t_fwd + time.perf_counter() - t1
    return {"items": len(items), "batch_size": batch_size, "device": str(dev), "threads": torch.get_num_threads(),
            "text_model": Path(cfg.text_model or "all-MiniLM-L6-v2").name,
            "text_layers": enc.backbone.config.num_hidden_layers, "vision_model": cfg.vision_model or "none",
            "params_m": round(sum(p.numel() for p in enc.parameters()) / 1e6, 2),
            "max_length": cfg.max_length, "items_per_s": len(items) / (t_pre + t_fwd),
            "forward_items_per_s": len(items) / t_fwd, "preprocess_items_per_s": len(items) / t_pre}


# ----------------------------------------------------------------------------- CLI


class TokenizerCLI(StageCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one encoder config: the data module tokenises and resizes images for the model it feeds
        parser.link_arguments("model.encoder", "data.encoder", apply_on="parse")


def main(argv: list[str] | None = None) -> None:
    TokenizerCLI(TokenizerModule, Item2ItemDataModule, args=argv)


if __name__ == "__main__":
    main()
