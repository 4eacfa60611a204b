"""What every stage's command line shares: a LightningCLI with an ``export`` subcommand.

    onemall <stage> fit     -c configs/<stage>/tiny.yaml [--trainer configs/trainer/ddp.yaml]
    onemall <stage> export  -c configs/<stage>/tiny.yaml        # writes artifacts/<dataset>/<stage>/
    onemall <stage> validate | test | predict ...

A stage's LightningModule implements :class:`Exportable` (``export_artifact``), which writes
its artifact folder through :func:`onemall_pl.artifacts.write_artifact` on rank 0.
Resuming: ``fit --ckpt_path last`` restarts from ``<trainer.default_root_dir>/checkpoints/last.ckpt``
(model, optimiser, schedulers, loop and datamodule state), or from scratch when there is none.
Trust: configs may only name classes of the allowed packages (:mod:`onemall_pl.security`;
``--allow_any_class`` lifts it) and checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from onemall_pl.security import class_path_policy, hint_if_denied, take_allow_any_flag


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


class RNGState(Callback):
    """Saves the random generators (python, numpy, torch CPU and CUDA) in every checkpoint and
    restores them on resume where the run stood, so that dropout and any sampling continue as in
    a run never stopped (Lightning saves model, optimisers, schedulers, loops and stateful
    dataloaders, not the generators). A checkpoint taken mid-epoch is restored just before the
    next training batch, one taken at an epoch's end at the next epoch's start (before its data
    iterator draws its seed from torch's generator, as it did in the uninterrupted run). Plain
    types and tensors only, so the checkpoint still loads with ``weights_only=True``. Every rank
    restores rank 0's state (ranks seeded alike hold the same one)."""

    def __init__(self):
        self._pending: dict | None = None
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        t = self._trainer
        epoch_end = t is None or t.fit_loop.epoch_loop.batch_progress.current.ready >= t.num_training_batches
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "epoch_end": bool(epoch_end)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def _restore(self) -> None:
        s, self._pending = self._pending, None
        py = s["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        kind, keys, pos, has_gauss, gauss = s["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
        torch.set_rng_state(s["torch"])
        if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(s["cuda"])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._pending is not None and self._pending["epoch_end"]:
            self._restore()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            self._restore()


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
    Parsing, instantiation and the run happen under :func:`onemall_pl.security.class_path_policy`
    (``--allow_any_class`` or ``ONEMALL_ALLOW_ANY_CLASS=1`` lifts the allow-list).
    """

    def __init__(self, model_class=None, datamodule_class=None, args=None, **kw):
        kw.setdefault("trainer_class", StageTrainer)
        kw.setdefault("save_config_kwargs", {"overwrite": True})
        kw.setdefault("parser_kwargs", {"default_env": False})
        args, allow_any = take_allow_any_flag(args)
        with class_path_policy(allow_any):
            super().__init__(model_class, datamodule_class, args=args, **kw)

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's, less its warning about `args` beside sys.argv (`onemall <stage>` passes both)
        with hint_if_denied():
            self.config = parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        # checkpoints hold tensors and plain types only: resuming / validate / test load them with
        # weights_only=True whatever torch's default (Lightning passes None on); `--weights_only false` opts out
        sub = self.config.get("subcommand")
        if sub and "weights_only" in self.config[sub] and self.config[sub].weights_only is None:
            self.config[sub].weights_only = True

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        # One fixed checkpoint folder per run directory with a `last.ckpt`, so that rerunning
        # `fit --ckpt_path last` after a kill resumes (Lightning starts from scratch, with a
        # warning, when there is no checkpoint yet) and `export` finds the weights.
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, RNGState) for cb in trainer.callbacks):
            trainer.callbacks.append(RNGState())
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.dirpath is None:
                    cb.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
                if cb.save_last is None:
                    cb.save_last = True
        return trainer
