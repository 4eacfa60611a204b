"""``onemall data ml100k``: MovieLens-100K in the data contract.

    onemall data ml100k --out data/ml100k [--cache_dir ~/.cache/onemall]

Source: the atomic files RecBole ships inside its wheel (``recbole==1.2.1``,
``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``, tab-separated with a
``name:type`` header). The wheel is fetched with ``pip download --no-deps`` into the cache
folder (``--cache_dir``, else ``$ONEMALL_CACHE``, else ``~/.cache/onemall``), reused when
present, and read with :mod:`zipfile`; RecBole itself is never installed.

Mapping into the contract (MovieLens has no funnel, prices or shops):

- items: every movie is an ``item_type="product"``; ``title = "Title (Year)"``; ``text`` =
  the genres, comma-separated; ``category`` = the ids of the movie's genres in the file's
  order (the canonical ``u.genre`` order), at most three, read as L1..L3 (genres are flat:
  every one is a level-1 row of the ``categories`` table); ``price = 0.0`` (unknown);
  ``shop_id = 0``; no images.
- events: every rating is one request (``request_id`` numbered by ``(ts, user_id,
  item_id)``) in scenario ``product_card`` with one exposure that is clicked (an
  interaction, as the SASRec / TIGER literature counts every rating); a rating >= 4 is
  also an ``order`` with ``gmv = 1.0`` (one unit; there are no prices). ``ts`` = the
  rating's Unix timestamp (seconds), made strictly increasing per user: half of the ratings tie
  with another of the same user's to the second; ties keep the file's order and are spread one
  second apart (52,556 ratings move, by at most 9 s), so every earlier rating is in a request's
  history, as in the literature's leave-one-out sequences.
- users: ``user_id`` with ``age``, ``gender``, ``occupation``, ``zip_code`` as strings
  (categorical features).
- split: leave-one-out per user (``onemall data build``): the user's last interaction is
  test, the second last valid, the rest train.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from onemall_pl.data.importer import write_dataset
from onemall_pl.data.schema import DataError, DatasetInfo

RECBOLE = "recbole==1.2.1"
WHEEL = "recbole-1.2.1-py3-none-any.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
ORDER_MIN_RATING = 4.0
ORDER_GMV = 1.0
MAX_CATEGORY_LEVELS = 3
SPLIT_RULE = "leave-one-out per user: last interaction test, second last valid"
# MovieLens-100K's u.genre, in its order; a genre's id is its position here.
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")


def cache_folder(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("ONEMALL_CACHE") or Path.home() / ".cache" / "onemall")


def fetch_wheel(cache_dir: Path | None = None) -> Path:
    """The recbole wheel in the cache folder, downloaded with pip if it is not there yet."""
    cache = cache_folder(cache_dir)
    wheel = cache / WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", RECBOLE,
               "-d", str(cache)]
        print("fetching MovieLens-100K:", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wheel


def read_wheel(wheel: Path) -> dict[str, str]:
    """The ``inter`` / ``item`` / ``user`` atomic files of ml-100k, as text, from the wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            missing = [MEMBER.format(s) for s in ("inter", "item", "user") if MEMBER.format(s) not in names]
            if missing:
                raise DataError(f"the wheel does not contain {missing}", file=str(wheel))
            return {s: z.read(MEMBER.format(s)).decode("utf-8") for s in ("inter", "item", "user")}
    except zipfile.BadZipFile as e:
        raise DataError(f"not a readable wheel ({e}); delete it to download it again", file=str(wheel)) from None


def _atomic_columns(text: str, file: str, needed: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """Split a RecBole atomic file into rows and map ``needed`` column names to positions."""
    lines = text.splitlines()
    if len(lines) < 2:
        raise DataError("the file has no rows", file=file)
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    for name in needed:
        if name not in header:
            raise DataError(f"missing column; the header has {header}", file=file, column=name)
    return lines[1:], {name: header.index(name) for name in needed}


def _fields(rows: list[str], pos: dict[str, int], file: str) -> list[list[str]]:
    width = max(pos.values()) + 1
    out = []
    for i, line in enumerate(rows):
        f = line.split("\t")
        if len(f) < width:
            raise DataError(f"expected at least {width} tab-separated fields, got {len(f)}: {line!r}",
                            file=file, row=i)
        out.append(f)
    return out


def _numbers(fields: list[list[str]], pos: dict[str, int], name: str, file: str, dtype) -> np.ndarray:
    col = [f[pos[name]] for f in fields]
    try:
        return np.asarray(col, dtype=np.float64).astype(dtype)
    except ValueError:
        for i, v in enumerate(col):
            try:
                float(v)
            except ValueError:
                raise DataError(f"not a number: {v!r}", file=file, column=name, row=i) from None
        raise


def _strictly_increasing_per_user(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """``ts`` (sorted by user, then time) made strictly increasing within each user with the least
    change: ``ts_i = max(ts_i, ts_{i-1} + 1)``, i.e. ``k + cummax(ts - k)`` for the k-th rating."""
    start = np.r_[True, user[1:] != user[:-1]]
    group = np.cumsum(start) - 1
    k = np.arange(len(ts)) - np.flatnonzero(start)[group]
    span = int(ts.max() - ts.min()) + len(ts) + 1
    v = ts - k + group * span  # offsets keep each user's running maximum to itself
    return np.maximum.accumulate(v) - group * span + k


def parse(texts: dict[str, str], source: str = "ml-100k") -> dict[str, pa.Table]:
    """The contract tables (items, events, users, categories) from the three atomic files' text.

    ``source`` prefixes the file names in error messages (e.g. the wheel's path).
    """
    f_inter, f_item, f_user = (f"{source}/ml-100k.{s}" for s in ("inter", "item", "user"))

    rows, pos = _atomic_columns(texts["item"], f_item, ("item_id", "movie_title", "release_year", "class"))
    fields = _fields(rows, pos, f_item)
    item_id = _numbers(fields, pos, "item_id", f_item, np.int64)
    genre_id = {g: i for i, g in enumerate(GENRES)}
    titles, texts_, categories = [], [], []
    for i, f in enumerate(fields):
        year = f[pos["release_year"]].strip()
        title = f[pos["movie_title"]].strip()
        titles.append(f"{title} ({year})" if year else title)
        genres = f[pos["class"]].split()
        unknown = [g for g in genres if g not in genre_id]
        if unknown or not genres:
            raise DataError(f"genres {genres} not in {list(GENRES)}", file=f_item, column="class", row=i)
        texts_.append(", ".join(genres))
        categories.append([genre_id[g] for g in genres[:MAX_CATEGORY_LEVELS]])
    n = len(fields)
    items = pa.table({
        "item_id": item_id, "item_type": ["product"] * n, "title": titles, "text": texts_,
        "images": pa.nulls(n, pa.list_(pa.binary())), "category": pa.array(categories, pa.list_(pa.int32())),
        "price": np.zeros(n, np.float32), "shop_id": np.zeros(n, np.int64),
        "product_id": pa.nulls(n, pa.int64()),
    })

    rows, pos = _atomic_columns(texts["inter"], f_inter, ("user_id", "item_id", "rating", "timestamp"))
    fields = _fields(rows, pos, f_inter)
    user = _numbers(fields, pos, "user_id", f_inter, np.int64)
    item = _numbers(fields, pos, "item_id", f_inter, np.int64)
    rating = _numbers(fields, pos, "rating", f_inter, np.float32)
    ts = _numbers(fields, pos, "timestamp", f_inter, np.int64)
    # ties: half of the ratings share their second with another of the same user's; the file's
    # order breaks them (as RecBole / SASRec's stable sort by time does), and they are spread one
    # second apart, so a request's history ("events strictly before it") holds every earlier rating
    order = np.lexsort((np.arange(len(user)), ts, user))
    user, item, rating, ts = user[order], item[order], rating[order], ts[order]
    ts = _strictly_increasing_per_user(user, ts)
    order = np.lexsort((item, user, ts))
    user, item, rating, ts = user[order], item[order], rating[order], ts[order]
    n = len(user)
    is_order = (rating >= ORDER_MIN_RATING).astype(np.int8)
    events = pa.table({
        "request_id": np.arange(n, dtype=np.int64), "user_id": user, "ts": ts,
        "scenario": ["product_card"] * n, "item_id": item, "click": np.ones(n, np.int8),
        "order": is_order, "gmv": is_order.astype(np.float32) * np.float32(ORDER_GMV),
        "watch_s": pa.nulls(n, pa.float32()),
    })

    cols = ("user_id", "age", "gender", "occupation", "zip_code")
    rows, pos = _atomic_columns(texts["user"], f_user, cols)
    fields = _fields(rows, pos, f_user)
    users = pa.table({"user_id": _numbers(fields, pos, "user_id", f_user, np.int64),
                      **{c: [f[pos[c]] for f in fields] for c in cols[1:]}})

    categories = pa.table({
        "category_id": pa.array(range(len(GENRES)), pa.int32()), "name": list(GENRES),
        "level": pa.array([1] * len(GENRES), pa.int8()), "parent_id": pa.nulls(len(GENRES), pa.int32()),
    })
    return {"items": items, "events": events, "users": users, "categories": categories}


def load(out: Path, cache_dir: Path | None = None) -> None:
    """Fetch (or reuse) the recbole wheel and write MovieLens-100K as the dataset folder ``out``."""
    wheel = fetch_wheel(cache_dir)
    tables = parse(read_wheel(wheel), source=f"{wheel}!recbole/dataset_example/ml-100k")
    info = DatasetInfo(name=Path(out).name, source="ml100k", split_rule=SPLIT_RULE,
                       params={"wheel": WHEEL, "order_min_rating": ORDER_MIN_RATING, "order_gmv": ORDER_GMV})
    files = {"items": f"{wheel}!{MEMBER.format('item')}", "events": f"{wheel}!{MEMBER.format('inter')}",
             "users": f"{wheel}!{MEMBER.format('user')}"}
    info = write_dataset(out, tables, info, files=files)
    print(f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in info.tables.items()))
