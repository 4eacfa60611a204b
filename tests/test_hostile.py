"""Hostile inputs not covered by the stage and data tests: each is a clear error (DataError /
ArtifactError, naming the file) and nothing partial is written. The rest are listed, with the
test that covers each, in docs/reliability.md."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from onemall_pl.artifacts import ArtifactError, write_artifact
from onemall_pl.data.datasets import ParquetStream
from onemall_pl.data.schema import DataError
from onemall_pl.io import read_table


@pytest.fixture
def copy(micro_world, tmp_path):
    d = tmp_path / "micro"
    shutil.copytree(micro_world, d)
    return d


def _two_shards(d, second) -> None:
    """Rewrite ``samples`` as two shards, the second passed through ``second``."""
    f = d / "samples" / "part-00000.parquet"
    t = pq.read_table(f)
    f.unlink()
    pq.write_table(t.slice(0, 60), d / "samples" / "part-00000.parquet")
    pq.write_table(second(t.slice(60)), d / "samples" / "part-00001.parquet")


def _readers(d):
    return {"read_table": lambda: read_table(d, "samples"),
            "read_table(validate=False)": lambda: read_table(d, "samples", validate=False),
            "read_table(columns)": lambda: read_table(d, "samples", ["request_id", "ts", "seq_order"], validate=False),
            "ParquetStream": lambda: list(ParquetStream(d, "samples", batch_size=8))}


@pytest.mark.parametrize("drift", ["column dropped", "type changed", "nullability changed"])
def test_schema_drift_between_shards_names_the_shard(copy, drift):
    def second(t: pa.Table) -> pa.Table:
        if drift == "column dropped":
            return t.drop(["seq_order"])
        i = t.schema.get_field_index("ts")
        if drift == "type changed":
            return t.set_column(i, "ts", pa.array(t.column("ts").to_numpy().astype(np.float64)))
        return t.cast(t.schema.set(i, pa.field("ts", pa.int64(), nullable=True)))

    _two_shards(copy, second)
    for name, read in _readers(copy).items():
        if name == "read_table" and drift != "column dropped":
            continue  # validated reads conform each shard to the contract (a lossless cast)
        with pytest.raises(DataError, match=r"part-00001\.parquet.*table 'samples'") as e:
            read()
        assert "seq_order" in str(e.value) or "ts" in str(e.value), (name, str(e.value))


def test_corrupt_data_page_is_named(copy):
    """Footer intact, bytes of one column chunk scrambled (a disk or copy error, not a truncation:
    truncated files are tests/test_schema_io.py::test_corrupt_parquet_is_named)."""
    _two_shards(copy, lambda t: t)
    p = copy / "samples" / "part-00001.parquet"
    col = pq.ParquetFile(p).metadata.row_group(0).column(5)  # seq_click
    b = bytearray(p.read_bytes())
    for i in range(col.data_page_offset + 20, col.data_page_offset + col.total_compressed_size - 4, 3):
        b[i] ^= 0x5A
    p.write_bytes(bytes(b))
    for read in _readers(copy).values():
        with pytest.raises(DataError, match=r"part-00001\.parquet.*table 'samples'"):
            read()


def test_request_id_shared_by_two_users_is_refused(copy):
    """Duplicated request ids (one id on events of two users): `data build` and the reward stage
    refuse the log, and build writes nothing."""
    from onemall_pl.data.build import build
    from onemall_pl.reward import EventsDataModule

    ev = read_table(copy, "events")
    rid, user = ev.column("request_id").to_numpy(), ev.column("user_id").to_numpy()
    a = int(np.flatnonzero(user != user[0])[0])  # an event of another user: give it request 0's id
    rid = rid.copy()
    rid[a] = rid[0]
    shutil.rmtree(copy / "events")
    pq.write_table(ev.set_column(0, "request_id", pa.array(rid)), copy / "events.parquet")
    (copy / "events").mkdir()
    (copy / "events.parquet").rename(copy / "events" / "part-00000.parquet")
    shutil.rmtree(copy / "samples")
    with pytest.raises(DataError, match=rf"'events', column 'user_id', row {a}: request {rid[0]} has events of sev"):
        build(dataset=copy)
    assert not (copy / "samples").exists() and not [p for p in copy.iterdir() if p.name.startswith(".")]
    dm = EventsDataModule(str(copy), num_price_bands=4)
    with pytest.raises(DataError, match="several users"):
        dm.setup("fit")


def test_empty_histories_score_finite():
    """Requests with no history at all (new users): the ranking model scores them, finitely."""
    from onemall_pl.models.ranking import SEQUENCES, Config, RankingModel

    cfg = Config(num_items=10, num_categories_l1=3, num_categories_l2=3, num_categories_l3=3, num_shops=3)
    m = RankingModel(cfg).eval()
    I = cfg.num_items
    m.set_item_features(category=torch.zeros(I, 3, dtype=torch.long), shop=torch.zeros(I, dtype=torch.long),
                        price_band=torch.zeros(I, dtype=torch.long), item_type=torch.zeros(I, dtype=torch.long),
                        price=torch.ones(I))
    seqs = {s: torch.zeros(2, 4, dtype=torch.long) for s in SEQUENCES}
    masks = {s: torch.zeros(2, 4, dtype=torch.bool) for s in SEQUENCES}
    with torch.no_grad():
        out = m(seqs, masks, torch.tensor([0, 1]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    for k in ("ctr", "cvr", "ctcvr", "egpm"):
        assert out[k].shape == (2, 3) and torch.isfinite(out[k]).all(), k


# ----------------------------------------------------------------------------- upstream artifacts

READERS = {  # stage the reader expects -> how it is called on a folder
    "reward": ("onemall_pl.reward", lambda mod, f, d: mod.RewardScorer.from_artifact(f)),
    "pretrain": ("onemall_pl.pretrain", lambda mod, f, d: mod.load_pretrained(f)),
    "rl": ("onemall_pl.rl", lambda mod, f, d: mod.load_policy(f)),
    "quantize": ("onemall_pl.quantize", lambda mod, f, d: mod.load_tokenizers(f)),
    "quantize/sid_table": ("onemall_pl.quantize", lambda mod, f, d: mod.read_sid_table(f)),
    "quantize/datamodule": ("onemall_pl.pretrain", lambda mod, f, d: mod.SamplesDataModule(str(d), str(f))),
    "tokenizer": ("onemall_pl.tokenizer", lambda mod, f, d: mod.load_encoder(f)),
    "tokenizer/rqvae": ("onemall_pl.baselines.rqvae",
                        lambda mod, f, d: mod.tokenizer_embeddings(f.parent.parent, f.parent.name)),
    "sasrec": ("onemall_pl.baselines.sasrec", lambda mod, f, d: mod.SASRecRetriever.from_artifact(f, d)),
    "tiger": ("onemall_pl.baselines.tiger", lambda mod, f, d: mod.TigerRetriever.from_artifact(f, d)),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_an_artifact_whose_hashes_do_not_match(reader, micro_world, tmp_path):
    """A file changed after its stage wrote it: every reader of that stage's artifact fails first,
    with the file named, before it reads anything."""
    stage = reader.split("/")[0]
    folder = tmp_path / "artifacts" / "micro" / stage

    def build(tmp):
        (tmp / "model.pt").write_bytes(b"weights")
        (tmp / "sid_table").mkdir()
        (tmp / "sid_table" / "part-00000.parquet").write_bytes(b"sids")

    write_artifact(folder, build, stage=stage, dataset="micro", sizes={"codebook_sizes": [8, 8, 16]})
    (folder / "sid_table" / "part-00000.parquet").write_bytes(b"other sids")
    mod, call = READERS[reader]
    with pytest.raises(ArtifactError, match=r"sid_table/part-00000\.parquet does not match its sha256"):
        call(importlib.import_module(mod), folder, micro_world)
    assert json.loads((folder / "manifest.json").read_text())["stage"] == stage  # untouched
