"""The data contract: every table's Arrow schema and its validation, in one place.

A dataset is a folder ``data/<name>/`` with ``dataset.json`` and one folder of Parquet
shards per table (see ``onemall_pl.data.io``). Tables (DESIGN.md, "Data contract"):

- ``items``        the catalogue: products, short-videos (e-commerce ones sell ``product_id``;
                   entertainment ones have none) and live-streams.
- ``live_schedule`` which products a live-stream sells, and when.
- ``events``       one row per exposure, with the click -> order funnel and GMV.
- ``watches``      the entertainment watch log (user watched a short-video for ``watch_s``),
                   source of the *watching* item2item relation (paper 3.1.1). Optional.
- ``categories``   optional category tree: id, name, level (1..3), parent.
- ``users``        optional profile: ``user_id`` plus categorical columns.
- ``samples``      derived: one row per request with a positive, sequences strictly before it.
- ``item2item``    derived: (item_a, item_b, relation) pairs for the tokenizer.

Every error raised here is a :class:`DataError` (a ``ValueError``) whose message names the
file, the table, the column and the first offending row, so a user can fix their data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1

ITEM_TYPES = ("product", "video", "live")
SCENARIOS = ("product_card", "short_video", "live_stream")
SPLITS = ("train", "valid", "test")
RELATIONS = ("commercial", "watching")


class DataError(ValueError):
    """Bad input data. The message names file, table, column and row where known."""

    def __init__(self, msg: str, *, table: str | None = None, column: str | None = None,
                 row: int | None = None, file: str | None = None):
        where = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}"
                          for k, v in (("file", file), ("table", table), ("column", column), ("row", row))
                          if v is not None)
        super().__init__(f"{where}: {msg}" if where else msg)
        self.table, self.column, self.row, self.file = table, column, row, file


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    values: tuple[str, ...] | None = None  # allowed values of a string enum column
    finite: bool = False  # floats: NaN / inf are errors
    non_negative: bool = False


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[Column, ...]
    key: str | None = None  # unique column, if any
    extra_columns: bool = False  # e.g. `users` carries the user's own categorical columns
    doc: str = ""

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns])

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


_ids = pa.list_(pa.int64())

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        TableSpec("items", (
            Column("item_id", pa.int64(), non_negative=True),
            Column("item_type", pa.string(), values=ITEM_TYPES),
            Column("title", pa.string()),
            Column("text", pa.string(), nullable=True),
            Column("images", pa.list_(pa.binary()), nullable=True),
            Column("category", pa.list_(pa.int32())),
            Column("price", pa.float32(), finite=True, non_negative=True),
            Column("shop_id", pa.int64(), non_negative=True),
            Column("product_id", pa.int64(), nullable=True),
        ), key="item_id", doc="the catalogue"),
        TableSpec("live_schedule", (
            Column("live_id", pa.int64()),
            Column("product_id", pa.int64()),
            Column("start_ts", pa.int64()),
            Column("end_ts", pa.int64()),
        ), doc="what a live-stream sells, when"),
        TableSpec("events", (
            Column("request_id", pa.int64()),
            Column("user_id", pa.int64(), non_negative=True),
            Column("ts", pa.int64()),
            Column("scenario", pa.string(), values=SCENARIOS),
            Column("item_id", pa.int64()),
            Column("click", pa.int8()),
            Column("order", pa.int8()),
            Column("gmv", pa.float32(), finite=True, non_negative=True),
            Column("watch_s", pa.float32(), nullable=True),
        ), doc="one row per exposure"),
        TableSpec("watches", (
            Column("user_id", pa.int64(), non_negative=True),
            Column("ts", pa.int64()),
            Column("item_id", pa.int64()),
            Column("watch_s", pa.float32(), finite=True, non_negative=True),
        ), doc="entertainment watch log"),
        TableSpec("categories", (
            Column("category_id", pa.int32(), non_negative=True),
            Column("name", pa.string()),
            Column("level", pa.int8()),
            Column("parent_id", pa.int32(), nullable=True),
        ), key="category_id", doc="optional category tree (names for L1..L3 ids)"),
        TableSpec("users", (Column("user_id", pa.int64(), non_negative=True),),
                  key="user_id", extra_columns=True, doc="optional user profile"),
        TableSpec("samples", (
            Column("request_id", pa.int64()),
            Column("user_id", pa.int64(), non_negative=True),
            Column("ts", pa.int64()),
            Column("scenario", pa.string(), values=SCENARIOS),
            Column("seq_exposure", _ids),
            Column("seq_click", _ids),
            Column("seq_order", _ids),
            Column("targets", _ids),
            Column("split", pa.string(), values=SPLITS),
        ), key="request_id", doc="derived training samples"),
        TableSpec("item2item", (
            Column("item_a", pa.int64()),
            Column("item_b", pa.int64()),
            Column("relation", pa.string(), values=RELATIONS),
        ), doc="derived item pairs for the tokenizer"),
    )
}


def spec(table: str) -> TableSpec:
    if table not in TABLES:
        raise DataError(f"unknown table; known tables are {sorted(TABLES)}", table=table)
    return TABLES[table]


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    arr = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    idx = np.flatnonzero(arr)
    return int(idx[0]) if len(idx) else None


def conform(table: pa.Table, name: str, *, file: str | None = None, row_offset: int = 0,
            allow_empty: bool = False) -> pa.Table:
    """Check ``table`` against the contract of table ``name`` and return it in the exact schema.

    Columns are reordered, safely castable types are cast (int32 -> int64, float64 ->
    float32 for finite values...), and every violation raises :class:`DataError` naming the
    file, table, column and first bad row (``row_offset`` is added, for shards and batches).
    """
    ts = spec(name)
    where = dict(table=name, file=file)
    if table.num_rows == 0 and not allow_empty:
        raise DataError("table is empty", **where)
    missing = [c.name for c in ts.columns if c.name not in table.column_names]
    if missing:
        raise DataError(f"missing column(s) {missing}; the table has {table.column_names}",
                        column=missing[0], **where)
    arrays, fields = [], []
    for col in ts.columns:
        arr = table.column(col.name)
        if not arr.type.equals(col.type):
            try:
                arr = arr.cast(col.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise DataError(f"has type {table.column(col.name).type}, expected {col.type} ({e})",
                                column=col.name, **where) from None
        if not col.nullable and arr.null_count:
            row = _first_true(pc.is_null(arr))
            raise DataError("null value in a required column", column=col.name, row=row_offset + row, **where)
        if col.values is not None:
            bad = _first_true(pc.invert(pc.is_in(arr, value_set=pa.array(col.values))))
            if bad is not None:
                raise DataError(f"value {arr[bad].as_py()!r} not in {list(col.values)}",
                                column=col.name, row=row_offset + bad, **where)
        if col.finite:
            bad = _first_true(pc.invert(pc.is_finite(arr)))
            if bad is not None:
                raise DataError(f"value {arr[bad].as_py()} is not finite (NaN or inf)",
                                column=col.name, row=row_offset + bad, **where)
        if col.non_negative:
            bad = _first_true(pc.less(arr, 0))
            if bad is not None:
                raise DataError(f"value {arr[bad].as_py()} is negative", column=col.name,
                                row=row_offset + bad, **where)
        arrays.append(arr)
        fields.append(pa.field(col.name, col.type, nullable=col.nullable))
    if ts.extra_columns:
        for name_ in table.column_names:
            if name_ not in {c.name for c in ts.columns}:
                arrays.append(table.column(name_))
                fields.append(table.schema.field(name_))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def check_unique(table: pa.Table, name: str, column: str, *, file: str | None = None) -> None:
    """Raise if ``column`` has a repeated value, naming the first repeated row."""
    values = table.column(column).to_numpy()
    _, first, counts = np.unique(values, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup_value = _[np.argmax(counts > 1)]
        rows = np.flatnonzero(values == dup_value)
        raise DataError(f"duplicated value {int(dup_value)} (rows {rows[:5].tolist()})",
                        table=name, column=column, row=int(rows[1]), file=file)


def check_known(values: pa.Array | pa.ChunkedArray | np.ndarray, known: np.ndarray, *, table: str,
                column: str, known_from: str, file: str | None = None, row_offset: int = 0) -> None:
    """Raise if some of ``values`` are not in ``known`` (e.g. an event's item_id not in items)."""
    v = values if isinstance(values, np.ndarray) else np.asarray(values.to_numpy(zero_copy_only=False))
    ok = np.isin(v, known)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(f"unknown id {int(v[row])} (not in {known_from})", table=table, column=column,
                        row=row_offset + row, file=file)


@dataclass
class DatasetInfo:
    """``dataset.json``: what a dataset folder holds."""

    name: str
    source: str  # synth | ml100k | amazon | import
    tables: dict[str, int] = field(default_factory=dict)  # table -> row count
    split_rule: str = ""
    schema_version: int = SCHEMA_VERSION
    params: dict = field(default_factory=dict)  # generator / loader parameters
