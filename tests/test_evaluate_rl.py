"""``onemall evaluate rl`` / ``ab`` on the simulator's micro world with real upstream artifacts (a category-
derived quantize artifact as in test_pretrain, a briefly trained pretrain and reward model), and the slow
end-to-end claim: on a tiny world, RL raises the mean reward of the beam's Top10 over Base."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from onemall_pl.artifacts import load_manifest
from onemall_pl.evaluate import ab, bootstrap_lift, rl, update_artifact
from onemall_pl.models.decoder import OneMallConfig
from test_pretrain import fixture_sid_artifact


def _trainer(root, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """micro world -> quantize (fixture) -> pretrain (trained briefly) -> reward (trained briefly)."""
    from onemall_pl.data import build as B
    from onemall_pl.data.synth import generate
    from onemall_pl.models.ranking import Config
    from onemall_pl.pretrain import PretrainModule, SamplesDataModule
    from onemall_pl.reward import EventsDataModule, RewardModule

    root = tmp_path_factory.mktemp("rl_eval")
    d = root / "micro"
    generate(d, preset="micro", seed=0)
    B.build(d, max_exposure=64, max_click=16, max_order=8)
    art = root / "artifacts" / "micro"
    q = fixture_sid_artifact(d, art / "quantize")
    pl.seed_everything(0)
    dm = SamplesDataModule(str(d), str(q), batch_size=32, eval_batch_size=64, max_exposure=12, max_click=8,
                           max_order=4, max_targets=4)
    net = OneMallConfig(dim=32, n_heads=4, ffn_hidden=64, item_dim=16, n_queries=2, emb_dim=16)
    pre = PretrainModule(net=net, sizes=dm.sizes, sid_source=dm.sid_source, lr=3e-3, warmup_steps=5, beam=50,
                         hr_k=(5, 50), beam_requests=16)
    t = _trainer(root / "runs" / "pretrain", max_steps=60, limit_val_batches=0)
    t.fit(pre, datamodule=dm)
    pre.export_artifact(t, dm, art / "pretrain")
    edm = EventsDataModule(str(d), max_exposure=20, max_click=10, max_order=5, batch_size=256, eval_batch_size=1024)
    rew = RewardModule(net=Config(d_emb=4, d_model=16, attn_hidden=16, tower_hidden=[32]), sizes=edm.sizes, lr=5e-3)
    t = _trainer(root / "runs" / "reward", max_epochs=2)
    t.fit(rew, datamodule=edm)
    rew.export_artifact(t, edm, art / "reward")
    return d, art


def _rl(pipeline, algo, out, steps=0, **rl_kw):
    """An RL artifact through the stage's CLI wiring (links from the data module), trained ``steps``."""
    from onemall_pl.rl import RLCLI, RLDataModule, RLModule

    d, art = pipeline
    args = ["--data.data_dir", str(d), "--data.sid_artifact", str(art / "quantize"), "--data.batch_size", "32",
            "--data.eval_batch_size", "64", "--model.rl.algo", algo, "--model.beam", "50", "--model.hr_k", "[5, 50]",
            "--model.beam_requests", "16", "--model.rl.eval_requests", "8", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(max(steps, 1)), "--trainer.enable_progress_bar",
            "false", "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(out.parent / f"run_{out.name}"), "--seed_everything", "0"]
    for k, v in rl_kw.items():
        args += [f"--model.{k}" if k in ("lr", "warmup_steps") else f"--model.rl.{k}", str(v)]
    cli = RLCLI(RLModule, RLDataModule, args=args, run=False)
    assert cli.model.hparams.pretrain_source == str(art / "pretrain")
    assert cli.model.hparams.reward_source == str(art / "reward")
    if steps:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.export_artifact(cli.trainer, cli.datamodule, out)


def test_bootstrap_lift_interval():
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, 400)
    same = bootstrap_lift(base.copy(), base, 500)
    assert same == (0.0, 0.0, 0.0)
    up = bootstrap_lift(base * 1.1 + rng.normal(0, 0.05, 400).clip(0), base, 500)
    assert up[1] < up[0] < up[2] and up[1] > 0.05  # a 10% lift: the interval excludes 0
    noise = bootstrap_lift(rng.permutation(base), base, 500)
    assert noise[1] < 0 < noise[2]


def test_update_artifact_keeps_other_subcommands(tmp_path):
    from onemall_pl.artifacts import Manifest

    up = Manifest(stage="quantize", dataset="x", id="q1")
    update_artifact(tmp_path / "ev", "x", {"compare.md": "a"}, {"compare": {"m": 1}}, {"compare": {}}, [up])
    m = update_artifact(tmp_path / "ev", "x", {"rl_table4.md": "b"}, {"table4": {"Base": {}}}, {"rl": {}})
    m = load_manifest(tmp_path / "ev", stage="evaluate")
    assert set(m.files) == {"compare.md", "rl_table4.md"} and set(m.metrics) == {"compare", "table4"}
    assert m.upstream == {"quantize": "q1"} and set(m.config) == {"compare", "rl"}


def test_evaluate_rl_and_ab(pipeline, tmp_path):
    d, art = pipeline
    _rl(pipeline, "dpo", art / "rl_dpo", steps=1, lr=0.0)  # lr 0 (a fit with its logger): DPO = GRPO = Base
    _rl(pipeline, "grpo", art / "rl_grpo")
    man = load_manifest(art / "rl_grpo", stage="rl")
    assert set(man.upstream) == {"quantize", "pretrain", "reward"} and man.sizes["algo"] == "grpo"
    out = tmp_path / "evaluate"
    res = rl(data_dir=d, sid_artifact=str(art / "quantize"), requests=24, beam=50, top=[10, 50], hr_k=[5, 50],
             ab_k=10, bootstrap=200, batch_size=16, out=str(out))
    t4 = res["table4"]
    assert set(t4) == {"Base", "DPO", "GRPO"} and set(t4["Base"]) == {"Top10", "Top50"}
    for p in t4:
        row = t4[p]["Top10"]
        assert 0 < row["ctr"] < 1 and 0 < row["ctcvr"] < row["ctr"] and row["reward"] > 0
        assert 0 <= row["valid_sid"] <= 1 and 0 <= res["relevance"][p]["HR@50"] <= 1
        assert row == t4["Base"]["Top10"]  # the same weights answer the same
    assert t4["Base"]["Top10"]["reward"] >= t4["Base"]["Top50"]["reward"] - 1.0  # defined on both segments
    ov = res["offline_ab"]["overall"]
    assert ov["requests"] == 24 and ov["Base/exposures"] == pytest.approx(10.0)
    assert 0 < ov["Base/ctr"] < 1 and ov["GRPO/click_lift"] == 0.0 and ov["DPO/gmv_lift_ci95"] == [0.0, 0.0]
    m = load_manifest(out, stage="evaluate")
    assert {"rl_table4.md", "rl_table4.json", "ab.md"} <= set(m.files)
    assert json.loads((out / "rl_table4.json").read_text())["table4"]["GRPO"]["Top10"]["reward"] > 0
    assert "| Top10 | GRPO |" in (out / "rl_table4.md").read_text()
    # `ab` alone updates the same artifact and keeps Table 4
    res_ab = ab(data_dir=d, sid_artifact=str(art / "quantize"), requests=16, beam=20, k=5, bootstrap=100,
                batch_size=16, out=str(out))
    assert res_ab["overall"]["Base/exposures"] == pytest.approx(5.0)
    m = load_manifest(out, stage="evaluate")
    assert {"table4", "offline_ab", "relevance"} <= set(m.metrics) and "ab.json" in m.files


@pytest.mark.slow
def test_rl_raises_top10_reward_on_a_tiny_world(pipeline, tmp_path):
    """Train GRPO and DPO from the pretrained policy with the trained ranking model as reward; on held-out
    requests the mean fused reward of the beam's Top10 rises over Base."""
    d, art = pipeline
    torch.manual_seed(0)
    kw = {"replay_fraction": 0.25, "group_size": 32, "grpo_samples": 16, "sync_every": 10, "rl_weight": 1.0,
          "lr": 1e-3, "warmup_steps": 1}
    _rl(pipeline, "grpo", tmp_path / "rl_grpo", steps=60, **kw)
    _rl(pipeline, "dpo", tmp_path / "rl_dpo", steps=60, dpo_beta=0.5, **kw)
    pols = {"Base": str(art / "pretrain"), "DPO": str(tmp_path / "rl_dpo"), "GRPO": str(tmp_path / "rl_grpo")}
    res = rl(data_dir=d, policies=pols, sid_artifact=str(art / "quantize"), requests=64, beam=50, top=[10, 50],
             hr_k=[50], ab_k=10, bootstrap=200, batch_size=32, out=str(tmp_path / "evaluate"))
    t4 = res["table4"]
    base = t4["Base"]["Top10"]["reward"]
    assert t4["GRPO"]["Top10"]["reward"] > base and t4["DPO"]["Top10"]["reward"] > base, t4
