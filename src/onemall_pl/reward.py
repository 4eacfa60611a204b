"""The ``reward`` stage: the ranking model (paper §2.1) trained on exposure logs, used as the
reward model of RL post-training (§3.3, Eq. 8).

    onemall reward fit    -c configs/reward/tiny.yaml
    onemall reward export -c configs/reward/tiny.yaml      # -> artifacts/<dataset>/reward/

Data (:class:`EventsDataModule`): every exposure of the ``events`` table is one example:
the user's exposure / click / order histories *strictly before* the request
(:func:`onemall_pl.data.build.iter_request_histories`, the same code that builds ``samples``),
the target item, the scenario, and its labels (click, order, gmv). Split: requests take the
split rule of the dataset, the one ``samples`` uses (:mod:`onemall_pl.data.build`): with the
*time* rule a request at or after ``t0 + 0.9 (t1 - t0)`` is test, at or after
``t0 + 0.8 (t1 - t0)`` valid; with *leave-one-out* a request is test (valid) from the time of
the user's test (valid) sample on. Every exposure of a request shares its split, and
requests with no click are kept (they are the negatives).

Model (:class:`RewardModule`): :class:`onemall_pl.models.ranking.RankingModel` (DIN target
attention, user x item cross features, ESMM CTR / CVR / CTCVR, EGPM), trained with
:func:`onemall_pl.models.ranking.esmm_loss`. Metrics (torchmetrics), per head, on valid
and test: AUC (``BinaryAUROC``) and GAUC (:class:`GroupedAUROC`: per-user AUC weighted by
the user's exposures, over users with both classes). Labels per head: ``ctr`` click over
all exposures; ``cvr`` order over *clicked* exposures (its own space); ``ctcvr`` order over
all exposures; ``egpm`` "has GMV" over all exposures.

Reward (:func:`fuse_reward`, Eq. 8) and scoring API for stage 4 (:class:`RewardScorer`)::

    scorer = RewardScorer.from_artifact("artifacts/synth/reward")
    out = scorer.score(user_batch, item_ids_BN)   # dict(ctr, cvr, ctcvr, egpm, reward), each [B, N]
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.regression import PearsonCorrCoef
from torchmetrics.utilities import dim_zero_cat

from onemall_pl.artifacts import load_manifest, write_artifact
from onemall_pl.data.build import assign_splits, is_leave_one_out, iter_request_histories
from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.data.datasets import ENUMS, MapLoader, ParquetMapDataset, collate_sequences
from onemall_pl.data.schema import SCENARIOS, SPLITS, DataError
from onemall_pl.io import read_dataset_info, read_table
from onemall_pl.metrics import PAD, pad_lists
from onemall_pl.models.ranking import SEQUENCES, Config, RankingModel, esmm_loss
from onemall_pl.stage import StageCLI

HEADS = ("ctr", "cvr", "ctcvr", "egpm")
OBJECTIVES = ("ctr", "ctcvr", "egpm")  # the three fused by Eq. 8
SEQ_COLUMNS = tuple(f"seq_{s}" for s in SEQUENCES)


# ----------------------------------------------------------------------------- Eq. 8


@dataclass
class Fusion:
    """How Eq. 8 turns the ranking model's predictions into one reward.

    The paper fuses CTR, CTCVR and EGPM "with a simple F1 scoring formula" and hand-crafted
    factors α, β, γ chosen "to maintain consistent magnitude across different objectives"
    (§3.3, §4.4); it does not print the formula. Two forms are offered, on the *normalised*
    scores ŝ = s / n (n = the objective's mean on the training exposures, when
    ``normalize``; else n = 1 and α, β, γ must carry the magnitudes themselves):

    - ``weighted`` (default): r = α ŝ_ctr + β ŝ_ctcvr + γ ŝ_egpm. The paper's Table 4 is
      consistent with this form: its Reward column equals CTR + 30.8 CTCVR + 0.98 GPM (all
      as fractions) to within 3e-4 on all nine rows (least squares), i.e. factors that give
      the three terms the same magnitude, which is what ``normalize`` does from the data.
    - ``harmonic`` (F1-like): r = (α + β + γ) / (α / ŝ_ctr + β / ŝ_ctcvr + γ / ŝ_egpm), the
      weighted harmonic mean, as F_β is of precision and recall. It rewards items that are
      good on *every* objective (one near-zero score pulls r to zero); α, β, γ are
      importance weights, so use it with ``normalize: true``.

    Both are increasing in each score, and both equal 1 for an average item when
    ``normalize`` is on and α = β = γ = 1 (weighted: 3).
    """

    form: Literal["weighted", "harmonic"] = "weighted"
    alpha: float = 1.0
    """factor of CTR"""
    beta: float = 1.0
    """factor of CTCVR"""
    gamma: float = 1.0
    """factor of EGPM"""
    normalize: bool = True
    """divide each score by its mean on the training exposures (click rate, order rate, GMV per
    1000 exposures) before applying the factors"""

    def __post_init__(self):
        if self.form not in ("weighted", "harmonic"):
            raise ValueError(f"fusion form {self.form!r} is not 'weighted' or 'harmonic'")
        if min(self.alpha, self.beta, self.gamma) < 0 or self.alpha + self.beta + self.gamma <= 0:
            raise ValueError(f"fusion factors must be >= 0 and not all 0, got α={self.alpha}, "
                             f"β={self.beta}, γ={self.gamma}")


def fuse_reward(ctr: torch.Tensor, ctcvr: torch.Tensor, egpm: torch.Tensor, fusion: Fusion,
                norm: Sequence[float] = (1.0, 1.0, 1.0), eps: float = 1e-12) -> torch.Tensor:
    """Eq. 8: the reward of each (user, item) pair from its predicted CTR, CTCVR and EGPM.

    ``norm`` = (n_ctr, n_ctcvr, n_egpm), the normalisers used when ``fusion.normalize`` (see
    :class:`Fusion` for both forms). Elementwise; any shape.
    """
    n = norm if fusion.normalize else (1.0, 1.0, 1.0)
    w = (fusion.alpha, fusion.beta, fusion.gamma)
    s = [x / float(nk) for x, nk in zip((ctr, ctcvr, egpm), n)]
    if fusion.form == "weighted":
        return w[0] * s[0] + w[1] * s[1] + w[2] * s[2]
    return sum(w) / sum(wk / sk.clamp_min(eps) for wk, sk in zip(w, s))


# ----------------------------------------------------------------------------- GAUC


class GroupedAUROC(Metric):
    """GAUC: the AUC within each group (user), averaged with weights = the group's sample count,
    over the groups that hold both classes (Zhu et al. 2017, as used in DIN).

    ``torchmetrics.retrieval.RetrievalAUROC`` averages per-query AUCs uniformly; GAUC weights
    them by exposures, hence this metric. Ties within a group count one half (rank-based).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        self.preds.append(preds.detach().flatten().double())
        self.target.append(target.detach().flatten().long())
        self.groups.append(groups.detach().flatten().long())

    def compute(self) -> torch.Tensor:
        if isinstance(self.preds, list) and not self.preds:  # after a DDP sync the states are tensors
            return torch.tensor(float("nan"))
        return grouped_auc(dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.groups))


def grouped_auc(preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Exposure-weighted mean of per-group AUCs (Mann-Whitney U from average ranks); vectorised."""
    if preds.numel() == 0:
        return torch.tensor(float("nan"))
    o = torch.argsort(preds, stable=True)
    o = o[torch.argsort(groups[o], stable=True)]  # by group, then by score
    p, y, g = preds[o], target[o].double(), groups[o]
    _, g_inv, g_cnt = torch.unique_consecutive(g, return_inverse=True, return_counts=True)
    g_start = torch.cumsum(g_cnt, 0) - g_cnt
    pos = torch.arange(len(p), device=p.device) - g_start[g_inv]  # 0-based position in its group
    new_tie = torch.ones(len(p), dtype=torch.bool, device=p.device)
    new_tie[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    tie_id = torch.cumsum(new_tie.long(), 0) - 1
    tie_cnt = torch.bincount(tie_id)
    tie_first = pos[new_tie]
    rank = (tie_first[tie_id] + (tie_cnt[tie_id] - 1) / 2 + 1).double()  # average 1-based rank
    n_g = g_cnt.double()
    n_pos = torch.zeros_like(n_g).index_add_(0, g_inv, y)
    r_pos = torch.zeros_like(n_g).index_add_(0, g_inv, rank * y)
    n_neg = n_g - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return torch.tensor(float("nan"))
    auc = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return ((auc * n_g[ok]).sum() / n_g[ok].sum()).float()


# ----------------------------------------------------------------------------- data


def _collate_exposures(batch: pa.Table, histories: pa.Table, max_len: dict[str, int]) -> dict[str, torch.Tensor]:
    """Exposure rows (``req`` = row of their request in ``histories``) -> padded tensors.

    Item ids are already dense catalogue indices (mapped once in ``setup``).
    """
    h = histories.take(batch.column("req"))
    for c in SEQ_COLUMNS:
        batch = batch.append_column(c, h.column(c))
    return collate_sequences(batch, {c: max_len[c] for c in SEQ_COLUMNS},
                             scalar_columns=["user_id", "ts", "scenario", "item", "click", "order", "gmv"])


class EventsDataModule(pl.LightningDataModule):
    """Exposures of the ``events`` table with the user's histories, split by request.

    Args:
        data_dir: the dataset folder (``items``, ``events``; ``samples`` for leave-one-out datasets).
        max_exposure, max_click, max_order: history lengths (latest items kept).
        batch_size: training exposures per batch (per device).
        eval_batch_size: exposures per validation / test batch.
        num_workers: DataLoader workers.
        num_price_bands: price bands of the catalogue (quantile bins, :class:`ItemCatalog`).
        seed: the order of the training exposures, per epoch (:class:`MapLoader`).
    """

    def __init__(self, data_dir: str = "data/synth", max_exposure: int = 50, max_click: int = 30,
                 max_order: int = 10, batch_size: int = 1024, eval_batch_size: int = 4096, num_workers: int = 0,
                 num_price_bands: int = 16, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.catalog = ItemCatalog.load(data_dir, num_price_bands=num_price_bands)
        # the catalogue keeps price bands only; the model also reads log(1 + price)
        items = read_table(data_dir, "items", ["item_id", "price"], validate=False)
        self.price = np.zeros(len(self.catalog), np.float32)
        self.price[self.catalog.index_of(items.column("item_id").to_numpy(), table="items")] = \
            items.column("price").to_numpy()
        self.max_len = {"seq_exposure": max_exposure, "seq_click": max_click, "seq_order": max_order}
        self._ready = False

    @property
    def dataset_name(self) -> str:
        return Path(self.hparams.data_dir).resolve().name

    @property
    def sizes(self) -> dict[str, int]:
        """Vocabulary sizes of the item features (linked into the model config)."""
        fields = {f.name for f in dataclasses.fields(Config)}
        return {k: v for k, v in self.catalog.sizes.items() if k in fields}

    def item_features(self) -> dict[str, torch.Tensor]:
        """Side features of every catalogue item, rows in dense-index order (for the model's buffers)."""
        t = self.catalog.tensors()
        return {"category": t["category"], "shop": t["shop"], "price_band": t["price_band"],
                "item_type": t["item_type"], "price": torch.from_numpy(self.price)}

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        d = self.hparams.data_dir
        events = read_table(d, "events", ["request_id", "user_id", "ts", "scenario", "item_id", "click",
                                          "order", "gmv"], validate=False)
        if events.num_rows == 0:
            raise DataError("table is empty", table="events", file=str(Path(d) / "events"))
        clicks = int(pc.sum(events.column("click")).as_py())
        if clicks in (0, events.num_rows):
            raise DataError(f"{clicks} of {events.num_rows} exposures are clicked: the ranking model needs "
                            "both clicked and unclicked exposures (an interaction-only log such as "
                            "MovieLens or Amazon reviews has no negatives to rank against)",
                            table="events", column="click", file=str(Path(d) / "events"))
        item = self.catalog.index_of(events.column("item_id").to_numpy(), table="events", column="item_id")
        # Histories one bucket of users at a time (bounded memory on large logs), their item ids
        # mapped once to dense catalogue indices (int32: half the memory of the ids).
        parts = []
        for h in iter_request_histories(events, self.hparams.max_exposure, self.hparams.max_click,
                                        self.hparams.max_order):
            cols = {c: h.column(c) for c in ("request_id", "user_id", "ts")}
            for c in SEQ_COLUMNS:
                arr = h.column(c).combine_chunks()
                values = self.catalog.index_of(arr.values.to_numpy(), table="events", column="item_id")
                cols[c] = pa.ListArray.from_arrays(arr.offsets, pa.array(values.astype(np.int32)))
            parts.append(pa.table(cols))
        hist = pa.concat_tables(parts).combine_chunks()
        hist = hist.take(np.argsort(hist.column("request_id").to_numpy(), kind="stable"))
        self.histories = hist.select(list(SEQ_COLUMNS))
        rid = events.column("request_id").to_numpy()
        req = np.searchsorted(hist.column("request_id").to_numpy(), rid)  # histories are sorted by request_id
        split = self._request_splits(hist, events)[req]
        self.exposures = pa.table({
            "req": req, "user_id": events.column("user_id"), "ts": events.column("ts"),
            "scenario": events.column("scenario"),
            "item": item, "click": events.column("click"), "order": events.column("order"),
            "gmv": events.column("gmv"), "split": pa.array(np.asarray(SPLITS)[split])})
        train = split == 0
        n = max(int(train.sum()), 1)
        self.base_rates = {  # the objectives' means on the training exposures (Eq. 8 normalisers)
            "ctr": float(events.column("click").to_numpy()[train].sum() / n),
            "ctcvr": float(events.column("order").to_numpy()[train].sum() / n),
            "egpm": float(1000.0 * events.column("gmv").to_numpy()[train].astype(np.float64).sum() / n)}
        self.split_counts = {s: int((split == i).sum()) for i, s in enumerate(SPLITS)}
        for s, k in self.split_counts.items():
            if k == 0:
                raise DataError(f"no exposure falls in the {s} split (rule: {self._rule}); the log is too short",
                                table="events", file=str(Path(d) / "events"))
        if min(self.base_rates.values()) <= 0:
            raise DataError(f"the training exposures have no order or no GMV ({self.base_rates}): nothing to "
                            "learn CTCVR / EGPM from", table="events", column="order", file=str(Path(d) / "events"))
        rank_zero_info(f"reward data: {events.num_rows:,} exposures in {hist.num_rows:,} requests, "
                       f"splits {self.split_counts}, train rates {self.base_rates}")
        self._ready = True

    def _request_splits(self, hist: pa.Table, events: pa.Table) -> np.ndarray:
        """Split index (0 train, 1 valid, 2 test) of every request (rows of ``hist``)."""
        d = self.hparams.data_dir
        user, ts = hist.column("user_id").to_numpy(), hist.column("ts").to_numpy()
        if not is_leave_one_out(read_dataset_info(d)):
            self._rule = "time"
            ev_ts = events.column("ts").to_numpy()
            return assign_splits(user, ts, hist.column("request_id").to_numpy(), leave_one_out=False,
                                 t0=int(ev_ts.min()), t1=int(ev_ts.max()))
        # leave-one-out: from the time of the user's valid (test) sample on, the user's requests are valid (test)
        self._rule = "leave-one-out"
        s = read_table(d, "samples", ["user_id", "ts", "split"], validate=False)
        s_user, s_ts = s.column("user_id").to_numpy(), s.column("ts").to_numpy()
        s_split = pc.index_in(s.column("split"), value_set=pa.array(SPLITS)).to_numpy()
        out = np.zeros(len(user), np.int8)
        for k in (1, 2):
            m = s_split == k
            users, first = np.unique(s_user[m], return_index=True)  # one valid / test sample per user
            at = np.minimum(np.searchsorted(users, user), max(len(users) - 1, 0))
            has = (len(users) > 0) & (users[at] == user) if len(users) else np.zeros(len(user), bool)
            cut = s_ts[m][first][at] if len(users) else np.zeros(len(user), np.int64)
            out[has & (ts >= cut)] = k
        return out

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = ParquetMapDataset(self.exposures, filter={"split": split}, columns=[
            "req", "user_id", "ts", "scenario", "item", "click", "order", "gmv"],
            collate=partial(_collate_exposures, histories=self.histories, max_len=self.max_len))
        h = self.hparams
        kw = dict(collate_fn=ds.collate_fn, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)
        # Shard by rank here (the DDP trainer configs turn Lightning's sampler injection off).
        # Training: seeded per epoch and resumable mid-epoch (the position is in every checkpoint).
        if train:
            return MapLoader(ds, h.batch_size, seed=h.seed, **kw)
        # Evaluation shards pad with repeats to even sizes.
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = DistributedSampler(ds, shuffle=False)
        return DataLoader(ds, batch_size=h.eval_batch_size, sampler=sampler, **kw)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# ----------------------------------------------------------------------------- module


def _user_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    seqs = {s: batch[f"seq_{s}"] for s in SEQUENCES}
    masks = {s: batch[f"seq_{s}_mask"] for s in SEQUENCES}
    return seqs, masks


class RewardModule(pl.LightningModule):
    """The ranking model with its ESMM loss, AUC / GAUC metrics per head, and its artifact.

    Args:
        net: the model's widths (:class:`onemall_pl.models.ranking.Config`); its sizes are
            overwritten by ``sizes``.
        sizes: vocabulary sizes from the data (linked from ``data.sizes``, never typed).
        fusion: Eq. 8, recorded in the artifact as the scorer's default (see :class:`Fusion`).
        lr, weight_decay: AdamW.
        gmv_weight: weight of the gmv | order loss beside the click and order losses.
        artifacts_root: ``export`` writes ``<artifacts_root>/<dataset>/reward/``.
    """

    def __init__(self, net: Config | None = None, sizes: dict[str, int] | None = None, fusion: Fusion | None = None,
                 lr: float = 2e-3, weight_decay: float = 0.0, gmv_weight: float = 1.0,
                 artifacts_root: str = "artifacts"):
        super().__init__()
        net = net or Config()
        fusion = fusion or Fusion()
        unknown = set(sizes or {}) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise ValueError(f"sizes {sorted(unknown)} are not fields of the ranking Config")
        self.cfg = dataclasses.replace(net, **(sizes or {}))
        self.fusion = fusion
        # plain types only, so checkpoints load with weights_only=True
        self.save_hyperparameters({"net": dataclasses.asdict(self.cfg), "fusion": dataclasses.asdict(fusion),
                                   "lr": lr, "weight_decay": weight_decay, "gmv_weight": gmv_weight,
                                   "artifacts_root": artifacts_root})
        self.model = RankingModel(self.cfg)
        self.metrics = torch.nn.ModuleDict({split: head_metrics() for split in ("val", "test")})

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            dm.setup(stage)
            self.model.set_item_features(**dm.item_features())
            if stage == "fit":
                self._init_biases(dm.base_rates)

    @torch.no_grad()
    def _init_biases(self, rates: dict[str, float]) -> None:
        """Start the towers at the training base rates (a checkpoint restore overwrites this)."""
        ctr = min(max(rates["ctr"], 1e-6), 1 - 1e-6)
        cvr = min(max(rates["ctcvr"] / ctr, 1e-6), 1 - 1e-6)
        gmv_per_order = rates["egpm"] / 1000.0 / max(rates["ctcvr"], 1e-12)
        for tower, b in ((self.model.ctr, math.log(ctr / (1 - ctr))), (self.model.cvr, math.log(cvr / (1 - cvr))),
                         (self.model.gmv, math.log(max(gmv_per_order, 1e-6)))):
            tower[-1].bias.fill_(b)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seqs, masks = _user_inputs(batch)
        return {k: v.squeeze(1) for k, v in self.model(seqs, masks, batch["scenario"], batch["item"][:, None]).items()}

    def _losses(self, batch) -> tuple[dict, dict]:
        out = self(batch)
        return out, esmm_loss(out, batch["click"], batch["order"], batch["gmv"], self.hparams.gmv_weight)

    def training_step(self, batch, batch_idx):
        _, losses = self._losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["item"]))
        return losses["loss"]

    def _eval_step(self, batch, split: str) -> None:
        out, losses = self._losses(batch)
        B = len(batch["item"])
        self.log(f"{split}/loss", losses["loss"], batch_size=B, sync_dist=True, prog_bar=split == "val")
        for name, metric in update_head_metrics(self.metrics[split], out, batch).items():
            self.log(f"{split}/{name}", metric, batch_size=B, prog_bar=name == "ctr_auc")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- the artifact
    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """AUC and GAUC per head over a loader (fresh metrics, this process only)."""
        metrics = head_metrics().to(self.device)
        self.eval()
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            update_head_metrics(metrics, self(batch), batch)
        return {k: float(m.compute()) for k, m in metrics.items()}

    def export_artifact(self, trainer: pl.Trainer, datamodule: EventsDataModule | None, out: Path | None):
        if datamodule is None:
            raise ValueError("the reward export needs its data module (to evaluate and to record the catalogue)")
        dm = datamodule
        dm.setup("test")
        if trainer.global_rank != 0:
            return None
        out = out or Path(self.hparams.artifacts_root) / dm.dataset_name / "reward"
        metrics = {"valid": self.evaluate(dm.val_dataloader()), "test": self.evaluate(dm.test_dataloader()),
                   "exposures": dm.split_counts, "base_rates": dm.base_rates}
        if (Path(dm.hparams.data_dir) / "world").is_dir():  # a synthetic world: compare with its truth
            metrics["oracle_test"] = oracle_agreement(self, dm, dm.test_dataloader())
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        meta = {"model": dataclasses.asdict(self.cfg), "fusion": dataclasses.asdict(self.fusion),
                "base_rates": dm.base_rates, "max_len": dm.max_len,
                "price_edges": dm.catalog.price_edges.tolist()}  # the bands the item buffers were built with

        def build(tmp: Path) -> None:
            torch.save(state, tmp / "model.pt")
            (tmp / "reward.json").write_text(json.dumps(meta, indent=2) + "\n")
            pq.write_table(pa.table({"item_id": dm.catalog.item_ids}), tmp / "items.parquet")

        m = write_artifact(out, build, stage="reward", dataset=dm.dataset_name,
                           config={"model": dict(self.hparams), "data": dict(dm.hparams)},
                           sizes={**dm.sizes, **{f"max_{s}": dm.max_len[f"seq_{s}"] for s in SEQUENCES}},
                           metrics=metrics)
        rank_zero_info(f"reward artifact {out} (id {m.id}): test " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items()))
        return m


@torch.no_grad()
def oracle_agreement(module: RewardModule, dm: EventsDataModule, loader: DataLoader) -> dict[str, float]:
    """On a synthetic world (``onemall data synth``), how the predictions agree with the truth.

    ``spearman_<head>``: rank correlation over the loader's exposures between the prediction
    and the world's oracle (:meth:`World.expected`: P(click), P(click and order), E[GMV]);
    ``oracle_<head>_auc``: the AUC of the oracle itself on the sampled labels, the ceiling of
    the model's ``<head>_auc``.
    """
    from torchmetrics.regression import SpearmanCorrCoef

    from onemall_pl.data.synth import World

    world = World.load(dm.hparams.data_dir)
    module.eval()
    cols: dict[str, list] = {k: [] for k in ("ctr", "ctcvr", "egpm", "user_id", "ts", "scenario", "item", "click",
                                              "order")}
    for batch in loader:
        out = module({k: v.to(module.device) for k, v in batch.items()})
        for k in ("ctr", "ctcvr", "egpm"):
            cols[k].append(out[k].double().cpu())
        for k in ("user_id", "ts", "scenario", "item", "click", "order"):
            cols[k].append(batch[k])
    c = {k: torch.cat(v) for k, v in cols.items()}
    p_click, p_order, e_gmv = world.expected(c["user_id"].numpy(), c["ts"].numpy(), c["scenario"].numpy(),
                                             dm.catalog.ids_of(c["item"].numpy()))
    truth = {"ctr": p_click, "ctcvr": p_order, "egpm": e_gmv}
    res = {f"spearman_{k}": float(SpearmanCorrCoef()(c[k], torch.as_tensor(truth[k], dtype=torch.float64)))
           for k in truth}
    for k, label in (("ctr", "click"), ("ctcvr", "order")):
        res[f"oracle_{k}_auc"] = float(BinaryAUROC()(torch.as_tensor(truth[k]), c[label]))
        res[f"model_{k}_auc"] = float(BinaryAUROC()(c[k], c[label]))
    return res


def head_metrics() -> torch.nn.ModuleDict:
    """``<head>_auc`` and ``<head>_gauc`` for every head, and ``gmv_pearson``: the Pearson
    correlation of the predicted log E[gmv | order] with log gmv on ordered exposures (EGPM's
    AUC is taken against "has GMV", which it trades for value by design, so the gmv tower
    gets its own check)."""
    out = {f"{h}_{k}": (BinaryAUROC() if k == "auc" else GroupedAUROC()) for h in HEADS for k in ("auc", "gauc")}
    return torch.nn.ModuleDict({**out, "gmv_pearson": PearsonCorrCoef()})


def update_head_metrics(metrics: Mapping[str, Metric], out: Mapping[str, torch.Tensor],
                        batch: Mapping[str, torch.Tensor]) -> dict[str, Metric]:
    """Update the ``<head>_auc`` / ``<head>_gauc`` metrics with one batch; returns those updated."""
    click, order = batch["click"].long(), batch["order"].long()
    rows = {"ctr": (slice(None), click), "cvr": (click > 0, order), "ctcvr": (slice(None), order),
            "egpm": (slice(None), (batch["gmv"] > 0).long())}
    done = {}
    for head, (sel, label) in rows.items():
        score, y, user = out[head][sel].double(), label[sel], batch["user_id"][sel]
        if head == "egpm":  # BinaryAUROC reads scores outside [0, 1] as logits: map monotonically into it
            score = score / (score + 1000.0)
        if y.numel() == 0:
            continue
        metrics[f"{head}_auc"].update(score, y)
        metrics[f"{head}_gauc"].update(score, y, user)
        done[f"{head}_auc"], done[f"{head}_gauc"] = metrics[f"{head}_auc"], metrics[f"{head}_gauc"]
    ordered = (order > 0) & (batch["gmv"] > 0)
    if ordered.sum() >= 2:
        metrics["gmv_pearson"].update(out["log_gmv"][ordered], batch["gmv"][ordered].log())
        done["gmv_pearson"] = metrics["gmv_pearson"]
    return done


# ----------------------------------------------------------------------------- scoring API (stage 4)


class RewardScorer:
    """The trained ranking model behind one call: many candidate items per request, vectorised.

    ``user_batch`` holds raw item ids (``-1`` pads), as :func:`collate_sequences` gives them
    without an ``item_index`` or as :func:`onemall_pl.metrics.pad_lists` pads lists:

    - ``seq_exposure``, ``seq_click``, ``seq_order``: ``[B, L]`` LongTensors (any alignment;
      optional ``<name>_mask`` bool tensors, else ``id >= 0`` is real), or lists of id lists.
      History ids missing from the catalogue are ignored. The model is order-free (attention
      sums and counts), so pass each user's latest ``max_*`` items (the manifest's sizes
      ``max_exposure`` / ``max_click`` / ``max_order``, the lengths it was trained with) in
      any order. A longer row is cut to its last ``max_*`` real items, reading later
      positions as newer (oldest first, as ``samples`` stores them).
    - ``scenario``: ``[B]`` LongTensor of indices into ``SCENARIOS`` or a list of names.

    ``item_ids``: ``[B, N]`` candidate item ids (``-1`` pads: those get 0 everywhere); an id
    missing from the catalogue is an error. Returns ``ctr, cvr, ctcvr, egpm, reward``, each ``[B, N]``.
    Requests are scored in chunks of about ``max_pairs`` (request, candidate) pairs (memory:
    ``max_pairs * max_exposure * attn_hidden`` floats).
    """

    def __init__(self, model: RankingModel, item_ids: np.ndarray, fusion: Fusion, base_rates: Mapping[str, float],
                 max_len: Mapping[str, int], device: str | torch.device = "cpu", max_pairs: int = 16384):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.fusion = fusion
        self.norm = tuple(float(base_rates[k]) for k in OBJECTIVES)
        self.max_len = dict(max_len)
        self.max_pairs = max_pairs
        ids = np.asarray(item_ids, dtype=np.int64)
        order = np.argsort(ids)
        self._sorted = torch.as_tensor(ids[order], device=self.device)
        self._perm = torch.as_tensor(order, device=self.device)

    @classmethod
    def from_artifact(cls, folder: str | Path, device: str | torch.device = "cpu",
                      fusion: Fusion | Mapping[str, Any] | None = None, **kw) -> RewardScorer:
        """Load ``artifacts/<dataset>/reward/`` (checked through its manifest). ``fusion``
        overrides the artifact's Eq. 8 settings (a :class:`Fusion` or a dict of its fields)."""
        m = load_manifest(folder, stage="reward")
        meta = json.loads(m.file("reward.json").read_text())
        model = RankingModel(Config(**meta["model"]))
        model.load_state_dict(torch.load(m.file("model.pt"), map_location="cpu", weights_only=True))
        item_ids = pq.read_table(m.file("items.parquet")).column("item_id").to_numpy()
        if isinstance(fusion, Mapping):
            fusion = Fusion(**{**meta["fusion"], **fusion})
        return cls(model, item_ids, fusion or Fusion(**meta["fusion"]), meta["base_rates"], meta["max_len"],
                   device=device, **kw)

    def index_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw item ids -> (dense indices, known mask); unknown ids map to index 0."""
        ids = ids.to(self.device, torch.long)
        pos = torch.searchsorted(self._sorted, ids).clamp(max=len(self._sorted) - 1)
        known = self._sorted[pos] == ids
        return torch.where(known, self._perm[pos], torch.zeros_like(pos)), known

    def _history(self, user_batch: Mapping[str, Any], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = user_batch[name]
        if not torch.is_tensor(ids):
            ids = pad_lists(ids)
        ids = ids.to(self.device, torch.long)
        mask = user_batch.get(f"{name}_mask")
        mask = (ids != PAD) & (ids >= 0) if mask is None else mask.to(self.device, torch.bool)
        idx, known = self.index_of(ids)
        mask = mask & known
        L = self.max_len[name]
        if ids.shape[1] > L:  # keep the latest L real items of each row, wherever its pads are
            pos_BL = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
            rank_BL = torch.cumsum(mask.flip(1), 1).flip(1)  # 1 for the newest real item, 2 for the next...
            keep = mask & (rank_BL <= L)
            col = torch.argsort(torch.where(keep, pos_BL, ids.shape[1] + pos_BL), dim=1, stable=True)[:, :L]
            idx, mask = idx.gather(1, col), keep.gather(1, col)
        return idx, mask

    @torch.no_grad()
    def score(self, user_batch: Mapping[str, Any], item_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        item_ids = torch.as_tensor(item_ids, device=self.device, dtype=torch.long)
        if item_ids.dim() != 2:
            raise ValueError(f"item_ids must be [B, N], got shape {tuple(item_ids.shape)}")
        B, N = item_ids.shape
        valid = item_ids != PAD
        item, known = self.index_of(item_ids)
        if (bad := valid & ~known).any():
            raise ValueError(f"item id {int(item_ids[bad][0])} is not in the reward model's catalogue "
                             f"({len(self._sorted)} items)")
        seqs, masks = {}, {}
        for s in SEQUENCES:
            seqs[s], masks[s] = self._history(user_batch, f"seq_{s}")
        scen = user_batch["scenario"]
        if not torch.is_tensor(scen):
            names = list(scen)
            if unknown := sorted(set(names) - set(SCENARIOS)):
                raise ValueError(f"unknown scenario(s) {unknown}; expected {list(SCENARIOS)}")
            scen = torch.tensor([ENUMS["scenario"].index(x) for x in names])
        scen = scen.to(self.device, torch.long)
        if any(t.shape[0] != B for t in (*seqs.values(), scen)):
            raise ValueError(f"user_batch rows do not match item_ids' {B} requests")
        rows = max(1, self.max_pairs // max(N, 1))
        parts = []
        for a in range(0, B, rows):
            sl = slice(a, a + rows)
            parts.append(self.model({s: seqs[s][sl] for s in SEQUENCES}, {s: masks[s][sl] for s in SEQUENCES},
                                    scen[sl], item[sl]))
        out = {k: torch.cat([p[k] for p in parts]) for k in ("ctr", "cvr", "ctcvr", "egpm")}
        out["reward"] = fuse_reward(out["ctr"], out["ctcvr"], out["egpm"], self.fusion, self.norm)
        return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------- CLI


class RewardCLI(StageCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.sizes", "model.sizes", apply_on="instantiate")


def main(argv: list[str] | None = None) -> None:
    RewardCLI(RewardModule, EventsDataModule, args=argv)
