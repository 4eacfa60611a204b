"""kill -9, through the `onemall` command line: a training stage resumes from its last checkpoint
and ends where an uninterrupted run ends; an export killed at any point leaves the old artifact
or none, never a partial one.

Training, on the synth micro world, for each stage with its own data path: SASRec with
``train_rows: all`` (a ParquetStream), the reward model (exposures through a MapLoader) and the
tokenizer (item2item pairs through a MapLoader, the real all-MiniLM text encoder cut to one block).
Each run has dropout on, so the restored RNG matters, and crosses an epoch. The kill comes from
outside (SIGKILL as soon as a checkpoint at step >= 4 exists), at whatever instruction the
process is in, as a real kill would; the same command is then run again with ``--ckpt_path last``.
Compared with a run never stopped: weights, optimiser state, LR schedulers, RNG and the data
loader's position, all equal (not close: the same ops on the same data in the same order, one
CPU thread).
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
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
KILL_AT = 4  # the first checkpoint step at or after which the run is killed

CKPT_EVERY_2 = """
trainer:
  max_epochs: -1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_model_summary: false
  enable_progress_bar: false
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 2
"""


def _steps(ckpt_dir: Path) -> list[int]:
    return [int(p.stem.split("step=")[1]) for p in ckpt_dir.glob("epoch=*-step=*.ckpt")]


def _load(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _loader_state(ckpt: dict) -> dict:
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state


def _mid_epoch(ckpt: dict) -> bool:
    """The checkpoint was taken inside an epoch, and the loader's position is the batches trained."""
    done = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]  # saved before "completed"
    pos = _loader_state(ckpt)
    if "left" in pos:  # ParquetStream: the batches of the epoch not yet delivered
        return done > 0 and bool(pos["left"])
    f = pos["fingerprint"]  # MapLoader: indices of this pass delivered
    per_epoch = f["rows"] // f["batch_size"] if f["drop_last"] else -(-f["rows"] // f["batch_size"])
    return 0 < done < per_epoch and pos["start"] == done * f["batch_size"]


def kill_and_resume(stage: str, args: list[str], tmp: Path, steps: int) -> None:
    """``onemall <stage> fit <args>`` for ``steps`` steps, uninterrupted, and the same command with
    ``--ckpt_path last`` killed mid-epoch then rerun: both end in the same state. ``steps`` is
    even: ``last.ckpt`` is written every 2 steps."""
    assert steps % 2 == 0, steps
    cfg = tmp / "ckpt.yaml"
    cfg.write_text(CKPT_EVERY_2)

    def cmd(run: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "onemall_pl.cli", stage, "fit", *args, "-c", str(cfg),
                "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run), *extra]

    a, b = tmp / "a", tmp / "b"
    r = subprocess.run(cmd(a), env=ENV, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # the same command with --ckpt_path last (no checkpoint yet: Lightning starts from scratch), killed
    again = cmd(b, "--ckpt_path", "last")
    p = subprocess.Popen(again, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if any(s >= KILL_AT for s in _steps(b / "checkpoints")):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == -signal.SIGKILL, f"finished before the kill:\n{err[-3000:]}"
    killed = _load(b)
    assert 0 < killed["global_step"] < steps and _mid_epoch(killed), "not a mid-epoch checkpoint"

    r = subprocess.run(again, env=ENV, check=False, capture_output=True, text=True, timeout=600)  # resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restoring states from the checkpoint" in r.stderr, r.stderr[-3000:]
    want, got = _load(a), _load(b)
    assert got["global_step"] == want["global_step"] == steps
    assert want["epoch"] == got["epoch"] >= 1, "the runs should cross an epoch"
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for k, v in want["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    assert len(want["optimizer_states"]) == len(got["optimizer_states"])
    for ow, og in zip(want["optimizer_states"], got["optimizer_states"]):
        assert ow["state"].keys() == og["state"].keys()
        for sw, sg in zip(ow["state"].values(), og["state"].values()):
            for k in sw:
                assert torch.equal(torch.as_tensor(sw[k]), torch.as_tensor(sg[k])), k
    assert want["lr_schedulers"] == got["lr_schedulers"]
    assert _loader_state(want) == _loader_state(got)
    rw, rg = want["callbacks"]["RNGState"], got["callbacks"]["RNGState"]
    assert torch.equal(rw["torch"], rg["torch"]) and rw["python"] == rg["python"]
    assert torch.equal(rw["numpy"][1], rg["numpy"][1]) and rw["numpy"][2:] == rg["numpy"][2:]


@pytest.mark.slow
def test_sasrec_killed_mid_epoch_resumes_to_the_same_end(micro_world, tmp_path):
    # the micro world's train split is 11 batches of 8
    kill_and_resume("sasrec", ["-c", str(ROOT / "configs/sasrec/tiny.yaml"), "--data.dataset", str(micro_world),
                               "--data.train_rows", "all", "--data.batch_size", "8", "--model.d_model", "16",
                               "--model.n_layers", "1"], tmp_path, steps=14)


@pytest.mark.slow
def test_reward_killed_mid_epoch_resumes_to_the_same_end(micro_world, tmp_path):
    # 1,829 training exposures: 8 batches of 256
    kill_and_resume("reward", ["-c", str(ROOT / "configs/reward/tiny.yaml"), "--data.data_dir", str(micro_world),
                               "--data.batch_size", "256", "--model.net.dropout", "0.2"], tmp_path, steps=10)


@pytest.mark.slow
def test_tokenizer_killed_mid_epoch_resumes_to_the_same_end(micro_world, tmp_path):
    # all-MiniLM's first block only, short texts, a small held-out set; 89 training pairs: 11 batches of 8
    kill_and_resume("tokenizer", ["-c", str(ROOT / "configs/tokenizer/tiny.yaml"), "--data.data_dir", str(micro_world),
                                  "--model.encoder.text_kwargs", "{num_hidden_layers: 1}",
                                  "--model.encoder.train_top_layers", "1", "--model.encoder.max_length", "12",
                                  "--data.batch_size", "8", "--data.max_eval_pairs", "8", "--data.eval_items", "32",
                                  "--model.artifacts_root", str(tmp_path / "art")], tmp_path, steps=14)


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
