"""Real-data loaders (MovieLens-100K, Amazon Reviews, your own Parquet) on fixtures in the exact
source formats, written here; and every bad input answered with a DataError naming where."""

import gzip
import json
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onemall_pl.data import amazon, importer, ml100k
from onemall_pl.data.schema import DataError
from onemall_pl.io import read_dataset_info, read_table

# ----------------------------------------------------------------------------- MovieLens-100K

ML_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
196\t242\t3\t881250949
186\t302\t3\t891717742
196\t302\t5\t881250950
22\t377\t1\t878887116
22\t242\t4\t878887000
186\t377\t4\t891717700
"""
ML_ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
242\tKolya\t1996\tComedy
302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller
377\tHeavyweights\t1994\tChildren's Comedy
"""
ML_USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
196\t49\tM\twriter\t55105
186\t39\tF\texecutive\t00000
22\t25\tM\twriter\t40206
"""


def _ml_wheel(folder, inter=ML_INTER, item=ML_ITEM, user=ML_USER, drop=()):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / ml100k.WHEEL, "w") as z:
        for suffix, text in (("inter", inter), ("item", item), ("user", user)):
            if suffix not in drop:
                z.writestr(ml100k.MEMBER.format(suffix), text)
    return folder


def test_ml100k_from_a_cached_wheel(tmp_path):
    cache = _ml_wheel(tmp_path / "cache")
    ml100k.load(out=tmp_path / "ml", cache_dir=cache)
    info = read_dataset_info(tmp_path / "ml")
    assert info.source == "ml100k" and info.split_rule.startswith("leave-one-out")
    assert info.tables == {"items": 3, "events": 6, "categories": len(ml100k.GENRES), "users": 3}
    items = read_table(tmp_path / "ml", "items").to_pylist()
    la = next(i for i in items if i["item_id"] == 302)
    g = {name: i for i, name in enumerate(ml100k.GENRES)}
    assert la["title"] == "L.A. Confidential (1997)" and la["text"] == "Crime, Film-Noir, Mystery, Thriller"
    assert la["category"] == [g["Crime"], g["Film-Noir"], g["Mystery"]] and la["price"] == 0.0
    ev = read_table(tmp_path / "ml", "events")
    assert ev.column("ts").to_pylist() == sorted(ev.column("ts").to_pylist())
    assert ev.column("request_id").to_pylist() == list(range(6))
    assert set(ev.column("click").to_pylist()) == {1}
    rating = {(196, 242): 3, (186, 302): 3, (196, 302): 5, (22, 377): 1, (22, 242): 4, (186, 377): 4}
    for r in ev.to_pylist():
        assert r["order"] == (rating[r["user_id"], r["item_id"]] >= 4) and r["gmv"] == r["order"] * ml100k.ORDER_GMV
    users = read_table(tmp_path / "ml", "users").to_pylist()
    assert {"user_id": 186, "age": "39", "gender": "F", "occupation": "executive", "zip_code": "00000"} in users


@pytest.mark.parametrize("kw, match", [
    ({"drop": ("user",)}, "does not contain.*ml-100k.user"),
    ({"inter": ML_INTER.replace("rating:float", "score:float")}, r"ml-100k.inter.*column 'rating'"),
    ({"inter": ML_INTER.replace("881250950", "yesterday")}, r"ml-100k.inter.*column 'timestamp', row 2"),
    ({"item": ML_ITEM.replace("Children's Comedy", "Cartoon")}, r"ml-100k.item.*column 'class', row 2"),
    ({"inter": ML_INTER + "22\t999\t4\t878887001\n"}, r"table 'events', column 'item_id', row \d: unknown id 999"),
])
def test_ml100k_bad_files_are_named_and_nothing_is_written(tmp_path, kw, match):
    cache = _ml_wheel(tmp_path / "cache", **kw)
    with pytest.raises(DataError, match=match):
        ml100k.load(out=tmp_path / "ml", cache_dir=cache)
    assert not (tmp_path / "ml").exists()


@pytest.mark.slow
def test_ml100k_ties_keep_the_file_order_one_second_apart():
    """Two ratings of one user in the same second: the file's order, 1 s apart, so the later one's
    history (events strictly before it) holds the earlier one; other users' times are untouched."""
    inter = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
             "7\t302\t4\t100\n7\t242\t5\t100\n7\t377\t3\t101\n8\t242\t3\t100\n")
    ev = ml100k.parse({"inter": inter, "item": ML_ITEM, "user": ML_USER.replace("196", "7").replace("186", "8")})["events"]
    got = sorted(zip(ev.column("user_id").to_pylist(), ev.column("ts").to_pylist(), ev.column("item_id").to_pylist()))
    assert got == [(7, 100, 302), (7, 101, 242), (7, 102, 377), (8, 100, 242)]


def test_ml100k_real_wheel(tmp_path):
    """Downloads recbole==1.2.1 (2 MB) with pip and loads the real MovieLens-100K."""
    ml100k.load(out=tmp_path / "ml", cache_dir=tmp_path / "cache")
    info = read_dataset_info(tmp_path / "ml")
    assert info.tables == {"items": 1682, "events": 100_000, "categories": 19, "users": 943}
    ev = read_table(tmp_path / "ml", "events")
    assert len(np.unique(ev.column("user_id").to_numpy())) == 943


# ----------------------------------------------------------------------------- Amazon

REVIEWS_2014 = [
    {"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714", "reviewerName": "J. McDonald", "helpful": [2, 3],
     "reviewText": "I bought this for my husband...", "overall": 5.0, "summary": "Heavenly",
     "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"},
    {"reviewerID": "A2SUAM1J3GNN3B", "asin": "B00004U9V2", "overall": 3.0, "unixReviewTime": 1252900000},
    {"reviewerID": "A1QA985ULVCQOB", "asin": "B00004U9V2", "overall": 4.0, "unixReviewTime": 1252700000},
    {"reviewerID": "A1QA985ULVCQOB", "asin": "B0000531EN", "overall": 2.0, "unixReviewTime": 1252950000},
    {"reviewerID": "A1QA985ULVCQOB", "asin": "0000013714", "overall": 5.0, "unixReviewTime": 1253000000},
]
META_2014 = [  # Python literals, as in meta_Beauty.json.gz
    {"asin": "0000013714", "title": "Heavenly Highway Hymns", "price": 13.02, "imUrl": "http://x/1.jpg",
     "related": {"also_bought": ["B00004U9V2"]}, "salesRank": {"Beauty": 1},
     "categories": [["Beauty", "Skin Care", "Face", "Creams & Moisturizers"], ["Beauty", "Bath"]],
     "brand": "Crabtree & Evelyn", "description": "Hymns for the soul"},
    {"asin": "B00004U9V2", "title": "Hand Cream", "price": 4.5, "categories": [["Beauty", "Skin Care", "Hands"]],
     "brand": "Crabtree & Evelyn"},
    {"asin": "B0000531EN", "categories": [["Beauty", "Makeup"]], "description": "no title, no price"},
    {"asin": "B000NOTREVIEWED", "title": "never reviewed", "price": 1.0, "categories": [["Beauty"]]},
]
META_2018 = [
    {"category": ["All Beauty", "Skin Care"], "description": ["Soft", "and smooth"], "title": "Lotion &amp; co",
     "brand": "Acme", "price": "$12.99", "asin": "0000013714"},
    {"category": ["All Beauty", "Hair Care", "Shampoo"], "description": [], "title": "Shampoo", "brand": "",
     "price": "$3.50 - $10.00", "asin": "B00004U9V2"},
    {"category": [], "title": "Odd", "price": ".a-box-inner{background-color:#fff}", "asin": "B0000531EN"},
]


def _amazon(tmp_path, reviews=REVIEWS_2014, meta=META_2014, literal=True, gz=True):
    rv = tmp_path / ("reviews_Beauty_5.json.gz" if gz else "reviews.json")
    mt = tmp_path / ("meta_Beauty.json.gz" if gz else "meta.json")
    lines = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in reviews) + "\n"
    mlines = "\n".join(repr(m) if literal else json.dumps(m) for m in meta) + "\n"
    for path, text in ((rv, lines), (mt, mlines)):
        if gz:
            with gzip.open(path, "wt") as f:
                f.write(text)
        else:
            path.write_text(text)
    return rv, mt


def test_amazon_2014(tmp_path):
    rv, mt = _amazon(tmp_path)
    amazon.load(reviews=rv, meta=mt, out=tmp_path / "beauty")
    d = tmp_path / "beauty"
    info = read_dataset_info(d)
    assert info.source == "amazon" and info.name == "beauty" and info.split_rule.startswith("leave-one-out")
    assert info.params["items_without_price"] == 1 and info.params["items_without_meta"] == 0
    asin = dict(zip(*pq.read_table(d / "asin_map.parquet").to_pydict().values()))
    assert sorted(asin) == ["0000013714", "B00004U9V2", "B0000531EN"]  # only reviewed items
    items = {r["item_id"]: r for r in read_table(d, "items").to_pylist()}
    hymns, cream, bare = items[asin["0000013714"]], items[asin["B00004U9V2"]], items[asin["B0000531EN"]]
    assert hymns["title"] == "Heavenly Highway Hymns" and hymns["text"] == "Hymns for the soul"
    assert hymns["price"] == pytest.approx(13.02) and bare["price"] == 0.0 and bare["title"] == ""
    assert hymns["shop_id"] == cream["shop_id"] > 0 and bare["shop_id"] == 0
    cats = {r["category_id"]: r for r in read_table(d, "categories").to_pylist()}
    assert [cats[c]["name"] for c in hymns["category"]] == ["Beauty", "Skin Care", "Face"]  # first path, 3 levels
    assert [cats[c]["level"] for c in hymns["category"]] == [1, 2, 3]
    assert cats[hymns["category"][2]]["parent_id"] == hymns["category"][1]
    assert hymns["category"][:2] == cream["category"][:2]  # shared tree nodes
    ev = read_table(d, "events").to_pylist()
    assert [e["ts"] for e in ev] == sorted(r["unixReviewTime"] for r in REVIEWS_2014)
    users = dict(zip(*pq.read_table(d / "user_map.parquet").to_pydict().values()))
    first = ev[0]  # A1QA985ULVCQOB bought the cream at 1252700000 with 4 stars: an order at its price
    assert first["user_id"] == users["A1QA985ULVCQOB"] and first["item_id"] == asin["B00004U9V2"]
    assert first["order"] == 1 and first["gmv"] == pytest.approx(4.5)
    assert [e["order"] for e in ev] == [1, 1, 0, 0, 1]


def test_amazon_2018_json_meta_and_price_strings(tmp_path):
    reviews = [{k: v for k, v in r.items() if k != "overall"} for r in REVIEWS_2014]  # no rating: every review orders
    rv, mt = _amazon(tmp_path, reviews=reviews, meta=META_2018, literal=False, gz=False)
    amazon.load(reviews=rv, meta=mt, out=tmp_path / "out", name="beauty18")
    assert read_dataset_info(tmp_path / "out").name == "beauty18"
    items = read_table(tmp_path / "out", "items").to_pylist()
    by_title = {i["title"]: i for i in items}
    assert by_title["Lotion & co"]["price"] == pytest.approx(12.99)
    assert by_title["Lotion & co"]["text"] == "Soft\nand smooth"
    assert by_title["Shampoo"]["price"] == pytest.approx(3.5) and by_title["Shampoo"]["shop_id"] == 0
    assert by_title["Odd"]["price"] == 0.0 and by_title["Odd"]["category"] == []
    assert set(read_table(tmp_path / "out", "events").column("order").to_pylist()) == {1}


@pytest.mark.parametrize("change, match", [
    (lambda r: r[:2] + ["{not json"] + r[3:], r"reviews.json', table 'reviews', row 2"),
    (lambda r: r[:3] + [{"reviewerID": "A", "asin": "B"}] + r[4:], r"table 'reviews', column 'unixReviewTime', row 3"),
    (lambda r: r[:1] + [dict(r[1], overall="five")] + r[2:], r"table 'reviews', column 'overall', row 1"),
    (lambda r: [], r"table 'reviews'.*no reviews"),
])
def test_amazon_bad_reviews(tmp_path, change, match):
    rv, mt = _amazon(tmp_path, reviews=change(list(REVIEWS_2014)), gz=False)
    with pytest.raises(DataError, match=match):
        amazon.load(reviews=rv, meta=mt, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- import


def _items(n=4):
    return pa.table({
        "item_id": np.arange(n, dtype=np.int64), "item_type": ["product"] * (n - 1) + ["video"],
        "title": [f"item {i}" for i in range(n)], "text": [None] * n, "images": pa.nulls(n, pa.list_(pa.binary())),
        "category": [[1, 2, 3]] * n, "price": np.linspace(1, 9, n).astype(np.float32), "shop_id": np.ones(n, np.int64),
        "product_id": [None] * (n - 1) + [0],
    })


def _events(n=6):
    return pa.table({
        "request_id": np.arange(n, dtype=np.int64), "user_id": np.arange(n, dtype=np.int64) % 2,
        "ts": np.arange(n, dtype=np.int64) * 100, "scenario": ["product_card"] * n,
        "item_id": np.arange(n, dtype=np.int64) % 4, "click": np.ones(n, np.int8), "order": np.zeros(n, np.int8),
        "gmv": np.zeros(n, np.float32), "watch_s": pa.nulls(n, pa.float32()),
    })


def test_import_round_trip(tmp_path):
    pq.write_table(_items(), tmp_path / "items.parquet")
    (tmp_path / "ev").mkdir()  # a folder of shards
    pq.write_table(_events().slice(0, 3), tmp_path / "ev" / "a.parquet")
    pq.write_table(_events().slice(3), tmp_path / "ev" / "b.parquet")
    pq.write_table(pa.table({"user_id": [0, 1], "city": ["x", "y"]}), tmp_path / "users.parquet")
    importer.load(items=tmp_path / "items.parquet", events=tmp_path / "ev", users=tmp_path / "users.parquet",
                  out=tmp_path / "mine")
    info = read_dataset_info(tmp_path / "mine")
    assert info.source == "import" and info.tables == {"items": 4, "events": 6, "users": 2}
    assert read_table(tmp_path / "mine", "users").column("city").to_pylist() == ["x", "y"]
    assert read_table(tmp_path / "mine", "events").equals(importer.read_file_table(tmp_path / "ev", "events"))


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:50])


@pytest.mark.parametrize("table, edit, column, row", [
    ("items", lambda t: t.drop(["price"]), "price", None),                                        # missing column
    ("events", lambda t: t.set_column(2, "ts", pa.array([str(i) + "s" for i in range(6)])), "ts", None),  # wrong type
    ("events", lambda t: t.set_column(4, "item_id", pa.array([0, 1, 2, 3, 0, 9], pa.int64())), "item_id", 5),  # unknown
    ("events", lambda t: t.slice(0, 0), None, None),                                               # empty table
    ("items", lambda t: t.set_column(6, "price", pa.array([1, 2, float("nan"), 4], pa.float32())), "price", 2),  # NaN
    ("items", lambda t: t.set_column(8, "product_id", pa.array([None, None, None, 7], pa.int64())), "product_id", 3),
    ("items", lambda t: t.set_column(0, "item_id", pa.array([0, 1, 2, 1], pa.int64())), "item_id", 3),  # duplicate
    ("events", "corrupt", None, None),                                                              # corrupt Parquet
])
def test_import_bad_input_names_file_table_column_row(tmp_path, table, edit, column, row):
    tables = {"items": _items(), "events": _events()}
    if edit != "corrupt":
        tables[table] = edit(tables[table])
    files = {name: tmp_path / f"my_{name}.parquet" for name in tables}
    for name, t in tables.items():
        pq.write_table(t, files[name])
    if edit == "corrupt":
        _corrupt(files[table])
    with pytest.raises(DataError) as e:
        importer.load(items=files["items"], events=files["events"], out=tmp_path / "out")
    msg = str(e.value)
    assert f"my_{table}.parquet" in msg and f"table '{table}'" in msg, msg
    if column:
        assert f"column '{column}'" in msg, msg
    if row is not None:
        assert f"row {row}" in msg, msg
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
