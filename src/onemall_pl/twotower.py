"""A reusable two-tower retrieval LightningModule: in-batch softmax, logQ correction, recall@K.

Used by stage 2 for the live-stream item tower (``onemall_pl.quantize``) and by the SASRec
baseline (which plugs a causal-transformer user tower in). The towers are constructor
arguments (``nn.Module``\\ s, so a YAML can give them as ``class_path`` / ``init_args``).

A batch is a dict::

    {"user": {feature: LongTensor}, "item": {feature: LongTensor},
     "item_id": LongTensor [B],            # to mask in-batch duplicates of the positive
     "logq": FloatTensor [B] (optional)}   # log sampling probability of each positive item

Loss (sampled softmax over the batch's positives, temperature tau, logQ-corrected as in
Yi et al. 2019): ``CE(u_i . v_j / tau - log q_j, j = i)``, other rows holding the same item
masked out. Validation logs the loss and in-batch recall@K (torchmetrics).
The item tower may learn more slowly (``item_lr_scale``): the paper lowers the item tower's
learning rate so that live-stream semantic IDs do not churn (§3.1.3).

    onemall twotower index --artifact artifacts/synth/quantize --at TS --out live.faiss

writes a faiss index of the live-stream item-tower vectors at time TS (the model trained by
``onemall quantize fit``); the SASRec baseline trains and exports its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.retrieval import RetrievalRecall

from onemall_pl.models.twotower import TwoTower


class TwoTowerModule(pl.LightningModule):
    """Args:
        user_tower: ``forward(feats) -> [B, d]`` (L2-normalised).
        item_tower: ``forward(feats) -> [B, d]`` (L2-normalised).
        lr: learning rate of the user tower.
        item_lr_scale: the item tower's learning rate is ``lr * item_lr_scale``.
        weight_decay: AdamW weight decay.
        temperature: softmax temperature tau.
        logq_correction: subtract the positives' log q from the logits when the batch has ``logq``.
        recall_k: K values of the in-batch recall@K logged at validation.
    """

    def __init__(self, user_tower: nn.Module, item_tower: nn.Module, lr: float = 1e-3, item_lr_scale: float = 0.1,
                 weight_decay: float = 0.0, temperature: float = 0.1, logq_correction: bool = True,
                 recall_k: Sequence[int] = (1, 10)):
        super().__init__()
        self.save_hyperparameters(ignore=["user_tower", "item_tower"])
        self.model = TwoTower(user_tower, item_tower)
        self.val_loss = MeanMetric()
        self._seen = 0  # validation query ids so far in the epoch
        self.val_recall = MetricCollection({f"recall@{k}": RetrievalRecall(top_k=k) for k in recall_k},
                                           prefix="val/")

    def encode_users(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.user_tower(feats)

    def encode_items(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.item_tower(feats)

    def logits(self, batch: dict) -> torch.Tensor:
        u_BD, v_BD = self.model(batch["user"], batch["item"])
        logits_BB = u_BD @ v_BD.T / self.hparams.temperature
        if self.hparams.logq_correction and "logq" in batch:
            logits_BB = logits_BB - batch["logq"][None, :]
        ids = batch["item_id"]
        dup_BB = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
        return logits_BB.masked_fill(dup_BB, float("-inf"))

    def loss(self, logits_BB: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BB, torch.arange(len(logits_BB), device=logits_BB.device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.logits(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["item_id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits_BB = self.logits(batch)
        b = len(logits_BB)
        self.val_loss.update(self.loss(logits_BB), weight=b)
        target_BB = torch.eye(b, dtype=torch.bool, device=logits_BB.device)
        # query ids, unique across ranks: the DDP-synced RetrievalRecall groups rows by id
        query_B = (torch.arange(b, device=logits_BB.device) + self._seen) * self.trainer.world_size + self.global_rank
        query_BB = query_B[:, None].expand(b, b)
        self._seen += b
        keep = torch.isfinite(logits_BB)
        self.val_recall.update(logits_BB[keep], target_BB[keep], indexes=query_BB[keep])
        # metric objects: Lightning computes them over the epoch and resets them
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log_dict(self.val_recall, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._seen = 0

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW([
            {"params": self.model.user_tower.parameters(), "lr": hp.lr},
            {"params": self.model.item_tower.parameters(), "lr": hp.lr * hp.item_lr_scale},
        ], weight_decay=hp.weight_decay)


def export_index(item_emb: np.ndarray | torch.Tensor, item_ids: np.ndarray, path: str | os.PathLike | None = None):
    """A faiss inner-product index over item vectors, keyed by item id; written to ``path`` if given."""
    import faiss

    x = np.ascontiguousarray(torch.as_tensor(item_emb).detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(x, np.asarray(item_ids, dtype=np.int64))
    if path is not None:
        faiss.write_index(index, str(path))
    return index


def main(argv: list[str] | None = None) -> None:
    import sys

    from jsonargparse import CLI

    from onemall_pl.quantize import live_index

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "index":
        print("usage: onemall twotower index --artifact DIR --at TS --out FILE\n"
              "  a faiss index of the live-stream item tower trained by `onemall quantize fit`\n"
              "  (the SASRec baseline: `onemall sasrec ...`)", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    n = CLI(live_index, args=argv[1:], as_positional=False)
    print(f"indexed {n} live-streams")
