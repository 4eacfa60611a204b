"""``onemall data amazon``: Amazon Reviews (2014 or 2018, 5-core) in the data contract.

    onemall data amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out data/beauty

The format TIGER and most generative-retrieval papers use (McAuley et al.; Ni et al.):

- reviews: one JSON object per line (optionally gzipped) with ``reviewerID``, ``asin``,
  ``unixReviewTime`` and, in both releases, ``overall`` (the 1-5 star rating);
- meta: one object per line; the 2014 files hold Python literals (read with
  :func:`ast.literal_eval`), the 2018 files JSON. Fields used: ``asin``, ``title``,
  ``categories`` (2014: a list of category paths) or ``category`` (2018: one path),
  ``price`` (2014: a number; 2018: a string such as ``"$12.99"`` or ``"$3.50 - $10.00"``),
  ``brand``, ``description`` (a string or a list of strings).

Mapping into the contract:

- items: every asin that has a review (the 5-core), ``item_id`` 0..n-1 in asin order,
  ``item_type="product"``, ``title`` (``""`` when the meta has none), ``text`` = the
  description, ``category`` = the first three levels of the (first) category path, whose
  nodes form the ``categories`` table; ``price`` in dollars (the lower bound of a range;
  ``0.0`` when missing or unreadable, counted in ``dataset.json``); ``shop_id`` = the brand
  (1..n in brand order, 0 = no brand).
- events: every review is one request (``request_id`` numbered by ``(ts, user_id,
  item_id)``) in scenario ``product_card`` with one clicked exposure (the SASRec / TIGER
  literature counts every review as an interaction); it is also an ``order`` when
  ``overall >= 4`` (every review is an order when a line has no rating), ``gmv`` = the price
  of ordered items. ``ts`` = ``unixReviewTime``.
- ``asin_map.parquet`` (asin -> item_id) and ``user_map.parquet`` (reviewerID -> user_id)
  sit beside the tables, outside the data contract.
- split: leave-one-out per user (``onemall data build``).
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from onemall_pl.data.importer import write_dataset
from onemall_pl.data.schema import DataError, DatasetInfo

ORDER_MIN_RATING = 4.0
MAX_CATEGORY_LEVELS = 3
SPLIT_RULE = "leave-one-out per user: last interaction test, second last valid"
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
_PRICE = re.compile(r"\$?\s*(\d[\d,]*(?:\.\d+)?)")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(row, line) of a text file, gunzipped when it is gzip (by its magic bytes)."""
    if not Path(path).exists():
        raise DataError("file does not exist", file=str(path))
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as f:
        row = 0
        for line in f:
            if line.strip():
                yield row, line
                row += 1


def _record(line: str, row: int, file: str, table: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(line)
        except (ValueError, SyntaxError) as e:
            raise DataError(f"neither JSON nor a Python literal ({e.__class__.__name__}): {line[:80]!r}",
                            file=file, table=table, row=row) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected an object, got {type(obj).__name__}", file=file, table=table, row=row)
    return obj


def _number(r: dict, col: str, kind, row: int, file: str):
    try:
        return kind(r[col])
    except (TypeError, ValueError) as e:
        raise DataError(f"not a number ({e})", file=file, table="reviews", column=col, row=row) from None


def read_reviews(path: Path) -> pa.Table:
    """(reviewerID, asin, ts, overall) of a reviews file; ``overall`` is NaN when absent."""
    file = str(path)
    users, asins, ts, overall = [], [], [], []
    for row, line in _lines(path):
        r = _record(line, row, file, "reviews")
        for col in ("reviewerID", "asin", "unixReviewTime"):
            if r.get(col) in (None, ""):
                raise DataError(f"missing field; the line has {sorted(r)}", file=file, table="reviews",
                                column=col, row=row)
        ts.append(_number(r, "unixReviewTime", int, row, file))
        overall.append(_number(r, "overall", float, row, file) if r.get("overall") is not None else float("nan"))
        users.append(str(r["reviewerID"]))
        asins.append(str(r["asin"]))
    if not users:
        raise DataError("no reviews", file=file, table="reviews")
    return pa.table({"reviewerID": users, "asin": asins, "ts": pa.array(ts, pa.int64()),
                     "overall": pa.array(overall, pa.float32())})


def parse_price(value) -> float | None:
    """Dollars from a 2014 number or a 2018 string (``"$12.99"``, ``"$3.50 - $10.00"`` -> 3.5)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        price = float(value)
    elif isinstance(value, str) and (m := _PRICE.search(value)) and len(value) < 40:
        price = float(m.group(1).replace(",", ""))
    else:
        return None
    return price if np.isfinite(price) and price >= 0 else None


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        value = "\n".join(str(v) for v in value if v)
    return html.unescape(str(value)).strip() if value else ""


def _category_path(meta: dict) -> list[str]:
    cats = meta.get("categories", meta.get("category"))
    if not cats:
        return []
    path = cats[0] if isinstance(cats[0], (list, tuple)) else cats  # 2014: list of paths; 2018: one path
    return [_text(c) for c in path if _text(c)][:MAX_CATEGORY_LEVELS]


def read_meta(path: Path, asins: set[str]) -> dict[str, dict]:
    """asin -> meta record, for the asins in ``asins`` only (the first record of a repeated asin)."""
    file, out = str(path), {}
    for row, line in _lines(path):
        m = _ASIN.search(line)
        if m is not None and (m.group(1) not in asins or m.group(1) in out):
            continue  # cheap skip before the (slow) parse of an item without reviews
        r = _record(line, row, file, "meta")
        if "asin" not in r:
            raise DataError(f"missing field; the line has {sorted(r)}", file=file, table="meta", column="asin",
                            row=row)
        if r["asin"] in asins:
            out.setdefault(str(r["asin"]), r)
    return out


def parse(reviews: pa.Table, meta: dict[str, dict]) -> tuple[dict[str, pa.Table], dict[str, pa.Table], dict]:
    """(contract tables, id maps, counts) from the reviews table and the asin -> meta records."""
    asin_list = sorted(set(reviews.column("asin").to_pylist()))
    user_list = sorted(set(reviews.column("reviewerID").to_pylist()))
    item_of = {a: i for i, a in enumerate(asin_list)}
    user_of = {u: i for i, u in enumerate(user_list)}

    node_of: dict[tuple[str, ...], int] = {}
    brands = sorted({_text(m.get("brand")) for m in meta.values()} - {""})
    shop_of = {b: i + 1 for i, b in enumerate(brands)}
    titles, texts, categories, prices, shops = [], [], [], [], []
    no_meta = no_price = 0
    for a in asin_list:
        m = meta.get(a)
        no_meta += m is None
        m = m or {}
        titles.append(_text(m.get("title")))
        texts.append(_text(m.get("description")) or None)
        path, ids = _category_path(m), []
        for level in range(1, len(path) + 1):
            ids.append(node_of.setdefault(tuple(path[:level]), len(node_of)))
        categories.append(ids)
        price = parse_price(m.get("price"))
        no_price += price is None
        prices.append(price or 0.0)
        shops.append(shop_of.get(_text(m.get("brand")), 0))
    n = len(asin_list)
    items = pa.table({
        "item_id": np.arange(n, dtype=np.int64), "item_type": ["product"] * n, "title": titles, "text": texts,
        "images": pa.nulls(n, pa.list_(pa.binary())), "category": pa.array(categories, pa.list_(pa.int32())),
        "price": np.asarray(prices, np.float32), "shop_id": np.asarray(shops, np.int64),
        "product_id": pa.nulls(n, pa.int64()),
    })
    nodes = sorted(node_of.items(), key=lambda kv: kv[1])
    categories_t = pa.table({
        "category_id": pa.array([i for _, i in nodes], pa.int32()), "name": [p[-1] for p, _ in nodes],
        "level": pa.array([len(p) for p, _ in nodes], pa.int8()),
        "parent_id": pa.array([node_of[p[:-1]] if len(p) > 1 else None for p, _ in nodes], pa.int32()),
    })

    user = np.asarray([user_of[u] for u in reviews.column("reviewerID").to_pylist()], np.int64)
    item = np.asarray([item_of[a] for a in reviews.column("asin").to_pylist()], np.int64)
    ts = reviews.column("ts").to_numpy()
    overall = reviews.column("overall").to_numpy()
    order = np.lexsort((item, user, ts))
    user, item, ts, overall = user[order], item[order], ts[order], overall[order]
    is_order = (np.isnan(overall) | (overall >= ORDER_MIN_RATING)).astype(np.int8)
    m = len(user)
    events = pa.table({
        "request_id": np.arange(m, dtype=np.int64), "user_id": user, "ts": ts, "scenario": ["product_card"] * m,
        "item_id": item, "click": np.ones(m, np.int8), "order": is_order,
        "gmv": np.asarray(prices, np.float32)[item] * is_order, "watch_s": pa.nulls(m, pa.float32()),
    })
    tables = {"items": items, "events": events}
    if categories_t.num_rows:
        tables["categories"] = categories_t
    maps = {"asin_map": pa.table({"asin": asin_list, "item_id": np.arange(n, dtype=np.int64)}),
            "user_map": pa.table({"reviewerID": user_list, "user_id": np.arange(len(user_list), dtype=np.int64)})}
    counts = {"items_without_meta": no_meta, "items_without_price": no_price, "brands": len(brands)}
    return tables, maps, counts


def load(reviews: Path, meta: Path, out: Path, name: str | None = None) -> None:
    """Read an Amazon reviews file and its meta file and write them as the dataset folder ``out``."""
    r = read_reviews(reviews)
    tables, maps, counts = parse(r, read_meta(meta, set(r.column("asin").to_pylist())))
    info = DatasetInfo(name=name or Path(out).name, source="amazon", split_rule=SPLIT_RULE,
                       params={"reviews": str(reviews), "meta": str(meta), "order_min_rating": ORDER_MIN_RATING,
                               **counts})
    info = write_dataset(out, tables, info, extra_files=maps, files={"events": str(reviews), "items": str(meta)})
    print(f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in info.tables.items())
          + f" ({counts['items_without_meta']} items without meta, {counts['items_without_price']} without price)")
