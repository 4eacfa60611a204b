import math

import pytest
import torch

from onemall_pl.metrics import hr_at_k, ndcg_at_k, pad_lists, recall_at_k, topk_excluding


def test_hr_is_share_of_targets_found():
    topk = torch.tensor([[5, 3, 9, 1], [2, 4, 6, 8]])
    targets = pad_lists([[3, 7], [8]])
    assert hr_at_k(topk, targets, 2).tolist() == [0.5, 0.0]
    assert hr_at_k(topk, targets, 4).tolist() == [0.5, 1.0]
    assert recall_at_k is hr_at_k


def test_ndcg_single_and_multi_target():
    topk = torch.tensor([[5, 3, 9, 1], [2, 4, 6, 8]])
    targets = pad_lists([[5], [4, 8]])
    got = ndcg_at_k(topk, targets, 4)
    ideal2 = 1 + 1 / math.log2(3)
    assert got[0].item() == pytest.approx(1.0)
    assert got[1].item() == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal2)
    assert ndcg_at_k(topk, targets, 1).tolist() == pytest.approx([1.0, 0.0])


def test_padded_topk_and_missing_target():
    topk = pad_lists([[1, 2]], width=4)
    assert hr_at_k(topk, pad_lists([[-1, 2]]), 4).tolist() == [1.0]
    with pytest.raises(ValueError, match="no target"):
        hr_at_k(topk, pad_lists([[]], width=1), 4)


def test_topk_excluding_history():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5]])
    assert topk_excluding(scores, 2).tolist() == [[0, 1]]
    assert topk_excluding(scores, 2, torch.tensor([[0, -1]])).tolist() == [[1, 3]]


def test_retrieval_metrics_per_scenario():
    from onemall_pl.metrics import RetrievalMetrics, flat_metrics

    m = RetrievalMetrics(hr_k=(1, 2), ndcg_k=(2,))
    m.update(torch.tensor([[1, 2], [3, 4], [5, 6]]), pad_lists([[2], [3, 9], [7]]), torch.tensor([0, 2, 2]))
    out = m.compute()
    assert out["overall"]["HR@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["product_card"]["HR@1"] == 0.0 and out["live_stream"]["HR@1"] == pytest.approx(0.25)
    assert "short_video" not in out and out["requests"] == {"overall": 3, "product_card": 1, "live_stream": 2}
    assert flat_metrics(out, "test/")["test/live_stream/HR@2"] == pytest.approx(0.25)


class _Fixed:
    """A retriever that answers every request with the same ranked list."""

    def __init__(self, ranked):
        self.ranked = ranked

    def retrieve(self, rows, k):
        return pad_lists([self.ranked[:k]] * rows.num_rows, width=k)


def test_replay_excludes_the_whole_history(tmp_path):
    import pyarrow as pa

    from onemall_pl.io import write_table
    from onemall_pl.metrics import replay

    ids = pa.list_(pa.int64())
    write_table(tmp_path, "samples", pa.table({
        "request_id": pa.array([1, 2], pa.int64()), "user_id": pa.array([0, 1], pa.int64()),
        "ts": pa.array([5, 6], pa.int64()), "scenario": ["product_card", "short_video"],
        "seq_exposure": pa.array([[], []], ids), "seq_click": pa.array([[7, 8, 9], [1]], ids),
        "seq_order": pa.array([[], []], ids), "targets": pa.array([[3], [2]], ids), "split": ["test", "test"]}))
    ranked = [9, 8, 7, 3, 1, 2]
    plain = replay(_Fixed(ranked), tmp_path, "test", hr_k=(1, 4), ndcg_k=(1,))
    assert plain["overall"]["HR@4"] == 0.5 and plain["overall"]["HR@1"] == 0.0
    out = replay(_Fixed(ranked), tmp_path, "test", hr_k=(1, 2), ndcg_k=(1,), exclude_history=True)
    assert out["product_card"]["HR@1"] == 1.0  # 9, 8, 7 dropped: 3 comes first
    assert out["short_video"]["HR@1"] == 0.0 and out["short_video"]["HR@2"] == 0.0  # 9, 8, then 7
