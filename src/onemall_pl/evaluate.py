"""``onemall evaluate ...``: replay held-out requests through trained policies, side by side.

    onemall evaluate rl --data_dir data/synth     # paper Table 4 + the offline A/B (Table 3 analogue)
    onemall evaluate ab --data_dir data/synth     # the offline A/B alone
    onemall evaluate compare --data_dir data/synth  # paper Table 2: SASRec vs TIGER vs OneMall, HR@K per scenario

Each command is a typed function; jsonargparse builds the parser from its signature and docstring.
Results go into the ``evaluate`` artifact (``artifacts/<dataset>/evaluate/``, stage ``evaluate``):
each subcommand replaces its own files and metric keys and keeps the others' (:func:`update_artifact`),
and the folder is republished whole (atomic rename).

**Table 4** (``rl``, paper §4.4). Base (the pretrain artifact), DPO and GRPO (``rl_dpo``, ``rl_grpo``)
answer the same held-out requests (the first ``requests`` of the split in a seeded order) with the
trie-constrained beam search of width ``beam`` over the scenario's item type; SIDs expand to their items
(collided SIDs to all of them, most clicked first) as for HR@K. For the Top-N items of each list
(N in ``top``) the ranking model (the reward artifact) predicts CTR, CTCVR, EGPM ("GPM" in the paper; here
the expected GMV per 1000 exposures, a money figure, where the paper prints a rate) and the fused reward (Eq. 8); a request's figure is the mean over its N items, the table the mean over
requests. Beside them, what RL may cost in relevance: HR@K (held-out positives in the top K), Acc-SID
(teacher-forced top-1 per level) and the valid-SID rate (the share of the model's *unconstrained*
top-N beams, no trie, that are the SID of an item of the scenario's type). RL raising the reward
while lowering HR or validity is what the paper warns about when the RL weight is too large.

**Offline A/B** (``rl`` and ``ab``, synthetic datasets). The simulator's oracle
(:meth:`onemall_pl.data.synth.World.expected_batch`) gives each (user, time, scenario, item) its true
click probability, P(click and order) and expected GMV; a policy's list for a request is its Top-``ab_k``
items, so per request its expected clicks, orders and GMV are sums over the list, exposures its length.
Lifts of DPO and GRPO over Base are ratios of means over the same requests, minus 1, overall and per
scenario; the 95% interval is a paired bootstrap over requests (``bootstrap`` resamples: the same
requests drawn for both policies, percentiles 2.5 / 97.5).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# heavy imports (torch, the stages) stay inside the commands, so `onemall evaluate -h` answers at once

TABLE4_COLUMNS = ("ctr", "ctcvr", "egpm", "reward")
AB_METRICS = ("exposures", "clicks", "orders", "gmv")


# ----------------------------------------------------------------------------- the evaluate artifact


def update_artifact(dest: str | Path, dataset: str, files: dict[str, str], metrics: dict, config: dict,
                    upstream: Sequence[Any] = ()) -> Any:
    """Republish the ``evaluate`` artifact ``dest`` with ``files`` (relative path -> text) and ``metrics`` /
    ``config`` keys replaced, keeping the files, metrics, config and upstream ids that other subcommands
    put there. Written whole or not at all (:func:`onemall_pl.artifacts.write_artifact`)."""
    from onemall_pl.artifacts import ArtifactError, Manifest, load_manifest, write_artifact

    dest = Path(dest)
    old = None
    if (dest / "manifest.json").exists():
        try:
            old = load_manifest(dest, stage="evaluate")
        except ArtifactError as e:
            raise ArtifactError(f"{e}; remove {dest} or fix it, it will not be overwritten") from None

    def build(tmp: Path) -> None:
        if old is not None:
            for rel in old.files:
                if rel not in files:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(dest / rel, tmp / rel)
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)

    ups = {u.stage: u for u in upstream}
    if old is not None:
        for stage, uid in old.upstream.items():
            ups.setdefault(stage, Manifest(stage=stage, dataset=dataset, id=uid))
    return write_artifact(dest, build, stage="evaluate", dataset=dataset,
                          config={**(old.config if old else {}), **config}, upstream=list(ups.values()),
                          metrics={**(old.metrics if old else {}), **metrics})


# ----------------------------------------------------------------------------- replay


def _requests(data_dir: Path, split: str, n: int, seed: int):
    """The first ``n`` requests of ``split`` in a seeded order, with user id and time (for the oracle)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from onemall_pl.data.schema import DataError
    from onemall_pl.io import read_table
    from onemall_pl.pretrain import SAMPLE_COLUMNS

    cols = [*SAMPLE_COLUMNS, "user_id", "ts"]
    t = read_table(data_dir, "samples", columns=[*cols, "split"], validate=False)
    t = t.filter(pc.equal(t.column("split"), split)).select(cols).combine_chunks()
    if t.num_rows == 0:
        raise DataError(f"no {split} request", table="samples", column="split", file=str(data_dir))
    perm = np.random.default_rng([seed, 4]).permutation(t.num_rows)[:n]
    t = t.take(perm)
    return t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64)))


def _default_policies(sid_artifact: Path) -> dict[str, str]:
    root = sid_artifact.parent
    return {"Base": str(root / "pretrain"), "DPO": str(root / "rl_dpo"), "GRPO": str(root / "rl_grpo")}


def replay_policies(data_dir: str | Path, policies: dict[str, str] | None = None, sid_artifact: str | None = None,
                    reward_artifact: str | None = None, split: str = "test", requests: int = 512, beam: int = 500,
                    top: Sequence[int] = (10, 100, 500), hr_k: Sequence[int] = (50, 100, 500), ab_k: int = 10,
                    batch_size: int = 32, seed: int = 0, device: str = "cpu", table4: bool = True) -> dict:
    """Run every policy on the same requests; per-request arrays ``{policy: {name: array [R]}}`` plus the
    requests' scenarios and the context (data module, manifests) under ``"_"``."""
    import torch

    from onemall_pl.data.schema import SCENARIOS
    from onemall_pl.metrics import hr_at_k
    from onemall_pl.pretrain import SIDAccuracy, _take
    from onemall_pl.reward import RewardScorer
    from onemall_pl.rl import RLDataModule, load_policy, policy_topk, user_batch, valid_sid_rate

    data_dir = Path(data_dir)
    sid = Path(sid_artifact or f"artifacts/{data_dir.resolve().name}/quantize")
    policies = dict(policies or _default_policies(sid))
    if "Base" not in policies:
        raise ValueError(f"policies must name a 'Base' (the lifts are over it), got {sorted(policies)}")
    if beam < (max(*top, *hr_k, ab_k) if table4 else ab_k):
        raise ValueError(f"beam={beam} is narrower than the largest Top-N / HR@K / ab_k")
    dm = RLDataModule(str(data_dir), str(sid), pretrain_artifact=policies["Base"], reward_artifact=reward_artifact)
    dev = torch.device(device)
    scorer = RewardScorer.from_artifact(dm.reward_source, device=dev)
    tries = {k: t.to(dev) for k, t in dm.sids.tries.items()}
    world = None
    if (data_dir / "world").is_dir():
        from onemall_pl.data.synth import World

        world = World.load(data_dir)
    table = _requests(data_dir, split, requests, seed)
    K = max(*top, *hr_k, ab_k) if table4 else ab_k
    models = {name: load_policy(path, quantize=dm.sid_manifest)[0].to(dev) for name, path in policies.items()}
    out: dict[str, Any] = {"_": {"dm": dm, "world": world, "n": table.num_rows, "policies": policies,
                                 "manifests": {}}}
    from onemall_pl.artifacts import load_manifest

    for name, path in policies.items():
        out["_"]["manifests"][name] = load_manifest(path, verify=False)
    scen = []
    acc = {name: SIDAccuracy(dm.sids.codebook_sizes.__len__()) for name in policies}
    cols: dict[str, dict[str, list]] = {name: {} for name in policies}
    t0 = time.perf_counter()
    for a in range(0, table.num_rows, batch_size):
        rows = table.slice(a, batch_size)
        batch = dm.collate(rows)
        batch = {k: ({kk: vv.to(dev) for kk, vv in v.items()} if isinstance(v, dict) else v.to(dev))
                 for k, v in batch.items()}
        scen.append(batch["scenario"].cpu().numpy())
        for name, model in models.items():
            c = cols[name]
            items = policy_topk(model, batch, tries, beam, K)
            if table4:
                s = scorer.score(user_batch(batch), items[:, :max(top)])
                valid_items = (items[:, :max(top)] >= 0).float()
                free = valid_sid_rate(model, batch, tries, max(top)).float()
                for n in top:
                    v = valid_items[:, :n]
                    for key in TABLE4_COLUMNS:
                        mean = (s[key][:, :n].float() * v).sum(1) / v.sum(1).clamp_min(1)
                        c.setdefault(f"Top{n}/{key}", []).append(mean.cpu().numpy())
                    c.setdefault(f"Top{n}/valid_sid", []).append(free[:, :n].mean(1).cpu().numpy())
                for k in hr_k:
                    c.setdefault(f"HR@{k}", []).append(hr_at_k(items, batch["target_ids"], k).cpu().numpy())
                has = batch["target"]["mask"].any(1)
                if has.any():
                    sub = _take({k: batch[k] for k in ("scenario", "target", "exposure", "click", "order")},
                                has.nonzero(as_tuple=True)[0])
                    with torch.no_grad():
                        o = model(sub)
                    acc[name].update([lg.cpu() for lg in o.logits], o.targets_NS.cpu(), sub["scenario"][o.req_N].cpu())
            if world is not None:
                ids = items[:, :ab_k].cpu().numpy()
                names = np.asarray(SCENARIOS)[batch["scenario"].cpu().numpy()]
                p_click, p_order, gmv = world.expected_batch(batch["user_id"].cpu().numpy(), batch["ts"].cpu().numpy(),
                                                             names, ids)
                for key, x in (("exposures", (ids >= 0).astype(float)), ("clicks", p_click), ("orders", p_order),
                               ("gmv", gmv)):
                    c.setdefault(key, []).append(np.asarray(x, float).sum(1))
    for name in policies:
        out[name] = {k: np.concatenate(v) for k, v in cols[name].items()}
        if table4:
            out[name]["acc_sid"] = acc[name].compute()["overall"]
    out["_"]["scenario"] = np.concatenate(scen)
    out["_"]["replay_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- tables


def bootstrap_lift(x: np.ndarray, base: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``mean(x) / mean(base) - 1`` and its 95% paired-bootstrap interval over requests (rows resampled
    together for both policies)."""
    lift = float(x.sum() / base.sum() - 1) if base.sum() > 0 else float("nan")
    if len(x) < 2 or n <= 0 or base.sum() <= 0:
        return lift, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n, len(x)))
    b = base[idx].sum(1)
    ratio = np.where(b > 0, x[idx].sum(1) / np.where(b > 0, b, 1) - 1, np.nan)
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5])
    return lift, float(lo), float(hi)


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _pct(x: float, d: int = 3) -> str:
    return f"{100 * x:.{d}f}%"


def _signed(x: float) -> str:
    return "nan" if np.isnan(x) else f"{100 * x:+.2f}%"


def table4_tables(res: dict, top: Sequence[int], hr_k: Sequence[int]) -> tuple[dict, str]:
    """(metrics, markdown) of Table 4 and the relevance table."""
    pols = [p for p in res if p != "_"]
    t4 = {p: {f"Top{n}": {k: float(res[p][f"Top{n}/{k}"].mean()) for k in (*TABLE4_COLUMNS, "valid_sid")}
              for n in top} for p in pols}
    rel = {p: {**{f"HR@{k}": float(res[p][f"HR@{k}"].mean()) for k in hr_k}, **res[p]["acc_sid"]} for p in pols}
    rows = [[f"Top{n}", p, _pct(t4[p][f"Top{n}"]["ctr"]), _pct(t4[p][f"Top{n}"]["ctcvr"]),
             f"{t4[p][f'Top{n}']['egpm']:.2f}", f"{t4[p][f'Top{n}']['reward']:.4f}",
             _pct(t4[p][f"Top{n}"]["valid_sid"], 1)] for n in top for p in pols]
    md = _md(["Beam Top", "Strategy", "CTR", "CTCVR", "GPM (GMV / 1000 exp.)", "Reward", "valid SID"], rows)
    rk = list(next(iter(rel.values())))
    md += "\n" + _md(["Strategy", *rk], [[p, *[_pct(rel[p][k], 1) for k in rk]] for p in pols])
    return {"table4": t4, "relevance": rel}, md


def ab_tables(res: dict, bootstrap: int, seed: int) -> tuple[dict, str]:
    """(metrics, markdown) of the offline A/B: per policy mean exposures, clicks, CTR, orders, GMV per request,
    and lifts over Base with 95% paired-bootstrap intervals, overall and per scenario."""
    from onemall_pl.data.schema import SCENARIOS

    pols = [p for p in res if p != "_"]
    scen = res["_"]["scenario"]
    scopes = {"overall": np.ones(len(scen), bool)} | {s: scen == i for i, s in enumerate(SCENARIOS) if (scen == i).any()}
    metrics: dict[str, dict] = {}
    md = ""
    for scope, sel in scopes.items():
        m: dict[str, Any] = {"requests": int(sel.sum())}
        rows = []
        for p in pols:
            r = {k: res[p][k][sel] for k in AB_METRICS}
            ctr = r["clicks"].sum() / max(r["exposures"].sum(), 1)
            m[f"{p}/ctr"] = float(ctr)
            for k in AB_METRICS:
                m[f"{p}/{k}"] = float(r[k].mean())
            row = [p, f"{r['exposures'].mean():.2f}", f"{r['clicks'].mean():.4f}", _pct(ctr, 2),
                   f"{r['orders'].mean():.5f}", f"{r['gmv'].mean():.3f}"]
            for k in ("clicks", "orders", "gmv"):
                if p == "Base":
                    row.append("—")
                    continue
                lift, lo, hi = bootstrap_lift(r[k], res["Base"][k][sel], bootstrap, seed)
                m[f"{p}/{k.removesuffix('s')}_lift"] = lift
                m[f"{p}/{k.removesuffix('s')}_lift_ci95"] = [lo, hi]
                row.append(f"{_signed(lift)} [{_signed(lo)}, {_signed(hi)}]")
            rows.append(row)
        metrics[scope] = m
        md += (f"\n**{scope}** ({int(sel.sum())} requests)\n\n"
               + _md(["Strategy", "exposures", "clicks", "CTR", "orders", "GMV", "click lift [95% CI]",
                      "order lift [95% CI]", "GMV lift [95% CI]"], rows))
    return metrics, md


def _publish(res: dict, files: dict[str, str], metrics: dict, config: dict, out: str | None) -> Path:
    ctx = res["_"]
    dm = ctx["dm"]
    dest = Path(out) if out else Path(dm.sid_source).parent / "evaluate"
    config = {**config, "policies": {p: {"path": ctx["policies"][p], "id": ctx["manifests"][p].id,
                                         "stage": ctx["manifests"][p].stage} for p in ctx["policies"]}}
    update_artifact(dest, dm.dataset_name, files, metrics, config,
                    upstream=[dm.sid_manifest, dm.reward_manifest, dm.pretrain_manifest])
    return dest


# ----------------------------------------------------------------------------- commands


def rl(data_dir: Path = Path("data/synth"), policies: dict[str, str] | None = None, sid_artifact: str | None = None,
       reward_artifact: str | None = None, split: str = "test", requests: int = 512, beam: int = 500,
       top: tuple[int, ...] = (10, 100, 500), hr_k: tuple[int, ...] = (50, 100, 500), ab_k: int = 10, bootstrap: int = 2000,
       batch_size: int = 32, seed: int = 0, device: str = "cpu", out: str | None = None) -> dict:
    """Paper Table 4 (Base vs DPO vs GRPO: ranking-model CTR / CTCVR / GPM / reward of the beam's Top-N, with
    HR@K, Acc-SID and the valid-SID rate), plus the offline A/B on a synthetic world.

    Args:
        data_dir: the dataset folder.
        policies: ``{name: artifact folder}``; default Base = ``pretrain``, DPO = ``rl_dpo``, GRPO = ``rl_grpo``
            beside the quantize artifact. ``Base`` is required (lifts are over it).
        sid_artifact: the quantize artifact; default ``artifacts/<dataset>/quantize``.
        reward_artifact: the ranking model; default ``reward`` beside the quantize artifact.
        split: the held-out split replayed.
        requests: how many of its requests (a seeded random sample, the same for every policy).
        beam: beam width (>= the largest Top-N and K).
        top: the Top-N segments of Table 4.
        hr_k: the K of HR@K.
        ab_k: the list length each policy shows in the offline A/B.
        bootstrap: paired bootstrap resamples for the lifts' 95% intervals.
        batch_size: requests per beam-search batch.
        seed: the request sample and the bootstrap.
        device: ``cpu`` or ``cuda``.
        out: the evaluate artifact folder; default ``evaluate`` beside the quantize artifact.
    """
    res = replay_policies(data_dir, policies, sid_artifact, reward_artifact, split, requests, beam, top, hr_k, ab_k,
                          batch_size, seed, device, table4=True)
    metrics, md = table4_tables(res, top, hr_k)
    n = res["_"]["n"]
    doc = (f"# Table 4: RL post-training, Base vs DPO vs GRPO\n\n{n} {split} requests of `{data_dir}`, beam {beam}; "
           "CTR / CTCVR / GPM (EGPM head: expected GMV per 1000 exposures) / Reward (Eq. 8) by the ranking model, mean over each request's Top-N "
           "items then over requests; valid SID = share of the unconstrained top-N beams naming an item.\n\n" + md)
    files = {"rl_table4.md": doc}
    if res["_"]["world"] is not None:
        ab_metrics, ab_md = ab_tables(res, bootstrap, seed)
        metrics["offline_ab"] = ab_metrics
        ab_doc = (f"# Offline A/B (paper Table 3 analogue)\n\n{n} {split} requests; each policy shows its top {ab_k} "
                  "items; expected clicks / orders / GMV per request by the simulator's truth; lift over Base = "
                  "ratio of means - 1, 95% paired bootstrap over requests "
                  f"({bootstrap} resamples).\n" + ab_md)
        files["ab.md"] = ab_doc
        doc += "\n" + ab_doc
    metrics["rl_eval"] = {"requests": n, "split": split, "beam": beam, "ab_k": ab_k, "replay_s": res["_"]["replay_s"]}
    files["rl_table4.json"] = _json(metrics)
    dest = _publish(res, files, metrics, {"rl": {"split": split, "requests": requests, "beam": beam, "top": list(top),
                                                 "hr_k": list(hr_k), "ab_k": ab_k, "seed": seed}}, out)
    print(doc)
    print(f"wrote {dest}")
    return metrics


def ab(data_dir: Path = Path("data/synth"), policies: dict[str, str] | None = None, sid_artifact: str | None = None,
       reward_artifact: str | None = None, split: str = "test", requests: int = 512, beam: int = 500, k: int = 10,
       bootstrap: int = 2000, batch_size: int = 32, seed: int = 0, device: str = "cpu", out: str | None = None) -> dict:
    """The offline A/B test (paper Table 3 analogue): each policy's top-``k`` for the same held-out requests,
    scored by the simulator's oracle; expected exposures, clicks, CTR, orders and GMV per request and the lift
    of every policy over Base with a 95% paired-bootstrap interval. Synthetic datasets only.

    Args:
        data_dir: the dataset folder (made by ``onemall data synth``: it holds the world's truth).
        policies: ``{name: artifact folder}`` (default Base / DPO / GRPO beside the quantize artifact).
        sid_artifact, reward_artifact: as for ``rl``.
        split, requests: the held-out requests replayed (a seeded sample).
        beam: beam width of each policy's retrieval.
        k: items each policy shows per request.
        bootstrap: resamples of the interval.
        batch_size, seed, device, out: as for ``rl``.
    """
    if not (Path(data_dir) / "world").is_dir():
        raise ValueError(f"{data_dir} has no world/ folder: the offline A/B needs a dataset made by `onemall data synth`")
    res = replay_policies(data_dir, policies, sid_artifact, reward_artifact, split, requests, beam, (k,), (k,), k,
                          batch_size, seed, device, table4=False)
    metrics, md = ab_tables(res, bootstrap, seed)
    doc = (f"# Offline A/B (paper Table 3 analogue)\n\n{res['_']['n']} {split} requests of `{data_dir}`; top {k} "
           f"of a beam of {beam}; expected outcomes by the simulator's truth; 95% paired bootstrap "
           f"({bootstrap} resamples).\n" + md)
    dest = _publish(res, {"ab.md": doc, "ab.json": _json({"offline_ab": metrics})}, {"offline_ab": metrics},
                    {"ab": {"split": split, "requests": requests, "beam": beam, "k": k, "seed": seed}}, out)
    print(doc)
    print(f"wrote {dest}")
    return metrics


# ----------------------------------------------------------------------------- compare (Table 2)

COMPARE_MODELS = ("SASRec", "TIGER", "OneMall")


class OneMallRetriever:
    """A OneMall policy (``pretrain`` or ``rl`` artifact) as a retriever for
    :func:`onemall_pl.metrics.replay`: constrained beam search of width ``beam`` over the SID trie
    of each request's scenario type, SIDs expanded to their items (``rl.policy_topk``)."""

    def __init__(self, data_dir: str | Path, policy: str | Path, sid_artifact: str | Path, beam: int = 500,
                 device: str = "cpu"):
        import json

        import torch

        from onemall_pl.artifacts import load_manifest
        from onemall_pl.pretrain import SamplesDataModule
        from onemall_pl.rl import load_policy

        pm = load_manifest(policy)
        meta = json.loads(pm.file("model.json").read_text())
        ml = meta["max_len"]
        dm = SamplesDataModule(str(data_dir), str(sid_artifact), max_exposure=ml["exposure"], max_click=ml["click"],
                               max_order=ml["order"], max_targets=meta["max_targets"],
                               num_price_bands=pm.config.get("data", {}).get("num_price_bands", 16))
        self.device = torch.device(device)
        self.model = load_policy(policy, dm.sid_manifest, map_location=device)[0].to(self.device)
        self.collate, self.beam, self.manifest = dm.collate, beam, pm
        self.tries = {k: t.to(self.device) for k, t in dm.sids.tries.items()}
        self.name = "OneMall"

    def retrieve(self, rows, k: int):
        from onemall_pl.pretrain import SAMPLE_COLUMNS, _to
        from onemall_pl.rl import policy_topk

        batch = _to(self.collate(rows.select(SAMPLE_COLUMNS)), self.device)
        return policy_topk(self.model, batch, self.tries, max(self.beam, k), k).cpu()


def compare(data_dir: Path = Path("data/synth"), artifacts: Path = Path("artifacts"),
            models: tuple[str, ...] = COMPARE_MODELS, onemall: str | None = None, split: str = "test",
            hr_k: tuple[int, ...] = (50, 100, 500), loo_k: tuple[int, ...] = (5, 10), beam: int = 500,
            requests: int | None = None, batch_size: int = 64, device: str = "cpu", out: str | None = None) -> dict:
    """Paper Table 2: SASRec, TIGER and OneMall answer the same held-out requests; HR@K per scenario.

    Every model is read from its artifact (``sasrec``, ``tiger`` + ``rqvae``, ``pretrain`` / ``rl_*`` +
    ``quantize`` under ``<artifacts>/<dataset>/``) and scored by :func:`onemall_pl.metrics.replay`, the
    same requests and the same code for all; each request is answered from its scenario's item type.
    For a leave-one-out dataset (MovieLens, Amazon) the literature table is added: Recall@K and NDCG@K
    with full ranking over all items, the user's history excluded (one held-out item per user: Recall@K
    is HR@K).

    Args:
        data_dir: the dataset folder.
        artifacts: the artifacts root.
        models: which of SASRec, TIGER, OneMall to compare (each must have its artifact).
        onemall: the OneMall policy artifact; default ``rl_grpo`` if it exists, else ``pretrain``.
        split: the held-out split replayed.
        hr_k: the K of HR@K (Table 2).
        loo_k: the K of Recall@K / NDCG@K (literature table, leave-one-out datasets only).
        beam: beam width of TIGER and OneMall (>= the largest K).
        requests: replay only the first this many requests of the split (default: all).
        batch_size: requests per retrieval call.
        device: ``cpu`` or ``cuda``.
        out: the evaluate artifact folder; default ``<artifacts>/<dataset>/evaluate``.
    """
    import json

    from onemall_pl.artifacts import ArtifactError, load_manifest
    from onemall_pl.data.build import is_leave_one_out
    from onemall_pl.io import read_dataset_info
    from onemall_pl.metrics import replay

    info = read_dataset_info(data_dir)
    root = Path(artifacts) / info.name
    unknown = [m for m in models if m not in COMPARE_MODELS]
    if unknown or not models:
        raise ValueError(f"models must be among {list(COMPARE_MODELS)}, got {list(models)}")
    if beam < max(hr_k):
        raise ValueError(f"beam={beam} is narrower than the largest K {max(hr_k)}")
    retrievers, sources = {}, {}
    for name in models:  # fail in the first second if an artifact is missing
        if name == "SASRec":
            from onemall_pl.baselines.sasrec import SASRecRetriever

            r = SASRecRetriever.from_artifact(root / "sasrec", data_dir)
            sources[name] = load_manifest(root / "sasrec", stage="sasrec", verify=False)
        elif name == "TIGER":
            from onemall_pl.baselines.tiger import TigerRetriever

            r = TigerRetriever.from_artifact(root / "tiger", data_dir)
            r.module.hparams.beam = beam
            r.module.to(device)
            sources[name] = load_manifest(root / "tiger", stage="tiger", verify=False)
        else:
            policy = Path(onemall) if onemall else (root / "rl_grpo" if (root / "rl_grpo").is_dir() else root / "pretrain")
            if not (policy / "manifest.json").exists():
                raise ArtifactError(f"{policy}: no OneMall policy artifact (run `onemall pretrain fit/export` first)")
            r = OneMallRetriever(data_dir, policy, root / "quantize", beam=beam, device=device)
            sources[name] = r.manifest
        retrievers[name] = r
    loo = is_leave_one_out(info)
    results, timings = {}, {}
    for name, r in retrievers.items():
        t0 = time.perf_counter()
        results[name] = {"table2": replay(r, data_dir, split, hr_k=hr_k, batch_size=batch_size, limit=requests)}
        if loo:
            results[name]["literature"] = replay(r, data_dir, split, hr_k=loo_k, ndcg_k=loo_k, exclude_history=True,
                                                 batch_size=batch_size, limit=requests)
        timings[name] = time.perf_counter() - t0
    md = compare_tables(results, hr_k, loo_k, info.name, split)
    metrics = {"compare": {name: {**res, "replay_s": timings[name], "artifact": sources[name].path,
                                  "artifact_id": sources[name].id} for name, res in results.items()}}
    dest = Path(out) if out else root / "evaluate"
    update_artifact(dest, info.name, {"compare.md": md, "compare.json": _json(metrics)}, metrics,
                    {"compare": {"split": split, "hr_k": list(hr_k), "loo_k": list(loo_k), "beam": beam,
                                 "requests": requests, "models": list(models)}},
                    upstream=[m for m in sources.values() if m.stage in ("sasrec", "tiger", "pretrain", "rl")])
    print(md)
    print(f"wrote {dest}")
    return json.loads(_json(metrics))


def compare_tables(results: dict, hr_k: Sequence[int], loo_k: Sequence[int], dataset: str, split: str) -> str:
    """Markdown: Table 2 (HR@K per scenario, rows model x scenario) and, when present, the literature table."""
    from onemall_pl.data.schema import SCENARIOS

    first = next(iter(results.values()))["table2"]
    n = first["requests"]
    lines = [f"# Table 2: SASRec vs TIGER vs OneMall on `{dataset}` ({split}, {n['overall']} requests)\n",
             ("HR@K = share of each request's held-out positives in its top K, averaged over requests; "
              "each request is answered from its scenario's item type.\n")]
    rows = []
    for scen in [*(s for s in SCENARIOS if s in first), "overall"]:
        for name, res in results.items():
            row = res["table2"].get(scen)
            if row is not None:
                rows.append([scen if name == next(iter(results)) else "", name,
                             *(_pct(row[f"HR@{k}"], 1) for k in hr_k)])
    lines.append(_md(["Scenario", "Model", *(f"HR@{k}" for k in hr_k)], rows))
    if "literature" in next(iter(results.values())):
        lines.append("\n## Literature protocol: leave-one-out, full ranking, history excluded\n")
        rows = [[name, *(f"{res['literature']['overall'][f'HR@{k}']:.4f}" for k in loo_k),
                 *(f"{res['literature']['overall'][f'NDCG@{k}']:.4f}" for k in loo_k)] for name, res in results.items()]
        lines.append(_md(["Model", *(f"Recall@{k}" for k in loo_k), *(f"NDCG@{k}" for k in loo_k)], rows))
    return "\n".join(lines) + "\n"


def _json(obj) -> str:
    import json

    from onemall_pl.io import _json_default

    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    auto_cli({"rl": rl, "ab": ab, "compare": compare}, args=argv, as_positional=False)
