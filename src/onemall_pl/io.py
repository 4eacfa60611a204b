"""Files written whole or not at all, and the dataset folder format.

Everything the project writes goes through :func:`atomic_dir` (a folder built under a
temporary name beside its destination, then renamed into place) or :func:`atomic_file`.
A run killed at any point leaves the old folder or the new one, never a mix.

Dataset layout::

    data/<name>/dataset.json          DatasetInfo (tables and row counts, split rule)
    data/<name>/<table>/part-00000.parquet ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from onemall_pl.data.schema import DataError, DatasetInfo, conform, spec

DATASET_JSON = "dataset.json"


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``dest`` in one rename.

    On an exception the temporary folder is removed and ``dest`` is left as it was. A process
    killed (SIGKILL, power loss) cannot clean up: it leaves ``dest`` as it was (or absent, if
    killed between the two renames) and a hidden ``.<name>.tmp-<host>-<pid>-*`` folder, which
    nothing reads and the next write of ``dest`` on this host removes once its process is gone.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_HOST = socket.gethostname().replace("-", "_")


def _remove_stale(dest: Path) -> None:
    """Remove the temporary / displaced folders of ``dest`` left by killed writers on this host."""
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.*-{_HOST}-*-*"):
        kind, _, rest = p.name[len(dest.name) + 2:].partition("-")
        pid = rest[len(_HOST) + 1:].split("-")[0]
        if kind not in ("tmp", "old") or not rest.startswith(_HOST + "-") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``dest``; it replaces ``dest`` when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------- tables


class ShardWriter:
    """Streams batches of one table into numbered Parquet shards under ``folder/<table>/``.

    Every batch is validated against the contract (:func:`~onemall_pl.data.schema.conform`)
    before it is written, so a bad row fails the write with its global row number. Meant to
    be used inside :func:`atomic_dir`, which makes the whole dataset appear at once.
    """

    def __init__(self, folder: str | os.PathLike, table: str, *, rows_per_shard: int = 1_000_000,
                 row_group_size: int = 65_536, shard_prefix: str = "part"):
        self.table, self.rows_per_shard, self.row_group_size = table, rows_per_shard, row_group_size
        self.dir = Path(folder) / table
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = shard_prefix
        self.rows = 0
        self._shard = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._schema: pa.Schema | None = None

    def write(self, batch: pa.Table) -> None:
        batch = conform(batch, self.table, row_offset=self.rows, allow_empty=True)
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            raise DataError(f"batch schema {batch.schema} differs from the first batch {self._schema}",
                            table=self.table, row=self.rows)
        start = 0
        while start < batch.num_rows:
            if self._writer is None:
                path = self.dir / f"{self.prefix}-{self._shard:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self._schema, compression="zstd")
            take = min(batch.num_rows - start, self.rows_per_shard - self._in_shard)
            self._writer.write_table(batch.slice(start, take), row_group_size=self.row_group_size)
            start += take
            self._in_shard += take
            self.rows += take
            if self._in_shard >= self.rows_per_shard:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._shard += 1
            self._in_shard = 0

    def close(self) -> int:
        self._close_shard()
        if self.rows == 0:  # keep an empty table readable
            schema = self._schema or spec(self.table).schema
            pq.write_table(schema.empty_table(), self.dir / f"{self.prefix}-00000.parquet")
        return self.rows

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_table(folder: str | os.PathLike, table: str, data: pa.Table | Iterable[pa.Table], **kw) -> int:
    """Validate and write ``data`` (a table or an iterable of batches) as ``folder/<table>/``."""
    with ShardWriter(folder, table, **kw) as w:
        for batch in [data] if isinstance(data, pa.Table) else data:
            w.write(batch)
    return w.rows


def _shards_pending(folder: str | os.PathLike) -> str:
    """What to add to a "not found" error while ``onemall data synth --shard i/n`` processes are
    still filling ``folder`` (their staging folder ``.shards`` is there, ``dataset.json`` not yet)."""
    folder = Path(folder)
    staging = folder / ".shards"  # onemall_pl.data.synth.generate's
    if (folder / DATASET_JSON).exists() or not staging.is_dir():
        return ""
    done = [p.name for p in sorted(staging.glob("*-of-*")) if (p / "done").exists()]
    return (f"; {folder} is still being generated by `onemall data synth --shard i/n` (shards done: "
            f"{', '.join(done) or 'none'}); dataset.json is written when the last one finishes")


def table_files(folder: str | os.PathLike, table: str) -> list[Path]:
    """The Parquet shards of ``folder/<table>/`` in order; an error naming what is missing."""
    d = Path(folder) / table
    if not d.is_dir():
        raise DataError(f"no folder {d} (tables here: "
                        f"{sorted(p.name for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else 'none: the dataset folder does not exist'})"
                        f"{_shards_pending(folder)}", table=table, file=str(d))
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise DataError("no Parquet shards", table=table, file=str(d))
    return files


def open_parquet(path: str | os.PathLike, table: str | None = None) -> pq.ParquetFile:
    """``pq.ParquetFile`` with a corrupt or truncated file reported as a :class:`DataError`."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", table=table, file=str(path)) from None


def read_table(folder: str | os.PathLike, table: str, columns: list[str] | None = None, *,
               validate: bool = True) -> pa.Table:
    """Read all shards of one table, checked against the contract (errors name the shard)."""
    parts, offset = [], 0
    for f in table_files(folder, table):
        pf = open_parquet(f, table)
        if columns is not None and (missing := [c for c in columns if c not in pf.schema_arrow.names]):
            raise DataError(f"missing column(s) {missing}; the shard has {pf.schema_arrow.names}", table=table,
                            file=str(f))
        try:
            t = pf.read(columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read ({e})", table=table, file=str(f)) from None
        if validate and columns is None:
            t = conform(t, table, file=str(f), row_offset=offset, allow_empty=True)
        if parts:
            check_same_schema(t.schema, parts[0].schema, table=table, file=str(f))
        offset += t.num_rows
        parts.append(t)
    out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if validate and columns is None and out.num_rows == 0:
        raise DataError("table is empty", table=table, file=str(Path(folder) / table))
    return out


def check_same_schema(schema: pa.Schema, first: pa.Schema, *, table: str, file: str) -> None:
    """Shards of one table must share one schema (names, types, nullability): schema drift
    between shards is a :class:`DataError` naming the shard and the fields that differ."""
    if schema.remove_metadata().equals(first.remove_metadata()):
        return
    a, b = {f.name: f for f in first}, {f.name: f for f in schema}
    diff = [f"{n}: {a[n].type if n in a else 'absent'}{'' if n not in a or a[n].nullable else ' not null'} in "
            f"the first shard, {b[n].type if n in b else 'absent'}{'' if n not in b or b[n].nullable else ' not null'}"
            " here" for n in dict.fromkeys([*a, *b]) if n not in a or n not in b or not a[n].equals(b[n])]
    raise DataError(f"schema differs from the table's first shard ({'; '.join(diff) or 'column order'})",
                    table=table, file=file)


def read_file_table(path: str | os.PathLike, table: str) -> pa.Table:
    """Read a user's single Parquet file (or folder of shards) as table ``table``, validated."""
    p = Path(path)
    if p.is_dir():
        return read_table(p.parent, p.name) if p.name == table else _read_dir_as(p, table)
    if not p.exists():
        raise DataError("file does not exist", table=table, file=str(p))
    try:
        t = open_parquet(p, table).read()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read ({e})", table=table, file=str(p)) from None
    return conform(t, table, file=str(p))


def _read_dir_as(d: Path, table: str) -> pa.Table:
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise DataError("no Parquet files in folder", table=table, file=str(d))
    parts, offset = [], 0
    for f in files:
        t = conform(open_parquet(f, table).read(), table, file=str(f), row_offset=offset, allow_empty=True)
        offset += t.num_rows
        parts.append(t)
    return pa.concat_tables(parts)


def write_dataset_info(folder: str | os.PathLike, info: DatasetInfo) -> None:
    write_json(Path(folder) / DATASET_JSON, dataclasses.asdict(info))


def read_dataset_info(folder: str | os.PathLike) -> DatasetInfo:
    path = Path(folder) / DATASET_JSON
    if not path.exists():
        raise DataError(_shards_pending(folder)[2:] or f"{path} not found: is {folder} a dataset folder? "
                        "Create one with `onemall data synth|ml100k|amazon|import`.", file=str(path))
    try:
        return DatasetInfo(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"malformed dataset.json ({e})", file=str(path)) from None
