"""kill -9, through the `onemall` command line: a training stage resumes from its last checkpoint
and ends where an uninterrupted run ends; an export killed at any point leaves the old artifact
or none, never a partial one.

Training: the SASRec baseline with ``train_rows: all`` (a ParquetStream, so the data position is
in the checkpoint) and dropout 0.2 (so the restored RNG matters), on the synth micro world.
The kill comes from outside (SIGKILL as soon as a checkpoint at step >= 6 exists), at whatever
instruction the process is in, as a real kill would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onemall_pl.artifacts import ArtifactError, load_manifest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
STEPS = 20  # the micro world's train split is 11 batches of 8: the run crosses an epoch

CKPT_EVERY_2 = """
trainer:
  max_epochs: -1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 2
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from onemall_pl.data.build import build
    from onemall_pl.data.synth import generate

    out = tmp_path_factory.mktemp("world") / "micro"
    generate(out, "micro", seed=0)
    build(dataset=out)
    return out


def _fit_cmd(micro: Path, tmp: Path, run: Path, *extra: str) -> list[str]:
    cfg = tmp / "ckpt.yaml"
    cfg.write_text(CKPT_EVERY_2)
    return [sys.executable, "-m", "onemall_pl.cli", "sasrec", "fit", "-c", str(ROOT / "configs/sasrec/tiny.yaml"),
            "-c", str(cfg), "--data.dataset", str(micro), "--data.train_rows", "all", "--data.batch_size", "8",
            "--model.d_model", "16", "--model.n_layers", "1", "--trainer.max_steps", str(STEPS),
            "--trainer.default_root_dir", str(run), *extra]


def _steps(ckpt_dir: Path) -> list[int]:
    return [int(p.stem.split("step=")[1]) for p in ckpt_dir.glob("epoch=*-step=*.ckpt")]


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_same_end(micro, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(_fit_cmd(micro, tmp_path, a), env=ENV, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # the same command with --ckpt_path last (no checkpoint yet: Lightning starts from scratch), killed
    cmd = _fit_cmd(micro, tmp_path, b, "--ckpt_path", "last")
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if any(s >= 6 for s in _steps(b / "checkpoints")):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == -signal.SIGKILL, f"finished before the kill:\n{err[-3000:]}"
    killed = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    done = killed["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert 0 < killed["global_step"] < STEPS and 0 < done < 11, "not a mid-epoch checkpoint"

    r = subprocess.run(cmd, env=ENV, check=False, capture_output=True, text=True, timeout=600)  # rerun: resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restoring states from the checkpoint" in r.stderr, r.stderr[-3000:]
    want, got = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for d in (a, b))
    assert got["global_step"] == want["global_step"] == STEPS
    # equal, not close: the same ops on the same data in the same order, one CPU thread
    for k, v in want["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    for sw, sg in zip(want["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()):
        for k in sw:
            assert torch.equal(torch.as_tensor(sw[k]), torch.as_tensor(sg[k])), k
    assert torch.equal(want["callbacks"]["RNGState"]["torch"], got["callbacks"]["RNGState"]["torch"])


# ----------------------------------------------------------------------------- export

KILL_IN_BUILD = """
import os, signal, torch
real = torch.save
def save(obj, f, *a, **k):  # the first file of the artifact is written, then the process dies
    real(obj, f, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
"""
KILL_BETWEEN_RENAMES = """
import os, signal
real = os.replace
def replace(src, dst):  # the old artifact is moved aside, the new one not yet in place
    real(src, dst)
    if os.path.basename(str(dst)).startswith(".reward.old-"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""


@pytest.mark.slow
def test_export_killed_leaves_old_artifact_or_none(tmp_path):
    from onemall_pl.reward import main
    from test_reward import planted_dataset

    data = planted_dataset(tmp_path)
    art = tmp_path / "art"
    args = ["-c", str(ROOT / "configs/reward/tiny.yaml"), "--data.data_dir", str(data),
            "--data.num_price_bands", "4", "--trainer.max_epochs", "1", "--trainer.default_root_dir",
            str(tmp_path / "run"), "--model.artifacts_root", str(art), "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false"]
    main(["fit", *args])
    main(["export", *args])
    dest = art / "planted" / "reward"
    first = load_manifest(dest, stage="reward")

    def killed_export(hook: str) -> None:
        code = hook + f"\nfrom onemall_pl.cli import main\nmain(['reward', 'export', *{args!r}])\n"
        r = subprocess.run([sys.executable, "-c", code], env=ENV, check=False, capture_output=True, text=True, timeout=600)
        assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]

    killed_export(KILL_IN_BUILD)
    assert load_manifest(dest, stage="reward").id == first.id  # the old artifact, whole (hashes verified)
    hidden = [p.name for p in dest.parent.iterdir() if p.name != "reward"]
    assert len(hidden) == 1 and hidden[0].startswith(".reward.tmp-"), hidden  # the partial one, hidden

    killed_export(KILL_BETWEEN_RENAMES)
    with pytest.raises(ArtifactError, match="not found"):  # absent: readers fail in their first second
        load_manifest(dest, stage="reward")

    main(["export", *args])  # the next export publishes a whole one and sweeps the leftovers
    assert load_manifest(dest, stage="reward").files == first.files
    assert [p.name for p in dest.parent.iterdir()] == ["reward"]
