"""Trust rules of every stage's command line: configs name classes of allowed packages only,
checkpoints and artifacts load with ``weights_only=True``, killed writers leave nothing half-made."""

from __future__ import annotations

import ast
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from onemall_pl.io import atomic_dir
from onemall_pl.security import ALLOW_ANY_ENV, ALLOW_ANY_FLAG, class_path_policy
from onemall_pl.stage import StageCLI

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "onemall_pl"
REWARD_CFG = str(ROOT / "configs" / "reward" / "tiny.yaml")


# ----------------------------------------------------------------------------- class-path allow-list


@pytest.fixture
def foreign_callback(tmp_path, monkeypatch):
    """An importable Callback outside the allowed packages; importing it leaves a mark."""
    mark = tmp_path / "imported"
    (tmp_path / "foreign_pkg.py").write_text(textwrap.dedent(f"""
        from lightning.pytorch.callbacks import Callback
        open({str(mark)!r}, "w").write("imported")

        class Foreign(Callback):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ANY_ENV, raising=False)
    sys.modules.pop("foreign_pkg", None)
    yield mark
    sys.modules.pop("foreign_pkg", None)


def _reward(args):
    from onemall_pl.reward import main

    main(args)


def test_foreign_class_path_is_refused_before_import(foreign_callback, capsys):
    with pytest.raises(SystemExit) as e:
        _reward(["fit", "-c", REWARD_CFG, "--trainer.callbacks+=foreign_pkg.Foreign", "--print_config"])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert 'key "trainer.callbacks"' in err and "foreign_pkg.Foreign" in err and "is not allowed" in err
    assert ALLOW_ANY_FLAG in err and ALLOW_ANY_ENV in err  # the hint says how to lift it
    assert not foreign_callback.exists(), "the module was imported (its code ran) before being refused"
    # the policy is the CLI's only: outside it jsonargparse's default applies again
    from lightning.pytorch.callbacks import Callback

    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--cb", type=Callback)
    assert p.parse_args(["--cb", "foreign_pkg.Foreign"]).cb.class_path == "foreign_pkg.Foreign"
    assert foreign_callback.exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_allow_any_class_lifts_the_allow_list(foreign_callback, capsys, monkeypatch, how):
    extra = [ALLOW_ANY_FLAG] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv(ALLOW_ANY_ENV, "1")
    with pytest.raises(SystemExit) as e:
        _reward(["fit", "-c", REWARD_CFG, *extra, "--trainer.callbacks+=foreign_pkg.Foreign", "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"][0]["class_path"] == "foreign_pkg.Foreign"
    assert foreign_callback.exists()


def test_loaders_under_allowed_packages_are_refused():
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--fn", type=Callable)
    with class_path_policy():
        assert p.parse_args(["--fn", "torch.nn.functional.relu"]).fn is torch.nn.functional.relu
        for path in ("torch.hub.load", "torch.load", "os.system", "subprocess.Popen", "pickle.loads"):
            with pytest.raises(Exception, match="is not allowed"):
                p.parse_args(["--fn", path])


@pytest.mark.parametrize("trainer", ["cpu", "ddp", "fsdp", "slurm"])
def test_shipped_trainer_configs_pass_the_allow_list(trainer, capsys):
    """Every class the shipped configs name (strategies, plugins, FSDP wrap units) is allowed."""
    with pytest.raises(SystemExit) as e:
        _reward(["fit", "-c", REWARD_CFG, "-c", str(ROOT / "configs" / "trainer" / f"{trainer}.yaml"),
                 "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err


# ----------------------------------------------------------------------------- weights_only


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "np", "numpy"):
            yield node.func.value.id, node, {k.arg: k.value for k in node.keywords}


def test_every_load_in_the_package_is_weights_only():
    """torch.load with weights_only=True, np.load never with allow_pickle=True, no pickle."""
    found = 0
    for f in sorted(SRC.rglob("*.py")):
        for mod, node, kw in _torch_load_calls(f):
            where = f"{f.relative_to(ROOT)}:{node.lineno}"
            if mod == "torch":
                found += 1
                v = kw.get("weights_only")
                assert isinstance(v, ast.Constant) and v.value is True, f"{where}: torch.load without weights_only=True"
            else:
                v = kw.get("allow_pickle")
                assert v is None or (isinstance(v, ast.Constant) and v.value is False), f"{where}: np.load pickles"
        text = f.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, f"{f}: unpickles"
    assert found >= 5  # the scan does see the loads


class _Payload:
    """A pickle that runs code when loaded without weights_only (it writes a file)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def _boring(tmp_path, *extra):
    return StageCLI(BoringModel, BoringDataModule, args=[
        "fit", "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "3",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0", *extra])


def test_stage_checkpoint_loads_weights_only_and_resumes(tmp_path):
    cli = _boring(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # model, optimiser, loops, RNG: plain types
    assert ckpt["global_step"] == 3 and ckpt["optimizer_states"] and "RNGState" in ckpt["callbacks"]
    assert cli.config_init.fit.weights_only is True  # Lightning's resume is told so, whatever torch's default
    cli = _boring(tmp_path, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert cli.trainer.global_step == 5
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5


def test_hostile_checkpoint_is_refused(tmp_path, monkeypatch):
    """A last.ckpt that would run code when unpickled: `fit --ckpt_path last` and `export` refuse it,
    even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (which flips torch.load's default only)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    mark = tmp_path / "pwned"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Payload(str(mark))}, last)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _boring(tmp_path, "--ckpt_path", "last")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _boring(tmp_path, "--ckpt_path", str(last))  # LightningCLI reads its hyper-parameters first
    from onemall_pl.stage import StageTrainer

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        StageTrainer(default_root_dir=tmp_path / "run", logger=False).export(_ExportableBoring(), ckpt_path="last")
    assert not mark.exists()


class _ExportableBoring(BoringModel):
    def export_artifact(self, trainer, datamodule, out):
        raise AssertionError("must not be reached")


# ----------------------------------------------------------------------------- killed writers

WRITER = r"""
import os, signal, sys
from pathlib import Path
from onemall_pl.io import atomic_dir
dest = Path(sys.argv[1])
with atomic_dir(dest) as tmp:
    (tmp / "a").write_text("new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_leaves_the_old_folder_and_its_temp_is_cleaned(tmp_path):
    dest = tmp_path / "art"
    with atomic_dir(dest) as t:
        (t / "a").write_text("old")
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    r = subprocess.run([sys.executable, str(script), str(dest)], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (dest / "a").read_text() == "old"
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp-")]
    assert len(stale) == 1 and (stale[0] / "a").read_text() == "new"
    # a live writer's temp folder is kept, a dead one's removed by the next write of the same folder
    live = tmp_path / f".art.tmp-{stale[0].name.split('-')[1]}-{os.getpid()}-live"
    live.mkdir()
    with atomic_dir(dest) as t:
        (t / "a").write_text("newer")
    assert (dest / "a").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art")) == [live.name]
