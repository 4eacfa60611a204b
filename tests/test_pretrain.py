"""Stage 3 (pretrain): data module -> batch contract, Eq. 7 loss, overfitting, codebook checks, export,
DDP (2 gloo processes) and resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from onemall_pl.artifacts import ArtifactError, load_manifest, write_artifact
from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.io import read_table
from onemall_pl.models.decoder import BEHAVIOURS, OneMallConfig

ROOT = Path(__file__).resolve().parents[1]
SIZES = [8, 8, 16]


def fixture_sid_artifact(data_dir: Path, out: Path, codebook_sizes=SIZES, seed: int = 0) -> Path:
    """A quantize artifact as stage 2 writes it (sid_table + manifest sizes), with category-derived SIDs:
    level 1 from the L1 category, level 2 from the L3 category, level 3 random. Entertainment videos
    (no product) get no SID, as in the quantize stage."""
    items = read_table(data_dir, "items", ["item_id", "item_type", "category", "product_id"], validate=False)
    cat = ItemCatalog.load(data_dir)
    idx = cat.index_of(items.column("item_id").to_numpy(), table="items")
    keep = ~((items.column("item_type").to_numpy(zero_copy_only=False) == "video")
             & np.asarray(items.column("product_id").is_null().to_numpy(zero_copy_only=False)))
    rng = np.random.default_rng(seed)
    c = cat.category.numpy()[idx]
    sid = np.stack([c[:, 0] % codebook_sizes[0], c[:, 2] % codebook_sizes[1],
                    rng.integers(0, codebook_sizes[2], len(idx))], axis=1)[keep].astype(np.int32)
    t = pa.table({"item_id": items.column("item_id").filter(pa.array(keep)),
                  "item_type": items.column("item_type").filter(pa.array(keep)),
                  "sid": pa.array(list(sid), pa.list_(pa.int32()))})

    def build(tmp: Path) -> None:
        (tmp / "sid_table").mkdir()
        pq.write_table(t, tmp / "sid_table" / "part-00000.parquet")

    write_artifact(out, build, stage="quantize", dataset=data_dir.name, sizes={"codebook_sizes": list(codebook_sizes)})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from onemall_pl.data import build as B
    from onemall_pl.data.synth import generate

    root = tmp_path_factory.mktemp("pretrain")
    d = root / "micro"
    generate(d, preset="micro", seed=0)
    B.build(d, max_exposure=64, max_click=16, max_order=8)
    q = fixture_sid_artifact(d, root / "artifacts" / "micro" / "quantize")
    return d, q, root


def _dm(world, **kw):
    from onemall_pl.pretrain import SamplesDataModule

    d, q, _ = world
    return SamplesDataModule(str(d), str(q), **{"batch_size": 16, "eval_batch_size": 32, "max_exposure": 12,
                                                "max_click": 8, "max_order": 4, "max_targets": 4, **kw})


def _module(dm, **kw):
    from onemall_pl.pretrain import PretrainModule

    net = OneMallConfig(dim=32, n_heads=4, ffn_hidden=64, item_dim=16, n_queries=2, emb_dim=16,
                        **kw.pop("net", {}))
    kw.setdefault("beam", 50)
    kw.setdefault("hr_k", (5, 50))
    return PretrainModule(net=net, sizes=dm.sizes, sid_source=dm.sid_source, **kw)


def test_datamodule_batch_contract(world):
    dm = _dm(world)
    assert dm.sizes["codebook_sizes"] == SIZES and dm.sizes["max_seq_len"] == 12
    batch = next(iter(dm.train_dataloader()))
    B = len(batch["scenario"])
    assert B == 16
    samples = read_table(world[0], "samples", validate=False)
    for b, L in zip(BEHAVIOURS, (12, 8, 4)):
        seq = batch[b]
        assert seq["sid"].shape == (B, L, 3) and seq["cat"].shape == (B, L, 3)
        assert seq["price"].shape == seq["shop"].shape == seq["mask"].shape == (B, L)
        # right-padded: a real item never follows a pad
        m = seq["mask"].long()
        assert (m[:, 1:] <= m[:, :-1]).all()
        for lvl, c in enumerate(SIZES):
            assert seq["sid"][..., lvl].max() < c
    tgt = batch["target"]
    assert tgt["sid"].shape == (B, 4, 3) and tgt["item"].shape == (B, 4) and tgt["mask"].any(1).all()
    # most recent first: position 0 of the click sequence is the last click of the request's history
    dm2 = _dm(world)
    t = samples.filter(pa.compute.equal(samples.column("split"), "valid"))
    eb = dm2.collate(t.slice(0, 8).append_column("row", pa.array(np.arange(8))))
    cat = dm2.catalog
    for i in range(8):
        clicks = [x for x in t.column("seq_click")[i].as_py() if dm2.sids.has_sid[cat.index_of([x])[0]]]
        if clicks:
            want = dm2.sids.sid[cat.index_of([clicks[-1]])[0]]
            assert eb["click"]["sid"][i, 0].tolist() == want.tolist()
            assert int(eb["click"]["mask"][i].sum()) == min(len(clicks), 8)
        assert sorted(x for x in eb["target_ids"][i].tolist() if x >= 0) == sorted(t.column("targets")[i].as_py())


def test_items_without_sid_are_dropped_from_sequences(world):
    from onemall_pl.pretrain import _keep, _window

    off, vals = np.array([0, 3, 3, 5]), np.array([10, 11, 12, 13, 14])
    o2, v2 = _keep(off, vals, np.array([True, False, True, True, False]))
    assert o2.tolist() == [0, 2, 2, 3] and v2.tolist() == [10, 12, 13]
    ids, mask = _window(o2, v2, 3, newest_first=True)
    assert ids.tolist() == [[12, 10, 0], [0, 0, 0], [13, 0, 0]]
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, False, False]]


def test_gathered_contrastive_equals_model_loss_on_one_process(world):
    dm = _dm(world)
    module = _module(dm)
    module.eval()
    batch = next(iter(dm.train_dataloader()))
    out = module.model(batch)
    con, _ = module.contrastive(out, batch["target"]["mask"])
    assert torch.allclose(con, module.model.loss(out)["contrastive"], atol=1e-6)


def _trainer(tmp_path, **kw):
    import lightning.pytorch as pl

    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
          "default_root_dir": str(tmp_path), **kw}
    return pl.Trainer(**kw)


def test_tiny_model_overfits_a_few_samples(world, tmp_path):
    """Teacher-forced Acc-SID reaches ~1 on a handful of training requests (and beam search finds them)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from onemall_pl.pretrain import _EvalBatches

    pl.seed_everything(0)
    dm = _dm(world)
    t = dm.eval_table("train")
    one = np.flatnonzero(pa.compute.list_value_length(t.column("targets")).to_numpy() == 1)[:8]
    few = t.take(one)  # one target each: two targets under one prefix could not both be top-1
    batch = dm.collate(few)
    module = _module(dm, lr=1e-2, warmup_steps=5, beam_requests=None,
                     net={"n_layers": 1, "n_experts": 4, "top_k": 2, "contrastive_weight": 0.1})
    module.attach_data(dm)
    _trainer(tmp_path, max_steps=80).fit(module, train_dataloaders=DataLoader([batch] * 80, batch_size=None))
    res = module.evaluate(DataLoader(_EvalBatches(few, 8, dm.collate), batch_size=None), leave_one_out=False)
    assert res["Acc-SID1"] > 0.95 and res["Acc-SID2"] > 0.95 and res["Acc-SID3"] > 0.95, res
    assert res["HR@50"] > 0.9, res


def test_codebook_mismatch_is_a_clear_error(world, tmp_path):
    from onemall_pl.pretrain import PretrainModule, SamplesDataModule

    dm = _dm(world)
    module = _module(dm)
    state = module.state_dict()
    other = fixture_sid_artifact(world[0], tmp_path / "q2", codebook_sizes=[8, 8, 32])
    dm2 = SamplesDataModule(str(world[0]), str(other), max_exposure=12, max_click=8, max_order=4)
    module2 = PretrainModule(net=module.cfg, sizes=dm2.sizes, sid_source=dm2.sid_source)
    with pytest.raises(ArtifactError, match=r"codebook_sizes \[8, 8, 16\].*q2.*\[8, 8, 32\]"):
        module2.load_state_dict(state)
    # a model built without the link: the data module's manifest disagrees
    with pytest.raises(ArtifactError, match=r"q2.*\[8, 8, 32\].*\[8, 8, 16\]"):
        module.attach_data(dm2)
    # a sid_table whose codes exceed the manifest's codebooks
    bad = fixture_sid_artifact(world[0], tmp_path / "q3", codebook_sizes=[8, 8, 16])
    m = json.loads((bad / "manifest.json").read_text())
    m["sizes"]["codebook_sizes"] = [8, 8, 4]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"outside the manifest's codebook_sizes \[8, 8, 4\]"):
        SamplesDataModule(str(world[0]), str(bad))


def test_fit_validate_export_and_load(world, tmp_path):
    from onemall_pl.pretrain import load_pretrained

    dm = _dm(world)
    module = _module(dm, beam_requests=16, net={"n_layers": 2, "n_experts": 4, "top_k": 2})
    trainer = _trainer(tmp_path, max_steps=6, val_check_interval=3, check_val_every_n_epoch=None,
                       limit_val_batches=1)
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    for k in ("val/Acc-SID1", "val/Acc-SID3", "val/HR@50", "val/product_card/HR@5", "moe/max_violation"):
        assert k in logged, sorted(logged)
    assert 0 <= float(logged["val/HR@50"]) <= 1
    m = module.export_artifact(trainer, dm, tmp_path / "art")
    man = load_manifest(tmp_path / "art", stage="pretrain")
    assert man.upstream == {"quantize": load_manifest(world[1]).id}
    assert man.sizes["codebook_sizes"] == SIZES and man.metrics["test"]["beam_requests"] == 16
    assert {"Acc-SID1", "HR@5", "HR@50", "product_card/Acc-SID1"} <= set(man.metrics["test"])
    model, _ = load_pretrained(tmp_path / "art", quantize=world[1])
    sd = torch.load(m.file("model.pt"), weights_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    other = fixture_sid_artifact(world[0], tmp_path / "q4", codebook_sizes=[8, 8, 32])
    with pytest.raises(ArtifactError, match="codebook_sizes"):
        load_pretrained(tmp_path / "art", quantize=other)


def test_configs_build_with_linked_sizes(world):
    """CPU configs build end to end with sizes linked from the data (tests/test_configs.py parses every
    YAML); the GPU presets are Table 1's rows (checked against decoder.PRESETS, not built: 1.3B weights)."""
    import yaml

    from onemall_pl.models.decoder import PRESETS
    from onemall_pl.pretrain import PretrainCLI, PretrainModule, SamplesDataModule

    d, q, _ = world
    for name in ("tiny.yaml", "ml100k.yaml"):
        cli = PretrainCLI(PretrainModule, SamplesDataModule, run=False,
                          args=["-c", str(ROOT / "configs/pretrain" / name), "--data.data_dir", str(d),
                                "--data.sid_artifact", str(q), "--trainer.accelerator", "cpu"])
        assert cli.model.cfg.codebook_sizes == tuple(SIZES), name  # linked, not typed
        assert cli.model.cfg.n_shops == cli.datamodule.catalog.sizes["num_shops"]
        assert cli.model.sid_source == str(q)
    rows = {"paper-0.05b": "0.05B", "paper-0.1b": "0.1B", "paper-0.5b-a0.1b": "0.5B-A0.1B",
            "paper-1.3b-a0.1b": "1.3B-A0.1B"}
    for f, row in rows.items():
        net = yaml.safe_load((ROOT / "configs/pretrain" / f"{f}.yaml").read_text())["model"]["net"]
        want = PRESETS[row]
        for k in ("n_layers", "dim", "ffn_hidden", "n_heads", "n_experts", "top_k", "gated_ffn", "item_dim",
                  "n_queries"):
            assert net[k] == getattr(want, k), (f, k)


# ----------------------------------------------------------------------------- DDP and resume (subprocesses)

SCRIPT = r'''
import json, os, signal, sys
from pathlib import Path
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from onemall_pl.models.decoder import OneMallConfig
from onemall_pl.pretrain import PretrainModule, SamplesDataModule

torch.set_num_threads(1)
mode, devices, data, q, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
max_steps = int(sys.argv[6]) if len(sys.argv) > 6 else 4
pl.seed_everything(0)
dm = SamplesDataModule(data, q, batch_size=8, eval_batch_size=16, max_exposure=12, max_click=8, max_order=4,
                       max_targets=4)
net = OneMallConfig(dim=32, n_heads=4, ffn_hidden=64, item_dim=16, n_queries=2, emb_dim=16, n_layers=1,
                    n_experts=4, top_k=2, bias_update_rate=0.01)
module = PretrainModule(net=net, sizes=dm.sizes, sid_source=dm.sid_source, beam=50, hr_k=(5, 50),
                        beam_requests=None, warmup_steps=2)


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_last=True)]
if mode == "kill":
    callbacks.append(KillAt(int(sys.argv[7])))
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                     max_steps=max_steps, logger=False, callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=str(out))
rank = trainer.global_rank
if mode in ("fit", "kill", "resume"):
    last = out / "ckpt" / "last.ckpt"
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if mode == "resume" and last.exists() else None)
    torch.save({k: v for k, v in module.model.state_dict().items() if "expert_bias" in k}, out / f"bias{rank}.pt")
    trainer.save_checkpoint(out / "model.ckpt")
    if rank == 0:
        torch.save(module.model.state_dict(), out / "final.pt")
else:
    trainer.test(module, datamodule=dm, ckpt_path=str(out / "model.ckpt"), verbose=False)
    if rank == 0:
        (out / f"test{devices}.json").write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))
'''


def _run(tmp_path, world, *args, timeout=600):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    d, q, _ = world
    res = subprocess.run([sys.executable, str(script), args[0], str(args[1]), str(d), str(q), *map(str, args[2:])],
                         cwd=tmp_path, env=env, capture_output=True, check=False, text=True, timeout=timeout)
    return res


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_cpu_processes(world, tmp_path):
    """2 gloo processes: fit (cross-rank negatives, all-reduced MoE loads: identical biases on both
    ranks), then test metrics over 2 ranks equal those over 1 on the same checkpoint."""
    out = tmp_path / "out"
    res = _run(tmp_path, world, "fit", 2, out)
    assert res.returncode == 0, res.stderr[-3000:]
    b0, b1 = torch.load(out / "bias0.pt"), torch.load(out / "bias1.pt")
    assert b0.keys() == b1.keys() and b0
    for k in b0:
        assert torch.equal(b0[k], b1[k]), k
        assert b0[k].abs().sum() > 0  # the balancer did move them
    for devices in (2, 1):
        res = _run(tmp_path, world, "test", devices, out)
        assert res.returncode == 0, res.stderr[-3000:]
    m2, m1 = (json.loads((out / f"test{n}.json").read_text()) for n in (2, 1))
    assert m1.keys() == m2.keys() and "test/HR@50" in m1 and "test/short_video/Acc-SID1" in m1
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], abs=1e-6), k


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(world, tmp_path):
    """kill -9 mid-epoch after a checkpoint, rerun with the last checkpoint: the same final weights
    (model, optimiser, schedule, MoE biases and stream position restored) as a run never killed."""
    a, b = tmp_path / "a", tmp_path / "b"
    steps = 14  # the micro world's train split is a few batches of 8: this crosses epochs
    res = _run(tmp_path, world, "fit", 1, a, steps)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(tmp_path, world, "kill", 1, b, steps, 8)  # checkpoints at 3, 6; killed at 8
    assert res.returncode == -9, res.stderr[-3000:]
    res = _run(tmp_path, world, "resume", 1, b, steps)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


@pytest.mark.slow
def test_sweep_writes_table1_and_table6(world, tmp_path):
    from onemall_pl.pretrain import sweep

    d, q, _ = world
    table = sweep(config=str(ROOT / "configs/pretrain/tiny.yaml"), rows=["dense-2L"], table6=True, max_steps=2,
                  data_dir=str(d), sid_artifact=str(q), out=str(tmp_path / "art"), runs_dir=str(tmp_path / "runs"),
                  extra=["--model.beam_requests", "8", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                         "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    assert [r["row"] for r in table["table1"]] == ["dense-2L"]
    qf, full = table["table6"]
    assert qf["context_len"] < full["context_len"] and qf["gflops_per_sample"] < full["gflops_per_sample"]
    assert qf["params_active"] < qf["params_total"]  # moe-12/2: 2 of 12 experts active
    m = load_manifest(tmp_path / "art", stage="pretrain_sweep")
    assert "HR@500" in (tmp_path / "art" / "tables.md").read_text() and m.upstream["quantize"]
