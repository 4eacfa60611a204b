"""n machines produce one dataset, the stages read it as one (issue #10, "Distributed").

``onemall data synth --preset P --shard i/n`` run by n processes into one folder (see
``onemall_pl.data.synth.generate``) leaves ``events/`` and ``watches/`` as the parts of all n.
Here the micro world is made as 2 shards and compared with the same world made whole
(``micro_world``): a folder with a shard missing is refused by the readers; ``data build``
makes the same derived tables; the reward stage's data module (the one that reads the raw,
sharded ``events``), SASRec's and pretrain's read the same training rows; and 2 ranks streaming
the sharded events share them, every row to exactly one rank. (tests/test_synth.py checks the
generated tables themselves.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from onemall_pl.data.build import build
from onemall_pl.data.synth import generate
from onemall_pl.io import read_dataset_info, read_table
from test_ddp import row_digests, row_keys


def _sorted(t: pa.Table) -> pa.Table:
    """Rows in a fixed order: by every column that is not a list."""
    keys = [f.name for f in t.schema if not pa.types.is_list(f.type) and not pa.types.is_large_list(f.type)]
    return t.sort_by([(c, "ascending") for c in keys])


def _rows(loader, paths) -> Counter:
    return Counter(k for b in loader for k in row_keys(row_digests(b), paths))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The micro world as 2 shards written into one folder (shard 1 first: any order may come),
    built; and the folder as it stands while only shard 0, or only shard 1, has finished."""
    root = tmp_path_factory.mktemp("shards")
    out = root / "micro"
    generate(out, "micro", seed=0, shard="1/2")
    generate(out, "micro", seed=0, shard="0/2")
    build(dataset=out)
    halves = {}
    for i in (0, 1):
        halves[f"only {i}"] = root / f"only{i}" / "micro"
        generate(halves[f"only {i}"], "micro", seed=0, shard=f"{i}/2")
    return out, halves


@pytest.mark.parametrize("which", ["only 0", "only 1"])
def test_a_folder_missing_a_shard_is_refused(sharded, which):
    """Until every shard is done the folder has no dataset.json (shard 0 writes the catalogue,
    so "only 0" holds items and part of the events): build and the stages' readers refuse it."""
    from onemall_pl.reward import EventsDataModule

    folder = sharded[1][which]
    assert not (folder / "dataset.json").exists()
    for read in (lambda: build(dataset=folder), lambda: EventsDataModule(str(folder)).setup("fit")):
        with pytest.raises(ValueError, match=rf"still being generated .*shards done: 0000{which[-1]}-of-00002\)"):
            read()


def test_events_are_the_shards_parts_and_build_is_the_same(sharded, micro_world):
    out, _ = sharded
    parts = sorted(p.name.split("-")[1] for p in (out / "events").glob("*.parquet"))
    assert set(parts) == {"00000", "00001"}  # both processes' parts, side by side
    info, whole = read_dataset_info(out), read_dataset_info(micro_world)
    assert info.params["shards"] == 2 and info.tables == whole.tables  # samples, item2item included
    for t in ("events", "samples", "item2item"):
        assert _sorted(read_table(out, t)).equals(_sorted(read_table(micro_world, t))), t


def test_stage_readers_read_the_same_rows(sharded, micro_world, tmp_path):
    """Reward's data module reads the sharded raw events (and derives splits and histories from
    them); SASRec's and pretrain's read the built samples: the same training rows either way."""
    from onemall_pl.baselines.sasrec import SequenceData
    from onemall_pl.pretrain import SamplesDataModule
    from onemall_pl.reward import EventsDataModule
    from test_pretrain import fixture_sid_artifact

    out, _ = sharded
    q = fixture_sid_artifact(micro_world, tmp_path / "quantize")  # one SID table for both (the same items)
    got, want = [], []
    for d, rows in ((out, got), (micro_world, want)):
        dm = EventsDataModule(str(d), batch_size=4096)
        dm.setup("fit")
        rows.append(dm.split_counts)
        rows.append(_rows(dm.train_dataloader(), ("user_id", "ts", "item", "click", "order", "gmv", "seq_click", "seq_order")))
        rows.append(_rows(SequenceData(d, max_len=10, train_rows="all", batch_size=64).train_dataloader(),
                          ("seq", "targets", "scenario")))
        sdm = SamplesDataModule(str(d), str(q), batch_size=64, max_exposure=8, max_click=8, max_order=4)
        rows.append(_rows(sdm.train_dataloader(), ("scenario", "exposure.sid", "click.sid", "target.item")))
    assert got[0] == want[0] and got[0]["train"] > 1000
    for g, w in zip(got[1:], want[1:]):
        assert g == w and sum(w.values()) > 30


def test_two_ranks_share_the_sharded_events(sharded):
    """The training stream over the 2 generation shards' parts, on 2 ranks: every row to one rank."""
    from onemall_pl.data.datasets import ParquetStream

    out, _ = sharded
    events = read_table(out, "events")
    want = Counter(zip(events.column("request_id").to_pylist(), events.column("item_id").to_pylist()))
    got = []
    for rank in (0, 1):
        s = ParquetStream(out, "events", batch_size=100, columns=["request_id", "item_id"], even=False, rank=rank,
                          world_size=2)
        got.append(Counter((r, i) for b in s.loader() for r, i in zip(b.column("request_id").to_pylist(),
                                                                        b.column("item_id").to_pylist())))
    assert not (got[0] & got[1]) and got[0] + got[1] == want
    assert abs(sum(got[0].values()) - sum(got[1].values())) <= 1
