"""What every stage's command line shares: a LightningCLI with an ``export`` subcommand.

    onemall <stage> fit     -c configs/<stage>/tiny.yaml [--trainer configs/trainer/ddp.yaml]
    onemall <stage> export  -c configs/<stage>/tiny.yaml        # writes artifacts/<dataset>/<stage>/
    onemall <stage> validate | test | predict ...

A stage's LightningModule implements :class:`Exportable` (``export_artifact``), which writes
its artifact folder through :func:`onemall_pl.artifacts.write_artifact` on rank 0.
Resuming: ``fit --ckpt_path last`` restarts from ``<trainer.default_root_dir>/checkpoints/last.ckpt``
(model, optimiser, schedulers, loop and datamodule state), or from scratch when there is none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


@runtime_checkable
class Exportable(Protocol):
    def export_artifact(self, trainer: pl.Trainer, datamodule: pl.LightningDataModule | None,
                        out: Path) -> Any:
        """Write this stage's artifact folder ``out`` (rank 0 writes; all ranks may compute)."""


class StageTrainer(pl.Trainer):
    """A ``Trainer`` whose ``export`` method becomes the ``export`` subcommand of LightningCLI."""

    def export(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
               ckpt_path: str | None = "last", out: str | None = None) -> Any:
        """Load a checkpoint into ``model`` and write the stage's artifact folder.

        Args:
            ckpt_path: ``"last"`` / ``"best"`` (from the run directory), a file, or ``None`` to
                export the weights as configured (e.g. the untrained encoder, for a baseline).
            out: the artifact folder; default ``<artifacts_root>/<dataset>/<stage>`` as the
                module defines it.
        """
        if not isinstance(model, Exportable):
            raise ValueError(f"{type(model).__name__} has no export_artifact(); this stage exports nothing")
        path = resolve_ckpt(self, ckpt_path)
        if path is not None:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["state_dict"])
        return model.export_artifact(self, datamodule, Path(out) if out else None)


def resolve_ckpt(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """``last`` / ``best`` -> a file in the run directory; an explicit path must exist."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "best"):
        root = Path(trainer.default_root_dir)
        cands = sorted(root.rglob("last*.ckpt" if ckpt_path == "last" else "*.ckpt"), key=os.path.getmtime)
        if ckpt_path == "best":
            cands = [c for c in cands if not c.name.startswith("last")] or cands
        if not cands:
            raise ValueError(f"no checkpoint found under {root} for ckpt_path={ckpt_path!r}: run `fit` first "
                             "or pass --ckpt_path null to export the untrained weights")
        return str(cands[-1])
    if not Path(ckpt_path).is_file():
        raise ValueError(f"checkpoint {ckpt_path} does not exist")
    return ckpt_path


class StageCLI(LightningCLI):
    """LightningCLI with the ``export`` subcommand and the project's defaults.

    Subclass per stage to ``link_arguments`` sizes from the data module to the model.
    """

    def __init__(self, model_class=None, datamodule_class=None, args=None, **kw):
        kw.setdefault("trainer_class", StageTrainer)
        kw.setdefault("save_config_kwargs", {"overwrite": True})
        kw.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(model_class, datamodule_class, args=args, **kw)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        # One fixed checkpoint folder per run directory with a `last.ckpt`, so that rerunning
        # `fit --ckpt_path last` after a kill resumes (Lightning starts from scratch, with a
        # warning, when there is no checkpoint yet) and `export` finds the weights.
        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.dirpath is None:
                    cb.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
                if cb.save_last is None:
                    cb.save_last = True
        return trainer
