"""The ``onemall`` command: one word per stage, each handled by its own module.

    onemall data {synth,ml100k,amazon,import,build} ...   build a dataset (jsonargparse)
    onemall tokenizer {fit,validate,test,predict,export} ... stage 1 (LightningCLI)
    onemall quantize ...                                   stage 2
    onemall pretrain ... | reward ... | rl ... | evaluate ...
    onemall sasrec ... | tiger ...                         baselines
    onemall bench {data,tokenizer,quantize,beam,pretrain}  benchmarks that print figures

Each module named below exposes ``main(argv: list[str] | None) -> None``; modules are
imported only when their command runs, so ``onemall data`` never imports transformers.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("onemall_pl.data.cli", "build datasets: synth world, MovieLens-100K, Amazon, your Parquet"),
    "tokenizer": ("onemall_pl.tokenizer", "stage 1: fine-tune the item encoder, export embeddings"),
    "quantize": ("onemall_pl.quantize", "stage 2: semantic IDs (Res-Kmeans + FSQ)"),
    "twotower": ("onemall_pl.twotower", "two-tower retrieval model (live-stream item tower, SASRec)"),
    "pretrain": ("onemall_pl.pretrain", "stage 3: the OneMall model, NTP + contrastive"),
    "reward": ("onemall_pl.reward", "the ranking model used as reward"),
    "rl": ("onemall_pl.rl", "stage 4: DPO / GRPO post-training"),
    "evaluate": ("onemall_pl.evaluate", "replay held-out requests: HR@K, Table 2/4, offline A/B"),
    "sasrec": ("onemall_pl.baselines.sasrec", "baseline: SASRec two-tower with faiss ANN"),
    "rqvae": ("onemall_pl.baselines.rqvae", "baseline: TIGER's RQ-VAE item tokenizer"),
    "tiger": ("onemall_pl.baselines.tiger", "baseline: TIGER encoder-decoder over RQ-VAE SIDs"),
    "bench": ("onemall_pl.bench", "benchmarks that print figures"),
    "report": ("onemall_pl.report", "write artifacts/<dataset>/report/ (report.md + .html, plots): paper tables beside ours"),
}


def _usage() -> str:
    lines = ["usage: onemall <command> ...", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"onemall: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = COMMANDS[cmd][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"onemall: command {cmd!r} is not available in this version ({module} missing)", file=sys.stderr)
        raise SystemExit(2) from None
    mod.main(rest)


if __name__ == "__main__":
    main()
