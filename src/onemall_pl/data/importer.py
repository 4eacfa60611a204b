"""``onemall data import``: your own Parquet files as a dataset folder, validated.

    onemall data import --items items.parquet --events events.parquet --out data/mine \\
        [--users users.parquet] [--live_schedule live.parquet] [--watches watches.parquet]

Each input is a Parquet file or a folder of Parquet shards holding one table of the data
contract (``onemall_pl.data.schema``). Every table is checked on its own (columns, types,
nulls, enum values, finite non-negative prices...) and then against the others:

- ``items.item_id`` is unique, ``users.user_id`` is unique;
- every ``events.item_id`` and ``watches.item_id`` is a known item;
- every short-video's ``product_id`` is a known item;
- every ``live_schedule.live_id`` and ``live_schedule.product_id`` is a known item.

The first violation raises a :class:`~onemall_pl.data.schema.DataError` naming the file,
table, column and row, and nothing is written: the folder appears whole or not at all.
The dataset is split by time when ``onemall data build`` derives its samples (see
``onemall_pl.data.build``); set ``split_rule`` in ``dataset.json`` to a text starting with
``leave-one-out`` to split per user instead, as for MovieLens and Amazon. The MovieLens and Amazon loaders write through
:func:`write_dataset` too, so every dataset passes the same checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onemall_pl.data.schema import DataError, DatasetInfo, check_known, check_unique
from onemall_pl.io import atomic_dir, read_file_table, write_dataset_info, write_table

# Tables in the order they are written; every one but items and events is optional.
TABLE_ORDER = ("items", "live_schedule", "events", "watches", "categories", "users")


def validate(tables: dict[str, pa.Table], files: dict[str, str] | None = None) -> None:
    """Cross-table checks (unique keys, known ids) of tables already conformed one by one."""
    files = files or {}
    for name in ("items", "events"):
        if name not in tables:
            raise DataError("a dataset needs this table", table=name)
    items = tables["items"]
    check_unique(items, "items", "item_id", file=files.get("items"))
    known = np.sort(items.column("item_id").to_numpy())
    for name, column in (("events", "item_id"), ("watches", "item_id"),
                         ("live_schedule", "live_id"), ("live_schedule", "product_id")):
        if name in tables:
            check_known(tables[name].column(column), known, table=name, column=column,
                        known_from="items.item_id", file=files.get(name))
    product_ids = items.column("product_id")
    has_product = pc.is_valid(product_ids).to_numpy(zero_copy_only=False)
    if has_product.any():
        rows = np.flatnonzero(has_product)
        values = product_ids.to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        ok = np.isin(values, known)
        if not ok.all():
            bad = int(rows[np.flatnonzero(~ok)[0]])
            raise DataError(f"unknown id {int(values[~ok][0])} (not in items.item_id)", table="items",
                            column="product_id", row=bad, file=files.get("items"))
    if "users" in tables:
        check_unique(tables["users"], "users", "user_id", file=files.get("users"))
    if "categories" in tables:
        check_unique(tables["categories"], "categories", "category_id", file=files.get("categories"))


def write_dataset(out: str | os.PathLike, tables: dict[str, pa.Table], info: DatasetInfo,
                  extra_files: dict[str, pa.Table] | None = None,
                  files: dict[str, str] | None = None) -> DatasetInfo:
    """Validate ``tables`` and write them, with ``dataset.json``, as the folder ``out``, atomically.

    ``extra_files`` are side tables kept outside the data contract (e.g. Amazon's
    ``asin_map``), written as ``out/<name>.parquet``.
    """
    import pyarrow.parquet as pq

    unknown = set(tables) - set(TABLE_ORDER)
    if unknown:
        raise DataError(f"not a source table (derived tables come from `onemall data build`): {sorted(unknown)}")
    validate(tables, files)
    with atomic_dir(out) as tmp:
        for name in TABLE_ORDER:
            if name in tables:
                info.tables[name] = write_table(tmp, name, tables[name])
        for name, t in (extra_files or {}).items():
            pq.write_table(t, tmp / f"{name}.parquet", compression="zstd")
        write_dataset_info(tmp, info)
    return info


def load(items: Path, events: Path, out: Path, users: Path | None = None, live_schedule: Path | None = None,
         watches: Path | None = None, name: str | None = None) -> None:
    """Read, validate and write the user's Parquet tables as the dataset folder ``out``."""
    paths = {"items": items, "events": events, "users": users, "live_schedule": live_schedule,
             "watches": watches}
    tables, files = {}, {}
    for table, path in paths.items():
        if path is not None:
            tables[table] = read_file_table(path, table)
            files[table] = str(path)
    info = DatasetInfo(name=name or Path(out).name, source="import",
                       split_rule="time: requests in the last 10% of the time span are test, "
                                  "the 10% before valid, the rest train",
                       params={k: str(v) for k, v in paths.items() if v is not None})
    info = write_dataset(out, tables, info, files=files)
    print(f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in info.tables.items()))
