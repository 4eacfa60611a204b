"""The pipeline report: every stage's metrics, the paper's tables beside ours, and plots.

    onemall report --dataset synth                      # -> artifacts/synth/report/report.md (+ .html, plots/)
    onemall report --dataset synth --artifacts artifacts --runs runs --verify true

Reads each stage's artifact folder under ``<artifacts>/<dataset>/`` only through its manifest
(:func:`onemall_pl.artifacts.load_manifest`; ``verify`` also re-hashes every listed file, which
reads whole checkpoints: off by default, the metrics live in the manifest itself), the training
logs of each stage under ``<runs>/<dataset>/<stage>/`` (Lightning's TensorBoard event files or
CSVLogger ``metrics.csv``), and, when ``onemall quantize ablate`` has been run, its Table 5
(``<artifacts>/<dataset>/reports/table5.json``). A missing stage is listed with the command that
produces it; nothing else is required, so the report can be written after any prefix of the
pipeline. Output, written whole or not at all (:func:`onemall_pl.io.atomic_dir`)::

    <artifacts>/<dataset>/report/report.md     the tables (Markdown)
    <artifacts>/<dataset>/report/report.html   the same, rendered (python-markdown)
    <artifacts>/<dataset>/report/plots/*.png   training curves, codebook utilisation, expert load,
                                               HR@K by model, reward by beam segment, Table-1 scaling

The paper's numbers (Tables 1-6 of shared/paper/onemall.txt) are constants below and appear in
rows marked ``paper`` beside ours. They come from Kuaishou's production traffic with 0.05B-1.3B
parameter models; ours come from the dataset and preset at hand, so compare directions (which
row wins, what rises with capacity), not magnitudes.

Metric layouts read (other stages' ``export_artifact``):

- tokenizer: ``before`` / ``after`` held-out pair recall; quantize: ``collisions`` (per item type and
  ``overall``: conflict / exclusive rates, per-level ``utilisation`` and ``perplexity_ratio``);
  rqvae: ``conflict_rate_3_codes``, ``utilisation``.
- pretrain / sasrec / tiger / rl*: ``test`` retrieval metrics, nested (``{"overall": {"HR@50": x},
  "<scenario>": {...}}``, :meth:`onemall_pl.metrics.RetrievalMetrics.compute`) or flat
  (``{"HR@50": x, "<scenario>/HR@50": y}``, :func:`onemall_pl.metrics.flat_metrics`).
- pretrain_sweep: ``table1`` and ``table6`` (lists of rows, :func:`onemall_pl.pretrain.sweep`).
- evaluate: ``compare`` (or ``table2``): ``{model: retrieval metrics}``; ``table4`` (or
  ``beam_reward``): ``{policy: {"Top10": {"ctr", "ctcvr", "egpm", "reward"}}}`` (or segment first);
  ``offline_ab`` (or ``ab`` / ``table3``): ``{scenario: {metric: value}}``. Without an evaluate
  artifact, Table 2 and Table 4 fall back to each stage's own test metrics (labelled so: those
  are not always the same requests for every model).

Every other metric a manifest holds is listed under "All metrics", so a stage's new figures show
up without a change here.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onemall_pl.artifacts import ArtifactError, Manifest, load_manifest
from onemall_pl.io import atomic_dir, read_dataset_info

# ----------------------------------------------------------------------------- the paper's numbers

SCALE_NOTE = ("Paper numbers are Kuaishou's production scale (0.05B-1.3B parameter models trained and "
              "replayed on industrial e-commerce traffic); ours come from this dataset at the chosen preset. "
              "Compare directions (which row wins, what rises with capacity), not magnitudes.")

PAPER_TABLE1 = [  # Table 1: scaling (all dims of the paper's rows; HR by replayed online traffic)
    {"row": "0.05B", "layers": 2, "dim": 1024, "ffn_dim": 4096, "heads": 8, "experts": "-",
     "Acc-SID1": 0.145, "Acc-SID2": 0.439, "Acc-SID3": 0.610, "HR@50": 0.329, "HR@100": 0.413, "HR@500": 0.605},
    {"row": "0.1B", "layers": 4, "dim": 1024, "ffn_dim": 4096, "heads": 8, "experts": "-",
     "Acc-SID1": 0.149, "Acc-SID2": 0.462, "Acc-SID3": 0.636, "HR@50": 0.347, "HR@100": 0.438, "HR@500": 0.632},
    {"row": "0.5B-A0.1B", "layers": 4, "dim": 1024, "ffn_dim": 4096, "heads": 8, "experts": "12/2",
     "Acc-SID1": 0.160, "Acc-SID2": 0.506, "Acc-SID3": 0.693, "HR@50": 0.447, "HR@100": 0.560, "HR@500": 0.742},
    {"row": "1.3B-A0.1B", "layers": 4, "dim": 1024, "ffn_dim": 4096, "heads": 8, "experts": "24/2",
     "Acc-SID1": 0.162, "Acc-SID2": 0.517, "Acc-SID3": 0.717, "HR@50": 0.456, "HR@100": 0.573, "HR@500": 0.760},
]
TABLE1_PAPER_ROW = {"dense-2L": "0.05B", "dense-4L": "0.1B", "moe-12/2": "0.5B-A0.1B", "moe-24/2": "1.3B-A0.1B"}
"""Our sweep rows (:data:`onemall_pl.pretrain.TABLE1_ROWS`) and the paper row each mirrors."""

PAPER_TABLE2 = {  # Table 2: replayed traffic, all models 0.5B-A0.1B
    "product_card": {"SASRec": (0.232, 0.304, 0.451), "TIGER": (0.295, 0.371, 0.537), "OneMall": (0.343, 0.409, 0.593)},
    "short_video": {"SASRec": (0.302, 0.419, 0.663), "TIGER": (0.351, 0.478, 0.725), "OneMall": (0.447, 0.560, 0.742)},
    "live_stream": {"SASRec": (0.539, 0.588, 0.684), "TIGER": (0.573, 0.635, 0.737), "OneMall": (0.659, 0.691, 0.805)},
}
PAPER_HR_K = (50, 100, 500)

PAPER_TABLE3 = {  # Table 3: online A/B, relative lift of OneMall, as printed (Short-Video GMV has no sign there)
    "product_card": {"exposure": "+2.851%", "click": "+13.01%", "order": "+8.35%", "gmv": "+14.71%"},
    "short_video": {"exposure": "+15.32%", "click": "+5.76%", "order": "+11.65%", "gmv": "10.33%"},
    "live_stream": {"exposure": "+2.78%", "click": "+2.53%", "order": "+4.47%", "gmv": "+4.90%"},
}

PAPER_TABLE4 = {  # Table 4: ranking-model scores of the beam's Top-N segments (GPM = our egpm head)
    "Top10": {"Base": (0.07816, 0.00243, 0.09830, 0.2493), "DPO": (0.07834, 0.00254, 0.09972, 0.2543),
              "GRPO": (0.07874, 0.00266, 0.10200, 0.2607)},
    "Top100": {"Base": (0.04369, 0.00106, 0.03902, 0.1147), "DPO": (0.04396, 0.00110, 0.03999, 0.1169),
               "GRPO": (0.04403, 0.00112, 0.03998, 0.1177)},
    "Top500": {"Base": (0.02188, 0.00038, 0.01275, 0.0463), "DPO": (0.02210, 0.00039, 0.01302, 0.0470),
               "GRPO": (0.02225, 0.00041, 0.01325, 0.0476)},
}
TABLE4_METRICS = ("ctr", "ctcvr", "egpm", "reward")
TABLE4_LABEL = {"ctr": "CTR", "ctcvr": "CTCVR", "egpm": "GPM", "reward": "Reward"}

PAPER_TABLE5 = [  # Table 5: tokenizer variants (0.3B-A0.1B model); "+Contrastive" HR are deltas
    {"variant": "ResKmeans", "conflict": 0.36, "exclusive": 0.86, "HR@50": 0.339, "HR@100": 0.430, "HR@500": 0.626},
    {"variant": "ResKmeans+FSQ", "conflict": 0.11, "exclusive": 0.95, "HR@50": 0.354, "HR@100": 0.453, "HR@500": 0.667},
    {"variant": "+Contrastive", "conflict": 0.11, "exclusive": 0.95, "HR@50": "+1.5%", "HR@100": "+1.7%",
     "HR@500": "+1.7%"},
]

PAPER_TABLE6 = [  # Table 6: Query-Former (0.5B-A0.1B); the w/o row's HR are deltas over the QFormer row
    {"variant": "QFormer", "seq_len": 160, "gflops": 9.2, "HR@50": 0.447, "HR@100": 0.560, "HR@500": 0.742},
    {"variant": "w/o QFormer", "seq_len": 1205, "gflops": 34.4, "HR@50": "+0.5%", "HR@100": "+0.3%",
     "HR@500": "+0.4%"},
]

SCENARIO_LABEL = {"overall": "overall", "product_card": "Product-Card", "short_video": "Short-Video",
                  "live_stream": "Live-Streaming"}

# ----------------------------------------------------------------------------- the stages

def _fit_export(stage: str) -> str:
    return f"onemall {stage} fit -c configs/{stage}/tiny.yaml, then onemall {stage} export -c configs/{stage}/tiny.yaml"


STAGES: dict[str, tuple[str, str]] = {  # stage -> (what it is, the command that produces it)
    "tokenizer": ("stage 1, item encoder", _fit_export("tokenizer")),
    "quantize": ("stage 2, semantic IDs", _fit_export("quantize")),
    "pretrain": ("stage 3, OneMall NTP + contrastive", _fit_export("pretrain")),
    "pretrain_sweep": ("Tables 1 and 6", "onemall pretrain sweep -c configs/pretrain/tiny.yaml"),
    "reward": ("ranking model (the RL reward)", _fit_export("reward")),
    "rl": ("stage 4, DPO / GRPO post-training", ("onemall rl fit -c configs/rl/tiny_grpo.yaml, then onemall rl export "
                                                "-c configs/rl/tiny_grpo.yaml (and tiny_dpo.yaml)")),
    "sasrec": ("baseline, SASRec two-tower + faiss", _fit_export("sasrec")),
    "rqvae": ("baseline, TIGER's RQ-VAE tokenizer", _fit_export("rqvae")),
    "tiger": ("baseline, TIGER encoder-decoder", _fit_export("tiger")),
    "evaluate": ("Table 2 comparison, Table 4, offline A/B", ("onemall evaluate compare --data_dir data/<dataset> "
                 "(Table 2), onemall evaluate rl --data_dir data/<dataset> (Table 4 + offline A/B)")),
}
NOT_STAGES = {"report", "reports"}  # folders under artifacts/<dataset>/ that hold no manifest by design
TABLE5_JSON = Path("reports") / "table5.json"  # written by `onemall quantize ablate`


def _stage_kind(name: str) -> str:
    """``rl_grpo`` -> ``rl``: RL artifacts may be one per objective."""
    return "rl" if name == "rl" or name.startswith("rl_") else name


def load_stages(root: Path, verify: bool = False) -> tuple[dict[str, Manifest], dict[str, str], dict[str, str]]:
    """Manifests of every artifact folder in ``root`` (``<artifacts>/<dataset>``), the missing known
    stages (-> the command that produces them) and the unreadable folders (-> why)."""
    found, bad = {}, {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name in NOT_STAGES:
            continue
        try:
            found[d.name] = load_manifest(d, verify=verify)
        except ArtifactError as e:
            bad[d.name] = str(e)
    kinds = {_stage_kind(m.stage) for m in found.values()} | {_stage_kind(n) for n in found} | set(bad)
    missing = {s: cmd.replace("<dataset>", root.name) for s, (_, cmd) in STAGES.items() if s not in kinds}
    return found, missing, bad


def _by_stage(manifests: dict[str, Manifest], stage: str) -> Manifest | None:
    for name, m in manifests.items():
        if m.stage == stage or name == stage:
            return m
    return None


def _rl_manifests(manifests: dict[str, Manifest]) -> dict[str, Manifest]:
    return {n: m for n, m in manifests.items() if _stage_kind(m.stage) == "rl" or _stage_kind(n) == "rl"}


# ----------------------------------------------------------------------------- metric layouts

RETRIEVAL_RE = re.compile(r"^(HR|Recall|NDCG)@(\d+)$")
SEGMENT_RE = re.compile(r"^(?:top[ _-]?|@)?(\d+)$", re.IGNORECASE)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts) as ``{"a/b/0/c": value}``."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, x in enumerate(d):
            out.update(flatten(x, f"{prefix}{i}/"))
    else:
        out[prefix.rstrip("/")] = d
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def retrieval_scopes(metrics: Any, key: str | None = None) -> dict[str, dict[str, float]]:
    """``{"overall": {"HR@50": x}, "<scenario>": {...}}`` from the nested or the flat layout
    (``key`` inside, or else a ``table2`` / ``test`` one, is preferred); empty when it holds no HR / Recall / NDCG."""
    if not isinstance(metrics, dict):
        return {}
    for k in (key,) if key else ("table2", "test"):
        if isinstance(metrics.get(k), dict):
            metrics = metrics[k]
            break
    out: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if isinstance(v, dict) and k != "requests":
            row = {m: float(x) for m, x in v.items() if RETRIEVAL_RE.match(str(m)) and _num(x) is not None}
            if row:
                out.setdefault(str(k), {}).update(row)
        elif _num(v) is not None:
            scope, _, name = str(k).rpartition("/")
            if RETRIEVAL_RE.match(name):
                out.setdefault(scope or "overall", {})[name] = float(v)
    return out


def _find(metrics: dict, names: Iterable[str]) -> Any:
    """The value of the first key of ``names`` (case-insensitive) at the top of ``metrics`` or one level down."""
    names = [n.lower() for n in names]
    for level in [metrics] + [v for v in metrics.values() if isinstance(v, dict)]:
        low = {str(k).lower(): v for k, v in level.items()}
        for n in names:
            if n in low:
                return low[n]
    return None


def _segment(key: Any) -> str | None:
    m = SEGMENT_RE.match(str(key))
    return f"Top{m.group(1)}" if m else None


def _t4_metric(key: str) -> str | None:
    k = key.lower()
    for name in ("ctcvr", "ctr", "egpm", "gpm", "reward"):  # ctcvr before ctr
        if k == name or k.endswith(name) or k.startswith(name):
            return "egpm" if name == "gpm" else name
    return None


def _t4_row(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    out = {}
    for k, v in d.items():
        name = _t4_metric(str(k))
        if name and _num(v) is not None and name not in out:
            out[name] = float(v)
    return out


def segment_table(d: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{policy: {"Top10": {"ctr": .., "reward": ..}}}`` from policy-first or segment-first nesting;
    a bare ``{segment: row}`` gets the policy ``""``. Empty when no segment is found."""
    if not isinstance(d, dict) or not d:
        return {}
    if any(_segment(k) for k in d):  # segment first
        out: dict[str, dict[str, dict[str, float]]] = {}
        for k, v in d.items():
            seg = _segment(k)
            if seg is None or not isinstance(v, dict):
                continue
            row = _t4_row(v)
            if row:
                out.setdefault("", {})[seg] = row
            else:
                for pol, r in v.items():
                    if _t4_row(r):
                        out.setdefault(str(pol), {})[seg] = _t4_row(r)
        return out
    out = {}
    for pol, v in d.items():
        if isinstance(v, dict) and any(_segment(k) for k in v):
            rows = {_segment(k): _t4_row(r) for k, r in v.items() if _segment(k) and _t4_row(r)}
            if rows:
                out[str(pol)] = rows
    return out


def _search_segments(d: Any, depth: int = 3) -> dict[str, dict[str, dict[str, float]]]:
    """The first segment table anywhere in ``d`` (breadth-first, ``depth`` levels)."""
    level = [d]
    for _ in range(depth):
        for x in level:
            t = segment_table(x)
            if t:
                return t
        level = [v for x in level if isinstance(x, dict) for v in x.values() if isinstance(v, dict)]
    return {}


def _policy_name(stage_name: str, m: Manifest) -> str:
    """``rl_grpo`` -> ``GRPO``; an ``rl`` folder names its objective in its config when it can."""
    if stage_name.startswith("rl_"):
        return stage_name[3:].upper()
    flat = {k.rsplit("/", 1)[-1]: v for k, v in flatten(m.config).items()}
    for key in ("objective", "algorithm", "loss", "method"):
        if isinstance(flat.get(key), str):
            return flat[key].upper()
    return "RL"


# ----------------------------------------------------------------------------- formatting


def pct(v: Any, digits: int = 1) -> str:
    x = _num(v)
    return v if isinstance(v, str) else ("—" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%")


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _ab_value(key: str, v: Any) -> str:
    """A/B figures: lifts (keys naming lift / delta / uplift) as signed percentages."""
    x = _num(v)
    if x is not None and re.search(r"lift|delta|rel", key, re.IGNORECASE):
        return f"{100 * x:+.2f}%"
    return fmt(v)


AB_COLUMNS = ("exposures", "clicks", "ctr", "orders", "gmv")


def _paper_ab_row(scope: str) -> list[str]:
    pr = PAPER_TABLE3[scope]
    return [SCENARIO_LABEL[scope], "*OneMall*", "paper", *["—"] * 6, pr["exposure"], pr["click"], pr["order"], pr["gmv"]]


def _ab_policy_table(ab: dict) -> str | None:
    """``onemall evaluate rl``'s layout, ``{scope: {"requests": n, "<policy>/<metric>": v}}``, as rows
    (scope, policy) with means per request and lifts over Base (95% interval), the paper's lifts beside."""
    scopes = {k: v for k, v in ab.items() if isinstance(v, dict) and any("/" in str(x) for x in v)}
    if not scopes:
        return None
    rows = []
    for scope, m in scopes.items():
        pols = list(dict.fromkeys(str(k).split("/", 1)[0] for k in m if "/" in str(k)))
        base = m.get("Base/exposures")
        for p in pols:
            exp = m.get(f"{p}/exposures")
            exp_lift = (f"{100 * (exp / base - 1):+.2f}%" if p != "Base" and _num(exp) is not None and base else "—")
            lifts = []
            for k in ("click", "order", "gmv"):
                v, ci = m.get(f"{p}/{k}_lift"), m.get(f"{p}/{k}_lift_ci95")
                cell = "—" if _num(v) is None else f"{100 * v:+.2f}%"
                if isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci):
                    cell += f" [{100 * ci[0]:+.2f}%, {100 * ci[1]:+.2f}%]"
                lifts.append(cell)
            rows.append([SCENARIO_LABEL.get(scope, scope), p, "ours", fmt(m.get("requests")),
                         fmt(m.get(f"{p}/exposures")), fmt(m.get(f"{p}/clicks")), pct(m.get(f"{p}/ctr"), 2),
                         fmt(m.get(f"{p}/orders")), fmt(m.get(f"{p}/gmv")), exp_lift, *lifts])
        if scope in PAPER_TABLE3:
            rows.append(_paper_ab_row(scope))
    rows += [_paper_ab_row(sc) for sc in PAPER_TABLE3 if sc not in scopes]
    return ("Means per request of each policy's list; lifts over Base (ratio of means - 1, 95% paired bootstrap "
            "interval). Paper rows: the online A/B lift of OneMall over the previous retrieval system.\n\n"
            + md_table(["scenario", "policy", "source", "requests", "exposures", "clicks", "CTR", "orders", "GMV",
                        "exposure lift", "click lift", "order lift", "GMV lift"], rows))


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return (x if isinstance(x, str) else fmt(x)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _params(n: Any) -> str:
    x = _num(n)
    if x is None:
        return "—"
    for unit, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= unit:
            return f"{x / unit:.3g}{s}"
    return f"{x:.0f}"


# ----------------------------------------------------------------------------- the tables


class Report:
    """Collects the Markdown sections and the data the plots draw."""

    def __init__(self, manifests: dict[str, Manifest], root: Path):
        self.m, self.root = manifests, root
        self.table2: dict[str, dict[str, dict[str, float]]] = {}  # model -> scope -> metric -> value
        self.table2_source = ""
        self.literature: dict[str, dict[str, dict[str, float]]] = {}  # leave-one-out protocol of evaluate compare
        self.table4: dict[str, dict[str, dict[str, float]]] = {}  # policy -> segment -> metric -> value
        self.table4_source = ""
        self.sweep_rows: list[dict] = []

    def _cmd(self, stage: str) -> str:
        return STAGES[stage][1].replace("<dataset>", self.root.name)

    # --- Table 1
    def table1(self) -> str:
        sweep = _by_stage(self.m, "pretrain_sweep")
        head = "## Table 1: scaling (dense vs MoE at equal active parameters)\n\n"
        rows1 = sweep.metrics.get("table1") if sweep else None
        if not rows1:
            return head + f"Not run: `{self._cmd('pretrain_sweep')}` trains the rows.\n"
        self.sweep_rows = list(rows1)
        acc = sorted({k for r in rows1 for k in r if k.startswith("Acc-SID")})
        hr = sorted({k for r in rows1 for k in r if RETRIEVAL_RE.match(k)}, key=lambda k: int(k.split("@")[1]))
        for k in ("Acc-SID1", "Acc-SID2", "Acc-SID3"):
            if k not in acc:
                acc.append(k)
        for k in (f"HR@{k}" for k in PAPER_HR_K):
            if k not in hr:
                hr.append(k)
        header = ["row", "source", "layers", "dim", "ffn", "heads", "experts", "params", "active", *acc, *hr]
        paper = {r["row"]: r for r in PAPER_TABLE1}
        rows = []
        for r in rows1:
            rows.append([r.get("row"), "ours", r.get("layers"), r.get("dim"), r.get("ffn_dim"), r.get("heads"),
                         r.get("experts"), _params(r.get("params_total")), _params(r.get("params_active")),
                         *[pct(r.get(k)) for k in acc], *[pct(r.get(k)) for k in hr]])
            p = paper.get(TABLE1_PAPER_ROW.get(str(r.get("row")), ""))
            if p:
                total, _, active = p["row"].partition("-A")
                rows.append([f"*{p['row']}*", "paper", p["layers"], p["dim"], p["ffn_dim"], p["heads"], p["experts"],
                             total, active or total, *[pct(p.get(k)) for k in acc],
                             *[pct(p.get(k)) for k in hr]])
        steps = {r.get("steps") for r in rows1}
        beams = {r.get("beam_requests") for r in rows1} - {None}
        note = (f"Ours: `onemall pretrain sweep`, same data and budget per row ({fmt(steps.pop())} steps), test "
                "split; MoE rows use experts of width ffn/top_k, so their active size equals dense-4L's. "
                if len(steps) == 1 else "Ours: `onemall pretrain sweep`, test split. ")
        if len(beams) == 1:
            note += f"HR@K by beam search on {fmt(beams.pop())} requests (Acc-SID on all). "
        return head + note + "Paper rows in italics.\n\n" + md_table(header, rows)

    # --- Table 2
    def collect_table2(self) -> None:
        ev = _by_stage(self.m, "evaluate")
        if ev is not None:
            cmp = _find(ev.metrics, ("compare", "table2", "models"))
            if isinstance(cmp, dict):
                self.table2 = {str(k): s for k, v in cmp.items() if (s := retrieval_scopes(v))}
                self.literature = {str(k): s for k, v in cmp.items()
                                   if isinstance(v, dict) and (s := retrieval_scopes(v, "literature"))}
                self.table2_source = f"`onemall evaluate` (artifact {ev.id}): every model on the same requests"
        if self.table2:
            return
        for stage, label in (("sasrec", "SASRec"), ("tiger", "TIGER"), ("pretrain", "OneMall (pretrain)")):
            m = _by_stage(self.m, stage)
            if m is not None and (s := retrieval_scopes(m.metrics)):
                self.table2[label] = s
        for name, m in _rl_manifests(self.m).items():
            if s := retrieval_scopes(m.metrics):
                self.table2[f"OneMall ({_policy_name(name, m)})"] = s
        if self.table2:
            self.table2_source = ("each stage's own test metrics (no evaluate artifact: not necessarily the same "
                                  f"requests for every model; `{self._cmd('evaluate')}` replays them all alike)")

    def table2_md(self) -> str:
        head = "## Table 2: OneMall vs TIGER vs SASRec, HR@K per scenario\n\n"
        if not self.table2:
            return head + (f"No retrieval metrics yet: `{self._cmd('evaluate')}` compares the models "
                           "(or run the pretrain / sasrec / tiger stages).\n")
        ks = sorted({int(k.split("@")[1]) for s in self.table2.values() for r in s.values() for k in r
                     if k.startswith(("HR@", "Recall@"))} | set(PAPER_HR_K))
        kind = "HR" if any(k.startswith("HR@") for s in self.table2.values() for r in s.values() for k in r) \
            else "Recall"
        scopes = ["overall", *PAPER_TABLE2]
        scopes += sorted({sc for s in self.table2.values() for sc in s} - set(scopes))
        rows = []
        for sc in scopes:
            ours = [(model, s[sc]) for model, s in self.table2.items() if sc in s]
            for model, r in ours:
                rows.append([SCENARIO_LABEL.get(sc, sc), model, "ours", *[pct(r.get(f"{kind}@{k}")) for k in ks]])
            for model, vals in PAPER_TABLE2.get(sc, {}).items():
                d = dict(zip(PAPER_HR_K, vals))
                rows.append([SCENARIO_LABEL.get(sc, sc), f"*{model}-0.5B-A0.1B*", "paper",
                             *[pct(d.get(k)) for k in ks]])
        out = (head + f"Ours: {self.table2_source}. The paper has no overall row.\n\n"
               + md_table(["scenario", "model", "source", *[f"{kind}@{k}" for k in ks]], rows))
        lit = {name: r["overall"] for name, r in self.literature.items() if "overall" in r}
        if lit:
            cols = sorted({k for r in lit.values() for k in r}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
            out += ("\nLiterature protocol (leave-one-out, full ranking, history excluded; Recall@K = HR@K with one "
                    "held-out item):\n\n"
                    + md_table(["model", *[c.replace("HR@", "Recall@") for c in cols]],
                               [[n, *[fmt(r.get(c)) for c in cols]] for n, r in lit.items()]))
        return out

    # --- Table 3
    def table3_md(self) -> str:
        head = "## Table 3: offline A/B on the simulator (paper: online A/B)\n\n"
        ev = _by_stage(self.m, "evaluate")
        ab = _find(ev.metrics, ("offline_ab", "ab", "table3", "ab_test")) if ev is not None else None
        paper_rows = [[SCENARIO_LABEL[s], *r.values()] for s, r in PAPER_TABLE3.items()]
        paper = ("Paper (online A/B on Kuaishou, relative lift of OneMall over the previous retrieval):\n\n"
                 + md_table(["scenario", "exposure", "click", "order", "GMV"], paper_rows))
        if not isinstance(ab, dict) or not ab:
            return (head + f"No offline A/B yet: `{self._cmd('evaluate')}` scores two policies' lists with the "
                           "world simulator (synthetic datasets only).\n\n" + paper)
        out = head + f"Ours (`onemall evaluate`, artifact {ev.id}): expected outcomes by the simulator's truth.\n\n"
        if (t := _ab_policy_table(ab)) is not None:
            return out + t
        scalars = {k: v for k, v in ab.items() if not isinstance(v, dict)}
        groups = {k: flatten(v) for k, v in ab.items() if isinstance(v, dict)}
        if groups:
            cols = list(dict.fromkeys(c for g in groups.values() for c in g))
            out += md_table(["", *cols], [[SCENARIO_LABEL.get(k, k), *[_ab_value(c, g.get(c)) for c in cols]]
                                          for k, g in groups.items()]) + "\n"
        if scalars:
            out += md_table(["", "value"], [[k, _ab_value(k, v)] for k, v in scalars.items()]) + "\n"
        return out + paper

    # --- Table 4
    def collect_table4(self) -> None:
        ev = _by_stage(self.m, "evaluate")
        if ev is not None:
            t = segment_table(_find(ev.metrics, ("table4", "beam_reward", "beam_rewards", "reward_by_segment")))
            if t:
                self.table4, self.table4_source = t, f"`onemall evaluate` (artifact {ev.id})"
                return
        sources = [("Base", _by_stage(self.m, "pretrain"))]
        sources += [(_policy_name(n, m), m) for n, m in _rl_manifests(self.m).items()]
        known = {"base": "Base", "dpo": "DPO", "grpo": "GRPO"}
        for policy, m in sources:
            t = _search_segments(m.metrics) if m is not None else {}
            for pol, rows in t.items():  # a key that names no policy ("beam", "test") is the stage's own
                name = known.get(pol.lower()) or (policy if len(t) == 1 or not pol else f"{policy} ({pol})")
                self.table4[name] = rows
        if self.table4:
            self.table4_source = "each stage's own metrics (no evaluate artifact)"

    def table4_md(self) -> str:
        head = "## Table 4: ranking-model reward of the beam's Top-N segments, Base vs DPO vs GRPO\n\n"
        if not self.table4:
            return head + (f"No beam-segment rewards yet: `{self._cmd('rl')}` and `{self._cmd('evaluate')}` "
                           "produce them.\n")
        segs = sorted({s for p in self.table4.values() for s in p} | set(PAPER_TABLE4), key=lambda s: int(s[3:]))
        order = ["Base", "DPO", "GRPO"]
        pols = sorted(self.table4, key=lambda p: (order.index(p) if p in order else len(order), p))
        rows = []
        for seg in segs:
            for p in pols:
                r = self.table4[p].get(seg)
                if r:
                    rows.append([seg, p, "ours", pct(r.get("ctr"), 3), pct(r.get("ctcvr"), 3),
                                 fmt(r.get("egpm")), fmt(r.get("reward"))])
            for p, vals in PAPER_TABLE4.get(seg, {}).items():
                rows.append([seg, f"*{p}*", "paper", *[pct(v, 3) for v in vals[:3]], f"{vals[3]:.4f}"])
        out = (head + f"Ours: {self.table4_source}; the ranking model's CTR / CTCVR / GPM and fused reward (Eq. 8), "
                      "mean over each request's Top-N items. Our GPM is the EGPM head, expected GMV per 1000 "
                      "exposures (money), where the paper prints a rate; our reward's scale follows from it, so "
                      "compare the order of Base / DPO / GRPO, not the values.\n\n"
               + md_table(["beam", "strategy", "source", "CTR", "CTCVR", "GPM", "Reward"], rows))
        ev = _by_stage(self.m, "evaluate")
        rel = _find(ev.metrics, ("relevance",)) if ev is not None else None
        if isinstance(rel, dict) and rel:
            cols = list(dict.fromkeys(k for r in rel.values() if isinstance(r, dict) for k in r))
            out += ("\nWhat RL costs in relevance (same requests; the paper warns that a large RL weight lowers "
                    "Acc-SID and the valid-SID rate):\n\n"
                    + md_table(["strategy", *cols], [[p, *[pct(r.get(c)) for c in cols]] for p, r in rel.items()
                                                     if isinstance(r, dict)]))
            valid = {p: {s: r.get("valid_sid") for s, r in rows.items()} for p, rows in
                     (_find(ev.metrics, ("table4",)) or {}).items() if isinstance(rows, dict)}
            if any(v is not None for r in valid.values() for v in r.values()):
                segs_v = list(dict.fromkeys(s for r in valid.values() for s in r))
                out += ("\nValid-SID rate of the unconstrained beams (no trie):\n\n"
                        + md_table(["strategy", *segs_v], [[p, *[pct(r.get(s)) for s in segs_v]]
                                                          for p, r in valid.items()]))
        return out

    # --- Table 5
    def table5_md(self) -> str:
        head = "## Table 5: semantic-ID tokenizers, conflict and exclusive rates\n\n"
        rows = []
        q = _by_stage(self.m, "quantize")
        abl = self.root / TABLE5_JSON
        if abl.exists():
            import json

            t5 = json.loads(abl.read_text())
            for variant, scopes in t5.get("rows", {}).items():
                for scope, s in scopes.items():
                    rows.append([variant, "ours (ablate)", scope, fmt(s.get("num_items")), pct(s.get("conflict")),
                                 pct(s.get("exclusive")), "—", "—", "—"])
        elif q is not None and isinstance(q.metrics.get("collisions"), dict):
            fsq = any(v for k, v in flatten(q.config).items() if k.endswith("fsq_bits"))
            variant = "ResKmeans+FSQ" if fsq else "ResKmeans"
            for scope, s in q.metrics["collisions"].items():
                rows.append([variant, "ours", scope, fmt(s.get("num_items")), pct(s.get("conflict_rate")),
                             pct(s.get("exclusive_rate")), "—", "—", "—"])
        rq = _by_stage(self.m, "rqvae")
        if rq is not None and _num(rq.metrics.get("conflict_rate_3_codes")) is not None:
            rows.append(["RQ-VAE (TIGER, 3 codes)", "ours", "all", fmt(rq.sizes.get("num_items")),
                         pct(rq.metrics["conflict_rate_3_codes"]), "—", "—", "—", "—"])
        for p in PAPER_TABLE5:
            rows.append([f"*{p['variant']}*", "paper", "all", "—", pct(p["conflict"], 0), pct(p["exclusive"], 0),
                         *[pct(p[f"HR@{k}"]) for k in PAPER_HR_K]])
        note = ("Ours: the quantize artifact's SIDs" + (" and the pure Res-Kmeans baseline of `onemall quantize "
                                                        "ablate`" if abl.exists() else
                                                        "; `onemall quantize ablate --artifact "
                                                        f"{self.root / 'quantize'}` adds the ResKmeans row")
                + ". Collisions count within an item type. HR per tokenizer needs one pretrain run per variant "
                  "(not run here: —).\n\n")
        if q is None and not abl.exists():
            note = f"No quantize artifact: `{self._cmd('quantize')}`.\n\n"
        return head + note + md_table(["variant", "source", "item type", "n", "conflict", "exclusive",
                                       *[f"HR@{k}" for k in PAPER_HR_K]], rows)

    # --- Table 6
    def table6_md(self) -> str:
        head = "## Table 6: Query-Former compression vs full sequences\n\n"
        sweep = _by_stage(self.m, "pretrain_sweep")
        t6 = sweep.metrics.get("table6") if sweep else None
        hr = [f"HR@{k}" for k in PAPER_HR_K]
        rows = []
        if t6:
            base = t6[0]
            for i, r in enumerate(t6):
                cells = []
                for k in hr:
                    v = _num(r.get(k))
                    b = _num(base.get(k))
                    cells.append(pct(v) + (f" ({100 * (v - b):+.1f} pt)" if i and v is not None and b is not None
                                           else ""))
                rows.append([r.get("row"), "ours", fmt(r.get("context_len")), fmt(r.get("gflops_per_sample")),
                             *cells])
        for p in PAPER_TABLE6:
            rows.append([f"*{p['variant']}*", "paper", fmt(p["seq_len"]), fmt(p["gflops"]), *[pct(p[k]) for k in hr]])
        note = ("Ours: `onemall pretrain sweep` (the moe-12/2 row with and without the Query-Former); "
                "seq = cross-attention keys per request, GFLOPs = training forward per request. Paper's w/o row "
                "gives HR as deltas over QFormer.\n\n" if t6 else
                f"Not run: `{self._cmd('pretrain_sweep')}` trains the pair.\n\n")
        return head + note + md_table(["variant", "source", "seq", "GFLOPs", *hr], rows)

    # --- stages
    def stages_md(self, missing: dict[str, str], bad: dict[str, str]) -> str:
        rows = []
        for name, m in self.m.items():
            sizes = ", ".join(f"{k}={fmt(v)}" for k, v in m.sizes.items() if not isinstance(v, dict))
            rows.append([f"`{name}`", STAGES.get(_stage_kind(m.stage), ("",))[0], m.id, m.created,
                         ", ".join(f"{k} {v}" for k, v in m.upstream.items()) or "—", sizes or "—"])
        out = "## Stages\n\n" + md_table(["artifact", "what", "id", "created", "upstream", "sizes"], rows)
        if missing:
            out += "\nMissing stages (the report skips their tables):\n\n"
            out += "".join(f"- `{s}` ({STAGES[s][0]}): not found; produce it with `{cmd}`\n"
                           for s, cmd in missing.items())
        if bad:
            out += "\nUnreadable artifact folders:\n\n" + "".join(f"- `{n}`: {e}\n" for n, e in bad.items())
        return out

    def headlines_md(self) -> str:
        lines = []
        t = _by_stage(self.m, "tokenizer")
        if t is not None and isinstance(t.metrics.get("after"), dict):
            before = t.metrics.get("before") or {}
            lines.append("- tokenizer, held-out item2item pairs: " + ", ".join(
                f"{k} {pct(before.get(k))} -> {pct(v)}" for k, v in t.metrics["after"].items() if "/" not in k))
        q = _by_stage(self.m, "quantize")
        if q is not None and isinstance(q.metrics.get("collisions"), dict) and "overall" in q.metrics["collisions"]:
            o = q.metrics["collisions"]["overall"]
            lines.append(f"- quantize, {fmt(o.get('num_items'))} items: conflict {pct(o.get('conflict_rate'))}, "
                         f"exclusive {pct(o.get('exclusive_rate'))}, codebook use per level "
                         + " / ".join(pct(lv.get("utilisation"), 0) for lv in o.get("levels", [])))
        for stage in ("pretrain", *_rl_manifests(self.m), "sasrec", "tiger"):
            m = self.m.get(stage) or _by_stage(self.m, stage)
            s = retrieval_scopes(m.metrics).get("overall") if m is not None else None
            if s:
                extra = {k: v for k, v in (m.metrics.get("test") or {}).items()
                         if str(k).startswith("Acc-SID") and _num(v) is not None}
                lines.append(f"- {stage}, test: " + ", ".join(f"{k} {pct(v)}" for k, v in {**s, **extra}.items()))
        r = _by_stage(self.m, "reward")
        if r is not None and isinstance(r.metrics.get("test"), dict):
            lines.append("- reward, test: " + ", ".join(f"{k} {fmt(v)}" for k, v in r.metrics["test"].items()
                                                         if _num(v) is not None))
        rq = _by_stage(self.m, "rqvae")
        if rq is not None and _num(rq.metrics.get("recon_mse")) is not None:
            lines.append(f"- rqvae: reconstruction MSE {fmt(rq.metrics['recon_mse'])} (k-means init "
                         f"{fmt(rq.metrics.get('recon_mse_at_kmeans_init'))}), 3-code conflict "
                         f"{pct(rq.metrics.get('conflict_rate_3_codes'))}")
        return ("## Headlines\n\n" + "\n".join(lines) + "\n") if lines else ""

    def all_metrics_md(self) -> str:
        out = ["## All metrics\n\nEvery metric each manifest holds (flattened keys).\n"]
        for name, m in self.m.items():
            flat = flatten(m.metrics)
            body = md_table(["metric", "value"], [[f"`{k}`", v] for k, v in flat.items()]) if flat \
                else "(no metrics)\n"
            out.append(f'<details markdown="1"><summary>{html.escape(name)} ({len(flat)} values)</summary>\n\n'
                       f"{body}\n</details>\n")
        return "\n".join(out)


# ----------------------------------------------------------------------------- training logs


def _version(p: Path) -> int:
    m = re.fullmatch(r"version_(\d+)", p.name)
    return int(m.group(1)) if m else -1


def _read_tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {int(e.step): float(e.value) for e in ea.Scalars(tag)} for tag in ea.Tags().get("scalars", [])}


def _read_csv(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                try:
                    out.setdefault(k, {})[int(float(step))] = float(v)
                except ValueError:
                    continue
    return out


def read_logs(stage_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run: {tag: [(step, value)]}}`` of every Lightning log under ``stage_dir``.

    A run is a log folder with its ``lightning_logs`` / ``version_N`` parts removed (``""`` for the
    stage's own run, ``moe-12-2`` for a sweep row); its versions merge in version order, so a resumed
    fit continues its curve and a rerun overwrites the steps it repeats.
    """
    folders = {p.parent for p in stage_dir.rglob("events.out.tfevents*")} | {p.parent for p in
                                                                              stage_dir.rglob("metrics.csv")}
    runs: dict[str, dict[str, dict[int, float]]] = {}
    for d in sorted(folders, key=lambda p: (str(p.parent), _version(p), p.name)):
        parts = [x for x in d.relative_to(stage_dir).parts if x != "lightning_logs" and _version(Path(x)) < 0]
        run = runs.setdefault("/".join(parts), {})
        found = _read_tensorboard(d) if any(d.glob("events.out.tfevents*")) else {}
        if (d / "metrics.csv").exists():
            for tag, pts in _read_csv(d / "metrics.csv").items():
                found.setdefault(tag, {}).update(pts)
        for tag, pts in found.items():
            run.setdefault(tag, {}).update(pts)
    return {r: {t: sorted(p.items()) for t, p in tags.items()} for r, tags in runs.items() if tags}


# ----------------------------------------------------------------------------- plots


def _figure(n: int, ncols: int = 3, w: float = 4.2, h: float = 3.2):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], fmt_pct: bool = True) -> None:
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        y = [float("nan") if v is None else (100 * v if fmt_pct else v) for v in vals]
        ax.bar(x + (i - (n - 1) / 2) * width, y, width, label=name)
    ax.set_xticks(x, groups)
    if fmt_pct:
        ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)


def _legend_below(fig, ax) -> None:
    """One legend for the figure, under the plots (it never covers a bar)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)


CURVE_SKIP = re.compile(r"^(epoch|hp_metric|lr|lr-.*|before/.*|moe/.*)$")


def _curve_tags(runs: dict[str, dict[str, list]], limit: int = 6) -> list[str]:
    tags = {t for r in runs.values() for t in r if not CURVE_SKIP.match(t)}

    def key(t: str):
        n = max(len(r.get(t, [])) for r in runs.values())
        kind = 0 if "loss" in t or t.endswith("ntp") else 1 if "reward" in t else 2 if t.startswith("val/") else 3
        return (n < 2, kind, t.count("/"), t)

    return sorted(tags, key=key)[:limit]


def plot_training_curves(stage: str, runs: dict[str, dict[str, list]], path: Path) -> bool:
    tags = _curve_tags(runs)
    if not tags:
        return False
    fig, axes = _figure(len(tags))
    for ax, tag in zip(axes, tags):
        for run, series in runs.items():
            pts = series.get(tag)
            if pts:
                steps, vals = zip(*pts)
                ax.plot(steps, vals, marker="o" if len(pts) < 3 else None, ms=3, lw=1.2, label=run or stage)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{stage}: training curves")
    fig.savefig(path, dpi=100)
    return True


def plot_codebooks(q: Manifest | None, rq: Manifest | None, path: Path) -> bool:
    coll = q.metrics.get("collisions") if q is not None else None
    rq_util = rq.metrics.get("utilisation") if rq is not None else None
    if not isinstance(coll, dict) and not isinstance(rq_util, list):
        return False
    coll = coll if isinstance(coll, dict) else {}
    levels = max([len(s.get("levels", [])) for s in coll.values()] + [len(rq_util or [])])
    names = [f"L{i + 1}" for i in range(levels)]
    util, ppl = {}, {}
    for t, s in coll.items():
        lv = s.get("levels", [])
        util[t] = [lv[i].get("utilisation") if i < len(lv) else None for i in range(levels)]
        ppl[t] = [lv[i].get("perplexity_ratio") if i < len(lv) else None for i in range(levels)]
    if isinstance(rq_util, list):
        util["RQ-VAE (TIGER)"] = [rq_util[i] if i < len(rq_util) else None for i in range(levels)]
    sizes = q.sizes.get("codebook_sizes") if q is not None else None
    fig, axes = _figure(2 if ppl else 1, w=5.5)
    _bars(axes[0], names, util)
    axes[0].set_title("codebook utilisation (share of codes used)", fontsize=10)
    if ppl:
        _bars(axes[1], names, {t: ppl.get(t, [None] * levels) for t in util})  # same colours as the left
        axes[1].set_title("perplexity / codebook size (100% = uniform use)", fontsize=10)
    _legend_below(fig, axes[0])
    fig.suptitle("semantic-ID codebooks" + (f" (sizes {sizes})" if sizes else ""))
    fig.savefig(path, dpi=100)
    return True


LOAD_RE = re.compile(r"^(?:moe/)?(?:(.*)/)?load_(\d+)$")


def _loads(tags: dict[str, Any]) -> dict[str, dict[int, float]]:
    """``{layer: {expert: load fraction}}`` from ``moe/<layer>/load_<i>`` keys (last value of a series)."""
    out: dict[str, dict[int, float]] = {}
    for k, v in tags.items():
        m = LOAD_RE.match(k)
        if m:
            x = v[-1][1] if isinstance(v, list) else _num(v)
            if x is not None:
                out.setdefault(m.group(1) or "moe", {})[int(m.group(2))] = float(x)
    return out


def plot_expert_load(logs: dict[str, dict[str, dict[str, list]]], pretrain: Manifest | None, path: Path) -> bool:
    """Max violation of the loss-free balancer over steps, and the last per-expert load of each layer."""
    import numpy as np

    violation = {f"{st}/{r}".rstrip("/"): s["moe/max_violation"] for st, runs in logs.items()
                 for r, s in runs.items() if s.get("moe/max_violation")}
    loads = {}
    if pretrain is not None and (ld := _loads(flatten(pretrain.metrics))):
        loads["pretrain (manifest)"] = ld
    for st, runs in logs.items():
        for r, s in runs.items():
            if (ld := _loads(s)) and len(loads) < 3:
                loads[f"{st}/{r}".rstrip("/") + " (last step)"] = ld
    if not violation and not loads:
        return False
    fig, axes = _figure(int(bool(violation)) + len(loads), w=5.0, h=3.4)
    i = 0
    if violation:
        ax = axes[0]
        for name, pts in violation.items():
            steps, vals = zip(*pts)
            ax.plot(steps, vals, lw=1.2, label=name)
        ax.set_title("max load violation (max load / mean - 1)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        i = 1
    for ax, (name, ld) in zip(axes[i:], loads.items()):
        layers = sorted(ld)
        E = 1 + max(max(v) for v in ld.values())
        grid = np.full((len(layers), E), np.nan)
        for a, layer in enumerate(layers):
            for e, x in ld[layer].items():
                grid[a, e] = x
        im = ax.imshow(grid * E, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_yticks(range(len(layers)), [lyr.replace("model.", "") for lyr in layers], fontsize=6)
        ax.set_xticks(range(0, E, 1 + E // 16))
        ax.set_xlabel("expert")
        ax.set_title(f"{name}\nload x E (1 = balanced)", fontsize=9)
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("MoE expert load (loss-free balancing)")
    fig.savefig(path, dpi=100)
    return True


def plot_hr_by_model(table2: dict[str, dict[str, dict[str, float]]], path: Path) -> bool:
    if not table2:
        return False
    scopes = [s for s in ["overall", *PAPER_TABLE2] if any(s in v for v in table2.values())]
    fig, axes = _figure(len(scopes), ncols=4, w=4.0)
    for ax, sc in zip(axes, scopes):
        names = sorted({k for v in table2.values() for k in v.get(sc, {}) if k.startswith(("HR@", "Recall@"))},
                       key=lambda k: int(k.split("@")[1]))
        _bars(ax, names, {m: [v.get(sc, {}).get(k) for k in names] for m, v in table2.items()})
        ax.set_title(SCENARIO_LABEL.get(sc, sc), fontsize=10)
    _legend_below(fig, axes[0])
    fig.suptitle("HR@K by model (test requests)")
    fig.savefig(path, dpi=100)
    return True


def plot_reward_segments(table4: dict[str, dict[str, dict[str, float]]], path: Path) -> bool:
    """Each policy's change over Base per beam segment (the paper's marks beside), or the scores without a Base."""
    if not table4:
        return False
    metrics = [k for k in TABLE4_METRICS if any(k in r for p in table4.values() for r in p.values())]
    segs = sorted({s for p in table4.values() for s in p}, key=lambda s: int(s[3:]))
    base = table4.get("Base")
    fig, axes = _figure(len(metrics), ncols=4, w=3.8)
    for ax, k in zip(axes, metrics):
        if base is None:
            _bars(ax, segs, {p: [rows.get(s, {}).get(k) for s in segs] for p, rows in table4.items()},
                  fmt_pct=k in ("ctr", "ctcvr"))
            ax.set_title(TABLE4_LABEL[k], fontsize=10)
            continue

        def lift(v, b):
            return None if v is None or not b else v / b - 1

        pols = [p for p in table4 if p != "Base"]
        _bars(ax, segs, {f"{p} (ours)": [lift(table4[p].get(s, {}).get(k), base.get(s, {}).get(k)) for s in segs]
                         for p in pols})
        j = TABLE4_METRICS.index(k)
        for i, p in enumerate(pols):
            paper = [lift(PAPER_TABLE4[s][p][j], PAPER_TABLE4[s]["Base"][j]) if s in PAPER_TABLE4 and p in
                     PAPER_TABLE4[s] else None for s in segs]
            if any(v is not None for v in paper):
                off = (i - (len(pols) - 1) / 2) * 0.8 / max(1, len(pols))
                ax.plot([x + off for x in range(len(segs))], [float("nan") if v is None else 100 * v for v in paper],
                        "k_", ms=14, mew=2, ls="none", label="paper" if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{TABLE4_LABEL[k]}: change over Base", fontsize=10)
    _legend_below(fig, axes[0])
    fig.suptitle("ranking-model scores by beam segment" + ("" if base is None else " (black marks: the paper's)"))
    fig.savefig(path, dpi=100)
    return True


def plot_scaling(rows: list[dict], path: Path) -> bool:
    """Table 1: Acc-SID and HR@K of each sweep row (ours, solid) and of the paper row it mirrors (dashed)."""
    groups = [("Acc-SID", [f"Acc-SID{i}" for i in (1, 2, 3)]), ("HR@K", [f"HR@{k}" for k in PAPER_HR_K])]
    groups = [(t, [k for k in ks if any(_num(r.get(k)) is not None for r in rows)]) for t, ks in groups]
    groups = [(t, ks) for t, ks in groups if ks]
    if not rows or not groups:
        return False
    paper = {r["row"]: r for r in PAPER_TABLE1}
    mirror = [paper.get(TABLE1_PAPER_ROW.get(str(r.get("row")), "")) for r in rows]
    labels = [f"{r.get('row')}\n{_params(r.get('params_total'))}" + (f"\n(paper {m['row']})" if m else "")
              for r, m in zip(rows, mirror)]
    fig, axes = _figure(len(groups), ncols=2, w=5.0, h=3.8)
    x = list(range(len(rows)))
    for ax, (title, keys) in zip(axes, groups):
        for c, k in enumerate(keys):
            color = f"C{c}"
            ax.plot(x, [100 * v if (v := _num(r.get(k))) is not None else float("nan") for r in rows],
                    marker="o", color=color, label=f"{k} ours")
            ax.plot(x, [100 * m[k] if m else float("nan") for m in mirror], ls="--", marker="x", color=color,
                    alpha=0.6, label=f"{k} paper")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=len(keys), loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
        ax.set_title(f"{title} by model size", fontsize=10)
    fig.suptitle("Table 1: scaling (solid ours, dashed the paper's matching row)")
    fig.savefig(path, dpi=100)
    return True


# ----------------------------------------------------------------------------- the report

HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }}
blockquote {{ color: #555; border-left: 4px solid #ddd; margin: 1em 0; padding: 0 1em; }}
details {{ margin: 0.3em 0; }} code {{ background: #f6f6f6; padding: 0 0.2em; }}
</style></head><body>
{body}
</body></html>
"""


def render_html(md: str, title: str) -> str:
    import markdown  # python-markdown (a tensorboard dependency)

    body = markdown.markdown(md, extensions=["tables", "md_in_html", "fenced_code"])
    return HTML_PAGE.format(title=html.escape(title), body=body)


def _dataset_line(manifests: dict[str, Manifest]) -> str:
    for m in manifests.values():
        data_dir = next((v for k, v in flatten(m.config).items() if k.endswith("data_dir") and isinstance(v, str)),
                        None)
        if data_dir and Path(data_dir, "dataset.json").exists():
            try:
                info = read_dataset_info(data_dir)
            except ValueError:
                return ""
            tables = ", ".join(f"{n:,} {t}" for t, n in info.tables.items())
            preset = info.params.get("preset") if isinstance(info.params, dict) else None
            return (f"Dataset `{info.name}` ({info.source}{', preset ' + str(preset) if preset else ''}, "
                    f"`{data_dir}`): {tables}; split rule {info.split_rule or '—'}.\n\n")
    return ""


def report(dataset: str = "synth", artifacts: Path = Path("artifacts"), runs: Path = Path("runs"),
           out: Path | None = None, verify: bool = False) -> Path:
    """Write the pipeline report of one dataset: ``report.md``, ``report.html`` and ``plots/*.png``.

    Args:
        dataset: the dataset name (``artifacts/<dataset>/``, ``runs/<dataset>/``).
        artifacts: the artifacts root.
        runs: the runs root (each stage's ``trainer.default_root_dir`` is ``runs/<dataset>/<stage>``).
        out: the report folder (default ``<artifacts>/<dataset>/report``), replaced whole.
        verify: re-hash every file each manifest lists (reads whole checkpoints) before reporting.

    Returns the path of ``report.md``.
    """
    root = Path(artifacts) / dataset
    if not root.is_dir():
        raise ValueError(f"{root} does not exist: no stage of dataset {dataset!r} has written an artifact yet "
                         "(run `make run`, or the stages one by one; see README)")
    manifests, missing, bad = load_stages(root, verify=verify)
    rep = Report(manifests, root)
    rep.collect_table2()
    rep.collect_table4()
    tables = [rep.table1(), rep.table2_md(), rep.table3_md(), rep.table4_md(), rep.table5_md(), rep.table6_md()]

    run_root = Path(runs) / dataset
    logs = {d.name: lg for d in sorted(run_root.iterdir()) if d.is_dir() and (lg := read_logs(d))} \
        if run_root.is_dir() else {}
    dest = Path(out) if out else root / "report"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_dir(dest) as tmp:
        (tmp / "plots").mkdir()
        plots: list[tuple[str, str]] = []

        def plot(name: str, title: str, ok: bool) -> None:
            if ok:
                plots.append((f"plots/{name}.png", title))

        for stage, runs_ in logs.items():
            plot(f"curves_{stage}", f"{stage}: training curves", plot_training_curves(
                stage, runs_, tmp / "plots" / f"curves_{stage}.png"))
        plot("codebook_utilisation", "codebook utilisation per level", plot_codebooks(
            _by_stage(manifests, "quantize"), _by_stage(manifests, "rqvae"), tmp / "plots" / "codebook_utilisation.png"))
        plot("expert_load", "MoE expert load", plot_expert_load(logs, _by_stage(manifests, "pretrain"),
                                                               tmp / "plots" / "expert_load.png"))
        plot("hr_by_model", "HR@K by model", plot_hr_by_model(rep.table2, tmp / "plots" / "hr_by_model.png"))
        plot("reward_by_segment", "reward by beam segment", plot_reward_segments(
            rep.table4, tmp / "plots" / "reward_by_segment.png"))
        plot("table1_scaling", "Table 1 scaling", plot_scaling(rep.sweep_rows, tmp / "plots" / "table1_scaling.png"))

        no_logs = f"no training logs under `{run_root}`" if not logs else \
            "training logs read from " + ", ".join(f"`{run_root / s}`" for s in logs)
        plot_md = "## Plots\n\n" + (no_logs + ".\n\n") + "".join(f"### {t}\n\n![{t}]({p})\n\n" for p, t in plots)
        md = "\n".join([
            f"# OneMall pipeline report: `{dataset}`\n",
            f"Written {now} from `{root}` by `onemall report`.\n\n" + _dataset_line(manifests)
            + f"> {SCALE_NOTE}\n",
            rep.stages_md(missing, bad), rep.headlines_md(), *tables, plot_md, rep.all_metrics_md(),
        ])
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(render_html(md, f"OneMall report: {dataset}"))
    for s, cmd in missing.items():
        print(f"report: stage {s} missing (produce it with `{cmd}`)")
    for n, e in bad.items():
        print(f"report: {n} unreadable: {e}", file=sys.stderr)
    print(f"report: {dest / 'report.md'} (+ report.html, {len(plots)} plots in {dest / 'plots'})")
    return dest / "report.md"


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    try:
        CLI(report, args=list(sys.argv[1:] if argv is None else argv), as_positional=False)
    except (ArtifactError, ValueError) as e:
        print(f"onemall report: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
