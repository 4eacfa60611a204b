"""``onemall bench <what>``: benchmarks that print measured figures.

Speed and memory targets are checked here, never by timed tests: the machines are shared
and noisy, so each benchmark measures in one run and, where it compares, prints a ratio of
two things timed side by side.

    onemall bench data        simulator events/s, data-layer samples/s, peak memory (medium world)
    onemall bench tokenizer   items embedded per second
    onemall bench quantize    faiss k-means vs scikit-learn KMeans (time ratio), items encoded/s
    onemall bench beam        our constrained beam search vs HF generate: same top-K?, speed ratio
    onemall bench pretrain    training samples/s and GFLOPs per sample

Each prints a table and, with ``--json PATH``, writes the figures as JSON.
"""

from __future__ import annotations

import platform
from pathlib import Path


def _report(title: str, rows: dict, json_path: Path | None) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"}
    print(f"== {title} ({env['device']}, torch {env['torch']})")
    width = max(len(k) for k in rows) if rows else 0
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        print(f"  {k:<{width}}  {v}")
    if json_path is not None:
        from onemall_pl.io import write_json

        write_json(json_path, {"benchmark": title, "env": env, "figures": rows})
    return rows


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data(synth_preset: str = "small", medium_memory: bool = True, num_workers: int = 1, seq_len: int = 256,
         seconds: float = 10.0, json: Path | None = None) -> dict:
    """Simulator throughput, data-layer throughput and peak memory while building `medium`.

    Args:
        synth_preset: world used to time the simulator's events per second (one core).
        medium_memory: also build the `medium` world (~10M exposures) and report its peak memory.
        num_workers: dataloader workers for the data-layer figure.
        seq_len: ids per behaviour sequence (3 sequences per sample).
        seconds: how long to time the data layer.
        json: also write the figures to this JSON file.
    """
    from onemall_pl.data import datasets, synth

    rows = _flat("synth.", synth.bench(preset=synth_preset))
    if medium_memory:
        rows.update(_flat("synth_medium.", synth.bench(preset="medium")))
    rows.update(_flat("loader.", datasets.throughput(num_workers=num_workers, seq_len=seq_len, seconds=seconds)))
    return _report("bench data", rows, json)


def tokenizer(json: Path | None = None) -> dict:
    """Items embedded per second by the stage-1 item encoder (tiny preset backbone)."""
    from onemall_pl import tokenizer as stage

    return _report("bench tokenizer", _flat("", stage.bench()), json)


def quantize(json: Path | None = None) -> dict:
    """faiss k-means vs scikit-learn KMeans on the same points, and items encoded per second."""
    from onemall_pl import quantize as stage

    return _report("bench quantize", _flat("", stage.bench()), json)


def beam(json: Path | None = None) -> dict:
    """Our constrained beam search vs Hugging Face generate on the same model and trie."""
    from onemall_pl import retrieval

    return _report("bench beam", _flat("", retrieval.bench()), json)


def pretrain(json: Path | None = None) -> dict:
    """Pretraining samples per second and GFLOPs per sample (with and without Query-Former)."""
    from onemall_pl import pretrain as stage

    return _report("bench pretrain", _flat("", stage.bench()), json)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    auto_cli({"data": data, "tokenizer": tokenizer, "quantize": quantize, "beam": beam, "pretrain": pretrain},
             args=argv, as_positional=False)

