"""TIGER, the generative baseline of the paper's Table 2: T5 over RQ-VAE semantic IDs.

    onemall tiger rqvae fit    -c configs/rqvae/tiny.yaml     # the item tokenizer first
    onemall tiger rqvae export -c configs/rqvae/tiny.yaml     # artifacts/<dataset>/rqvae/
    onemall tiger fit          -c configs/tiger/tiny.yaml     # CPU, a few minutes
    onemall tiger export       -c configs/tiger/tiny.yaml     # artifacts/<dataset>/tiger/
    (GPU / cluster: --trainer.accelerator gpu, or --trainer configs/trainer/ddp.yaml)

Data (:class:`TigerData`): the ``samples`` table; the encoder reads the user's latest
``max_items`` items of one behaviour sequence (``seq_click`` by default) as SID tokens (4 per
item: 3 RQ-VAE codes + the collision suffix, read through the ``rqvae`` artifact's manifest)
after a hashed user-id token; the decoder is trained to emit the SID of each of the request's
targets (a request with T targets gives T training examples). Every training request is an
example, as TIGER trains on every prefix of a user's sequence.

Retrieval: constrained beam search (``onemall_pl.retrieval.beam_search`` over the SID trie,
with the :class:`~onemall_pl.models.tiger.T5StepModel` adapter: encoder once per request,
decoder KV cache per beam) of width ``beam``; every beam is a valid SID, and a SID names one
item (the suffix makes them unique); a request is decoded over its scenario's item type.
``exclude_history`` drops the user's history from the list, for every model alike, in
:func:`onemall_pl.metrics.replay` (it asks for as many more beams).
"""

from __future__ import annotations

import inspect
import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from onemall_pl.artifacts import Manifest, load_manifest, write_artifact
from onemall_pl.baselines import RetrievalEvalHooks
from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.data.datasets import ParquetMapDataset, ParquetStream, collate_sequences
from onemall_pl.data.schema import SCENARIOS
from onemall_pl.io import read_dataset_info
from onemall_pl.metrics import PAD, RetrievalMetrics, pack_left, replay
from onemall_pl.models.tiger import TigerConfig, TigerT5
from onemall_pl.retrieval import SIDTrie, beam_search
from onemall_pl.stage import StageCLI

# ----------------------------------------------------------------------------- data


def tiger_batch(table: pa.Table, catalog: ItemCatalog, sequence: str, max_items: int,
                max_targets: int | None, explode: bool) -> dict[str, torch.Tensor]:
    """Rows of ``samples`` -> ``hist_sids`` (B, H, S; -1 pads), ``user``, ``scenario``, ``hist``
    (raw item ids, -1 pads), ``targets`` (raw ids, -1 pads) and, with ``explode``, one example
    per target: ``target_sids`` (B', S) with the history repeated."""
    b = collate_sequences(table, {sequence: max_items}, set_columns={"targets": max_targets},
                          scalar_columns=["scenario", "user_id"], item_index=catalog,
                          item_columns=[sequence, "targets"])
    sid_NS = catalog.sid
    hist_BH, hmask_BH = b[sequence], b[f"{sequence}_mask"]
    hist_sids_BHS = torch.where(hmask_BH[..., None], sid_NS[hist_BH], PAD)
    out = {"hist_sids": hist_sids_BHS, "user": b["user_id"], "scenario": b["scenario"],
           "hist": torch.where(hmask_BH, torch.from_numpy(catalog.ids_of(hist_BH)), PAD),
           "targets": torch.where(b["targets_mask"], torch.from_numpy(catalog.ids_of(b["targets"])), PAD)}
    if explode:
        row, col = b["targets_mask"].nonzero(as_tuple=True)
        out.update(hist_sids=hist_sids_BHS[row], user=b["user_id"][row], scenario=b["scenario"][row],
                   target_sids=sid_NS[b["targets"][row, col]])
        del out["hist"], out["targets"]
    return out


class TigerData(pl.LightningDataModule):
    """The ``samples`` of a dataset as SID sequences (see the module docstring).

    Args:
        dataset: the dataset folder (built by ``onemall data build``).
        rqvae: the ``rqvae`` artifact folder; default ``<artifacts>/<dataset name>/rqvae``.
        artifacts: the artifacts root.
        sequence: the behaviour sequence the encoder reads.
        max_items: history items read (TIGER: 20).
        batch_size / eval_batch_size: requests per batch.
        max_targets: targets per request (each is one training example).
        eval_limit: validate on at most this many valid requests (beam search is the cost).
    """

    def __init__(self, dataset: Path = Path("data/synth"), rqvae: Path | None = None,
                 artifacts: Path = Path("artifacts"), sequence: str = "seq_click", max_items: int = 20,
                 batch_size: int = 256, eval_batch_size: int = 64, max_targets: int = 16,
                 eval_limit: int | None = 512, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if sequence not in ("seq_click", "seq_order", "seq_exposure"):
            raise ValueError(f"sequence must be seq_click, seq_order or seq_exposure, got {sequence!r}")
        self.dataset, self.sequence, self.max_items = Path(dataset), sequence, max_items
        self.batch_size, self.eval_batch_size, self.max_targets = batch_size, eval_batch_size, max_targets
        self.eval_limit, self.num_workers, self.seed = eval_limit, num_workers, seed
        self.name = read_dataset_info(self.dataset).name
        self.rqvae = load_manifest(Path(rqvae) if rqvae else Path(artifacts) / self.name / "rqvae", stage="rqvae")
        if self.rqvae.dataset != self.name:
            raise ValueError(f"{self.rqvae.path} was built for dataset {self.rqvae.dataset!r}, not {self.name!r}")
        self.catalog = ItemCatalog.load(self.dataset, sid_table=self.rqvae.file("sid_table"))
        self.codebook_sizes = [int(k) for k in self.rqvae.size("codebook_sizes")]
        self.collate = partial(tiger_batch, catalog=self.catalog, sequence=sequence, max_items=max_items,
                               max_targets=max_targets, explode=False)
        self._train = None

    def trie(self) -> SIDTrie:
        return SIDTrie(self.catalog.sid, torch.from_numpy(self.catalog.item_ids), self.codebook_sizes)

    def train_dataloader(self):
        if self._train is None:
            self._train = ParquetStream(self.dataset, "samples", batch_size=self.batch_size, filter={"split": "train"},
                                        seed=self.seed, columns=["user_id", "scenario", self.sequence, "targets"],
                                        collate=partial(tiger_batch, catalog=self.catalog, sequence=self.sequence,
                                                        max_items=self.max_items, max_targets=self.max_targets,
                                                        explode=True))
        return self._train.loader(num_workers=self.num_workers)

    def _eval_loader(self, split: str, limit: int | None) -> DataLoader:
        ds = ParquetMapDataset(self.dataset, "samples", filter={"split": split},
                               columns=["user_id", "scenario", self.sequence, "targets"], collate=self.collate)
        if limit is not None and len(ds) > limit:
            ds = ParquetMapDataset(ds.table.slice(0, limit), collate=self.collate)
        return DataLoader(ds, batch_size=self.eval_batch_size, collate_fn=ds.collate_fn, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("valid", self.eval_limit)

    def test_dataloader(self):
        return self._eval_loader("test", None)


# ----------------------------------------------------------------------------- module


class TigerModule(RetrievalEvalHooks, pl.LightningModule):
    """Trains :class:`~onemall_pl.models.tiger.TigerT5` with next-SID cross-entropy.

    Args:
        codebook_sizes / max_items: linked from the data (the rqvae manifest, the data config).
        n_user_tokens, d_model, d_ff, n_heads, d_kv, n_layers, dropout: see :class:`TigerConfig`.
        lr / weight_decay / warmup_steps: AdamW with linear warm-up then inverse square root decay.
        beam: beam width of evaluation (at least the largest K).
        exclude_history: drop the input's items from the retrieved list.
        hr_k / ndcg_k: the K of HR@K / NDCG@K logged at validation and in the artifact.
        artifacts: the artifacts root; export writes ``<root>/<dataset>/tiger``.
    """

    def __init__(self, codebook_sizes: tuple[int, ...] = (), max_items: int = 20, n_user_tokens: int = 2000,
                 d_model: int = 128, d_ff: int = 1024, n_heads: int = 6, d_kv: int = 64, n_layers: int = 4,
                 dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 500,
                 beam: int = 100, exclude_history: bool = False, hr_k: tuple[int, ...] = (50, 100),
                 ndcg_k: tuple[int, ...] = (10,), artifacts: Path = Path("artifacts")):
        super().__init__()
        self.save_hyperparameters()
        if beam < max([*hr_k, *ndcg_k]):
            raise ValueError(f"beam {beam} is narrower than the largest K {max([*hr_k, *ndcg_k])}")
        self.model = TigerT5(TigerConfig(codebook_sizes=list(codebook_sizes), n_user_tokens=n_user_tokens,
                                         max_items=max_items, d_model=d_model, d_ff=d_ff, n_heads=n_heads,
                                         d_kv=d_kv, n_layers=n_layers, dropout=dropout))
        self.val_metrics = RetrievalMetrics(SCENARIOS, hr_k=hr_k, ndcg_k=ndcg_k)
        self.trie: SIDTrie | None = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if isinstance(dm, TigerData):
            self.trie = dm.trie()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids_BL, mask_BL = self.model.encoder_inputs(batch["hist_sids"], batch["user"])
        loss = self.model(ids_BL, mask_BL, batch["target_sids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ids_BL))
        return loss

    @torch.no_grad()
    def retrieve(self, hist_sids_BHS: torch.Tensor, user_B: torch.Tensor, hist_BH: torch.Tensor | None,
                 k: int, beam: int | None = None, max_rows: int = 20_000, trie: SIDTrie | None = None
                 ) -> torch.Tensor:
        """Top-``k`` raw item ids ``(B, k)`` by constrained beam search over ``trie`` (default: all
        items) (-1 pads); drops the items of ``hist_BH`` (raw ids, -1 pads) when given. Requests
        are decoded in chunks of ``max_rows // beam`` to bound the beams' KV cache."""
        trie = trie or self.trie
        assert trie is not None, "no SID trie: fit through TigerData or load with TigerRetriever"
        extra = hist_BH.shape[1] if hist_BH is not None else 0
        beam = max(beam or self.hparams.beam, k + extra)
        trie = trie.to(self.device) if trie.device != self.device else trie
        out = []
        step = max(1, max_rows // beam)
        for s in range(0, len(hist_sids_BHS), step):
            ids_BL, mask_BL = self.model.encoder_inputs(hist_sids_BHS[s:s + step].to(self.device),
                                                        user_B[s:s + step].to(self.device))
            res = beam_search(self.model.beam_model(ids_BL, mask_BL), trie, beam)
            items_BK, _ = trie.items_of(res.leaves, res.scores, k + extra)
            if hist_BH is not None:
                h_BH = hist_BH[s:s + step].to(items_BK.device)
                drop_BK = (items_BK[:, :, None] == h_BH[:, None, :]).any(-1) | (items_BK < 0)
                items_BK = pack_left(items_BK, ~drop_BK)
            out.append(items_BK[:, :k].cpu())
        return torch.cat(out)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        k = max([*self.hparams.hr_k, *self.hparams.ndcg_k])
        hist = batch["hist"] if self.hparams.exclude_history else None
        top_BK = self.retrieve(batch["hist_sids"], batch["user"], hist, k)
        self.val_metrics.update(top_BK.to(self.device), batch["targets"], batch["scenario"])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (warm / (s + 1)) ** 0.5))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def export_artifact(self, trainer, datamodule: TigerData, out: Path | None) -> Manifest | None:
        self.eval()
        if self.trie is None:
            self.trie = datamodule.trie()
        retriever = TigerRetriever(self, datamodule.catalog, datamodule.sequence, datamodule.max_items)
        # the test split only: beam search is the cost, and validation was fit's business
        metrics = {"test": replay(retriever, datamodule.dataset, "test", hr_k=self.hparams.hr_k,
                                  ndcg_k=self.hparams.ndcg_k, exclude_history=self.hparams.exclude_history,
                                  batch_size=datamodule.eval_batch_size)}
        if trainer is not None and not trainer.is_global_zero:
            return None
        out = Path(out) if out else Path(self.hparams.artifacts) / datamodule.name / "tiger"
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.hparams.items()}
        config["data"] = {"sequence": datamodule.sequence, "max_items": datamodule.max_items}

        def build(tmp: Path) -> None:
            torch.save({"hparams": config, "state_dict": self.state_dict()}, tmp / "tiger.pt")
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

        m = write_artifact(out, build, stage="tiger", dataset=datamodule.name, config=config,
                           upstream=[datamodule.rqvae],
                           sizes={"codebook_sizes": list(self.hparams.codebook_sizes),
                                  "vocab_size": self.model.vocab_size,
                                  "params": sum(p.numel() for p in self.parameters())}, metrics=metrics)
        print(f"tiger: wrote {out}\n  test: {json.dumps(metrics['test']['overall'])}")
        return m


class TigerRetriever:
    """Held-out requests (Arrow rows of ``samples``) -> top-K raw item ids by beam search.

    ``by_scenario_type``: a request is decoded over the SID trie of its scenario's item type,
    as OneMall's beam search is (one SID space, one trie per type).
    """

    def __init__(self, module: TigerModule, catalog: ItemCatalog, sequence: str, max_items: int,
                 by_scenario_type: bool = True):
        from onemall_pl.data.schema import ITEM_TYPES

        self.module, self.catalog, self.sequence, self.max_items = module, catalog, sequence, max_items
        self.by_scenario_type, self.name = by_scenario_type, "TIGER"
        sizes, types = module.hparams.codebook_sizes, catalog.item_type.numpy()
        self.tries = {None: SIDTrie(catalog.sid, torch.from_numpy(catalog.item_ids), sizes)}
        if by_scenario_type:
            for t, name in enumerate(ITEM_TYPES):
                if (types == t).any():
                    self.tries[name] = SIDTrie(catalog.sid[types == t], torch.from_numpy(catalog.item_ids[types == t]),
                                               sizes)

    @classmethod
    def from_artifact(cls, folder: str | Path, dataset: str | Path, by_scenario_type: bool = True) -> TigerRetriever:
        from onemall_pl.artifacts import check_upstream

        m = load_manifest(folder, stage="tiger")
        rq = load_manifest(Path(folder).parent / "rqvae", stage="rqvae")
        check_upstream(m, rq)
        ckpt = torch.load(m.file("tiger.pt"), map_location="cpu", weights_only=True)
        params = inspect.signature(TigerModule.__init__).parameters
        module = TigerModule(**{k: v for k, v in ckpt["hparams"].items() if k in params})
        module.load_state_dict(ckpt["state_dict"])
        module.eval()
        catalog = ItemCatalog.load(dataset, sid_table=rq.file("sid_table"))
        data = ckpt["hparams"]["data"]
        return cls(module, catalog, data["sequence"], data["max_items"], by_scenario_type)

    @torch.no_grad()
    def retrieve(self, rows: pa.Table, k: int) -> torch.Tensor:
        """``(B, k)`` raw item ids, best first (-1 pads)."""
        from onemall_pl.pretrain import SCENARIO_ITEM_TYPE

        b = tiger_batch(rows, self.catalog, self.sequence, self.max_items, None, explode=False)
        out = torch.full((rows.num_rows, k), PAD, dtype=torch.long)
        for s, scen in enumerate(SCENARIOS):
            r = (b["scenario"] == s).nonzero(as_tuple=True)[0]
            if len(r):
                trie = self.tries[SCENARIO_ITEM_TYPE[scen] if self.by_scenario_type else None]
                out[r] = self.module.retrieve(b["hist_sids"][r], b["user"][r], None, k, trie=trie)
        return out


class TigerCLI(StageCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.codebook_sizes", "model.codebook_sizes", apply_on="instantiate")
        parser.link_arguments("data.max_items", "model.max_items", apply_on="instantiate")
        parser.link_arguments("data.artifacts", "model.artifacts")


def main(argv: list[str] | None = None) -> None:
    """``onemall tiger ...`` (LightningCLI); ``onemall tiger rqvae ...`` trains the tokenizer."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rqvae"]:
        from onemall_pl.baselines.rqvae import main as rqvae_main

        return rqvae_main(argv[1:])
    TigerCLI(TigerModule, TigerData, args=argv)
    return None


if __name__ == "__main__":
    main()
