import math
from functools import partial
from itertools import islice

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from onemall_pl.data.datasets import (
    MapLoader,
    ParquetMapDataset,
    ParquetStream,
    _remaining,
    _split,
    collate_sequences,
    synthetic_samples,
    throughput,
)
from onemall_pl.data.schema import DataError
from onemall_pl.io import write_table

N = 103


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """103 samples in 3 shards of row groups of 10 rows; ~90% train."""
    d = tmp_path_factory.mktemp("ds")
    write_table(d, "samples", synthetic_samples(N, seq_len=4, seed=1), rows_per_shard=40, row_group_size=10)
    return d


def _ids(batch) -> list[int]:
    return batch.column("request_id").to_pylist()


def _epoch(stream, num_workers=0) -> list[list[int]]:
    return [_ids(b) for b in stream.loader(num_workers=num_workers)]


def _train_ids(folder) -> set[int]:
    t = synthetic_samples(N, seq_len=4, seed=1)
    return {r for r, s in zip(t.column("request_id").to_pylist(), t.column("split").to_pylist()) if s == "train"}


@pytest.mark.parametrize("even", [False, True])
def test_ranks_times_workers_cover_every_row_once(folder, even):
    seen, lengths = [], []
    for rank in range(2):
        stream = ParquetStream(folder, batch_size=7, filter={"split": "train"}, rank=rank, world_size=2,
                               even=even, seed=3, columns=["request_id", "split"])
        batches = _epoch(stream, num_workers=2)
        assert len(batches) == len(stream.loader())
        lengths.append(len(batches))
        seen += [r for b in batches for r in b]
    train = _train_ids(folder)
    assert len(seen) == len(set(seen)), "a row was delivered twice"
    if even:
        assert set(seen) <= train and len(seen) == 2 * (len(train) // 2)
        assert lengths[0] == lengths[1], "DDP ranks must yield the same number of batches"
    else:
        assert set(seen) == train


def test_deterministic_per_seed_and_different_per_epoch(folder):
    a = _epoch(ParquetStream(folder, batch_size=8, seed=0), num_workers=2)
    b = _epoch(ParquetStream(folder, batch_size=8, seed=0), num_workers=2)
    c = _epoch(ParquetStream(folder, batch_size=8, seed=1), num_workers=2)
    assert a == b and a != c
    flat = sorted(r for x in a for r in x)
    assert flat == list(range(N))
    s = ParquetStream(folder, batch_size=8, seed=0)
    s.set_epoch(1)
    e1 = _epoch(s)
    assert e1 != a and sorted(r for x in e1 for r in x) == flat
    # the next full pass starts the next epoch by itself
    s2 = ParquetStream(folder, batch_size=8, seed=0)
    _epoch(s2)
    assert _epoch(s2) == e1 and s2.epoch == 1
    # unshuffled: table order
    assert [r for x in _epoch(ParquetStream(folder, batch_size=8, shuffle=False)) for r in x] == list(range(N))


@pytest.mark.parametrize("num_workers, resume_workers", [(2, 2), (2, 0), (0, 2)])
def test_resume_yields_exactly_the_rest(folder, num_workers, resume_workers):
    make = partial(ParquetStream, folder, batch_size=6, seed=5, rank=1, world_size=2)
    full = _epoch(make(), num_workers)
    stream = make()
    loader = stream.loader(num_workers=num_workers)
    first = [_ids(b) for b in islice(loader, 5)]
    state = loader.state_dict()
    assert first == full[:5]
    fresh = make()
    fresh.load_state_dict(state)
    rest = _epoch(fresh, resume_workers)
    if resume_workers == num_workers:
        assert first + rest == full
    else:
        assert sorted(first + rest) == sorted(full)
    # resuming after a whole epoch starts the next one
    fresh.load_state_dict(fresh.state_dict())
    nxt = _epoch(fresh, resume_workers)
    assert fresh.epoch == 1 and len(nxt) == len(full) and nxt != full
    # state is rank-free, but a changed setup is refused
    with pytest.raises(ValueError, match="batch_size"):
        ParquetStream(folder, batch_size=7, seed=5, rank=1, world_size=2).load_state_dict(state)
    ParquetStream(folder, batch_size=6, seed=5, rank=0, world_size=2).load_state_dict(state)


def _handout(ranges, nw):
    """The order in which a DataLoader's in-order round robin (torch's _try_put_index: next
    worker in turn, skipping exhausted ones) delivers the runs of ``_split(ranges, nw)``."""
    runs = [[j for a, b in r for j in range(a, b)] for r in _split(ranges, nw)]
    order, pos, active = [], [0] * nw, list(range(nw))
    while active:
        for w in list(active):
            if pos[w] < len(runs[w]):
                order.append(runs[w][pos[w]])
                pos[w] += 1
            else:
                active.remove(w)
    return order


def test_remaining_matches_round_robin_handout():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ranges = [(0, int(rng.integers(0, 30)))]
        if rng.random() < 0.5:  # resumed before: several ranges
            ranges = _remaining(ranges, int(rng.integers(1, 4)), int(rng.integers(0, ranges[0][1] + 1)))
        nw = int(rng.integers(1, 5))
        order = _handout(ranges, nw)
        assert sorted(order) == sorted(j for a, b in ranges for j in range(a, b))
        for k in range(len(order) + 1):
            left = _remaining(ranges, nw, k)
            assert _handout(left, nw) == order[k:], "resuming with as many workers continues the order"
            assert sorted(_handout(left, 3)) == sorted(order[k:])


def test_filter_counts_from_statistics_and_reads(tmp_path):
    t = synthetic_samples(50, seq_len=2, seed=0)
    split = np.array(["train"] * 20 + ["valid"] * 10 + ["train", "test"] * 10)  # uniform groups, then mixed
    t = t.set_column(t.schema.get_field_index("split"), "split", pa.array(split))
    write_table(tmp_path, "samples", t, row_group_size=10)
    for want in ("train", "valid", "test"):
        s = ParquetStream(tmp_path, batch_size=4, filter={"split": want}, shuffle=False)
        assert s.num_rows == int((split == want).sum())
        got = [r for b in _epoch(s) for r in b]
        assert got == np.flatnonzero(split == want).tolist()
    s = ParquetStream(tmp_path, batch_size=4, filter={"split": ["valid", "test"]})
    assert s.num_rows == 20
    with pytest.raises(DataError, match="column 'nope'"):
        ParquetStream(tmp_path, columns=["nope"])
    with pytest.raises(DataError, match="fewer than the 4 ranks"):
        len(ParquetStream(tmp_path, filter={"split": "nothing"}, rank=0, world_size=4))


def test_collate_keeps_latest_right_aligned():
    t = pa.table(dict(seq_click=pa.array([[1, 2, 3, 4, 5], [7], []], pa.list_(pa.int64())),
                      targets=pa.array([[9], [8, 7, 6], [5, 4]], pa.list_(pa.int64())),
                      scenario=["short_video", "live_stream", "product_card"],
                      ts=pa.array([1, 2, 3], pa.int64()), gmv=pa.array([0.5, 0, 1], pa.float32())))
    out = collate_sequences(t.slice(0), {"seq_click": 3}, set_columns={"targets": None}, pad_value=-1)
    assert out["seq_click"].tolist() == [[3, 4, 5], [-1, -1, 7], [-1, -1, -1]]
    assert out["seq_click_mask"].tolist() == [[True] * 3, [False, False, True], [False] * 3]
    assert out["targets"].tolist() == [[9, -1, -1], [8, 7, 6], [5, 4, -1]]
    assert out["targets_mask"].sum(1).tolist() == [1, 3, 2]
    assert out["scenario"].tolist() == [1, 2, 0] and out["ts"].dtype == torch.int64
    assert out["gmv"].dtype == torch.float32
    # a slice of a bigger table (non-zero offsets) and a fixed targets width
    big = pa.concat_tables([t, t]).combine_chunks().slice(2, 3)
    out = collate_sequences(big, {"seq_click": 2}, set_columns={"targets": 2}, scalar_columns=[])
    assert out["seq_click"].tolist() == [[0, 0], [4, 5], [0, 7]] and out["targets"].tolist() == [[5, 4], [9, 0], [8, 7]]
    assert set(out) == {"seq_click", "seq_click_mask", "targets", "targets_mask"}
    with pytest.raises(ValueError, match="'targets' is neither"):
        collate_sequences(t, {"seq_click": 2})
    with pytest.raises(DataError, match="'nope'"):
        collate_sequences(t, {"nope": 2})


def test_collate_maps_ids_through_an_index():
    class Index:  # ids 10, 20, 30 -> 0, 1, 2
        def index_of(self, ids, column, rows=None):
            if not np.isin(ids, [10, 20, 30]).all():
                raise DataError("unknown id", column=column)
            return ids // 10 - 1

    t = pa.table(dict(seq_click=pa.array([[10, 30], [20]], pa.list_(pa.int64()))))
    out = collate_sequences(t, {"seq_click": 3}, item_index=Index(), pad_value=-1)
    assert out["seq_click"].tolist() == [[-1, 0, 2], [-1, -1, 1]]
    with pytest.raises(DataError, match="unknown"):
        collate_sequences(pa.table(dict(seq_click=pa.array([[10, 11]]))), {"seq_click": 3}, item_index=Index())


def test_stream_yields_collated_batches_through_workers(folder):
    collate = partial(collate_sequences, seq_columns={"seq_click": 3, "seq_order": 2},
                      set_columns={"targets": 4}, scalar_columns=["request_id", "scenario"])
    stream = ParquetStream(folder, batch_size=16, collate=collate,
                           columns=["request_id", "scenario", "seq_click", "seq_order", "targets"])
    batches = list(stream.loader(num_workers=2))
    assert batches[0]["seq_click"].shape == (16, 3) and batches[0]["seq_order_mask"].all()
    assert sorted(b["targets"].shape[0] for b in batches) == [N % 16] + [16] * (N // 16)
    assert all(b["targets"].shape[1] == 4 for b in batches)
    assert sorted(torch.cat([b["request_id"] for b in batches]).tolist()) == list(range(N))


def test_collate_gathering_rows_equals_collating_a_take(folder):
    collate = partial(collate_sequences, seq_columns={"seq_click": 3}, set_columns={"targets": None},
                      scalar_columns=["request_id", "scenario"])
    t = synthetic_samples(20, seq_len=4, seed=3)
    rows = np.array([7, 2, 19, 2])
    a, b = collate(t, rows=rows), collate(t.take(rows))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # in the stream: batches inside one row group take this path, the others are concatenated
    fast = list(ParquetStream(folder, batch_size=4, collate=collate, seed=7).loader())
    slow = [collate(t) for t in ParquetStream(folder, batch_size=4, seed=7).loader()]
    assert len(fast) == len(slow) == math.ceil(N / 4)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(fast, slow) for k in x)


def test_map_dataset(folder):
    ds = ParquetMapDataset(folder, filter={"split": "train"}, columns=["request_id", "seq_click", "targets"],
                           collate=partial(collate_sequences, seq_columns={"seq_click": 4},
                                           set_columns={"targets": None}))
    assert len(ds) == len(_train_ids(folder))
    row = ds[3]
    assert isinstance(row["seq_click"], np.ndarray) and len(row["seq_click"]) == 4
    assert row["seq_click"].base is not None, "list cells are views of the column's buffer"
    assert row["targets"].tolist() == ds.table.column("targets")[3].as_py()
    with pytest.raises(IndexError):
        ds[len(ds)]
    batches = list(DataLoader(ds, batch_size=10, shuffle=True, collate_fn=ds.collate_fn,
                              generator=torch.Generator().manual_seed(0)))
    ids = torch.cat([b["request_id"] for b in batches]).tolist()
    assert sorted(ids) == sorted(_train_ids(folder)) and batches[0]["seq_click"].shape == (10, 4)
    plain = ParquetMapDataset(synthetic_samples(5, seq_len=2))
    assert len(plain) == 5 and plain[-1]["request_id"] == 4


class _Recorder:
    """A LightningModule + DataModule pair that records the request ids it trains on."""

    @staticmethod
    def make(folder, seen):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, batch_idx):
                seen.extend(batch["request_id"].tolist())
                return (self.w * batch["request_id"].float().mean()).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        class Data(L.LightningDataModule):
            def setup(self, stage):
                self.stream = ParquetStream(folder, batch_size=8, seed=2, columns=["request_id"],
                                            collate=partial(collate_sequences, seq_columns={}))

            def train_dataloader(self):
                return self.stream.loader(num_workers=2)

        return Module(), Data()


@pytest.mark.slow
def test_lightning_saves_and_restores_the_stream_position(folder, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, max_epochs=1)
    seen: list[int] = []
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    L.Trainer(callbacks=[ckpt], **kw).fit(*_Recorder.make(folder, seen))
    assert sorted(seen) == list(range(N))
    full, seen[:] = list(seen), []
    L.Trainer(**kw, enable_checkpointing=False).fit(*_Recorder.make(folder, seen),
                                                    ckpt_path=tmp_path / "step=5.ckpt")
    assert seen == full[5 * 8:], "the resumed run trains on exactly the rest of the epoch, in order"


# ----------------------------------------------------------------------------- MapLoader


def _map_epoch(loader) -> list[list[int]]:
    return [b[0].tolist() for b in loader]


def _rows(n: int = 23):
    from torch.utils.data import TensorDataset

    return TensorDataset(torch.arange(n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_map_loader_shards_ranks_evenly(drop_last):
    per_rank = [_map_epoch(MapLoader(_rows(), 4, seed=1, rank=r, world_size=3, drop_last=drop_last)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1, "DDP ranks must yield the same number of batches"
    seen = [i for b in per_rank for x in b for i in x]
    if drop_last:  # 23 rows, 3 ranks: 21 kept, then batches of 4 (the partial one dropped)
        assert len(seen) == len(set(seen)) == 3 * 4
    else:  # 24 slots: one row repeated, every row seen
        assert sorted(set(seen)) == list(range(23)) and len(seen) == 24


def test_map_loader_is_seeded_per_epoch_and_pass():
    a, b, c = (_map_epoch(MapLoader(_rows(), 5, seed=s)) for s in (0, 0, 1))
    assert a == b and a != c and sorted(i for x in a for i in x) == list(range(23))
    loader = MapLoader(_rows(), 5, seed=0)
    _map_epoch(loader)
    again = _map_epoch(loader)  # a second pass in the same epoch: another order
    assert again != a and sorted(map(sorted, again)) != sorted(map(sorted, a))
    loader.sampler.set_epoch(1)
    e1 = _map_epoch(loader)
    assert e1 not in (a, again) and loader.state_dict()["passes"] == 0
    assert _map_epoch(MapLoader(_rows(), 5, shuffle=False)) == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    with pytest.raises(ValueError, match="sampler"):
        MapLoader(_rows(), 5, sampler=[0, 1])


@pytest.mark.parametrize("num_workers, resume_workers", [(0, 0), (2, 0), (0, 2)])
def test_map_loader_resumes_exactly_the_rest(num_workers, resume_workers):
    make = partial(MapLoader, _rows(), 3, seed=4, rank=1, world_size=2)
    loader = make(num_workers=num_workers)
    loader.sampler.set_epoch(2)
    full = _map_epoch(loader)
    loader = make(num_workers=num_workers)
    loader.sampler.set_epoch(2)
    first = [b[0].tolist() for b in islice(loader, 2)]
    state = loader.state_dict()
    assert first == full[:2] and state["start"] == 6
    fresh = make(num_workers=resume_workers)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)  # Lightning calls it after restoring: the position stays
    assert first + _map_epoch(fresh) == full
    nxt = _map_epoch(fresh)  # after the whole epoch: the next pass, a full one in another order
    assert len(nxt) == len(full) and nxt != full
    with pytest.raises(ValueError, match="batch_size"):
        MapLoader(_rows(), 4, seed=4, rank=1, world_size=2).load_state_dict(state)
    MapLoader(_rows(), 3, seed=4, rank=0, world_size=2).load_state_dict(state)  # the state is rank-free


class _Cycled:
    """A LightningModule training on two MapLoaders of different lengths in one CombinedLoader
    (``max_size_cycle``, as quantize trains), recording the rows of every batch."""

    @staticmethod
    def make(seen):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, batch_idx):
                seen.append((batch["long"][0].tolist(), batch["short"][0].tolist()))
                return self.w.sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

            def train_dataloader(self):
                return {"long": MapLoader(_rows(23), 4, seed=1, num_workers=1),
                        "short": MapLoader(_rows(9), 4, seed=2, drop_last=True)}

        return Module()


@pytest.mark.slow
def test_lightning_saves_and_restores_map_loaders(tmp_path):
    """Resumed mid-epoch, inside a cycle of the short loader, or at an epoch's end, a run trains
    on exactly the batches of the run never stopped."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, max_epochs=3)
    full: list = []
    cb = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    L.Trainer(callbacks=[cb], **kw).fit(_Cycled.make(full))
    assert len(full) == 3 * 6  # 6 batches of the long loader per epoch; the short one (2) cycles
    assert len({tuple(s) for _, s in full}) > 2, "each pass of the short loader has its own order"
    for step in (3, 6, 9, 11):  # mid-epoch (in a short cycle, at its end), an epoch's end
        seen: list = []
        L.Trainer(**kw, enable_checkpointing=False).fit(_Cycled.make(seen), ckpt_path=tmp_path / f"step={step}.ckpt")
        assert seen == full[step:], step


def test_throughput_reports_measured_figures():
    r = throughput(num_workers=1, seq_len=8, batch_size=16, seconds=0.3, rows=512, row_group_size=64)
    assert r["samples_per_s"] > 0 and r["samples_per_cpu_bound_s"] > 0 and r["workers_cpu_ms_per_batch"] > 0
    assert r["num_workers"] == 1 and r["timed_s"] >= 0.3
