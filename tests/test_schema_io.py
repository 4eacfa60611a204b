import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onemall_pl.artifacts import ArtifactError, load_manifest, write_artifact
from onemall_pl.data.schema import TABLES, DataError, conform
from onemall_pl.io import atomic_dir, read_table, write_table


def _events(n=5, **over):
    cols = dict(request_id=np.arange(n), user_id=np.arange(n), ts=np.arange(n) * 10,
                scenario=["product_card"] * n, item_id=np.arange(n), click=np.ones(n, np.int8),
                order=np.zeros(n, np.int8), gmv=np.zeros(n, np.float32), watch_s=[None] * n)
    cols.update(over)
    return pa.table(cols)


def test_every_table_round_trips(tmp_path):
    for name, ts in TABLES.items():
        empty = ts.schema.empty_table()
        write_table(tmp_path, name, empty)
        assert pq.read_schema(next((tmp_path / name).glob("*.parquet"))).equals(ts.schema)


def test_events_round_trip_and_cast(tmp_path):
    t = _events()
    write_table(tmp_path, "events", t, rows_per_shard=2)
    assert len(list((tmp_path / "events").glob("*.parquet"))) == 3
    back = read_table(tmp_path, "events")
    assert back.schema.equals(TABLES["events"].schema)
    assert back.column("request_id").to_pylist() == list(range(5))


@pytest.mark.parametrize("bad, column, row", [
    (dict(scenario=["product_card", "feed", "short_video", "x", "y"]), "scenario", 1),
    (dict(gmv=np.array([0, 0, np.nan, 0, 0], np.float32)), "gmv", 2),
    (dict(user_id=np.array([0, 1, 2, -3, 4])), "user_id", 3),
    (dict(item_id=[0, 1, 2, 3, None]), "item_id", 4),
])
def test_bad_values_name_column_and_row(bad, column, row):
    with pytest.raises(DataError) as e:
        conform(_events(**bad), "events", file="ev.parquet")
    msg = str(e.value)
    assert f"column '{column}'" in msg and f"row {row}" in msg and "table 'events'" in msg and "ev.parquet" in msg


def test_missing_column_and_wrong_type():
    with pytest.raises(DataError, match="missing column.*'click'"):
        conform(_events().drop(["click"]), "events")
    with pytest.raises(DataError, match="column 'ts'.*expected int64"):
        conform(_events(ts=["a"] * 5), "events")


def test_corrupt_parquet_is_named(tmp_path):
    write_table(tmp_path, "events", _events())
    f = next((tmp_path / "events").glob("*.parquet"))
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(DataError, match=str(f.name)):
        read_table(tmp_path, "events")


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "d"
    with atomic_dir(dest) as t:
        (t / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as t:
            (t / "a").write_text("2")
            raise RuntimeError("killed")
    assert (dest / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_manifest_detects_tampering(tmp_path):
    def build(d):
        (d / "x.json").write_text(json.dumps({"a": 1}))

    m = write_artifact(tmp_path / "art", build, stage="quantize", dataset="t", sizes={"codebook_sizes": [4, 4]})
    again = load_manifest(tmp_path / "art", stage="quantize")
    assert again.id == m.id and again.size("codebook_sizes") == [4, 4]
    with pytest.raises(ArtifactError, match="expected a 'tokenizer' artifact"):
        load_manifest(tmp_path / "art", stage="tokenizer")
    (tmp_path / "art" / "x.json").write_text("{}")
    with pytest.raises(ArtifactError, match="sha256"):
        load_manifest(tmp_path / "art")
    with pytest.raises(ArtifactError, match="not found"):
        load_manifest(tmp_path / "nope", stage="tokenizer")
