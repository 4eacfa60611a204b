"""Training data from Parquet shards: a resumable stream, a map-style dataset and its resumable
loader, a collate.

Three pieces, used by every stage's ``LightningDataModule``:

- :class:`ParquetStream` (training): an ``IterableDataset`` over the shards of one table.
  It yields whole collated batches (``batch_size`` lives in the dataset, the DataLoader
  runs with ``batch_size=None``): a batch is an Arrow slice turned into tensors in one
  vectorised step, instead of ``batch_size`` Python dicts glued together by
  ``default_collate``. Work is split across DDP ranks and DataLoader workers, the same for
  a given seed and epoch, and the stream resumes mid-epoch from its ``state_dict``.
- :class:`ParquetMapDataset` (validation, test, small tables): the (filtered) table held
  in memory as Arrow, indexable; ``__getitems__`` serves a whole batch as one Arrow
  ``take``, so Lightning's ``DistributedSampler`` and any sampler work as usual. To TRAIN on
  a map-style dataset use :class:`MapLoader` (seeded, sharded by rank, resumable mid-epoch
  like the stream).
- :func:`collate_sequences`: an Arrow batch -> padded ``LongTensor`` s with ``bool`` masks.

How the stream splits an epoch (all positions are rows *after* the row filter)::

    units       (file, row_group) of the table; rows per unit read from the Parquet
                footer, or counted once with the filter columns only (row-group
                statistics answer most units without reading them)
    epoch order the units permuted by (seed, epoch); rows inside a unit permuted by
                (seed, epoch, unit); G = the epoch's rows in that order, N = len(G)
    rank r      the contiguous slice G[r*N//W : r*N//W + N//W] (``even=True``) — every
                rank gets the same number of rows, hence of batches, so DDP never waits
                on a rank that ran out; at most W-1 rows (a different few each epoch) are
                left out. ``even=False`` keeps every row (r*N//W : (r+1)*N//W); ranks may
                then differ by one batch: use it outside DDP collectives (prediction).
                A rank decodes only the row groups its slice touches (two are shared
                with its neighbours), so the read cost per rank falls as 1/W.
    batches     consecutive ``batch_size`` rows of the rank's slice (last one partial
                unless ``drop_last``)
    worker w    a contiguous run of those batches (runs differ by at most one batch,
                longer runs first), so each row group is decoded by one worker (or two
                at a run's edge). The DataLoader asks its workers in turn, so the main
                process receives run0[0], run1[0], ..., run0[1], ... — a fixed order.

Resuming (nanoGPT / nanochat keep ``(file, row_group)`` positions; with DataLoader workers
the main process cannot see them, so we count instead): :class:`StreamLoader`, the
DataLoader returned by :meth:`ParquetStream.loader`, counts the batches it hands to the
training loop in the main process. From that count, the number of workers and the fixed
hand-out order, :meth:`ParquetStream.state_dict` computes the batches of this epoch not yet
delivered (a few ranges of batch indices). A stream given that state yields exactly those
batches — in the same order if the number of workers is unchanged, otherwise the same
batches in another order. The state holds no rank: every rank has delivered the same
number of batches, so rank 0's state (the one Lightning saves) restores all ranks.

With Lightning: keep one stream in the DataModule and return ``stream.loader(num_workers=...)``
from ``train_dataloader()``. The loader has ``state_dict``/``load_state_dict``, so
Lightning's fit loop saves it in every checkpoint and restores it on
``trainer.fit(..., ckpt_path=...)`` before the first batch; nothing else is needed. The loader
has a length (batches per rank per epoch), so Lightning does not fetch ahead and the count is
exactly the number of batches trained. Epochs advance by themselves: iterating again after a
full pass starts the next epoch (``set_epoch`` is there for manual loops). Workers are
restarted every epoch (``persistent_workers`` is refused) so they always start from the
main process's position.

Row groups are the unit of reading: write training tables with row groups of a few
thousand rows (``write_table(..., row_group_size=8192)``); a 65k-row group of three
256-id sequences is 400 MB decoded. Rows of a batch come from one or two row groups
(shuffled inside them), as in nanochat; shuffle the table when you write it if its
shards are sorted by time or user.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from onemall_pl.data.schema import TABLES, DataError
from onemall_pl.io import check_same_schema, open_parquet, read_table, table_files, write_table

Ranges = list[tuple[int, int]]  # half-open ranges of batch indices


# ----------------------------------------------------------------------------- collate


def _enums() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for ts in TABLES.values():
        for c in ts.columns:
            if c.values is not None:
                assert out.setdefault(c.name, c.values) == c.values, c.name
    return out


ENUMS: dict[str, tuple[str, ...]] = _enums()
"""String enum columns of the data contract (scenario, split, item_type, relation) -> values.
The collate turns them into their index in this tuple."""


def _list_buffers(arr: pa.Array | pa.ChunkedArray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column as numpy, zero-copy for a single chunk."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.null_count:
        raise DataError("null list", column=column, row=int(np.flatnonzero(arr.is_null())[0]))
    values = arr.values  # the whole child array: offsets below index into it, slice or not
    if values.null_count:
        raise DataError("null id inside a list", column=column)
    return arr.offsets.to_numpy(), values.to_numpy()


def _pad(starts: np.ndarray, ends: np.ndarray, values: np.ndarray, latest: bool, pad_value: int,
         ids: np.ndarray, mask: np.ndarray) -> None:
    """Gather the lists ``values[starts[i]:ends[i]]`` into ``ids`` [B, L] and ``mask`` [B, L]
    in one vectorised step.

    ``latest``: keep the last L items, right-aligned (the newest at position -1); otherwise
    keep the first L, left-aligned.
    """
    max_len = ids.shape[1]
    n = np.minimum(ends - starts, max_len)
    col = np.arange(max_len)
    src = (ends[:, None] - max_len + col) if latest else (starts[:, None] + col)
    if len(n) == 0 or n.min() == max_len:  # no padding: every list has max_len items or more
        mask.fill(True)
        np.take(values, src, out=ids) if values.dtype == ids.dtype else np.copyto(ids, values[src])
        return
    if latest:
        np.greater_equal(col, (max_len - n)[:, None], out=mask)
    else:
        np.less(col, n[:, None], out=mask)
    if values.size == 0:
        ids.fill(pad_value)
        return
    np.clip(src, 0, values.size - 1, out=src)
    np.take(values, src, out=ids) if values.dtype == ids.dtype else np.copyto(ids, values[src])
    np.copyto(ids, pad_value, where=~mask)


def _buffer(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Tensors for ``layout`` as views of ONE storage (shared memory inside a DataLoader
    worker, as ``default_collate`` does): a batch then crosses to the main process as one
    shared-memory segment instead of one per tensor, which is most of the cost of a worker."""
    spans, nbytes = {}, 0
    for k, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        spans[k] = nbytes
        nbytes += -(-size // 8) * 8  # keep every view 8-byte aligned
    if get_worker_info() is not None:
        buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)))
    else:
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    out = {}
    for k, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        t = buf[spans[k]:spans[k] + size].view(_TORCH_DTYPES[dtype]).view(shape)
        out[k] = (t, t.numpy())
    return out


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32,
                 np.dtype(np.bool_): torch.bool}


def collate_sequences(batch: pa.Table | pa.RecordBatch, seq_columns: Mapping[str, int], *,
                      rows: np.ndarray | None = None, set_columns: Mapping[str, int | None] | None = None,
                      scalar_columns: Sequence[str] | None = None, pad_value: int = 0,
                      item_index: Any = None, item_columns: Sequence[str] | None = None,
                      enums: Mapping[str, Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
    """Turn an Arrow batch into tensors, vectorised over the batch (no per-row Python).

    Args:
        batch: rows of a table (e.g. ``samples``), as a Table or RecordBatch.
        rows: collate only these rows of ``batch``, in this order (default: all). A dataset
            passes the rows of a shuffled batch of a decoded row group this way, and the
            gather below replaces an Arrow ``take`` that costs as much as the collate.
        seq_columns: behaviour sequences, ``column -> max_len``. Each becomes a
            ``[B, max_len]`` LongTensor holding the *latest* ``max_len`` ids, right-aligned
            (the most recent item is at position ``-1``, older ones to its left, padding
            on the left), and ``<column>_mask`` (``True`` = a real item). Right alignment
            keeps "position from the end" equal to recency for every user.
        set_columns: other list columns, e.g. ``{"targets": 8}``: the *first* ``max_len``
            ids, left-aligned, padded on the right, plus ``<column>_mask``; ``None`` as
            max_len pads to the longest list in the batch.
        scalar_columns: the other columns to return (default: all the rest). Integers
            become int64, floats float32, bools bool, enum strings (``ENUMS``) their int64 code.
        pad_value: the id written at padded positions (the masks are the truth).
        item_index: an object with ``index_of(ids, column=..., rows=...)`` (an
            :class:`~onemall_pl.data.catalog.ItemCatalog`): ids are replaced by dense item
            indices, an unknown id raising a ``DataError``.
        item_columns: the columns ``item_index`` maps (default: the seq and set columns).
        enums: extra or overriding ``column -> values`` for string columns.

    Returns:
        ``{column: tensor, <list column>_mask: tensor}``, all views of one buffer.
    """
    set_columns = dict(set_columns or {})
    enums = {**ENUMS, **(enums or {})}
    names = batch.schema.names
    missing = [c for c in (*seq_columns, *set_columns) if c not in names]
    if missing:
        raise DataError(f"batch has no column(s) {missing}; it has {names}", column=missing[0])
    lists = {c: True for c in seq_columns} | {c: False for c in set_columns}
    if scalar_columns is None:
        scalar_columns = [c for c in names if c not in lists]
    mapped = set(lists if item_columns is None else item_columns) if item_index is not None else set()
    B = batch.num_rows if rows is None else len(rows)
    i64, f32, b8 = np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.bool_)

    # 1. read every column (zero-copy where Arrow allows) and decide the output layout
    buffers, scalars, layout = {}, {}, {}
    for c, latest in lists.items():
        offsets, values = _list_buffers(batch.column(c), c)
        starts, ends = (offsets[:-1], offsets[1:]) if rows is None else (offsets[rows], offsets[rows + 1])
        buffers[c] = (starts.astype(np.int64), ends.astype(np.int64), values)
        max_len = seq_columns[c] if latest else set_columns[c]
        if max_len is None:
            max_len = max(1, int((ends - starts).max(initial=0)))
        layout[c] = ((B, int(max_len)), i64)
    for c in scalar_columns:
        arr = batch.column(c) if rows is None else batch.column(c).take(rows)
        t = arr.type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            raise ValueError(f"list column {c!r} is neither in seq_columns nor in set_columns; name it "
                             "there, or leave it out with the dataset's `columns=`")
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            if c not in enums:
                raise ValueError(f"string column {c!r} is not an enum ({sorted(enums)}); leave it out "
                                 f"with the dataset's `columns=` or pass `enums={{{c!r}: [...]}}`")
            codes = pc.index_in(arr, value_set=pa.array(list(enums[c])))
            if codes.null_count:
                bad = int(np.flatnonzero(codes.is_null())[0])
                raise DataError(f"value {arr[bad].as_py()!r} not in {list(enums[c])}", column=c, row=bad)
            a = codes.to_numpy()
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            if arr.null_count:
                raise DataError("null value", column=c, row=int(np.flatnonzero(arr.is_null())[0]))
            a = arr.to_numpy()
        else:
            raise ValueError(f"column {c!r} of type {t} has no tensor form; leave it out with `columns=`")
        scalars[c] = a
        layout[c] = ((B,), b8 if a.dtype == b8 else f32 if a.dtype.kind == "f" else i64)
    for c in lists:
        layout[f"{c}_mask"] = (layout[c][0], b8)

    # 2. fill one buffer
    views = _buffer(layout)
    for c, latest in lists.items():
        ids, mask = views[c][1], views[f"{c}_mask"][1]
        _pad(*buffers[c], latest, pad_value, ids, mask)
        if c in mapped:
            ids[mask] = item_index.index_of(ids[mask], column=c, rows=np.nonzero(mask)[0])
    for c, a in scalars.items():
        views[c][1][...] = item_index.index_of(a, column=c) if c in mapped else a
    return {k: t for k, (t, _) in views.items()}


# ----------------------------------------------------------------------------- filters and units


def _normalise_filter(filter: Mapping[str, Any] | None) -> dict[str, tuple]:
    """``{"split": "train"}`` or ``{"scenario": ["short_video", "live_stream"]}`` -> column -> values."""
    out = {}
    for c, v in (filter or {}).items():
        vals = tuple(v) if isinstance(v, (list, tuple, set, frozenset)) else (v,)
        if not vals:
            raise ValueError(f"filter on {c!r} allows no value")
        out[c] = vals
    return out


def _filter_mask(t: pa.Table, filt: dict[str, tuple]) -> np.ndarray:
    mask = None
    for c, vals in filt.items():
        m = pc.is_in(t.column(c), value_set=pa.array(list(vals), type=t.schema.field(c).type))
        mask = m if mask is None else pc.and_(mask, m)
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _stats_count(rg_meta: pq.RowGroupMetaData, leaf: dict[str, int], filt: dict[str, tuple]) -> int | None:
    """Rows of a row group passing the filter, if its statistics tell (all or none), else None."""
    n = rg_meta.num_rows
    for c, vals in filt.items():
        st = rg_meta.column(leaf[c]).statistics
        if st is None or not st.has_min_max or st.null_count != 0 or st.min != st.max:
            return None
        if st.min not in vals:
            return 0
    return n


def _split(ranges: Ranges, parts: int) -> list[Ranges]:
    """Cut the concatenation of ``ranges`` into ``parts`` contiguous runs, sizes differing
    by at most one, longer runs first."""
    total = sum(b - a for a, b in ranges)
    sizes = [total // parts + (i < total % parts) for i in range(parts)]
    out: list[Ranges] = []
    it = iter(ranges)
    cur = next(it, None)
    for size in sizes:
        run: Ranges = []
        while size > 0:
            assert cur is not None
            a, b = cur
            take = min(size, b - a)
            run.append((a, a + take))
            size -= take
            cur = (a + take, b) if a + take < b else next(it, None)
        out.append(run)
    return out


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the given ones, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if on else 0) if rank is None else rank
        world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def _remaining(ranges: Ranges, num_workers: int, delivered: int) -> Ranges:
    """What is left of a pass over ``ranges`` with ``num_workers`` workers after the main
    process received ``delivered`` batches (workers are asked in turn, run 0 first), in the
    order the pass would have continued."""
    nw = max(1, num_workers)
    runs = _split(ranges, nw)
    left: Ranges = []
    for i in range(nw):
        w = (delivered + i) % nw
        skip = delivered // nw + (w < delivered % nw)
        for a, b in runs[w]:
            drop = min(skip, b - a)
            skip -= drop
            if a + drop < b:
                if left and left[-1][1] == a + drop:
                    left[-1] = (left[-1][0], b)
                else:
                    left.append((a + drop, b))
    return left


# ----------------------------------------------------------------------------- stream


def _check_fingerprint(saved: Mapping[str, Any], mine: Mapping[str, Any], what: str) -> None:
    """Refuse a resume state made with another setup (batch size, seed, ranks, rows, ...)."""
    diff = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume the {what}: the saved state was made with a different setup, "
                         f"(saved, now) = {diff}")


class ParquetStream(IterableDataset):
    """Batches of one table's Parquet shards, split across DDP ranks and DataLoader workers.

    See the module docstring for how an epoch is split and how resuming works. Iterate it
    through :meth:`loader` (a :class:`StreamLoader`), which counts delivered batches.

    Args:
        folder: the dataset folder (``folder/<table>/*.parquet``).
        table: the table to read.
        batch_size: rows per batch (the DataLoader runs with ``batch_size=None``).
        columns: columns to read and yield (default: all).
        filter: rows to keep, ``column -> value or list of values`` (e.g. ``{"split": "train"}``);
            evaluated on each row group after reading it, with pyarrow.compute.
        collate: turns an Arrow table of ``batch_size`` rows into the batch, in the worker
            (e.g. ``functools.partial(collate_sequences, seq_columns={...})``); default: the
            Arrow table itself. If it takes a ``rows=`` argument (as ``collate_sequences``
            does), a batch within one row group is passed as the decoded row group and the
            batch's row indices, sparing an Arrow ``take``.
        shuffle: permute row groups and the rows inside each, by (seed, epoch).
        seed: the shuffling seed; every rank must use the same.
        drop_last: drop each rank's last partial batch.
        even: give every rank the same number of rows (needed under DDP; drops at most
            world_size - 1 rows per epoch). ``False`` keeps every row.
        rank, world_size: override the DDP rank and world size (default: torch.distributed
            when initialised, else 0 and 1), read when an epoch starts.
    """

    def __init__(self, folder: str | Path, table: str = "samples", *, batch_size: int = 256,
                 columns: Sequence[str] | None = None, filter: Mapping[str, Any] | None = None,
                 collate: Callable[[pa.Table], Any] | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, even: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.folder, self.table = Path(folder), table
        self.files = [str(f) for f in table_files(folder, table)]
        schema = open_parquet(self.files[0], table).schema_arrow
        self.filter = _normalise_filter(filter)
        for c in [*(columns or []), *self.filter]:
            if c not in schema.names:
                raise DataError(f"no such column; the table has {schema.names}", table=table, column=c,
                                file=self.files[0])
        self.columns = list(columns) if columns is not None else None
        self._read_columns = (None if self.columns is None
                              else self.columns + [c for c in self.filter if c not in self.columns])
        self.batch_size, self.collate, self.shuffle, self.seed = batch_size, collate, shuffle, seed
        self._collate_rows = collate is not None and "rows" in inspect.signature(collate).parameters
        self.drop_last, self.even, self._rank, self._world_size = drop_last, even, rank, world_size
        self.epoch = 0
        self._units: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # file, row group, rows
        self._left: Ranges | None = None  # batches of this epoch not yet delivered (None: all)
        self._pass: dict | None = None  # the pass under way: ranges, num_workers, rank, world_size
        self._delivered = 0  # batches the main process handed out in this pass
        self._loader_pass = False
        self._cache: dict = {}

    # -- the plan (main process and workers alike; deterministic)

    def _world(self) -> tuple[int, int]:
        return _rank_world(self._rank, self._world_size)

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file index, row group, rows after the filter) of every non-empty row group."""
        if self._units is None:
            fi, rg, rows = [], [], []
            for i, f in enumerate(self.files):
                pf = open_parquet(f, self.table)
                if i == 0:
                    first = pf.schema_arrow
                check_same_schema(pf.schema_arrow, first, table=self.table, file=str(f))
                md = pf.metadata
                leaf = {md.row_group(0).column(j).path_in_schema: j
                        for j in range(md.num_columns)} if md.num_row_groups else {}
                for g in range(md.num_row_groups):
                    n = md.row_group(g).num_rows
                    if self.filter and n:
                        n = _stats_count(md.row_group(g), leaf, self.filter)
                        if n is None:
                            n = int(_filter_mask(pf.read_row_group(g, columns=list(self.filter)),
                                                 self.filter).sum())
                    if n:
                        fi.append(i), rg.append(g), rows.append(n)
            self._units = (np.array(fi, np.int64), np.array(rg, np.int64), np.array(rows, np.int64))
        return self._units

    @property
    def num_rows(self) -> int:
        """Rows of the table that pass the filter (all ranks together)."""
        return int(self.units()[2].sum())

    def _rank_rows(self, rank: int, world: int) -> tuple[int, int]:
        """(first row in the epoch order, number of rows) of ``rank``."""
        n = self.num_rows
        if n < world:
            raise DataError(f"{n} row(s) after filter {self.filter or '{}'}, fewer than the "
                            f"{world} ranks", table=self.table, file=str(self.folder / self.table))
        lo = rank * n // world
        return lo, (n // world if self.even else (rank + 1) * n // world - lo)

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        rows = self._rank_rows(*self._world())[1]
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def _fingerprint(self) -> dict:
        return dict(table=self.table, files=len(self.files), rows=self.num_rows, world_size=self._world()[1],
                    batch_size=self.batch_size, seed=self.seed, shuffle=self.shuffle,
                    drop_last=self.drop_last, even=self.even, filter={k: list(v) for k, v in self.filter.items()})

    # -- passes, epochs and state (main process)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless the stream is already in it (so a
        position restored by :meth:`load_state_dict` is kept)."""
        if epoch != self.epoch:
            self.epoch, self._left, self._pass, self._delivered = epoch, None, None, 0

    def _commit(self) -> None:
        if self._pass is not None:
            self._left = _remaining(self._pass["ranges"], self._pass["num_workers"], self._delivered)
            self._pass, self._delivered = None, 0

    def _begin_pass(self, num_workers: int) -> None:
        self._commit()
        if self._left == []:  # the epoch was fully delivered: the next one starts
            self.epoch, self._left = self.epoch + 1, None
        rank, world = self._world()  # resolved here, in the main process, for the workers too
        n = len(self)
        if n == 0:
            raise DataError(f"{self._rank_rows(rank, world)[1]} row(s) per rank, fewer than batch_size="
                            f"{self.batch_size} with drop_last", table=self.table)
        self._pass = dict(ranges=self._left if self._left is not None else [(0, n)],
                          num_workers=num_workers, rank=rank, world_size=world)
        self._delivered = 0

    def state_dict(self) -> dict:
        """Where the stream stands: the epoch and its batches not yet delivered (rank-free)."""
        left = (self._left if self._pass is None
                else _remaining(self._pass["ranges"], self._pass["num_workers"], self._delivered))
        return dict(epoch=self.epoch, left=None if left is None else [list(r) for r in left],
                    fingerprint=self._fingerprint())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next pass yields exactly the batches left."""
        _check_fingerprint(state["fingerprint"], self._fingerprint(), "stream")
        self.epoch = int(state["epoch"])
        self._left = None if state["left"] is None else [tuple(r) for r in state["left"]]
        self._pass, self._delivered = None, 0

    def loader(self, num_workers: int = 0, **kwargs) -> StreamLoader:
        """The DataLoader to train with (counts delivered batches, Lightning-stateful)."""
        return StreamLoader(self, num_workers=num_workers, **kwargs)

    # -- reading (workers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        if info is None and not self._loader_pass:  # iterated directly, not through StreamLoader
            self._begin_pass(0)
            return self._count(self._batches(0, 1))
        assert self._pass is not None, "the pass is begun by StreamLoader in the main process"
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        assert nw == max(1, self._pass["num_workers"]), (nw, self._pass)
        return self._batches(wid, nw)

    def _count(self, it: Iterator) -> Iterator:
        for b in it:
            self._delivered += 1
            yield b

    def _batches(self, wid: int, nw: int) -> Iterator:
        ranges = self._pass["ranges"]
        rows = self.units()[2]
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(rows))
        else:
            order = np.arange(len(rows))
        cum = np.concatenate([[0], np.cumsum(rows[order])])
        lo, n = self._rank_rows(self._pass["rank"], self._pass["world_size"])
        for a, b in _split(ranges, nw)[wid]:
            for j in range(a, b):
                start = lo + j * self.batch_size
                stop = lo + min((j + 1) * self.batch_size, n)
                parts = []
                p = int(np.searchsorted(cum, start, side="right")) - 1
                while start < stop:
                    u = int(order[p])
                    take = min(stop, cum[p + 1]) - start
                    parts.append(self._unit_rows(u, start - cum[p], take))
                    start += take
                    p += 1
                if len(parts) == 1 and self._collate_rows:  # the collate gathers the rows itself
                    yield self.collate(parts[0][0], rows=parts[0][1])
                    continue
                t = pa.concat_tables([t if r is None else t.take(r) for t, r in parts])
                yield t if self.collate is None else self.collate(t)

    def _unit_rows(self, u: int, offset: int, length: int) -> tuple[pa.Table, np.ndarray | None]:
        """``length`` rows from ``offset`` of unit ``u`` (filtered, shuffled for this epoch), as
        (table, row indices into it) — or (a zero-copy slice, None) when the unit is read in
        order. The indices of a batch are sorted: same rows, a faster gather."""
        key = (u, self.epoch)
        if self._cache.get("key") != key:
            self._cache.clear()
            fi, rg, rows = self.units()
            path = self.files[fi[u]]
            try:
                t = open_parquet(path, self.table).read_row_group(int(rg[u]), columns=self._read_columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"cannot read row group {rg[u]} ({e})", table=self.table, file=path) from None
            idx = np.flatnonzero(_filter_mask(t, self.filter)) if self.filter else None
            if (len(idx) if idx is not None else t.num_rows) != rows[u]:
                raise DataError(f"row group {rg[u]} changed since the stream was planned", table=self.table,
                                file=path)
            if self.columns is not None:
                t = t.select(self.columns)
            if any(c.num_chunks > 1 for c in t.columns):
                t = t.combine_chunks()
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, u]).permutation(int(rows[u]))
                idx = perm if idx is None else idx[perm]
            self._cache.update(key=key, table=t, idx=idx)
        t, idx = self._cache["table"], self._cache["idx"]
        return (t.slice(offset, length), None) if idx is None else (t, np.sort(idx[offset:offset + length]))


class StreamLoader(DataLoader):
    """The DataLoader of a :class:`ParquetStream`: ``batch_size=None`` (the stream batches),
    counts the batches it delivers, and is stateful for Lightning (``state_dict`` /
    ``load_state_dict`` delegate to the stream). Other keyword arguments go to DataLoader."""

    def __init__(self, dataset: ParquetStream, num_workers: int = 0, **kwargs):
        if not isinstance(dataset, ParquetStream):
            raise TypeError(f"StreamLoader needs a ParquetStream, got {type(dataset).__name__}")
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("the stream makes the batches: set ParquetStream(batch_size=...)")
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would not see the stream's position; they are "
                             "restarted each epoch")
        if kwargs.get("in_order") is False:
            raise ValueError("in_order=False would make the delivered order, hence the resume state, random")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator:
        stream: ParquetStream = self.dataset
        stream._begin_pass(self.num_workers)
        stream._loader_pass = True
        try:
            it = super().__iter__()  # workers start here, with the pass just begun
        finally:
            stream._loader_pass = False
        return stream._count(it)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)


# ----------------------------------------------------------------------------- map-style


class ParquetMapDataset(Dataset):
    """A (filtered) table in memory as Arrow, indexable; for valid / test / small tables.

    ``ds[i]`` is a dict: list columns as zero-copy numpy views (from the column's offsets
    and values buffers), other columns as numpy scalars or str. A DataLoader with a batch
    sampler calls ``__getitems__``, which returns the batch as one Arrow ``take``; pass
    ``collate_fn=ds.collate_fn`` (the ``collate`` given here) to turn it into tensors::

        ds = ParquetMapDataset("data/synth", filter={"split": "valid"}, collate=partial(
            collate_sequences, seq_columns={"seq_click": 256}, set_columns={"targets": None}))
        DataLoader(ds, batch_size=512, collate_fn=ds.collate_fn)

    Args:
        data: a dataset folder, or an Arrow table.
        table: the table to read from the folder.
        columns: columns to keep (default: all).
        filter: rows to keep, ``column -> value or list of values``.
        collate: batch function on an Arrow table (default: the table itself).
    """

    def __init__(self, data: str | Path | pa.Table, table: str = "samples", *,
                 columns: Sequence[str] | None = None, filter: Mapping[str, Any] | None = None,
                 collate: Callable[[pa.Table], Any] | None = None):
        filt = _normalise_filter(filter)
        if isinstance(data, pa.Table):
            t = data
        else:
            read = None if columns is None else list(columns) + [c for c in filt if c not in columns]
            t = read_table(data, table, columns=read, validate=read is None)
        for c in [*(columns or []), *filt]:
            if c not in t.column_names:
                raise DataError(f"no such column; the table has {t.column_names}", table=table, column=c)
        if filt:
            t = t.filter(pa.array(_filter_mask(t, filt)))
        if columns is not None:
            t = t.select(list(columns))
        self.table = t.combine_chunks()
        self.collate = collate
        self._collate_rows = collate is not None and "rows" in inspect.signature(collate).parameters
        self._cols: dict[str, Any] = {}
        for c in self.table.column_names:
            arr = self.table.column(c).chunk(0) if self.table.num_rows else self.table.column(c)
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                self._cols[c] = _list_buffers(arr, c) if self.table.num_rows else (np.zeros(1, np.int64), None)
            else:
                self._cols[c] = np.asarray(arr.to_numpy(zero_copy_only=False))

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        out = {}
        for c, v in self._cols.items():
            if isinstance(v, tuple):
                off, values = v
                out[c] = values[off[i]:off[i + 1]]
            else:
                out[c] = v[i]
        return out

    def __getitems__(self, indices: Sequence[int]) -> pa.Table | tuple[pa.Table, np.ndarray]:
        """A batch for ``collate_fn``: the rows as one Arrow ``take``, or (table, indices)
        when the collate gathers rows itself (takes ``rows=``, like ``collate_sequences``)."""
        rows = np.asarray(indices, dtype=np.int64)
        return (self.table, rows) if self._collate_rows else self.table.take(rows)

    def collate_fn(self, batch: pa.Table | tuple[pa.Table, np.ndarray]) -> Any:
        """The ``collate`` given at construction, applied to a batch from ``__getitems__``."""
        if isinstance(batch, tuple):
            return self.collate(batch[0], rows=batch[1])
        return batch if self.collate is None else self.collate(batch)


# ----------------------------------------------------------------------------- map-style, resumable


class ResumableSampler(DistributedSampler):
    """This rank's indices of a map-style dataset, in a seeded order per epoch, able to start
    part-way through a pass (the position :class:`MapLoader` saves and restores).

    Sizes as torch's ``DistributedSampler``: every rank gets ``num_samples`` indices (the last
    ones repeat the first unless ``drop_last``, which drops the tail instead), rank r takes every
    W-th index from r. Differences: a pass's order is ``default_rng([seed, epoch, passes])``'s
    permutation (the dataset order if not ``shuffle``), its first ``start`` indices are skipped,
    and ``set_epoch`` keeps the position when given the current epoch (Lightning calls it at
    every epoch start, also just after restoring a mid-epoch checkpoint). ``passes`` counts the
    full passes made inside the epoch, so a loader cycled within one epoch (Lightning's
    ``max_size_cycle`` over loaders of different lengths) gets a new order each time. Being a
    ``DistributedSampler``, Lightning never replaces it under DDP.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        rank, num_replicas = _rank_world(rank, num_replicas)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.passes = 0  # full passes made in this epoch
        self.start = 0  # indices of this pass already delivered

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless already in it (a restored position stays)."""
        if epoch != self.epoch:
            self.epoch, self.passes, self.start = epoch, 0, 0

    def order(self) -> np.ndarray:
        """This rank's indices for the current pass, from its beginning."""
        n = len(self.dataset)
        idx = (np.random.default_rng([self.seed, self.epoch, self.passes]).permutation(n) if self.shuffle
               else np.arange(n))
        idx = idx[:self.total_size] if self.drop_last else np.resize(idx, self.total_size)  # resize repeats
        return idx[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:].tolist())


class MapLoader(DataLoader):
    """The training DataLoader of a map-style dataset: shuffled per (seed, epoch), sharded
    across DDP ranks, resumable mid-epoch. What :class:`StreamLoader` is to a
    :class:`ParquetStream`, for a dataset that fits in memory (:class:`ParquetMapDataset`,
    a ``TensorDataset``, ...)::

        ds = ParquetMapDataset(folder, filter={"split": "train"}, collate=...)
        MapLoader(ds, batch_size=512, seed=0, collate_fn=ds.collate_fn, num_workers=2)

    It counts the batches it hands to the training loop (in the main process, whatever
    ``num_workers``), and its ``state_dict`` / ``load_state_dict`` make it stateful for
    Lightning, which saves the state in every checkpoint and restores it on
    ``fit(ckpt_path=...)`` before the first batch. A restored loader yields exactly the batches
    not yet delivered, in the same order, with any ``num_workers``: its
    :class:`ResumableSampler` skips ``batch_size`` x delivered indices of the pass's order.

    Epochs: Lightning calls the sampler's ``set_epoch`` when an epoch starts (call it yourself in
    a manual loop, as with ``DistributedSampler``); iterating again after a full pass without a
    new epoch starts another pass in a new order. Every rank yields the same number of batches;
    the state holds no rank, so rank 0's (the one Lightning saves) restores every rank.

    Args:
        dataset: a map-style dataset.
        batch_size, drop_last: as DataLoader; ``drop_last`` also drops the tail that does not
            divide among the ranks (else the first indices are repeated to fill it).
        shuffle, seed: the order per (seed, epoch, pass); ``shuffle=False`` keeps dataset order.
        rank, world_size: default torch.distributed's when initialised, else 0 and 1.
        **kwargs: other DataLoader arguments (``collate_fn``, ``num_workers``,
            ``persistent_workers``, ...); not ``sampler``, ``batch_sampler``, ``generator``.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None, **kwargs):
        for k in ("sampler", "batch_sampler", "generator"):
            if kwargs.get(k) is not None:
                raise ValueError(f"MapLoader makes its own sampler from shuffle/seed/rank; {k}= is not taken")
        if kwargs.get("in_order") is False:
            raise ValueError("in_order=False would make the delivered order, hence the resume state, random")
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                   drop_last=drop_last)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)

    def __iter__(self) -> Iterator:
        # A generator: the pass (and the workers' first indices) starts at the first next(), after
        # the set_epoch that Lightning calls between iter() and the epoch when it resumes from a
        # checkpoint taken at an epoch's end.
        s: ResumableSampler = self.sampler
        if s.start >= len(self) * self.batch_size:  # the last pass was delivered whole: a new one
            s.passes, s.start = s.passes + 1, 0
        for batch in super().__iter__():
            s.start += self.batch_size  # counted as handed out, in the main process
            yield batch

    def _fingerprint(self) -> dict:
        s: ResumableSampler = self.sampler
        return dict(rows=len(self.dataset), world_size=s.num_replicas, batch_size=self.batch_size, seed=s.seed,
                    shuffle=s.shuffle, drop_last=self.drop_last)

    def state_dict(self) -> dict:
        """Where the loader stands: epoch, full passes in it, indices of this pass delivered (rank-free)."""
        s: ResumableSampler = self.sampler
        return dict(epoch=s.epoch, passes=s.passes, start=s.start, fingerprint=self._fingerprint())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next pass yields exactly the batches left."""
        _check_fingerprint(state["fingerprint"], self._fingerprint(), "loader")
        s: ResumableSampler = self.sampler
        s.epoch, s.passes, s.start = int(state["epoch"]), int(state["passes"]), int(state["start"])


# ----------------------------------------------------------------------------- benchmark


def synthetic_samples(n: int, seq_len: int = 256, num_items: int = 1_000_000, seed: int = 0) -> pa.Table:
    """A ``samples`` table of ``n`` rows with three ``seq_len``-id sequences (Zipf-like ids)."""
    rng = np.random.default_rng(seed)

    def ids(count: int) -> np.ndarray:  # popularity-skewed ids, as in exposure logs
        return (num_items * rng.random(count) ** 3).astype(np.int64)

    def seqs() -> pa.Array:
        return pa.ListArray.from_arrays(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32),
                                        pa.array(ids(n * seq_len)))

    n_targets = rng.integers(1, 4, n)
    return pa.table(dict(
        request_id=np.arange(n, dtype=np.int64), user_id=rng.integers(0, n // 4 + 1, n),
        ts=np.arange(n, dtype=np.int64) * 10,
        scenario=pa.array(np.array(["product_card", "short_video", "live_stream"])[rng.integers(0, 3, n)]),
        seq_exposure=seqs(), seq_click=seqs(), seq_order=seqs(),
        targets=pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(n_targets)]).astype(np.int32),
                                         pa.array(ids(int(n_targets.sum())))),
        split=pa.array(np.where(rng.random(n) < 0.9, "train", "valid"))))


def throughput(num_workers: int = 1, seq_len: int = 256, batch_size: int = 256, seconds: float = 5.0,
               rows: int = 65_536, row_group_size: int = 8192) -> dict:
    """Training samples per second delivered by ParquetStream + collate through a DataLoader.

    Writes a synthetic ``samples`` table (three ``seq_len``-id sequences per row) with
    :func:`~onemall_pl.io.write_table` into a temporary folder, then times whole collated
    batches (all three sequences padded to ``seq_len`` with masks, targets, scalars) arriving
    in the main process for ``seconds`` after the first batch, cycling epochs if needed.

    Besides the wall-clock ``samples_per_s`` it reports the CPU seconds the main process and
    the workers spent per batch; ``samples_per_cpu_bound_s`` = batch_size / the larger of the
    two (per worker) is what the pipeline delivers when each process has a core of its own,
    which a shared machine under load does not give (compare the two figures).
    """
    from functools import partial

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_table(tmp, "samples", synthetic_samples(rows, seq_len), row_group_size=row_group_size)
        write_s = time.perf_counter() - t0
        collate = partial(collate_sequences, seq_columns=dict.fromkeys(("seq_exposure", "seq_click",
                                                                          "seq_order"), seq_len),
                          set_columns={"targets": None})
        stream = ParquetStream(tmp, "samples", batch_size=batch_size, collate=collate, seed=0)
        loader = stream.loader(num_workers=num_workers)
        samples = batches = produced = 0
        start = first = None
        t0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children_cpu()
        while start is None or time.perf_counter() - start < seconds:  # epochs
            it = iter(loader)
            for batch in it:
                produced += 1
                if start is None:  # time from the first batch: worker start-up is reported apart
                    first, start = time.perf_counter() - t0, time.perf_counter()
                    continue
                samples += batch["seq_click"].shape[0]
                batches += 1
                if time.perf_counter() - start >= seconds:
                    break
            it.close()  # shuts the workers down, so their CPU time is counted below
            del it
        elapsed = time.perf_counter() - start
        main_cpu = time.process_time() - cpu0
        workers_cpu = _children_cpu() - kids0 if num_workers else 0.0
        per_batch = max(main_cpu / produced, workers_cpu / produced / max(1, num_workers))
        return dict(samples_per_s=samples / elapsed, samples_per_cpu_bound_s=batch_size / per_batch,
                    num_workers=num_workers, batch_size=batch_size, seq_len=seq_len, sequences=3, rows=rows,
                    row_group_size=row_group_size, epochs=stream.epoch + 1, first_batch_s=first,
                    main_cpu_ms_per_batch=1e3 * main_cpu / produced,
                    workers_cpu_ms_per_batch=1e3 * workers_cpu / produced, write_s=write_s, timed_s=elapsed)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
