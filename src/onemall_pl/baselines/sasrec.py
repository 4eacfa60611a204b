"""SASRec, the ANN baseline of the paper's Table 2, on the reusable two-tower module.

    onemall sasrec fit    -c configs/sasrec/tiny.yaml      # CPU, about a minute
    onemall sasrec export -c configs/sasrec/tiny.yaml      # artifacts/<dataset>/sasrec/
    onemall sasrec fit    -c configs/sasrec/ml100k.yaml    # MovieLens-100K, literature protocol
    (GPU / cluster: add --trainer configs/trainer/ddp.yaml, or --trainer.accelerator gpu)

Model: :class:`~onemall_pl.twotower.TwoTowerModule` with the causal-transformer user tower
and the item-id tower of :mod:`onemall_pl.models.sasrec` (they share the item embedding).
Training, ``loss``:

- ``full`` (default): softmax cross-entropy over *all* items at *every* position of the
  sequence (position t predicts item t+1, the last position predicts the request's
  targets), the objective of current SASRec reimplementations; the item count must fit a
  ``[B, L, N]`` logit tensor.
- ``in_batch``: the two-tower module's own sampled softmax over the batch's positives
  (logQ-corrected when the batch carries ``logq``), last position only: scales to any catalogue.

Data (:class:`SequenceData`): the ``samples`` table; the input is one behaviour sequence
(``sequence``, default ``seq_click``: the interaction sequence of MovieLens / Amazon, the
click sequence of the embedded world) of the latest ``max_len`` items. ``train_rows``:
``last_per_user`` trains on each user's latest training request (its sequence + targets hold
the user's whole training history up to ``max_click`` of ``data build``, so all positions
together are SASRec's usual one-sequence-per-user); ``all`` streams every training request.

Retrieval: the user vector after the latest item, top-K by inner product in a faiss index
over the item vectors (``index``: ``flat`` exact, ``hnsw`` approximate), over the items of the
request's scenario type as OneMall does (products for product-card requests, ...). ``exclude_history``
drops the items of the user's history from the ranking (the literature's full-ranking
protocol on MovieLens / Amazon; :func:`onemall_pl.metrics.replay` does it for every model); Table 2 on the embedded world excludes nothing.
Evaluation: HR@K per scenario (paper) and NDCG@K (literature) on the held-out requests,
through :class:`onemall_pl.metrics.RetrievalMetrics`. (During ``fit`` the history excluded is
the model's input, the latest ``max_len`` items; ``export`` and ``onemall evaluate compare``
exclude the whole ``seq_click`` through :func:`~onemall_pl.metrics.replay`.)

MovieLens-100K: half of its ratings share their second with an earlier rating of the same user;
``onemall data ml100k`` keeps them in the file's order, one second apart, so a request's history
(events strictly before it) holds every earlier rating as the literature's sequences do. Before
that, 41% of test users' histories lacked their latest rating(s), and the settings of
``configs/sasrec/ml100k.yaml`` reached test HR@10 0.1220; after it, 0.1803 (NDCG@10 0.0902).
"""

from __future__ import annotations

import inspect
import json
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from onemall_pl.artifacts import Manifest, load_manifest, write_artifact
from onemall_pl.baselines import RetrievalEvalHooks
from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.data.datasets import MapLoader, ParquetMapDataset, ParquetStream, collate_sequences
from onemall_pl.data.schema import SCENARIOS
from onemall_pl.io import read_dataset_info
from onemall_pl.metrics import PAD as TARGET_PAD
from onemall_pl.metrics import RetrievalMetrics, replay, topk_excluding
from onemall_pl.models.sasrec import PAD, ItemIdTower, SASRecConfig, SASRecUserTower
from onemall_pl.stage import StageCLI
from onemall_pl.twotower import TwoTowerModule, export_index

# ----------------------------------------------------------------------------- data


def sequence_batch(table: pa.Table, catalog: ItemCatalog, sequence: str, max_len: int,
                   max_targets: int | None) -> dict[str, torch.Tensor]:
    """Arrow rows of ``samples`` -> ``seq`` (item index + 1, 0 pads, latest item at -1),
    ``targets`` (item index + 1, -1 pads), ``scenario``."""
    b = collate_sequences(table, {sequence: max_len}, set_columns={"targets": max_targets},
                          scalar_columns=["scenario"], item_index=catalog, item_columns=[sequence, "targets"])
    seq_BL = torch.where(b[f"{sequence}_mask"], b[sequence] + 1, PAD)
    targets_BT = torch.where(b["targets_mask"], b["targets"] + 1, TARGET_PAD)
    return {"seq": seq_BL, "targets": targets_BT, "scenario": b["scenario"]}


def last_per_user(t: pa.Table) -> pa.Table:
    """Each user's latest row (by ``ts``, then ``request_id``)."""
    user, ts, rid = (t.column(c).to_numpy() for c in ("user_id", "ts", "request_id"))
    order = np.lexsort((rid, ts, user))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = user[order][1:] != user[order][:-1]
    return t.take(order[last])


class SequenceData(pl.LightningDataModule):
    """The ``samples`` of a dataset as item-index sequences (see the module docstring).

    Args:
        dataset: the dataset folder (``data/<name>``, built by ``onemall data build``).
        sequence: the behaviour sequence read (``seq_click``, ``seq_order``, ``seq_exposure``).
        max_len: items of the sequence read (the latest).
        train_rows: ``last_per_user`` or ``all`` training requests.
        batch_size / eval_batch_size: requests per batch.
        max_targets: targets kept per request (training: all are positives of the last position).
        eval_limit: evaluate on at most this many valid requests per epoch (the first, in table
            order; ``None`` = all). The test metrics of ``export`` always use every request.
    """

    def __init__(self, dataset: Path = Path("data/synth"), sequence: str = "seq_click", max_len: int = 50,
                 train_rows: Literal["last_per_user", "all"] = "last_per_user", batch_size: int = 128,
                 eval_batch_size: int = 256, max_targets: int = 16, eval_limit: int | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if sequence not in ("seq_click", "seq_order", "seq_exposure"):
            raise ValueError(f"sequence must be seq_click, seq_order or seq_exposure, got {sequence!r}")
        self.dataset, self.sequence, self.max_len = Path(dataset), sequence, max_len
        self.train_rows, self.batch_size, self.eval_batch_size = train_rows, batch_size, eval_batch_size
        self.max_targets, self.eval_limit, self.num_workers, self.seed = max_targets, eval_limit, num_workers, seed
        self.name = read_dataset_info(self.dataset).name
        self.catalog = ItemCatalog.load(self.dataset)
        self.collate = partial(sequence_batch, catalog=self.catalog, sequence=sequence, max_len=max_len,
                               max_targets=max_targets)
        self._train = None

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    def split(self, split: str, limit: int | None = None) -> ParquetMapDataset:
        cols = ["request_id", "user_id", "ts", "scenario", self.sequence, "targets"]
        ds = ParquetMapDataset(self.dataset, "samples", columns=cols, filter={"split": split}, collate=self.collate)
        if len(ds) == 0:
            raise ValueError(f"{self.dataset}: no {split!r} samples; run `onemall data build {self.dataset}`")
        if limit is not None and len(ds) > limit:
            ds = ParquetMapDataset(ds.table.slice(0, limit), collate=self.collate)
        return ds

    def train_dataloader(self):
        if self.train_rows == "all":
            if self._train is None:
                self._train = ParquetStream(self.dataset, "samples", batch_size=self.batch_size,
                                            filter={"split": "train"}, seed=self.seed, collate=self.collate,
                                            columns=["scenario", self.sequence, "targets"])
            return self._train.loader(num_workers=self.num_workers)
        ds = ParquetMapDataset(last_per_user(self.split("train").table), collate=self.collate)
        return MapLoader(ds, self.batch_size, seed=self.seed, collate_fn=ds.collate_fn, num_workers=self.num_workers)

    def _eval_loader(self, split: str, limit: int | None = None) -> DataLoader:
        ds = self.split(split, limit)
        return DataLoader(ds, batch_size=self.eval_batch_size, collate_fn=ds.collate_fn, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("valid", self.eval_limit)

    def test_dataloader(self):
        return self._eval_loader("test")


# ----------------------------------------------------------------------------- module


class SASRecModule(RetrievalEvalHooks, TwoTowerModule):
    """SASRec on :class:`~onemall_pl.twotower.TwoTowerModule` (see the module docstring).

    Args:
        n_items: catalogue size, linked from the data.
        max_len: sequence length, linked from the data.
        d_model / n_layers / n_heads / dropout: the user tower (:class:`SASRecConfig`).
        loss: ``full`` softmax over all items, or ``in_batch`` sampled softmax (last position).
        positions: with ``full``, train every position of the sequence (SASRec) or only the last
            one, the request's targets (RecBole-style, with ``data.train_rows: all``).
        normalize: cosine scores (L2-normalised towers) divided by ``temperature``.
        temperature: logits are scores / temperature (1.0 for plain dot products).
        lr / weight_decay: AdamW (one group: the towers share the item embedding).
        exclude_history: drop the input sequence's items from the ranking at evaluation.
        hr_k / ndcg_k: the K of HR@K and NDCG@K logged at validation and in the artifact.
        index: ``flat`` (exact inner product) or ``hnsw`` faiss index at export.
        artifacts: the artifacts root; export writes ``<root>/<dataset>/sasrec``.
    """

    def __init__(self, n_items: int = 0, max_len: int = 50, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 2, dropout: float = 0.2, loss: Literal["full", "in_batch"] = "full",
                 positions: Literal["all", "last"] = "all", normalize: bool = False, temperature: float = 1.0,
                 lr: float = 1e-3, weight_decay: float = 0.0,
                 exclude_history: bool = False, hr_k: tuple[int, ...] = (10, 50, 100, 500),
                 ndcg_k: tuple[int, ...] = (5, 10), index: Literal["flat", "hnsw"] = "flat",
                 artifacts: Path = Path("artifacts")):
        cfg = SASRecConfig(n_items=n_items, max_len=max_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           dropout=dropout, normalize=normalize)
        item_tower = ItemIdTower(n_items, d_model, normalize=normalize)
        super().__init__(user_tower=SASRecUserTower(cfg, item_tower), item_tower=item_tower, lr=lr,
                         item_lr_scale=1.0, weight_decay=weight_decay, temperature=temperature,
                         logq_correction=True)
        self.save_hyperparameters()
        self.cfg = cfg
        self.val_metrics = RetrievalMetrics(SCENARIOS, hr_k=hr_k, ndcg_k=ndcg_k)

    @property
    def user_tower(self) -> SASRecUserTower:
        return self.model.user_tower

    @property
    def item_tower(self) -> ItemIdTower:
        return self.model.item_tower

    # -- training

    def full_softmax_loss(self, seq_BL: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """CE over all items: position t predicts item t+1; the last position each target."""
        h_BLD = self.user_tower.hidden(seq_BL)
        logits_BLN = h_BLD @ self.item_tower.all_items().T / self.hparams.temperature
        labels_BL = torch.cat([seq_BL[:, 1:], targets_BT[:, :1].clamp(min=PAD)], 1) - 1  # -1 = no label
        if self.hparams.positions == "last":
            labels_BL[:, :-1] = -1
        ce = F.cross_entropy(logits_BLN.flatten(0, 1), labels_BL.flatten(), ignore_index=-1, reduction="sum")
        n = (labels_BL >= 0).sum()
        if targets_BT.shape[1] > 1:  # the request's other targets, also at the last position
            more_BT = targets_BT[:, 1:]
            keep = more_BT > 0
            last_BN = logits_BLN[:, -1][:, None].expand(-1, more_BT.shape[1], -1)
            ce = ce + F.cross_entropy(last_BN[keep], more_BT[keep] - 1, reduction="sum")
            n = n + keep.sum()
        return ce / n.clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        seq_BL, targets_BT = batch["seq"], batch["targets"]
        if self.hparams.loss == "full":
            loss = self.full_softmax_loss(seq_BL, targets_BT)
        else:  # the two-tower module's in-batch softmax over the first target of each request
            pos_B = targets_BT[:, 0]
            loss = self.loss(self.logits({"user": {"seq": seq_BL}, "item": {"item": pos_B}, "item_id": pos_B}))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(seq_BL))
        return loss

    def configure_optimizers(self):
        # one group: the user tower reads the item tower's embedding, a parameter two groups cannot share
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # -- retrieval and evaluation

    @torch.no_grad()
    def topk(self, seq_BL: torch.Tensor, k: int, exclude_history: bool | None = None) -> torch.Tensor:
        """Exact top-``k`` item indices (1-based) by inner product, full ranking."""
        exclude = self.hparams.exclude_history if exclude_history is None else exclude_history
        scores_BN = self.user_tower({"seq": seq_BL}) @ self.item_tower.all_items().T
        return topk_excluding(scores_BN, k, seq_BL - 1 if exclude else None) + 1

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        top_BK = self.topk(batch["seq"], max(*self.hparams.hr_k, *self.hparams.ndcg_k))
        self.val_metrics.update(top_BK, batch["targets"], batch["scenario"])

    @torch.no_grad()
    def export_artifact(self, trainer, datamodule: SequenceData, out: Path | None) -> Manifest | None:
        import faiss

        self.eval()
        vectors = self.item_tower.all_items().float().cpu().numpy()
        retriever = SASRecRetriever(self, datamodule.catalog, datamodule.sequence, datamodule.max_len, vectors,
                                    self.hparams.index)
        metrics = {split: replay(retriever, datamodule.dataset, split, hr_k=self.hparams.hr_k,
                                 ndcg_k=self.hparams.ndcg_k, exclude_history=self.hparams.exclude_history)
                   for split in ("valid", "test")}
        if trainer is not None and not trainer.is_global_zero:
            return None
        out = Path(out) if out else Path(self.hparams.artifacts) / datamodule.name / "sasrec"
        table = pa.table({"item_id": pa.array(datamodule.catalog.item_ids, pa.int64()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])})
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.hparams.items()}
        config["data"] = {"sequence": datamodule.sequence, "max_len": datamodule.max_len,
                          "train_rows": datamodule.train_rows}

        def build(tmp: Path) -> None:
            pq.write_table(table, tmp / "item_vectors.parquet")
            faiss.write_index(retriever.indexes[None], str(tmp / "items.faiss"))
            torch.save({"hparams": config, "state_dict": self.state_dict()}, tmp / "sasrec.pt")
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

        m = write_artifact(out, build, stage="sasrec", dataset=datamodule.name, config=config,
                           sizes={"n_items": self.cfg.n_items, "d_model": self.cfg.d_model,
                                  "max_len": self.cfg.max_len}, metrics=metrics)
        print(f"sasrec: wrote {out}\n  test: {json.dumps(metrics['test']['overall'])}")
        return m


# ----------------------------------------------------------------------------- retrieval


def build_index(vectors: np.ndarray, item_ids: np.ndarray, kind: str = "flat"):
    """A faiss inner-product index keyed by item id: exact (``flat``, the two-tower module's
    :func:`~onemall_pl.twotower.export_index`) or HNSW (approximate, for large catalogues)."""
    if kind == "flat":
        return export_index(vectors, item_ids)
    import faiss

    index = faiss.IndexIDMap(faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(item_ids, dtype=np.int64))
    return index


class SASRecRetriever:
    """Held-out requests (Arrow rows of ``samples``) -> top-K raw item ids via faiss.

    ``by_scenario_type``: a request is answered from the items of its scenario's type
    (product card -> products, short-video -> videos, live-stream -> live-streams), as OneMall's
    beam search runs over that type's SID trie; one faiss index per item type.
    """

    def __init__(self, module: SASRecModule, catalog: ItemCatalog, sequence: str, max_len: int,
                 vectors: np.ndarray, index: str = "flat", by_scenario_type: bool = True):
        self.module, self.catalog, self.sequence, self.max_len = module, catalog, sequence, max_len
        self.by_scenario_type, self.name = by_scenario_type, "SASRec"
        types = catalog.item_type.numpy()
        self.indexes = {None: build_index(vectors, catalog.item_ids, index)}
        if by_scenario_type:
            from onemall_pl.data.schema import ITEM_TYPES

            for t, name in enumerate(ITEM_TYPES):
                if (types == t).any():
                    self.indexes[name] = build_index(vectors[types == t], catalog.item_ids[types == t], index)

    @classmethod
    def from_artifact(cls, folder: str | Path, dataset: str | Path, by_scenario_type: bool = True) -> SASRecRetriever:
        m = load_manifest(folder, stage="sasrec")
        ckpt = torch.load(m.file("sasrec.pt"), map_location="cpu", weights_only=True)
        params = inspect.signature(SASRecModule.__init__).parameters
        module = SASRecModule(**{k: v for k, v in ckpt["hparams"].items() if k in params})
        module.load_state_dict(ckpt["state_dict"])
        module.eval()
        catalog = ItemCatalog.load(dataset)
        if len(catalog) != m.size("n_items"):
            raise ValueError(f"{folder}: trained on {m.size('n_items')} items, {dataset} has {len(catalog)}")
        t = pq.read_table(m.file("item_vectors.parquet"))
        if not np.array_equal(t.column("item_id").to_numpy(), catalog.item_ids):
            raise ValueError(f"{folder}: its item vectors are not keyed by the items of {dataset}")
        vectors = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(), np.float32)
        data = ckpt["hparams"]["data"]
        return cls(module, catalog, data["sequence"], data["max_len"], vectors.reshape(len(catalog), -1),
                   module.hparams.index, by_scenario_type)

    @torch.no_grad()
    def retrieve(self, rows: pa.Table, k: int) -> torch.Tensor:
        """``(B, k)`` raw item ids, best first (-1 pads)."""
        from onemall_pl.pretrain import SCENARIO_ITEM_TYPE

        b = sequence_batch(rows, self.catalog, self.sequence, self.max_len, None)
        device = next(self.module.parameters()).device
        u_BD = np.ascontiguousarray(self.module.user_tower({"seq": b["seq"].to(device)}).float().cpu().numpy())
        ids_BK = torch.full((len(u_BD), k), TARGET_PAD, dtype=torch.long)
        for s, scen in enumerate(SCENARIOS):
            rows_R = (b["scenario"] == s).nonzero(as_tuple=True)[0]
            if len(rows_R):
                index = self.indexes[SCENARIO_ITEM_TYPE[scen] if self.by_scenario_type else None]
                ids_BK[rows_R] = torch.from_numpy(index.search(u_BD[rows_R.numpy()], k)[1])
        return ids_BK


class SASRecCLI(StageCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.n_items", "model.n_items", apply_on="instantiate")
        parser.link_arguments("data.max_len", "model.max_len", apply_on="instantiate")


def main(argv: list[str] | None = None) -> None:
    SASRecCLI(SASRecModule, SequenceData, args=argv)
