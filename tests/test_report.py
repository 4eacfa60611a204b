"""`onemall report`: tables with the paper's numbers beside ours, missing stages named, valid PNG plots."""

import json

import numpy as np
import pytest
from PIL import Image

from onemall_pl import report as R
from onemall_pl.artifacts import write_artifact
from onemall_pl.quant.collision import stats_by_type

SCEN = ("product_card", "short_video", "live_stream")


def _write(root, stage, metrics, sizes=None, config=None):
    def build(tmp):
        (tmp / "model.json").write_text("{}")

    return write_artifact(root / "synth" / stage, build, stage=stage, dataset="synth", metrics=metrics,
                          sizes=sizes or {}, config=config or {})


def _retrieval(base):  # RetrievalMetrics.compute() layout
    out = {"overall": {"HR@50": base, "HR@100": base + 0.1, "HR@500": base + 0.2}}
    out.update({s: {"HR@50": base + 0.01 * i, "HR@100": base + 0.1, "HR@500": base + 0.2} for i, s in enumerate(SCEN)})
    out["requests"] = {"overall": 30, **{s: 10 for s in SCEN}}
    return out


def _segments(shift):
    return {f"Top{k}": {"ctr": 0.05 + shift / k, "ctcvr": 0.002 + shift / (10 * k), "egpm": 0.03 + shift / k,
                        "reward": 0.1 + shift / k} for k in (10, 100, 500)}


@pytest.fixture
def world(tmp_path):
    arts, runs = tmp_path / "artifacts", tmp_path / "runs"
    _write(arts, "tokenizer", {"before": {"recall@10": 0.05, "recall@50": 0.2},
                               "after": {"recall@10": 0.31, "recall@50": 0.62}, "train_pairs": 900})
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 8, 120), rng.integers(0, 8, 120), rng.integers(0, 16, 120)], 1)
    types = np.array(["product"] * 80 + ["video"] * 40)
    _write(arts, "quantize", {"collisions": stats_by_type(codes, types, [8, 8, 16])},
           sizes={"codebook_sizes": [8, 8, 16]}, config={"model": {"fsq_bits": 4}})
    flat = {"ntp": 2.5, "Acc-SID1": 0.21, "Acc-SID2": 0.4, "Acc-SID3": 0.55, "HR@50": 0.123, "HR@100": 0.2,
            "HR@500": 0.4, **{f"{s}/HR@50": 0.1 + 0.01 * i for i, s in enumerate(SCEN)}}
    _write(arts, "pretrain", {"test": flat}, sizes={"params_total": 123456, "codebook_sizes": [8, 8, 16]})
    rows = [{"row": r, "layers": 2, "dim": 64, "ffn_dim": 256, "heads": 4, "experts": "-", "params_total": p,
             "params_active": p, "Acc-SID1": 0.2 + 0.01 * i, "Acc-SID2": 0.4, "Acc-SID3": 0.5,
             "HR@50": 0.111 + 0.01 * i, "HR@100": 0.2, "HR@500": 0.3, "steps": 50, "context_len": 12,
             "gflops_per_sample": 0.01}
            for i, (r, p) in enumerate([("dense-2L", 1e5), ("dense-4L", 2e5), ("moe-12/2", 5e5), ("moe-24/2", 9e5)])]
    t6 = [dict(rows[2]), dict(rows[2], row="moe-12/2 w/o QFormer", context_len=120, gflops_per_sample=0.05,
                              **{"HR@50": 0.2})]
    _write(arts, "pretrain_sweep", {"table1": rows, "table6": t6})
    _write(arts, "sasrec", {"valid": _retrieval(0.05), "test": _retrieval(0.06)})
    _write(arts, "rqvae", {"recon_mse": 0.01, "recon_mse_at_kmeans_init": 0.02, "conflict_rate_3_codes": 0.3,
                           "utilisation": [1.0, 0.9, 0.5]}, sizes={"num_items": 120})
    _write(arts, "reward", {"test": {"ctr_auc": 0.71, "ctr_gauc": 0.66}, "valid": {"ctr_auc": 0.7}})
    # the layouts of `onemall evaluate compare` and `onemall evaluate rl`
    ab = {"requests": 40, "Base/exposures": 10.0, "Base/clicks": 0.5, "Base/ctr": 0.05, "Base/orders": 0.01,
          "Base/gmv": 1.5, "GRPO/exposures": 10.0, "GRPO/clicks": 0.55, "GRPO/ctr": 0.055, "GRPO/orders": 0.011,
          "GRPO/gmv": 1.6, "GRPO/click_lift": 0.1, "GRPO/click_lift_ci95": [0.02, 0.18], "GRPO/order_lift": 0.1,
          "GRPO/order_lift_ci95": [-0.01, 0.2], "GRPO/gmv_lift": 0.0667, "GRPO/gmv_lift_ci95": [0.0, 0.12]}
    _write(arts, "evaluate", {
        "compare": {name: {"table2": _retrieval(base), "literature": {"overall": {"HR@10": base, "NDCG@10": base / 2}},
                           "replay_s": 1.0, "artifact": "x", "artifact_id": "y"}
                    for name, base in (("OneMall", 0.15), ("SASRec", 0.06), ("TIGER", 0.09))},
        "table4": {p: {k: dict(v, valid_sid=0.8 - shift) for k, v in _segments(shift).items()}
                   for p, shift in (("Base", 0.0), ("DPO", 0.01), ("GRPO", 0.02))},
        "relevance": {p: {"HR@50": 0.15, "Acc-SID1": 0.2} for p in ("Base", "DPO", "GRPO")},
        "offline_ab": {"overall": ab, "product_card": ab},
        "rl_eval": {"requests": 40, "beam": 500},
    })
    (arts / "synth" / "half_written").mkdir()  # a folder without manifest: reported, not fatal

    # a TensorBoard log with MoE loads (pretrain) and a CSVLogger log (tokenizer)
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(runs / "synth" / "pretrain" / "lightning_logs" / "version_0"))
    for step in range(0, 50, 10):
        w.add_scalar("train/loss", 3.0 - step / 50, step)
        w.add_scalar("moe/max_violation", 1.0 / (1 + step), step)
        for layer in ("model.blocks.0.ffn", "model.blocks.1.ffn"):
            for e in range(4):
                w.add_scalar(f"moe/{layer}/load_{e}", 0.25 + 0.02 * (e - 1.5), step)
    w.add_scalar("val/HR@50", 0.1, 49)
    w.close()
    csv_dir = runs / "synth" / "tokenizer" / "lightning_logs" / "version_0"
    csv_dir.mkdir(parents=True)
    (csv_dir / "metrics.csv").write_text("epoch,step,train/loss,val/recall@10\n"
                                         + "".join(f"0,{s},{3 - s / 10},\n" for s in range(0, 40, 10))
                                         + "0,39,,0.3\n")
    return arts, runs


def test_report_tables_paper_numbers_and_plots(world):
    arts, runs = world
    path = R.report("synth", arts, runs)
    assert path == arts / "synth" / "report" / "report.md"
    md = path.read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6"):
        assert f"## {title}" in md
    # ours and the paper's, side by side
    assert "| dense-2L | ours |" in md and "| *0.05B* | paper |" in md and "14.5%" in md and "32.9%" in md
    assert "| Product-Card | OneMall | ours | 15.0% |" in md and "*OneMall-0.5B-A0.1B*" in md and "34.3%" in md
    assert "| Top10 | GRPO | ours | 5.200% | 0.220% | 0.032 | 0.102 |" in md
    assert "| Top10 | *GRPO* | paper | 7.874% | 0.266% | 10.200% | 0.2607 |" in md
    assert "| GRPO | 15.0% | 20.0% |" in md and "| GRPO | 78.0% | 78.0% | 78.0% |" in md  # relevance, valid SID
    assert "| OneMall | 0.15 | 0.075 |" in md  # literature protocol
    assert "| *ResKmeans* | paper | all | — | 36% | 86% |" in md and "ResKmeans+FSQ | ours | overall" in md
    assert "RQ-VAE (TIGER, 3 codes)" in md and "30.0%" in md
    assert "| *w/o QFormer* | paper | 1,205 | 34.4 | +0.5% |" in md and "(+6.9 pt)" in md
    assert "| Product-Card | GRPO | ours | 40 | 10 | 0.55 | 5.50% | 0.011 | 1.6 | +0.00% | +10.00% [+2.00%, +18.00%] |" in md
    assert "| Product-Card | *OneMall* | paper | — | — | — | — | — | — | +2.851% | +13.01% | +8.35% | +14.71% |" in md
    assert "| Live-Streaming | *OneMall* | paper | — | — | — | — | — | — | +2.78% | +2.53% | +4.47% | +4.90% |" in md
    assert "recall@10 5.0% -> 31.0%" in md  # tokenizer headline
    assert "`onemall evaluate` (artifact" in md  # Table 2 from the evaluate artifact
    # missing and broken stages are named with what produces them
    assert "- `rl` (stage 4" in md and "onemall rl fit" in md and "- `tiger`" in md
    assert "- `half_written`:" in md and "- `pretrain`" not in md
    assert R.SCALE_NOTE in md
    # plots: valid PNGs, referenced from the Markdown and the HTML
    plots = sorted(p.name for p in (path.parent / "plots").iterdir())
    assert plots == sorted(["curves_pretrain.png", "curves_tokenizer.png", "codebook_utilisation.png",
                            "expert_load.png", "hr_by_model.png", "reward_by_segment.png", "table1_scaling.png"])
    for name in plots:
        with Image.open(path.parent / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
            im.verify()
        assert f"(plots/{name})" in md
    page = (path.parent / "report.html").read_text()
    assert "<table>" in page and '<img alt="HR@K by model" src="plots/hr_by_model.png"' in page
    assert "<details>" in page and "<td>0.71</td>" not in page.split("<details>")[0]  # all-metrics folded


def test_report_without_evaluate_falls_back_and_lists_missing(tmp_path, world):
    arts, runs = world
    import shutil

    for s in ("evaluate", "pretrain_sweep", "half_written"):
        shutil.rmtree(arts / "synth" / s)
    shutil.rmtree(runs)
    _write(arts, "rl_grpo", {"test": {"HR@50": 0.3}, "beam": _segments(0.02)})  # Table 4 from the RL stage
    md = R.report("synth", arts, runs).read_text()
    assert "| Top10 | GRPO | ours | 5.200% |" in md and "| Overall | OneMall (GRPO) |" not in md
    assert "| overall | OneMall (GRPO) | ours | 30.0% |" in md and "- `rl`" not in md
    assert "each stage's own test metrics" in md
    assert "| Product-Card | SASRec | ours | 6.0% |" in md and "| Product-Card | OneMall (pretrain) | ours | 10.0% |" in md
    assert "No beam-segment rewards yet" not in md and "Not run: `onemall pretrain sweep" in md
    assert "- `evaluate`" in md and "- `pretrain_sweep`" in md and "no training logs" in md
    plots = {p.name for p in (arts / "synth" / "report" / "plots").iterdir()}
    assert plots == {"codebook_utilisation.png", "hr_by_model.png", "reward_by_segment.png"}  # the old folder was replaced whole


def test_report_cli_and_errors(tmp_path, world, capsys):
    from onemall_pl.cli import main

    arts, runs = world
    main(["report", "--dataset", "synth", "--artifacts", str(arts), "--runs", str(runs)])
    out = capsys.readouterr().out
    assert f"report: {arts / 'synth' / 'report' / 'report.md'}" in out and "stage rl missing" in out
    with pytest.raises(SystemExit):
        main(["report", "--dataset", "nope", "--artifacts", str(arts)])
    assert "does not exist" in capsys.readouterr().err


def test_metric_layouts():
    flat = {"HR@50": 0.1, "product_card/HR@50": 0.2, "ntp": 3.0, "Acc-SID1": 0.3}
    assert R.retrieval_scopes({"test": flat}) == {"overall": {"HR@50": 0.1}, "product_card": {"HR@50": 0.2}}
    assert R.retrieval_scopes({"overall": {"Recall@10": 0.5, "NDCG@10": 0.3}, "requests": {"overall": 3}}) == \
        {"overall": {"Recall@10": 0.5, "NDCG@10": 0.3}}
    seg_first = {"top10": {"GRPO": {"CTR": 0.1, "reward": 0.2}}, "top100": {"GRPO": {"ctr": 0.05}}}
    assert R.segment_table(seg_first) == {"GRPO": {"Top10": {"ctr": 0.1, "reward": 0.2}, "Top100": {"ctr": 0.05}}}
    assert R.segment_table({"10": {"ctcvr": 0.01, "gpm": 0.2}}) == {"": {"Top10": {"ctcvr": 0.01, "egpm": 0.2}}}
    assert R._search_segments({"rl": {"beam": {"Top10": {"reward": 1.0}}}}) == {"beam": {"Top10": {"reward": 1.0}}}
    assert R.flatten({"a": {"b": [{"c": 1}], "d": [1, 2]}}) == {"a/b/0/c": 1, "a/d": [1, 2]}
    assert json.dumps(R.PAPER_TABLE4)  # constants stay plain data
