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
masked out. The batch is the *global* one: under DDP every rank's users score against the
positives of all ranks (item vectors gathered with ``all_gather(sync_grads=True)``, so the
gradient reaches the rank that computed each vector; ids and log q gathered alongside, a
duplicate on another rank masked as on this one), and a rank's labels are offset by its
position in the gathered batch. W ranks with b rows each thus train on the loss and the
gradients of one process with the W*b rows (tests/test_ddp.py). One process: no gathering.
Validation logs the loss and in-batch recall@K (torchmetrics) over the same global batch.
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
        # attributes, not hparams: a subclass's save_hyperparameters (SASRec) replaces the hparams
        self.temperature, self.logq_correction = temperature, logq_correction
        self.model = TwoTower(user_tower, item_tower)
        sync = {"distributed_available_fn": self._in_world}
        self.val_loss = MeanMetric(**sync)
        self._seen = 0  # validation query ids so far in the epoch
        self.val_recall = MetricCollection({f"recall@{k}": RetrievalRecall(top_k=k, **sync) for k in recall_k},
                                           prefix="val/")

    def _in_world(self) -> bool:
        """Whether the metrics sync over ranks: when this module's trainer has several, not when a
        one-device trainer runs in a process of a larger world (quantize's live two-tower, trained
        by rank 0 while it prepares the data; syncing would wait on ranks that are not there)."""
        return self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized()

    def encode_users(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.user_tower(feats)

    def encode_items(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.item_tower(feats)

    def _gather(self, x: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        """``x`` of every rank, concatenated in rank order (``[W * n, ...]``); ``x`` on one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=sync_grads).flatten(0, 1)

    def logits(self, batch: dict) -> torch.Tensor:
        """``[b, W * n]``: this rank's b users against the positives of all W ranks, each rank's
        padded to the largest batch n (padding, and other rows holding a user's positive item,
        are -inf). The user's own positive is column :meth:`labels`."""
        u_BD, v_BD = self.model(batch["user"], batch["item"])
        ids_B = batch["item_id"]
        b = len(ids_B)
        n = int(self._gather(torch.tensor([b], device=ids_B.device)).max())  # ranks' last batches may differ
        logq_B = batch["logq"] if self.logq_correction and "logq" in batch else v_BD.new_zeros(b)
        v_ND = self._gather(F.pad(v_BD, (0, 0, 0, n - b)), sync_grads=True)
        ids_N = self._gather(F.pad(ids_B, (0, n - b)))
        logq_N = self._gather(F.pad(logq_B.to(v_BD.dtype), (0, n - b)))
        real_N = self._gather(F.pad(torch.ones_like(ids_B), (0, n - b))).bool()  # gloo gathers no bool
        logits_BN = u_BD @ v_ND.T / self.temperature - logq_N[None, :]
        cols_N = torch.arange(len(ids_N), device=ids_B.device)
        own_BN = cols_N[None, :] == self.labels(b, n)[:, None]
        masked_BN = ((ids_B[:, None] == ids_N[None, :]) & ~own_BN) | ~real_N[None, :]
        return logits_BN.masked_fill(masked_BN, float("-inf"))

    def labels(self, b: int, n: int) -> torch.Tensor:
        """Columns of this rank's b positives in the gathered ``[W * n]`` batch."""
        return torch.arange(b, device=self.device) + self.global_rank * n

    def loss(self, logits_BN: torch.Tensor) -> torch.Tensor:
        b, N = logits_BN.shape
        W = self.trainer.world_size if self._trainer is not None else 1
        return F.cross_entropy(logits_BN, self.labels(b, N // W))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.logits(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["item_id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits_BN = self.logits(batch)
        (b, N), W = logits_BN.shape, self.trainer.world_size
        self.val_loss.update(self.loss(logits_BN), weight=b)
        target_BN = torch.zeros_like(logits_BN, dtype=torch.bool)
        target_BN[torch.arange(b), self.labels(b, N // W)] = True
        # query ids, unique across ranks: the DDP-synced RetrievalRecall groups rows by id
        query_B = (torch.arange(b, device=logits_BN.device) + self._seen) * W + self.global_rank
        query_BN = query_B[:, None].expand(b, N)
        self._seen += b
        keep = torch.isfinite(logits_BN)
        self.val_recall.update(logits_BN[keep], target_BN[keep], indexes=query_BN[keep])
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
