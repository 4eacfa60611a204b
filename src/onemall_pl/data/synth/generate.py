"""``onemall data synth``: write a world's dataset folder, whole or as one of n shards.

    onemall data synth --out data/synth --preset tiny --seed 0
    onemall data synth --out /shared/synth_large --preset large --seed 0 --shard 3/64   # one process of 64

Unsharded, the folder is built under a temporary name and renamed into place
(:func:`~onemall_pl.io.atomic_dir`). It holds the tables ``categories``, ``items``,
``live_schedule``, ``users``, ``events``, ``watches``, ``dataset.json`` and ``world/``
(the parameters :meth:`World.load` restores the oracle from).

Sharded (``--shard i/n``), every process builds the same world from the seed (the
catalogue is cheap next to the logs) and generates the events and watches of the user
blocks ``b`` with ``b % n == i`` (all days); **shard 0 alone writes the catalogue tables and
``world/``**. Each process stages its files in ``out/.shards/<i>-of-<n>/`` (atomically),
then moves them into the shared folder as ``events/part-<i>-<k>.parquet`` (and
``watches/...``) and marks itself done; whichever process finds all n done writes
``dataset.json`` with the total row counts. Until then the folder has no
``dataset.json`` and no stage will read it. A shard can be rerun: its files are the same.
Because a chunk's randomness depends only on (seed, day, user block), the union of the
n shards equals the unsharded dataset, and request ids (``day << 44 | block << 24 | j``)
are unique across shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from onemall_pl.data.schema import DatasetInfo
from onemall_pl.data.synth import text as T
from onemall_pl.data.synth.presets import WorldConfig
from onemall_pl.data.synth.presets import preset as get_preset
from onemall_pl.data.synth.world import DAY, WORLD_DIR, World
from onemall_pl.io import (
    DATASET_JSON,
    ShardWriter,
    atomic_dir,
    read_dataset_info,
    write_dataset_info,
    write_json,
    write_table,
)

SPLIT_RULE = ("time: with t0, t1 the first and last event time, requests at or after t0 + 0.9 (t1 - t0) are "
              "test, those at or after t0 + 0.8 (t1 - t0) valid, the rest train")
_SHARDS = ".shards"
_BATCH_ROWS = 1 << 17  # events / watches rows gathered before a write (row groups of a useful size)


def parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard={shard!r}: expected 'i/n', e.g. '0/4'") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard={shard!r}: need 0 <= i < n")
    return i, n


def generate(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, shard: str | None = None, *,
             config: WorldConfig | None = None) -> None:
    """Generate the world ``preset`` (or ``config``) with ``seed`` as the dataset folder ``out``.

    ``shard="i/n"`` writes only this process's part (see the module docstring).
    """
    stats = _generate(Path(out), preset, seed, shard, config)
    rows = ", ".join(f"{k} {v:,}" for k, v in stats["rows"].items())
    print(f"wrote {out}{'' if shard is None else f' (shard {shard})'}: {rows} in {stats['seconds']:.1f} s "
          f"({stats['events_per_s']:,.0f} events/s)")


def _params(world: World, preset: str, n_shards: int | None) -> dict:
    c = world.config
    return {"preset": preset, "seed": world.seed, "shards": n_shards, "t0": c.t0, "n_days": c.n_days, "day_s": DAY,
            "long_view_s": c.long_view_s, "filtered_genres": list(T.FILTERED_GENRES), "world": WORLD_DIR,
            "request_id": "day << 44 | user_block << 24 | j", "config": c.to_dict()}


def _generate(out: Path, preset: str, seed: int, shard: str | None, config: WorldConfig | None) -> dict:
    t_start = time.perf_counter()
    cfg = config or get_preset(preset)
    i, n = parse_shard(shard)
    name = preset if config is None else "custom"
    world = World.build(cfg, seed)
    if shard is None:
        with atomic_dir(out) as tmp:
            stats = _write_tables(tmp, world, 0, 1, prefix="part", catalogue=True)
            info = DatasetInfo(name=out.name, source="synth", tables=stats["rows"], split_rule=SPLIT_RULE,
                               params=_params(world, name, None))
            write_dataset_info(tmp, info)
    else:
        stats = _generate_shard(out, world, name, i, n)
    stats["seconds"] = time.perf_counter() - t_start
    return stats


def _generate_shard(out: Path, world: World, name: str, i: int, n: int) -> dict:
    params = _params(world, name, n)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / _SHARDS / "params.json"
    if (out / DATASET_JSON).exists() and read_dataset_info(out).params != json.loads(json.dumps(params)):
        raise ValueError(f"{out} holds another dataset (dataset.json params differ); use a fresh folder")
    if meta.exists() and json.loads(meta.read_text()) != json.loads(json.dumps(params)):
        raise ValueError(f"{out} holds shards of another world or shard count ({meta}); use a fresh folder")
    if not meta.exists():
        write_json(meta, params)
    stage = out / _SHARDS / f"{i:05d}-of-{n:05d}"
    (stage / "done").unlink(missing_ok=True)
    with atomic_dir(stage) as tmp:
        stats = _write_tables(tmp, world, i, n, prefix=f"part-{i:05d}", catalogue=i == 0)
        write_json(tmp / "rows.json", stats["rows"])
    for d in sorted(p for p in stage.iterdir() if p.is_dir()):
        dest = out / d.name
        if d.name == WORLD_DIR:
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(d, dest)
            continue
        dest.mkdir(exist_ok=True)
        for f in sorted(d.iterdir()):
            os.replace(f, dest / f.name)
        d.rmdir()
    (stage / "done").touch()
    _finish_if_complete(out, n, params)
    return stats


def _finish_if_complete(out: Path, n: int, params: dict) -> None:
    stages = [out / _SHARDS / f"{k:05d}-of-{n:05d}" for k in range(n)]
    if not all((s / "done").exists() for s in stages):
        return
    rows: dict[str, int] = {}
    for s in stages:
        for k, v in json.loads((s / "rows.json").read_text()).items():
            rows[k] = rows.get(k, 0) + v
    write_dataset_info(out, DatasetInfo(name=out.name, source="synth", tables=rows, split_rule=SPLIT_RULE,
                                        params=params))


class _Batcher:
    """Gathers small tables into ~``rows`` before handing them to a :class:`ShardWriter`."""

    def __init__(self, writer: ShardWriter, rows: int = _BATCH_ROWS):
        self.writer, self.rows, self.parts, self.n = writer, rows, [], 0

    def add(self, t: pa.Table) -> None:
        self.parts.append(t)
        self.n += t.num_rows
        if self.n >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.writer.write(pa.concat_tables(self.parts))
            self.parts, self.n = [], 0


def _write_tables(folder: Path, world: World, i: int, n: int, *, prefix: str, catalogue: bool) -> dict:
    rows: dict[str, int] = {}
    t = time.perf_counter()
    if catalogue:
        rows["categories"] = write_table(folder, "categories", world.categories_table())
        rows["items"] = write_table(folder, "items", world.items_tables(), rows_per_shard=200_000,
                                    row_group_size=4096)
        rows["live_schedule"] = write_table(folder, "live_schedule", world.schedule_tables())
        rows["users"] = write_table(folder, "users", world.users_table())
        world.save(folder)
    t_catalogue = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    t_gen = c_gen = 0.0
    with ShardWriter(folder, "events", shard_prefix=prefix, rows_per_shard=2_000_000) as ev, \
            ShardWriter(folder, "watches", shard_prefix=prefix, rows_per_shard=2_000_000) as wa:
        be, bw = _Batcher(ev), _Batcher(wa)
        for day in range(world.config.n_days):
            for block in range(i, world.n_blocks, n):
                t0, c0 = time.perf_counter(), time.process_time()
                e, w = world.events_chunk(day, block)
                t_gen += time.perf_counter() - t0
                c_gen += time.process_time() - c0
                be.add(e)
                bw.add(w)
        be.flush()
        bw.flush()
    rows["events"], rows["watches"] = ev.rows, wa.rows
    t_events, c_events = time.perf_counter() - t, time.process_time() - c
    return {"rows": rows, "catalogue_seconds": t_catalogue, "events_seconds": t_events,
            "events_cpu_seconds": c_events, "events_generate_seconds": t_gen,
            "events_per_s": ev.rows / max(t_events, 1e-9), "events_per_cpu_s": ev.rows / max(c_events, 1e-9),
            "events_generate_per_s": ev.rows / max(t_gen, 1e-9),
            "events_generate_per_cpu_s": ev.rows / max(c_gen, 1e-9)}


# ----------------------------------------------------------------------------- benchmark


def bench(preset: str = "small", seed: int = 0) -> dict:
    """Build ``preset`` into a temporary folder in a one-core child process; measured figures.

    ``events_per_s``: exposures generated, validated and written per second of wall time
    (the watch log included); ``events_generate_per_s``: the same without the Parquet writes;
    the ``*_per_cpu_s`` figures divide by the child's CPU time instead (steadier on a shared
    machine); ``peak_rss_mb``: the child's peak resident memory (``ru_maxrss``) over the build.
    """
    get_preset(preset)
    with tempfile.TemporaryDirectory(prefix="onemall-synth-bench-") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        code = ("import json, resource, sys, pyarrow as pa; pa.set_cpu_count(1); pa.set_io_thread_count(1);"
                "from onemall_pl.data.synth.generate import _generate;"
                f"s = _generate(__import__('pathlib').Path(sys.argv[1]), {preset!r}, {int(seed)}, None, None);"
                "s['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
                "print(json.dumps(s))")
        res = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "world")], env=env, capture_output=True, check=False,
                             text=True)
        if res.returncode:
            raise RuntimeError(f"synth bench child failed:\n{res.stderr[-4000:]}")
        s = json.loads(res.stdout.strip().splitlines()[-1])
    return {"preset": preset, "events": s["rows"]["events"], "watches": s["rows"]["watches"],
            "items": s["rows"]["items"], "seconds": s["seconds"], "catalogue_seconds": s["catalogue_seconds"],
            "events_seconds": s["events_seconds"], "events_per_s": s["events_per_s"],
            "events_per_cpu_s": s["events_per_cpu_s"], "events_generate_per_s": s["events_generate_per_s"],
            "events_generate_per_cpu_s": s["events_generate_per_cpu_s"], "peak_rss_mb": s["peak_rss_mb"]}
