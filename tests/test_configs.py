"""Every shipped YAML parses: stage configs through their stage's CLI, trainer configs through
LightningCLI (and FSDP's strategy is instantiated: Lightning refuses FSDP on a CPU accelerator,
so the Trainer itself is only built for the CPU/DDP configs)."""

import importlib
from pathlib import Path

import pytest
import yaml

from onemall_pl.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STAGE_MODULES = {name: module for name, (module, _) in COMMANDS.items()}
stage_yamls = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("trainer", "data"))


def test_every_config_folder_belongs_to_a_stage():
    for p in stage_yamls:
        assert p.parent.name in STAGE_MODULES, f"{p}: no stage named {p.parent.name!r}"


@pytest.mark.parametrize("path", stage_yamls, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_config_parses(path, capsys):
    mod = importlib.import_module(STAGE_MODULES[path.parent.name])
    with pytest.raises(SystemExit) as e:
        mod.main(["fit", "-c", str(path), "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "model" in printed and "trainer" in printed


@pytest.mark.parametrize("name", ["cpu", "ddp", "slurm"])
def test_trainer_config_builds(name, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    over = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"] if name != "cpu" else []
    if name == "slurm":  # a one-task SLURM allocation, as srun would describe it
        over += ["--trainer.num_nodes", "1", "--trainer.precision", "32-true"]
        for k, v in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_ID="1", SLURM_JOB_NAME="onemall",
                         SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODELIST="localhost").items():
            monkeypatch.setenv(k, v)
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, save_config_callback=None,
                       args=["-c", str(CONFIGS / "trainer" / f"{name}.yaml"),
                             "--trainer.default_root_dir", str(tmp_path), *over])
    assert cli.trainer is not None


def test_fsdp_config_wraps_decoder_blocks():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from onemall_pl.models.decoder import DecoderBlock

    cfg = yaml.safe_load((CONFIGS / "trainer" / "fsdp.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": cfg["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert cfg["precision"] == "bf16-mixed"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert DecoderBlock in getattr(policy, "_module_classes", ()), policy
