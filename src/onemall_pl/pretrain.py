"""Stage 3, pretraining: the OneMall model on next-SID prediction + contrastive alignment (paper §3.2, Eq. 7).

    onemall pretrain fit     -c configs/pretrain/tiny.yaml                # CPU, a few minutes
    onemall pretrain fit     -c configs/pretrain/tiny.yaml -c configs/trainer/ddp.yaml --trainer.devices 2
    onemall pretrain export  -c configs/pretrain/tiny.yaml                # -> artifacts/<dataset>/pretrain/
    onemall pretrain sweep   -c configs/pretrain/tiny.yaml                # Table 1 rows + Table 6 pair
    onemall bench pretrain                                                # samples/s, GFLOPs per sample

Data (:class:`SamplesDataModule`): the ``samples`` table (one row per request with a positive;
histories strictly before the request) and the quantize stage's ``sid_table``, read only through
its manifest (``artifacts/<dataset>/quantize``). Training rows stream from the Parquet shards
(:class:`~onemall_pl.data.datasets.ParquetStream`: split across DDP ranks and workers, resumable
mid-epoch from the checkpoint); valid / test rows are held in memory, shuffled once by the seed and
split across ranks without repeats. A collate turns item ids into the model's batch contract
(``onemall_pl.models.decoder``): per behaviour the latest ``max_*`` items, most recent first,
right-padded, each with its SID, category L1..L3, price band and shop. Items without a SID
(entertainment videos: the quantize stage skips them; they are not recommendable) are **dropped
from the sequences** before truncation, so the kept window holds the latest items that have one;
targets without a SID are dropped from training (they cannot be generated) but kept in the
evaluation targets, where they count as misses.

Sizes are never typed twice: ``data.sizes`` (``codebook_sizes`` from the quantize manifest;
``n_categories``, ``n_price_bands``, ``n_shops`` from the catalogue; ``max_seq_len`` from the
history lengths) is linked into ``model.sizes`` and overrides ``model.net``. A checkpoint whose
vocabulary differs from the manifest's codebooks fails with an error naming both.

Objective (:class:`PretrainModule`, Eq. 7): mean cross-entropy over the SID levels (teacher
forced, NTP) + ``contrastive_weight`` x in-batch InfoNCE between the user embedding (the decoder's
state after the last SID token) and the item tower. Negatives are the other (request, target)
pairs of the *global* batch: embeddings are gathered across ranks with
``all_gather(sync_grads=True)``; the same item under another request is masked, not a negative.
AdamW with linear warm-up then cosine decay (per optimiser step). The MoE balancer
(:func:`onemall_pl.models.moe.balance_experts`) runs once per optimiser step, before it (the
routing bias changes selection only, never a gradient), with loads all-reduced over ranks.

Metrics (torchmetrics, synced over ranks, per scenario and overall):

- ``Acc-SID1/2/3``: teacher-forced top-1 accuracy of each SID level, over (request, target) pairs.
- ``HR@50/100/500`` (paper §4): constrained beam search (width ``beam``) over the trie of the
  scenario's item type (product-card -> products, short-video -> videos, live-stream ->
  live-streams; a SID is unique only within a type), SIDs -> items (collided SIDs expand to all
  their items, most clicked first), then the share of the request's held-out positives in the top K.
  Beam search runs on the first ``beam_requests`` evaluation requests (a seeded random sample, the
  same whatever the number of ranks) to keep CPU evaluation affordable; Acc-SID uses all of them.
- leave-one-out datasets (MovieLens, Amazon): also ``Recall@5/10`` and ``NDCG@5/10`` (one
  held-out item per user, so Recall@K = HR@K), the SASRec / TIGER protocol.

Artifact ``artifacts/<dataset>/pretrain/``: ``model.pt`` (the OneMall ``state_dict``, loads with
``weights_only=True``), ``model.json`` (its :class:`OneMallConfig` and the data settings), the
quantize manifest id as upstream, test metrics and parameter counts in the manifest. Load it with
:func:`load_pretrained`.

Sweep (Table 1 / Table 6 at CPU scale): :data:`TABLE1_ROWS` (dense 2 and 4 layers, MoE 12/2 and
24/2 with experts of half the dense FFN width, so equal active size), each trained from the same
config with the same budget, then the moe-12/2 row without Query-Former. Measured (one run, tiny
world of ``onemall data synth --preset tiny``, category-derived fixture SIDs [64, 64, 256] since the
quantize stage was still landing, 200 steps of 128 requests, beam 500 on 256 test requests, on a
16-core CPU box: 3 min 3 s for the 5 runs)::

    row       params total / active  Acc-SID1/2/3         HR@50/100/500
    dense-2L  288,448 / 288,448      84.3 / 71.4 / 28.7   81.6 / 90.3 / 97.3
    dense-4L  420,032 / 420,032      84.4 / 69.4 / 27.8   81.6 / 89.0 / 96.2
    moe-12/2  1,078,464 / 423,104    83.6 / 71.7 / 31.1   83.6 / 92.4 / 97.3
    moe-24/2  1,867,968 / 426,176    83.3 / 70.4 / 32.8   83.6 / 89.0 / 97.3
    Table 6   context keys  GFLOPs/request  HR@50/100/500
    QFormer   13            0.0042          83.6 / 92.4 / 97.3
    w/o       193           0.0155          88.4 / 93.6 / 98.2

``onemall bench pretrain`` on one H100 (bf16 autocast, batch 256, 2 targets, random batches of the
contract, full-length sequences of 400): 0.1B 4,793 samples/s (QFormer) vs 1,869 (full sequences);
0.5B-A0.1B 2,138 vs 1,262; 1.3B-A0.1B 1,252 vs 849. Forward GFLOPs per request (counted):
0.5B-A0.1B 3.55 with the Query-Former (151 context keys) vs 21.3 without (1201 keys); the paper's
Table 6 gives 9.2 vs 34.4.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics import MeanMetric, Metric

from onemall_pl.artifacts import ArtifactError, Manifest, load_manifest, write_artifact
from onemall_pl.data.build import is_leave_one_out
from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.data.datasets import ParquetStream
from onemall_pl.data.schema import ITEM_TYPES, SCENARIOS, DataError
from onemall_pl.io import read_dataset_info, read_table, write_json
from onemall_pl.metrics import PAD, RetrievalMetrics, flat_metrics
from onemall_pl.models.decoder import BEHAVIOURS, OneMall, OneMallConfig, count_params, flops_per_sample
from onemall_pl.models.moe import balance_experts
from onemall_pl.retrieval import SIDTrie, retrieve
from onemall_pl.stage import StageCLI

SCENARIO_ITEM_TYPE = {"product_card": "product", "short_video": "video", "live_stream": "live"}
"""The item type each scenario recommends: beam search runs over that type's SID trie."""
SEQ_COLUMNS = {b: f"seq_{b}" for b in BEHAVIOURS}
SAMPLE_COLUMNS = ["request_id", "scenario", *SEQ_COLUMNS.values(), "targets"]
LOO_K = (5, 10)


# ----------------------------------------------------------------------------- SIDs


class SIDIndex:
    """The quantize artifact as lookups over the catalogue's dense item index.

    ``sid`` [N, S] (0 where an item has no SID, see ``has_sid``), and one :class:`SIDTrie` per item
    type over raw item ids, built from the reverse map ``sid_items`` when the artifact has it
    (collided items in its rank order) else from ``sid_table``.
    """

    def __init__(self, manifest: Manifest, catalog: ItemCatalog):
        self.manifest = manifest
        self.codebook_sizes = tuple(int(c) for c in manifest.size("codebook_sizes"))
        path = manifest.file("sid_table")
        t = pq.read_table(path)
        for c in ("item_id", "item_type", "sid"):
            if c not in t.column_names:
                raise DataError(f"missing column; it has {t.column_names}", table="sid_table", column=c,
                                file=str(path))
        sid = t.column("sid").combine_chunks()
        S = len(self.codebook_sizes)
        lens = np.diff(sid.offsets.to_numpy())
        if (lens != S).any():
            row = int(np.flatnonzero(lens != S)[0])
            raise ArtifactError(f"{manifest.path}: sid_table row {row} has a SID of {lens[row]} levels but the "
                                f"manifest's codebook_sizes {list(self.codebook_sizes)} has {S}")
        codes = sid.flatten().to_numpy().astype(np.int64).reshape(-1, S)
        over = codes >= np.asarray(self.codebook_sizes)
        if over.any() or (codes < 0).any():
            row = int(np.flatnonzero(over.any(1) | (codes < 0).any(1))[0])
            raise ArtifactError(f"{manifest.path}: sid_table row {row} has SID {codes[row].tolist()}, outside the "
                                f"manifest's codebook_sizes {list(self.codebook_sizes)}")
        idx = catalog.index_of(t.column("item_id").to_numpy(), table="sid_table", column="item_id")
        self.sid = np.zeros((len(catalog), S), np.int64)
        self.sid[idx] = codes
        self.has_sid = np.zeros(len(catalog), bool)
        self.has_sid[idx] = True
        self.tries: dict[str, SIDTrie] = {}
        rev = self._reverse_map(manifest)
        for k, typ in enumerate(ITEM_TYPES):
            if rev is not None:
                r = rev.filter(pc.equal(rev.column("item_type"), typ))
                if r.num_rows == 0:
                    continue
                items = pc.list_flatten(r.column("item_ids")).to_numpy()
                rep = pc.list_parent_indices(r.column("item_ids")).to_numpy()
                s = r.column("sid").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(-1, S)[rep]
                self.tries[typ] = SIDTrie(s, items, self.codebook_sizes)
            else:
                m = (t.column("item_type").to_numpy(zero_copy_only=False) == typ)
                if m.any():
                    self.tries[typ] = SIDTrie(codes[m], t.column("item_id").to_numpy()[m], self.codebook_sizes)

    @staticmethod
    def _reverse_map(manifest: Manifest) -> pa.Table | None:
        try:
            path = manifest.file("sid_items")
        except ArtifactError:
            return None
        t = pq.read_table(path)
        return t if {"item_type", "sid", "item_ids"} <= set(t.column_names) else None


# ----------------------------------------------------------------------------- collate


def _ragged(arr: pa.Array | pa.ChunkedArray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list column."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.null_count:
        raise DataError("null list", table="samples", column=column,
                        row=int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]))
    off = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.slice(off[0], off[-1] - off[0]).to_numpy(zero_copy_only=False)
    return off - off[0], np.asarray(values, np.int64)


def _keep(off: np.ndarray, values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the values where ``keep`` is False, per row (offsets recomputed)."""
    kept = np.concatenate([[0], np.cumsum(keep)])
    return kept[off], values[keep]


def _window(off: np.ndarray, values: np.ndarray, width: int, newest_first: bool, pad: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> ``[B, width]`` ids and mask, left-aligned. ``newest_first``: the last ``width``
    values of each row, reversed (the most recent at position 0); else the first ``width``."""
    starts, ends = off[:-1], off[1:]
    n = np.minimum(ends - starts, width)
    col = np.arange(width)
    mask = col < n[:, None]
    src = (ends[:, None] - 1 - col) if newest_first else (starts[:, None] + col)
    ids = values[np.clip(src, 0, max(len(values) - 1, 0))] if len(values) else np.zeros(mask.shape, np.int64)
    return np.where(mask, ids, pad), mask


class SamplesCollate:
    """An Arrow batch of ``samples`` -> the OneMall batch contract (picklable, for DataLoader workers).

    Training batches hold ``scenario``, the three behaviours and ``target`` (the first ``max_targets``
    positives with a SID). Evaluation batches add ``target_ids`` (every positive, raw item ids,
    ``-1`` padded, for HR@K) and ``row`` (the request's rank in the seeded evaluation order).
    """

    def __init__(self, catalog: ItemCatalog, sids: SIDIndex, max_len: Mapping[str, int], max_targets: int):
        self.item_ids = catalog.item_ids
        self.feats = {"cat": catalog.category.numpy(), "price": catalog.price_band.numpy(),
                      "shop": catalog.shop.numpy(), "sid": sids.sid}
        self.has_sid = sids.has_sid
        self.max_len, self.max_targets = dict(max_len), max_targets
        self.index_of = catalog.index_of

    def features(self, idx: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.where(mask, idx, 0)
        out = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.feats.items()}
        out["mask"] = torch.from_numpy(mask)
        return out

    def _dense(self, t: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
        off, ids = _ragged(t.column(column), column)
        rows = np.repeat(np.arange(len(off) - 1), np.diff(off))
        return off, self.index_of(ids, table="samples", column=column, rows=rows)

    def __call__(self, t: pa.Table) -> dict[str, Any]:
        scen = pc.index_in(t.column("scenario"), value_set=pa.array(SCENARIOS))
        if scen.null_count:
            row = int(np.flatnonzero(scen.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"scenario {t.column('scenario')[row].as_py()!r} not in {list(SCENARIOS)}",
                            table="samples", column="scenario", row=row)
        batch: dict[str, Any] = {"scenario": torch.from_numpy(scen.to_numpy(zero_copy_only=False).astype(np.int64))}
        for b, col in SEQ_COLUMNS.items():
            off, idx = self._dense(t, col)
            off, idx = _keep(off, idx, self.has_sid[idx])  # items without a SID leave the sequence
            batch[b] = self.features(*_window(off, idx, self.max_len[b], newest_first=True))
        off, idx = self._dense(t, "targets")
        if "row" in t.column_names:  # evaluation: every positive counts for HR@K
            raw_off, raw = _ragged(t.column("targets"), "targets")
            ids, mask = _window(raw_off, raw, max(1, int(np.diff(raw_off).max(initial=1))), newest_first=False)
            batch["target_ids"] = torch.from_numpy(np.where(mask, ids, PAD))
            batch["row"] = torch.from_numpy(t.column("row").to_numpy().astype(np.int64))
        off, idx = _keep(off, idx, self.has_sid[idx])
        tidx, tmask = _window(off, idx, self.max_targets, newest_first=False)
        batch["target"] = self.features(tidx, tmask) | {"item": torch.from_numpy(tidx)}
        return batch


class _EvalBatches(IterableDataset):
    """This rank's share of an in-memory evaluation table, in collated batches.

    Rows ``rank, rank + W, ...`` of the table (no repeats, so metrics over W ranks equal those
    over one); the rank is read when iterated. Iterable, so Lightning never injects a sampler.
    """

    def __init__(self, table: pa.Table, batch_size: int, collate: SamplesCollate):
        self.table, self.batch_size, self.collate = table, batch_size, collate

    def _rows(self) -> np.ndarray:
        d = torch.distributed
        on = d.is_available() and d.is_initialized()
        rank, world = (d.get_rank(), d.get_world_size()) if on else (0, 1)
        return np.arange(rank, self.table.num_rows, world)

    def __len__(self) -> int:
        return math.ceil(len(self._rows()) / self.batch_size)

    def __iter__(self):
        rows = self._rows()
        for a in range(0, len(rows), self.batch_size):
            yield self.collate(self.table.take(rows[a:a + self.batch_size]))


class SamplesDataModule(pl.LightningDataModule):
    """``samples`` + the quantize artifact -> OneMall batches (see the module docstring).

    Args:
        data_dir: the dataset folder (``items``, ``samples``).
        sid_artifact: the quantize artifact folder; default ``artifacts/<dataset>/quantize``.
        batch_size: training requests per batch and per device.
        eval_batch_size: requests per validation / test batch.
        max_exposure, max_click, max_order: the latest items of each behaviour kept (with a SID).
        max_targets: positives per request used for training (the first ones); evaluation uses all.
        num_workers: DataLoader workers of the training stream.
        seed: shuffling of the training stream and of the evaluation order.
        num_price_bands: price bands of the catalogue (quantile bins).
    """

    def __init__(self, data_dir: str = "data/synth", sid_artifact: str | None = None, batch_size: int = 256,
                 eval_batch_size: int = 256, max_exposure: int = 64, max_click: int = 32, max_order: int = 16,
                 max_targets: int = 8, num_workers: int = 0, seed: int = 0, num_price_bands: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        if not (self.data_dir / "samples").exists():
            raise DataError(f"{self.data_dir} has no samples table: run `onemall data build {data_dir}` first",
                            table="samples", file=str(self.data_dir))
        sid_artifact = sid_artifact or f"artifacts/{self.dataset_name}/quantize"
        self.sid_manifest = load_manifest(sid_artifact, stage="quantize")
        self.catalog = ItemCatalog.load(data_dir, num_price_bands=num_price_bands)
        self.sids = SIDIndex(self.sid_manifest, self.catalog)
        self.max_len = {"exposure": max_exposure, "click": max_click, "order": max_order}
        self.collate = SamplesCollate(self.catalog, self.sids, self.max_len, max_targets)
        self.leave_one_out = is_leave_one_out(read_dataset_info(data_dir))
        self._stream: ParquetStream | None = None
        self._eval: dict[str, pa.Table] = {}

    @property
    def dataset_name(self) -> str:
        return self.data_dir.resolve().name

    @property
    def sid_source(self) -> str:
        """The quantize artifact folder (linked into the model for its error messages)."""
        return self.sid_manifest.path

    @property
    def sizes(self) -> dict[str, Any]:
        """Vocabulary sizes of the model (linked into ``model.sizes``)."""
        s = self.catalog.sizes
        return {"codebook_sizes": list(self.sids.codebook_sizes),
                "n_categories": max(s[f"num_categories_l{i}"] for i in (1, 2, 3)),
                "n_price_bands": s["num_price_bands"], "n_shops": s["num_shops"], "n_scenarios": len(SCENARIOS),
                "max_seq_len": max(self.max_len.values())}

    def eval_table(self, split: str) -> pa.Table:
        """The ``split`` requests in the seeded evaluation order, with their rank in it (``row``)."""
        if split not in self._eval:
            t = read_table(self.data_dir, "samples", columns=SAMPLE_COLUMNS + ["split"], validate=False)
            t = t.filter(pc.equal(t.column("split"), split)).select(SAMPLE_COLUMNS).combine_chunks()
            if t.num_rows == 0:
                raise DataError(f"no {split} request", table="samples", column="split", file=str(self.data_dir))
            perm = np.random.default_rng([self.hparams.seed, 1]).permutation(t.num_rows)
            t = t.take(perm)
            self._eval[split] = t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        return self._eval[split]

    def train_stream(self) -> ParquetStream:
        if self._stream is None:
            h = self.hparams
            self._stream = ParquetStream(self.data_dir, "samples", batch_size=h.batch_size, columns=SAMPLE_COLUMNS,
                                         filter={"split": "train"}, collate=self.collate, seed=h.seed)
        return self._stream

    def train_dataloader(self):
        return self.train_stream().loader(num_workers=self.hparams.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(_EvalBatches(self.eval_table(split), self.hparams.eval_batch_size, self.collate),
                          batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


# ----------------------------------------------------------------------------- metrics


class SIDAccuracy(Metric):
    """Teacher-forced top-1 accuracy of each SID level (``Acc-SID1..S``), overall and per scenario.

    ``update(logits, targets_NS, scenario_N)`` over (request, target) pairs; ``compute()`` has the
    :class:`~onemall_pl.metrics.RetrievalMetrics` layout (``flat_metrics`` flattens both).
    """

    full_state_update = False

    def __init__(self, levels: int, scenarios: Sequence[str] = SCENARIOS, **kw):
        super().__init__(**kw)
        self.scenarios, self.levels = tuple(scenarios), levels
        self.add_state("correct", torch.zeros(len(self.scenarios), levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros(len(self.scenarios), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Sequence[torch.Tensor], targets_NS: torch.Tensor, scenario_N: torch.Tensor) -> None:
        hit_NS = torch.stack([lg.argmax(-1) == targets_NS[:, i] for i, lg in enumerate(logits)], dim=1)
        self.correct.index_add_(0, scenario_N.long(), hit_NS.double())
        self.n.index_add_(0, scenario_N.long(), torch.ones_like(scenario_N, dtype=torch.float64))

    def compute(self) -> dict:
        def row(c, n):
            return {f"Acc-SID{i + 1}": float(c[i] / n) for i in range(self.levels)}

        out = {"overall": row(self.correct.sum(0), self.n.sum().clamp_min(1))}
        out.update({s: row(self.correct[i], self.n[i]) for i, s in enumerate(self.scenarios) if self.n[i] > 0})
        return out


def _take(batch: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of every tensor of a (nested) batch."""
    return {k: _take(v, idx) for k, v in batch.items()} if isinstance(batch, dict) else batch[idx]


class EvalMetrics(torch.nn.Module):
    """One split's metrics: loss, Acc-SID per level, HR@K (+ Recall / NDCG@5,10 for leave-one-out)."""

    def __init__(self, levels: int, hr_k: Sequence[int], leave_one_out: bool, beam: bool = True, sync: bool = True):
        super().__init__()
        kw = {} if sync else {"sync_on_compute": False}
        hr = sorted(set(hr_k) | (set(LOO_K) if leave_one_out else set()))
        self.loo = leave_one_out
        self.loss = MeanMetric(**kw)
        self.acc = SIDAccuracy(levels, **kw)
        self.retrieval = RetrievalMetrics(hr_k=hr, ndcg_k=LOO_K if leave_one_out else (), **kw)
        self.beam = beam

    def compute(self) -> dict[str, float]:
        out = {"ntp": float(self.loss.compute())} | flat_metrics(self.acc.compute())
        if self.beam:
            r = self.retrieval.compute()
            out.update(flat_metrics(r))
            if self.loo:  # one held-out item per user: the literature's Recall@K is HR@K
                out.update({k.replace(f"HR@{j}", f"Recall@{j}"): out.pop(k) for j in LOO_K
                            for k in [k for k in list(out) if k.endswith(f"HR@{j}")]})
            out["beam_requests"] = float(r["requests"]["overall"])
        return out

    def reset(self) -> None:
        for m in (self.loss, self.acc, self.retrieval):
            m.reset()


# ----------------------------------------------------------------------------- module


class PretrainModule(pl.LightningModule):
    """The OneMall model with its Eq. 7 loss, schedules, balancer and metrics (module docstring).

    Args:
        net: the model's widths and objective settings; its vocabulary sizes are overwritten by ``sizes``.
        sizes: sizes from the data and the quantize manifest (linked from ``data.sizes``, never typed).
        sid_source: the quantize artifact the sizes came from (linked; named in error messages).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of the matrices (not of norms, embeddings or biases).
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: the floor of the cosine schedule.
        beam: beam width of the retrieval metrics (>= the largest K).
        beam_requests: evaluation requests that run beam search (the first of the seeded order); None = all.
        hr_k: the K of HR@K.
        artifacts_root: ``export`` writes ``<artifacts_root>/<dataset>/pretrain/``.
    """

    def __init__(self, net: OneMallConfig | None = None, sizes: dict[str, Any] | None = None,
                 sid_source: str | None = None, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 50, min_lr_ratio: float = 0.1, beam: int = 500, beam_requests: int | None = 256,
                 hr_k: Sequence[int] = (50, 100, 500), artifacts_root: str = "artifacts"):
        super().__init__()
        net = net or OneMallConfig()
        unknown = set(sizes or {}) - {f.name for f in dataclasses.fields(OneMallConfig)}
        if unknown:
            raise ValueError(f"sizes {sorted(unknown)} are not fields of OneMallConfig")
        self.cfg = dataclasses.replace(net, **(sizes or {}))
        if beam < max(hr_k):
            raise ValueError(f"beam={beam} is narrower than the largest K of hr_k={list(hr_k)}")
        self.sid_source = sid_source
        # plain types only, so checkpoints load with weights_only=True
        self.save_hyperparameters({"net": dataclasses.asdict(self.cfg), "sid_source": sid_source, "lr": lr,
                                   "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                                   "min_lr_ratio": min_lr_ratio, "beam": beam, "beam_requests": beam_requests,
                                   "hr_k": list(hr_k), "artifacts_root": artifacts_root})
        self.model = OneMall(self.cfg)
        self.train_acc = SIDAccuracy(self.cfg.levels)
        self.metrics = torch.nn.ModuleDict()  # per split, built in setup (leave-one-out or not)
        self.tries: dict[str, SIDTrie] = {}
        self._moe: dict[str, float] = {}

    # --- setup and checkpoints
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            self.attach_data(dm)

    def attach_data(self, dm: SamplesDataModule) -> None:
        """Take the tries and the evaluation protocol of ``dm`` (checks its codebooks first)."""
        if tuple(dm.sids.codebook_sizes) != self.cfg.codebook_sizes:
            raise ArtifactError(f"{dm.sid_source}: the quantize manifest has codebook_sizes "
                                f"{list(dm.sids.codebook_sizes)} but the model was built with "
                                f"{list(self.cfg.codebook_sizes)}; link data.sizes into model.sizes")
        self.sid_source = dm.sid_source
        self.tries = dict(dm.sids.tries)
        if not len(self.metrics):
            for split in ("val", "test"):
                self.metrics[split] = EvalMetrics(self.cfg.levels, self.hparams.hr_k, dm.leave_one_out,
                                                  beam=self.hparams.beam_requests != 0).to(self.device)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        levels = sorted(int(k.split(".")[2]) for k in state_dict if k.startswith("model.sid_tok.") and k.endswith(".weight"))
        have = [int(state_dict[f"model.sid_tok.{i}.weight"].shape[0]) for i in levels]
        if have and tuple(have) != self.cfg.codebook_sizes:
            raise ArtifactError(f"the checkpoint's semantic-ID vocabulary is codebook_sizes {have}, but the quantize "
                                f"manifest ({self.sid_source or 'linked into the model'}) has "
                                f"{list(self.cfg.codebook_sizes)}: the checkpoint was trained on other SIDs; "
                                "point data.sid_artifact at the quantize artifact it was trained with, or retrain")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- training
    def forward(self, batch: dict):
        return self.model(batch)

    def contrastive(self, out, target_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In-batch InfoNCE over the (request, target) pairs of every rank (Eq. 7, second term).

        Each rank pads its pairs to ``[B * T]`` rows (the same on every rank: the training stream
        gives all ranks equal batches), gathers users, items and item ids with gradients, and scores
        each user against every item; the same item under another request is masked. With one
        process it is ``OneMall.loss``'s contrastive term. Returns (loss, top-1 accuracy).
        """
        B, T = target_mask_BT.shape
        req, t = target_mask_BT.nonzero(as_tuple=True)
        slot = req * T + t
        E = out.user_NE.shape[1]
        user = out.user_NE.new_zeros(B * T, E).index_copy(0, slot, out.user_NE)
        item = out.item_NE.new_zeros(B * T, E).index_copy(0, slot, out.item_NE)
        ids = out.item_N.new_full((B * T,), -1).index_copy(0, slot, out.item_N)
        valid = target_mask_BT.flatten()
        user, item = self._gather(user, sync_grads=True), self._gather(item, sync_grads=True)
        ids, valid = self._gather(ids), self._gather(valid.long())  # gloo gathers no bool
        valid = valid.reshape(-1).bool()
        user, item, ids = user.reshape(-1, E)[valid], item.reshape(-1, E)[valid], ids.reshape(-1)[valid]
        sim = (user @ item.T).float() / self.cfg.temperature
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill((ids[:, None] == ids[None, :]) & ~eye, float("-inf"))
        labels = torch.arange(len(sim), device=sim.device)
        return F.cross_entropy(sim, labels), (sim.argmax(-1) == labels).float().mean()

    def _gather(self, x: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        return x if self._trainer is None else self.all_gather(x, sync_grads=sync_grads)

    def training_step(self, batch, batch_idx):
        out = self.model(batch)
        ntp = self.model.loss(out)["ntp"]
        con, con_acc = self.contrastive(out, batch["target"]["mask"])
        loss = ntp + self.cfg.contrastive_weight * con
        B = len(batch["scenario"])
        self.log_dict({"train/loss": loss, "train/ntp": ntp, "train/contrastive": con,
                       "train/contrastive_acc": con_acc}, prog_bar=True, batch_size=B)
        self.train_acc.update([lg.detach() for lg in out.logits], out.targets_NS, batch["scenario"][out.req_N])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=B)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # once per optimiser step, after every micro-batch's routing: the loss-free MoE update
        self._moe = balance_experts(self.model)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._moe:
            self.log_dict({f"moe/{k}": v for k, v in self._moe.items()}, batch_size=len(batch["scenario"]))

    def on_train_epoch_end(self) -> None:
        self.log_dict({f"train/{k}": v for k, v in flat_metrics(self.train_acc.compute()).items()})
        self.train_acc.reset()

    # --- evaluation
    def _beam_rows(self, batch) -> torch.Tensor:
        cap = self.hparams.beam_requests
        rows = batch["row"]
        return torch.ones_like(rows, dtype=torch.bool) if cap is None else rows < cap

    @torch.no_grad()
    def update_metrics(self, m: EvalMetrics, batch: dict) -> None:
        """Loss and Acc-SID on every request of ``batch``; HR@K by beam search on its beam rows."""
        B = len(batch["scenario"])
        has = batch["target"]["mask"].any(1)
        if has.any():
            sub = _take(batch, has.nonzero(as_tuple=True)[0]) if not has.all() else batch
            out = self.model(sub)
            m.loss.update(self.model.loss(out)["ntp"], weight=len(out.req_N))
            m.acc.update(out.logits, out.targets_NS, sub["scenario"][out.req_N])
        if not m.beam:
            return
        sel = self._beam_rows(batch)
        K = max(m.retrieval.hr_k)
        for s, scen in enumerate(SCENARIOS):
            rows = (sel & (batch["scenario"] == s)).nonzero(as_tuple=True)[0]
            if len(rows) == 0:
                continue
            typ = SCENARIO_ITEM_TYPE[scen]
            if typ not in self.tries:
                raise ArtifactError(f"{self.sid_source}: no {typ} has a SID, so {scen} requests cannot be retrieved")
            trie = self.tries[typ]
            if trie.device != self.device:
                self.tries[typ] = trie = trie.to(self.device)
            sub = _take({k: batch[k] for k in ("scenario", *BEHAVIOURS)}, rows)
            items, _, _ = retrieve(self.model, sub, trie, self.hparams.beam, K)
            m.retrieval.update(items, batch["target_ids"][rows], batch["scenario"][rows])
        if B and not sel.any():  # keep every rank's states updated in step
            m.retrieval.update(batch["target_ids"][:0].new_zeros(0, K), batch["target_ids"][:0], batch["scenario"][:0])

    def validation_step(self, batch, batch_idx):
        self.update_metrics(self.metrics["val"], batch)

    def test_step(self, batch, batch_idx):
        self.update_metrics(self.metrics["test"], batch)

    def _log_split(self, split: str) -> None:
        m = self.metrics[split]
        self.log_dict({f"{split}/{k}": v for k, v in m.compute().items()}, prog_bar=False)
        m.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    # --- optimiser
    def configure_optimizers(self):
        h = self.hparams
        decay = [p for p in self.parameters() if p.ndim >= 2 and not _is_embedding(self, p)]
        ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in ids]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=h.lr, betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(h.warmup_steps, total, h.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- the artifact
    @torch.no_grad()
    def evaluate(self, loader, leave_one_out: bool) -> dict[str, float]:
        """The metrics of :meth:`update_metrics` over a loader, in this process only."""
        m = EvalMetrics(self.cfg.levels, self.hparams.hr_k, leave_one_out, beam=self.hparams.beam_requests != 0,
                        sync=False).to(self.device)
        was = self.training
        self.eval()
        try:
            for batch in loader:
                self.update_metrics(m, _to(batch, self.device))
        finally:
            self.train(was)
        return m.compute()

    def export_artifact(self, trainer: pl.Trainer, datamodule: SamplesDataModule | None, out: Path | None):
        if datamodule is None:
            raise ValueError("the pretrain export needs its data module (test metrics, upstream manifest)")
        dm = datamodule
        self.attach_data(dm)
        if trainer.global_rank != 0:
            return None
        out = out or Path(self.hparams.artifacts_root) / dm.dataset_name / "pretrain"
        t0 = time.perf_counter()
        metrics = {"test": self.evaluate(dm.test_dataloader(), dm.leave_one_out)}
        metrics["eval_s"] = time.perf_counter() - t0
        params = count_params(self.model)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        meta = {"model": dataclasses.asdict(self.cfg), "max_len": dm.max_len,
                "max_targets": dm.hparams.max_targets, "scenario_item_type": SCENARIO_ITEM_TYPE,
                "price_edges": dm.catalog.price_edges.tolist()}

        def build(tmp: Path) -> None:
            torch.save(state, tmp / "model.pt")
            write_json(tmp / "model.json", meta)

        m = write_artifact(out, build, stage="pretrain", dataset=dm.dataset_name,
                           config={"model": dict(self.hparams), "data": dict(dm.hparams)}, upstream=[dm.sid_manifest],
                           sizes={"codebook_sizes": list(self.cfg.codebook_sizes), "params_total": params["total"],
                                  "params_active": params["active"], **{f"max_{k}": v for k, v in dm.max_len.items()}},
                           metrics=metrics)
        rank_zero_info(f"pretrain artifact {out} (id {m.id}): test " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items() if "/" not in k))
        return m


def _is_embedding(module: torch.nn.Module, p: torch.nn.Parameter) -> bool:
    if not hasattr(module, "_embedding_ids"):
        module._embedding_ids = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return id(p) in module._embedding_ids


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _to(x, device):
    return {k: _to(v, device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def load_pretrained(folder: str | Path, quantize: str | Path | Manifest | None = None,
                    map_location: str = "cpu", stages: tuple[str, ...] = ("pretrain",)) -> tuple[OneMall, Manifest]:
    """The OneMall model of a pretrain artifact (checked through its manifest).

    ``quantize`` (an artifact folder or manifest): fail unless the model was trained on exactly
    these SIDs (same upstream id and codebook sizes), as stage 4 must before it decodes.
    ``stages``: the artifact stages accepted (stage 4's policies are OneMall models too).
    """
    m = load_manifest(folder, stage=stages[0] if len(stages) == 1 else None)
    if m.stage not in stages:
        raise ArtifactError(f"{folder}: expected a {' or '.join(map(repr, stages))} artifact, found stage {m.stage!r}")
    meta = json.loads(m.file("model.json").read_text())
    cfg = OneMallConfig(**meta["model"])
    if quantize is not None:
        from onemall_pl.artifacts import check_upstream
        from onemall_pl.models.decoder import check_codebooks

        q = quantize if isinstance(quantize, Manifest) else load_manifest(quantize, stage="quantize")
        check_codebooks(cfg, q)
        check_upstream(m, q)
    model = OneMall(cfg)
    model.load_state_dict(torch.load(m.file("model.pt"), map_location=map_location, weights_only=True))
    return model.eval(), m


# ----------------------------------------------------------------------------- Table 1 / Table 6 sweep

TABLE1_ROWS: dict[str, dict[str, Any]] = {
    # paper Table 1 at CPU scale: the widths of the config, only depth and experts change
    "dense-2L": {"n_layers": 2},
    "dense-4L": {"n_layers": 4},
    "moe-12/2": {"n_layers": 4, "n_experts": 12, "top_k": 2},
    "moe-24/2": {"n_layers": 4, "n_experts": 24, "top_k": 2},
}
"""MoE rows take experts of width ``ffn_hidden / top_k``, so the 2 active experts of a token hold as many
parameters as the dense FFN: dense-4L and the MoE rows have equal active size (the paper's rows keep the
active size near 0.1B the same way)."""
TABLE6_ROW = "moe-12/2"
"""The paper's Table 6 compares its 0.5B-A0.1B model with and without the Query-Former."""


def _row_args(name: str, net: dict, compress: bool = True) -> list[str]:
    cfg = dict(TABLE1_ROWS[name])
    if cfg.get("n_experts", 1) > 1:
        cfg["ffn_hidden"] = max(1, net["ffn_hidden"] // cfg["top_k"])
    cfg["compress"] = compress
    return [a for k, v in cfg.items() for a in (f"--model.net.{k}", json.dumps(v))]


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(c, v):
        if isinstance(v, float) and c.startswith(("Acc-", "HR@", "Recall@", "NDCG@")):
            return f"{100 * v:.1f}%"
        if isinstance(v, float):
            return f"{v:.4g}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep(config: str = "configs/pretrain/tiny.yaml", rows: list[str] | None = None, table6: bool = True,
          max_steps: int | None = None, data_dir: str | None = None, sid_artifact: str | None = None,
          out: str | None = None, runs_dir: str | None = None, extra: list[str] | None = None) -> dict:
    """Paper Table 1 (scaling) and Table 6 (Query-Former) at CPU scale: train each row on the same data
    with the same budget, evaluate on the test split, write a Markdown + JSON table.

    Args:
        config: the stage config every row starts from (data, trainer budget, widths, evaluation).
        rows: Table 1 rows to run (default all: dense-2L, dense-4L, moe-12/2, moe-24/2).
        table6: also train the moe-12/2 row without Query-Former (full sequences) for Table 6.
        max_steps: override the training budget (optimiser steps) of every row.
        data_dir, sid_artifact: override the config's dataset and quantize artifact.
        out: the artifact folder (default ``<artifacts_root>/<dataset>/pretrain_sweep``).
        runs_dir: where the rows' checkpoints go (default ``runs/<dataset>/pretrain_sweep``).
        extra: more LightningCLI arguments for every row (e.g. ``["--model.beam_requests", "128"]``).
    """
    names = list(rows or TABLE1_ROWS)
    unknown = [r for r in names if r not in TABLE1_ROWS]
    if unknown:
        raise ValueError(f"unknown sweep row(s) {unknown}; known: {list(TABLE1_ROWS)}")
    common = ["-c", config, *(extra or [])]
    if data_dir:
        common += ["--data.data_dir", data_dir]
    if sid_artifact:
        common += ["--data.sid_artifact", sid_artifact]
    if max_steps:
        common += ["--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "-1"]
    base = PretrainCLI(PretrainModule, SamplesDataModule, args=common, run=False)
    dm0 = base.datamodule
    net = dataclasses.asdict(base.model.cfg)
    runs = Path(runs_dir or f"runs/{dm0.dataset_name}/pretrain_sweep")
    jobs = [(n, True) for n in names]
    if table6:
        jobs += ([] if TABLE6_ROW in names else [(TABLE6_ROW, True)]) + [(TABLE6_ROW, False)]
    results: dict[str, dict] = {}
    for name, compress in jobs:
        key = name if compress else f"{name} w/o QFormer"
        tag = key.replace("/", "-").replace(" ", "_")
        args = common + _row_args(name, net, compress) + ["--trainer.default_root_dir", str(runs / tag)]
        cli = PretrainCLI(PretrainModule, SamplesDataModule, args=args, run=False)
        t0 = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        train_s = time.perf_counter() - t0
        if cli.trainer.global_rank != 0:
            continue
        t0 = time.perf_counter()
        metrics = cli.model.evaluate(cli.datamodule.test_dataloader(), cli.datamodule.leave_one_out)
        cfg = cli.model.cfg
        params, flops = count_params(cli.model.model), flops_per_sample(cfg)
        results[key] = {"row": key, "layers": cfg.n_layers, "dim": cfg.dim, "ffn_dim": cfg.ffn_hidden,
                        "heads": cfg.n_heads, "experts": f"{cfg.n_experts}/{cfg.top_k}" if cfg.n_experts > 1 else "-",
                        "compress": cfg.compress, "context_len": cfg.context_len, "params_total": params["total"],
                        "params_active": params["active"], "gflops_per_sample": flops["train"] / 1e9,
                        "steps": int(cli.trainer.global_step), "train_s": train_s,
                        "eval_s": time.perf_counter() - t0, **{k: v for k, v in metrics.items() if "/" not in k},
                        "per_scenario": {k: v for k, v in metrics.items() if "/" in k}}
        rank_zero_info(f"sweep {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k))
    if base.trainer.global_rank != 0:
        return {}
    hr = [f"HR@{k}" for k in base.model.hparams.hr_k]
    acc = [f"Acc-SID{i + 1}" for i in range(base.model.cfg.levels)]
    t1 = [results[n] for n in names]
    md = ("# Table 1 at CPU scale (onemall pretrain sweep)\n\n"
          f"dataset `{dm0.dataset_name}`, quantize artifact `{dm0.sid_source}`, same data and budget per row; "
          f"test split, HR@K by beam search (width {base.model.hparams.beam}) on "
          f"{t1[0].get('beam_requests', 0):.0f} requests.\n\n"
          + _table(t1, ["row", "layers", "dim", "ffn_dim", "heads", "experts", "params_total", "params_active",
                        *acc, *hr, "steps", "train_s"]))
    if table6:
        t6 = [results[TABLE6_ROW], results[f"{TABLE6_ROW} w/o QFormer"]]
        md += ("\n# Table 6 at CPU scale: Query-Former vs full sequences\n\n"
               "context_len = cross-attention keys per request; GFLOPs = training forward per request "
               "(one target, full-length sequences), counted by torch.utils.flop_counter.\n\n"
               + _table(t6, ["row", "context_len", "gflops_per_sample", *hr, *acc, "train_s"]))
    table = {"table1": t1, "table6": [results[TABLE6_ROW], results[f"{TABLE6_ROW} w/o QFormer"]] if table6 else []}
    dest = Path(out) if out else Path(base.model.hparams.artifacts_root) / dm0.dataset_name / "pretrain_sweep"

    def build(tmp: Path) -> None:
        (tmp / "tables.md").write_text(md)
        write_json(tmp / "tables.json", table)

    write_artifact(dest, build, stage="pretrain_sweep", dataset=dm0.dataset_name,
                   config={"config": config, "args": common, "rows": names, "table6": table6},
                   upstream=[dm0.sid_manifest], metrics=table)
    print(md)
    print(f"wrote {dest}")
    return table


# ----------------------------------------------------------------------------- benchmark


def bench(preset: str = "tiny", batch_size: int = 256, seconds: float = 5.0, targets: int = 2,
          device: str | None = None, bf16: bool = False, seed: int = 0) -> dict:
    """Training throughput of the OneMall model and its FLOPs per sample, with and without Query-Former.

    Times full optimiser steps (forward, Eq. 7 loss, backward, AdamW, MoE bias update) on random batches of
    the model's batch contract (full-length sequences, ``targets`` positives per request) for ``seconds``
    after two warm-up steps; the data pipeline is not included (``onemall bench data`` times it).
    GFLOPs per sample are counted by ``torch.utils.flop_counter.FlopCounterMode``: ``forward`` by
    :func:`~onemall_pl.models.decoder.flops_per_sample` (one target), ``train_step`` = forward + backward
    of this benchmark's batch, per request. ``bf16``: autocast to bfloat16 (GPU presets).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from onemall_pl.models.decoder import example_batch
    from onemall_pl.models.decoder import preset as make_preset

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "targets_per_request": targets,
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "threads": torch.get_num_threads(), "bf16": bf16}
    for compress in (True, False):
        cfg = make_preset(preset, compress=compress)
        torch.manual_seed(seed)
        model = OneMall(cfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = example_batch(cfg, batch_size, n_targets=targets, device=dev,
                              generator=torch.Generator().manual_seed(seed))

        def step(model=model, opt=opt, batch=batch):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(model(batch))["loss"]
            loss.backward()
            opt.step()
            balance_experts(model)
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as fc:
            model.loss(model(batch))["loss"].backward()
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            step()
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - t0 >= seconds:
                break
        dt = time.perf_counter() - t0
        key = "qformer" if compress else "full_seq"
        params = count_params(model)
        out[key] = {"context_len": cfg.context_len, "params_total": params["total"],
                    "params_active": params["active"], "samples_per_s": n * batch_size / dt,
                    "steps": n, "gflops_per_sample_forward": flops_per_sample(cfg, device=dev)["train"] / 1e9,
                    "gflops_per_sample_train_step": fc.get_total_flops() / batch_size / 1e9}
    return out


# ----------------------------------------------------------------------------- CLI


class PretrainCLI(StageCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.sizes", "model.sizes", apply_on="instantiate")
        parser.link_arguments("data.sid_source", "model.sid_source", apply_on="instantiate")


def _sweep_args(argv: list[str]) -> list[str]:
    """``sweep -c <stage config> --data.data_dir d --model.x y``: ``-c`` is ``--config`` and stage
    arguments (``--data.*``, ``--model.*``, ``--trainer.*``) go to every row through ``--extra``."""
    own, extra = [], []
    it = iter(argv)
    for a in it:
        if a.startswith(("--data.", "--model.", "--trainer.", "--seed_everything")):
            extra += [a] if "=" in a else [a, next(it)]
        elif a == "--extra":
            extra += json.loads(next(it))
        else:
            own.append("--config" if a == "-c" else a)
    return own + (["--extra", json.dumps(extra)] if extra else [])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        from jsonargparse import CLI

        CLI(sweep, args=_sweep_args(argv[1:]), as_positional=False)
        return
    try:
        PretrainCLI(PretrainModule, SamplesDataModule, args=argv)
    except ArtifactError as e:
        print(f"onemall pretrain: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
