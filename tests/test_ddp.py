"""DDP on CPU (gloo, 2 processes): metrics reduce across ranks to the one-process value, the
two-tower module's in-batch negatives gathered across ranks give the one-process loss and
gradients, and a stage launched with ``configs/trainer/ddp.yaml`` trains each rank on its own
share of the data.

The helpers here are the project's one way to run a test on 2 ranks: :func:`run_ranks` (a function
per rank, spawned), :func:`fit_ddp` (the `onemall <stage> fit` command, re-launched by Lightning),
:func:`fit_stages_ddp` (several stages' fits in one world), with :class:`SeenRows` recording what
each rank trained on and :func:`assert_disjoint_shares` checking it. tests/test_ddp_stages.py uses
them for quantize, rl, sasrec, rqvae and tiger. Covered beside their stages: cross-rank negatives,
identical MoE biases and HR@K over 2 ranks = over 1 for pretrain (tests/test_pretrain.py),
gathered negatives of the tokenizer (tests/test_tokenizer.py), rank sharding of the Parquet
stream (tests/test_datasets.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import socket
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback

from onemall_pl.data.schema import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]


def _data(seed: int = 0, B: int = 23, K: int = 10, T: int = 3, N: int = 40, E: int = 301):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    topk[0, 7:] = -1  # a short list
    targets = torch.randint(0, N, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.3] = -1
    targets[:, 0] = torch.randint(0, N, (B,), generator=g)  # every request has a target
    scenario = torch.randint(0, len(SCENARIOS), (B,), generator=g)
    preds = torch.rand(E, generator=g).round(decimals=2)  # ties, as real scores have
    labels = (torch.rand(E, generator=g) < preds).long()
    users = torch.randint(0, 17, (E,), generator=g)
    return (topk, targets, scenario), (preds, labels, users)


def _metrics(ret, auc, rows_ret=slice(None), rows_auc=slice(None)):
    from torchmetrics.classification import BinaryAUROC

    from onemall_pl.metrics import RetrievalMetrics
    from onemall_pl.reward import GroupedAUROC

    m = RetrievalMetrics(hr_k=(1, 5, 10), ndcg_k=(5,))
    m.update(*(x[rows_ret] for x in ret))
    out = m.compute()
    preds, labels, users = (x[rows_auc] for x in auc)
    gauc, bauc = GroupedAUROC(), BinaryAUROC()
    gauc.update(preds, labels, users)
    bauc.update(preds, labels)
    out["gauc"], out["auc"] = float(gauc.compute()), float(bauc.compute())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Failed(str):
    """A rank's traceback."""


def _rank_main(fn, rank: int, world: int, port: int, init_group: bool, q, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # what torchrun sets: Lightning's DDP strategy then joins this world instead of launching one
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    if init_group:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buf = io.BytesIO()  # bytes, not tensors: a tensor in a queue is shared through the sender, gone once it exits
        torch.save(fn(rank, world, *args), buf)
        q.put((rank, buf.getvalue()))
    except BaseException:  # reported to the parent, which fails the test
        q.put((rank, _Failed(traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2, init_group: bool = True, timeout: float = 300) -> dict:
    """``{rank: fn(rank, world, *args)}``, each rank a spawned process on one gloo world.

    ``init_group``: join the process group before calling ``fn``; ``False`` leaves it to a
    Lightning ``Trainer(strategy="ddp", devices=world)`` made in ``fn`` (the torchrun variables
    are set). ``fn`` and its arguments must be picklable (module-level)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, init_group, q, args)) for r in range(world)]
    for p in procs:
        p.start()
    got, waited = {}, 0.0
    try:
        while len(got) < world:
            try:
                rank, res = q.get(timeout=2)
            except queue.Empty:
                waited += 2
                assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
                assert waited < timeout, f"ranks still running after {timeout} s"
                continue
            assert not isinstance(res, _Failed), f"rank {rank} failed:\n{res}"
            got[rank] = torch.load(io.BytesIO(res), weights_only=True)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0, p.exitcode
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return got


def _metrics_share(rank: int, world: int):
    ret, auc = _data()
    # uneven, interleaved shares: rank 0 gets 12 requests, rank 1 gets 11
    return _metrics(ret, auc, slice(rank, None, world), slice(rank, None, world))


@pytest.mark.multiprocess
def test_metrics_over_two_ranks_equal_one():
    """HR@K / NDCG@K per scenario (RetrievalMetrics: summed states), AUC and GAUC (concatenated
    states) computed on 2 gloo ranks, each with part of the data, equal the 1-process values."""
    got = run_ranks(_metrics_share)
    want = _metrics(*_data())
    assert want["requests"]["overall"] == 23 and len(want["requests"]) > 2  # several scenarios
    for rank in (0, 1):
        assert got[rank].keys() == want.keys()
        for scope, row in want.items():
            if isinstance(row, dict):
                for k, v in row.items():
                    assert got[rank][scope][k] == pytest.approx(v, rel=1e-12), (rank, scope, k)
            else:
                assert got[rank][scope] == pytest.approx(row, rel=1e-6), (rank, scope)


# ----------------------------------------------------------------------------- a stage under ddp.yaml


def row_digests(batch, prefix: str = "") -> dict[str, list[str]]:
    """``{path: [digest of row 0, row 1, ...]}`` for every tensor of a (nested dict / list) batch,
    the path naming it (``click.sid``, ``product.0``): what identifies the rows a rank was given."""
    if isinstance(batch, dict):
        items = batch.items()
    elif isinstance(batch, list | tuple):
        items = enumerate(batch)
    else:
        if isinstance(batch, torch.Tensor) and batch.ndim:
            rows = batch.detach().cpu().contiguous().reshape(len(batch), -1).numpy()
            return {prefix: [hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in rows]}
        return {}
    out: dict[str, list[str]] = {}
    for k, v in items:
        out.update(row_digests(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def row_keys(digests: dict[str, list[str]], paths: Sequence[str]) -> list[tuple[str, ...]]:
    """The rows as tuples of their digests at ``paths``."""
    return list(zip(*(digests[p] for p in paths)))


def weights_digest(module: torch.nn.Module) -> str:
    """One digest of every tensor of the module's state dict (bit-exact)."""
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SeenRows(Callback):
    """Run inside `onemall <stage> fit` (``--trainer.callbacks+=test_ddp.SeenRows``): writes the
    :func:`row_digests` of every training batch this rank was given and the digest of its weights
    after training to ``<out>/seen<rank>.json``.
    ``export``: at the end of training every rank calls the module's ``export_artifact(trainer,
    datamodule, <out>/artifact)`` (rank 0 must write it, the others return None)."""

    def __init__(self, out: str, export: bool = False):
        self.out, self.export, self.seen = Path(out), export, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for k, v in row_digests(batch).items():
            self.seen.setdefault(k, []).extend(v)

    def on_train_end(self, trainer, pl_module):
        rec = {"world": trainer.world_size, "seen": self.seen, "steps": trainer.global_step,
               "weights": weights_digest(pl_module)}
        if self.export:
            m = pl_module.export_artifact(trainer, trainer.datamodule, self.out / "artifact")
            rec["exported"] = m is not None
            trainer.strategy.barrier()  # rank 1 records after rank 0 has written
            rec["artifact_seen_by_rank"] = (self.out / "artifact" / "manifest.json").exists()
        (self.out / f"seen{trainer.global_rank}.json").write_text(json.dumps(rec))


def ddp_args(out: Path, export: bool = False) -> list[str]:
    """The arguments that put `onemall <stage> fit` on 2 CPU ranks under ddp.yaml, with :class:`SeenRows`."""
    return ["-c", str(ROOT / "configs/trainer/ddp.yaml"), "--allow_any_class", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.callbacks+=test_ddp.SeenRows", f"--trainer.callbacks.out={out}",
            f"--trainer.callbacks.export={str(export).lower()}"]


def read_seen(out: Path, export: bool = False) -> list[dict]:
    """Each rank's :class:`SeenRows` record, after checking that both ranks end with the same weights
    and, with ``export``, that rank 0 alone wrote the artifact."""
    seen = [json.loads((out / f"seen{k}.json").read_text()) for k in (0, 1)]
    assert [s["world"] for s in seen] == [2, 2]
    assert seen[0]["weights"] == seen[1]["weights"], "the ranks ended with different weights"
    if export:
        assert [s["exported"] for s in seen] == [True, False]  # rank 0 wrote, rank 1 returned None
        assert all(s["artifact_seen_by_rank"] for s in seen)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    return seen


def fit_ddp(stage: str, args: Sequence[str], out: Path, export: bool = False, timeout: float = 600) -> list[dict]:
    """``onemall <stage> fit ARGS -c configs/trainer/ddp.yaml --trainer.devices 2`` on CPU, the command
    a user runs (Lightning re-launches it for rank 1); returns :func:`read_seen`."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onemall_pl.cli", stage, "fit", *args, *ddp_args(out, export)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")])}
    env.pop("ONEMALL_ALLOW_ANY_CLASS", None)  # the flag itself must reach the re-launched rank
    r = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=timeout, cwd=out)
    assert r.returncode == 0, r.stderr[-4000:]
    return read_seen(out, export)


def _fit_stages(rank: int, world: int, runs: list[tuple[str, list[str]]]) -> None:
    from onemall_pl.cli import main

    for stage, argv in runs:
        main([stage, "fit", *argv])


def fit_stages_ddp(runs: Sequence[tuple[str, Sequence[str], Path, bool]], timeout: float = 600) -> dict[Path, list]:
    """Several ``(stage, args, out, export)`` fits, one after the other, in one 2-rank world
    (:func:`run_ranks`; each stage's CLI runs in the rank's process and its trainer joins the world):
    the processes start once. Returns ``{out: read_seen(out)}``."""
    for _, _, out, _ in runs:
        out.mkdir(parents=True, exist_ok=True)
    run_ranks(_fit_stages, [(stage, [*args, *ddp_args(out, export)]) for stage, args, out, export in runs],
              init_group=False, timeout=timeout)
    return {out: read_seen(out, export) for _, _, out, export in runs}


def assert_disjoint_shares(seen: list[dict], want: list, paths: Sequence[str], extra: int = 1,
                           missing: int = 1) -> None:
    """The rows of the 2 ranks (keyed by ``paths``) together are ``want`` (a multiset), each rank
    given about half: no row on both ranks beyond ``extra`` repeats that even out the shares
    (DistributedSampler-style), at most ``missing`` rows left out (even shares, dropped tails)."""
    from collections import Counter

    got = [Counter(row_keys(s["seen"], paths)) for s in seen]
    want_c = Counter(want)
    n = len(want)
    both = got[0] + got[1]
    assert sum((both - want_c).values()) <= extra, "rows given to both ranks, or twice to one"
    assert sum((want_c - both).values()) <= missing, "training rows no rank was given"
    for g in got:
        assert sum(g.values()) >= (n - missing) // 2, "a rank was given less than its half"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_reward_stage_shards_its_data_across_two_ranks(tmp_path):
    """`onemall reward fit -c ... -c configs/trainer/ddp.yaml --trainer.devices 2` on CPU: both ranks
    train, on disjoint shares that together cover the training exposures (a class from outside
    the allowed packages, passed with --allow_any_class, reaches the re-launched rank too)."""
    from onemall_pl.reward import EventsDataModule
    from test_reward import planted_dataset

    data = planted_dataset(tmp_path)
    seen = fit_ddp("reward", ["-c", str(ROOT / "configs/reward/tiny.yaml"), "--trainer.max_epochs", "1",
                              "--trainer.precision", "32-true", "--trainer.limit_val_batches", "0",
                              "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(tmp_path / "run"),
                              "--data.data_dir", str(data), "--data.num_price_bands", "4", "--data.batch_size", "256"],
                   tmp_path / "out")
    dm = EventsDataModule(str(data), num_price_bands=4, batch_size=4096)
    dm.setup("fit")
    keys = ("user_id", "ts", "item")
    want = [k for b in dm.train_dataloader() for k in row_keys(row_digests(b), keys)]
    assert len(want) == dm.split_counts["train"]
    assert_disjoint_shares(seen, want, keys)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    n0 = len(seen[0]["seen"]["item"])
    assert state["global_step"] == seen[0]["steps"] == n0 // 256 + (n0 % 256 > 0)


# ----------------------------------------------------------------------------- in-batch negatives

def _tt_batch(rows: slice | list) -> dict:
    """Rows of a fixed 12-row two-tower batch: items repeat within and across halves, logq set."""
    g = torch.Generator().manual_seed(3)
    item = torch.tensor([1, 2, 3, 4, 5, 1, 2, 6, 7, 3, 8, 2])  # 1, 2, 3 on both halves; 2 twice on the second
    full = {"user": {"clicks": torch.randint(1, 13, (12, 4), generator=g)}, "item": {"item": item},
            "item_id": item, "logq": torch.log(torch.rand(12, generator=g) * 0.5 + 0.01)}
    take = lambda d: {k: take(v) if isinstance(v, dict) else v[rows] for k, v in d.items()}
    return take(full)


def _tt_module():
    from onemall_pl.models.twotower import FeatureTower, TowerConfig
    from onemall_pl.twotower import TwoTowerModule

    torch.manual_seed(0)
    user = FeatureTower(TowerConfig({"clicks": 13}, 8, 16, 8))
    item = FeatureTower(TowerConfig({"item": 13}, 8, 16, 8))
    return TwoTowerModule(user, item, lr=0.1, temperature=0.2)


def _tt_step(batch: dict, devices: int, root: str):
    """One training step on ``batch`` (this rank's); returns (loss, gradients after DDP's reduce,
    the trained module)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    class Grab(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.loss = float(outputs["loss"])

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}

    m, grab = _tt_module(), Grab()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=root,
                         callbacks=[grab])
    trainer.fit(m, torch.utils.data.DataLoader([batch], batch_size=None))
    return grab.loss, grab.grads, m


def _tt_rank(rank: int, world: int, root: str):
    b = 12 // world
    loss, grads, m = _tt_step(_tt_batch(slice(rank * b, (rank + 1) * b)), world, root)
    with torch.no_grad():  # uneven shares (rank 0: 7 rows, rank 1: 5), as last batches may be
        uneven = m.logits(_tt_batch(slice(0, 7) if rank == 0 else slice(7, 12)))
    return loss, grads, uneven


@pytest.mark.slow
@pytest.mark.multiprocess
def test_twotower_negatives_gathered_across_ranks(tmp_path):
    """2 ranks with 6 rows each train on the loss and gradients of 1 process with the 12 rows:
    every user scores against the positives of both ranks, labels offset by rank, a positive's
    duplicates on either rank masked, logQ of the other rank's items applied. Uneven shares give
    each rank its rows of the 1-process logits (padding columns masked)."""
    got = run_ranks(_tt_rank, str(tmp_path), init_group=False)
    want_loss, want_grads, m = _tt_step(_tt_batch(slice(None)), 1, str(tmp_path))
    with torch.no_grad():
        want_logits = m.logits(_tt_batch(slice(None)))
    assert torch.isinf(want_logits[0, 5]) and torch.isinf(want_logits[6, 11])  # duplicates across halves and within
    ddp_loss = sum(got[r][0] for r in (0, 1)) / 2
    assert ddp_loss == pytest.approx(want_loss, rel=1e-5)
    assert got[0][0] != pytest.approx(got[1][0], rel=1e-3)  # the ranks saw different rows
    for r in (0, 1):
        assert got[r][1].keys() == want_grads.keys() and len(want_grads) > 4
        for k, g in want_grads.items():
            torch.testing.assert_close(got[r][1][k], g, rtol=1e-4, atol=1e-6, msg=k)
    # uneven: rank 0's 7 rows against [7 of rank 0, 7 slots of rank 1 of which 5 real]
    lg0, lg1 = got[0][2], got[1][2]
    assert lg0.shape == (7, 14) and lg1.shape == (5, 14)
    cols = list(range(7)) + list(range(7, 12))
    for lg, rows in ((lg0, slice(0, 7)), (lg1, slice(7, 12))):
        assert torch.isinf(lg[:, 12:]).all()  # rank 1's padding
        torch.testing.assert_close(lg[:, cols], want_logits[rows], rtol=1e-4, atol=1e-5)
