"""The whole chain as users run it: `make run` on a micro world, then `make run` again (nothing reruns).

It drives the Makefile itself (every stage's LightningCLI fit + export, evaluate, report), with the
tiny configs cut to a few optimiser steps by STAGE_ARGS, so it checks the wiring of the chain: each
stage finds its upstream artifact through the manifest, evaluate compares the three models of
Table 2 on the same requests, and the report renders. Quality is the business of the stage tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onemall_pl.artifacts import load_manifest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
STAGES = ("tokenizer", "quantize", "pretrain", "reward", "rl_dpo", "rl_grpo", "rqvae", "tiger", "sasrec", "evaluate")


def _make(tmp_path: Path, *goals: str) -> subprocess.CompletedProcess:
    args = [f"VENV={VENV}", "DATASET=synth", "PRESET=micro", "STAGE_ARGS=--trainer.max_steps=3",
            f"DATA_DIR={tmp_path / 'data' / 'synth'}", f"ART_ROOT={tmp_path / 'artifacts'}",
            f"RUNS_ROOT={tmp_path / 'runs'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *goals, *args],
                          capture_output=True, text=True, env=env, timeout=1500)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not (VENV / ".installed").exists(), reason="drives the Makefile: run it in the venv `make test` installs")
def test_make_run_on_a_micro_world_then_nothing_reruns(tmp_path):
    first = _make(tmp_path, "run")
    assert first.returncode == 0, f"make run failed:\n{first.stdout[-4000:]}\n{first.stderr[-4000:]}"

    art = tmp_path / "artifacts" / "synth"
    for stage in STAGES:
        load_manifest(art / stage)          # complete, hashes checked
    report = (art / "report" / "report.md").read_text()
    for model in ("OneMall", "TIGER", "SASRec"):
        assert model in report, f"{model} missing from the report's Table 2"
    assert "Table 4" in report
    assert list((art / "report").rglob("*.png")), "the report wrote no plots"
    assert (art / "report" / "report.html").is_file()
    assert "the report is" in first.stdout

    again = _make(tmp_path, "run")
    assert again.returncode == 0, again.stderr[-4000:]
    reran = [line for line in again.stdout.splitlines() if " fit " in line or "evaluate compare" in line]
    assert not reran, f"unchanged inputs retrained: {reran}"
