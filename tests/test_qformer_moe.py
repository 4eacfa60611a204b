import os

import pytest
import torch
import torch.multiprocessing as mp

from onemall_pl.models.moe import FeedForward, MoE, MoEConfig, balance_experts, load_stats, make_ffn
from onemall_pl.models.qformer import Attention, QFormer


def test_qformer_shapes_and_padding_mask():
    torch.manual_seed(0)
    qf = QFormer(dim=16, n_queries=3, n_layers=2, n_heads=4, out_dim=24).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7], dtype=torch.bool)
    y = qf(x, mask)
    assert y.shape == (2, 3, 24)
    x2 = x.clone()
    x2[0, 3:] = 100.0  # padded positions must not matter
    assert torch.allclose(qf(x2, mask), y, atol=1e-6)
    x2[0, 1] = 1.0  # a real position does
    assert not torch.allclose(qf(x2, mask)[0], y[0])


def test_qformer_empty_sequence_is_finite():
    qf = QFormer(dim=8, n_queries=2, n_heads=2)
    y = qf(torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool))
    assert torch.isfinite(y).all()
    assert torch.allclose(y[0], y[1])  # nothing to attend to but the null key


def test_attention_cross_kv_width_and_mask():
    att = Attention(dim=8, n_heads=2, kv_dim=6)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    out = att(x, ctx, mask)
    ctx[:, -1] += 5.0
    assert out.shape == (2, 3, 8) and torch.allclose(att(x, ctx, mask), out, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        Attention(dim=10, n_heads=4)


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: every token through its experts one by one."""
    s = moe.router(x).float()
    s = s.sigmoid() if moe.cfg.score_func == "sigmoid" else s.softmax(-1)
    idx = (s + moe.expert_bias).topk(moe.cfg.top_k, dim=-1).indices
    out = torch.zeros_like(x)
    for t in range(len(x)):
        g = s[t, idx[t]]
        g = g / g.sum()
        for j, e in enumerate(idx[t].tolist()):
            out[t] += g[j] * moe.experts.expert(e, x[t:t + 1])[0]
    return out + (moe.shared(x) if moe.shared is not None else 0)


@pytest.mark.parametrize("gated,score,shared", [(True, "sigmoid", 0), (False, "softmax", 1)])
def test_moe_dispatch_matches_naive(gated, score, shared):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden=16, n_experts=5, top_k=2, n_shared=shared, score_func=score, gated=gated))
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(5) * 0.1)  # selection bias must steer selection only
    x = torch.randn(3, 4, 8)
    y = moe(x)
    assert y.shape == x.shape
    assert torch.allclose(y.view(-1, 8), _naive_moe(moe, x.view(-1, 8)), atol=1e-5)
    assert int(moe.load.sum()) == 12 * 2
    y.sum().backward()
    assert moe.router.weight.grad is not None and moe.experts.w1.grad.abs().sum() > 0
    assert moe.expert_bias.grad is None


def test_dense_when_one_expert_and_bad_config():
    assert isinstance(make_ffn(MoEConfig(dim=8, hidden=16)), FeedForward)
    assert isinstance(make_ffn(MoEConfig(dim=8, hidden=16, n_experts=4, top_k=2)), MoE)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(dim=8, hidden=16, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="score_func"):
        MoEConfig(dim=8, hidden=16, n_experts=2, score_func="relu")


def test_balancer_evens_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=16, hidden=8, n_experts=4, top_k=1, bias_update_rate=0.01))
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 wins for most inputs
    x = torch.randn(512, 16) + 1.0
    first = None
    for _ in range(150):
        moe(x)
        stats = balance_experts(moe)
        first = first if first is not None else stats["max_violation"]
    assert first > 1.0, first  # skewed at the start
    assert stats["max_violation"] < 0.25, stats
    assert sum(stats[f"load_{i}"] for i in range(4)) == pytest.approx(1.0)
    assert moe.expert_bias[0] < 0 < moe.expert_bias[1:].max()
    assert int(moe.load.sum()) == 0  # reset after each update
    moe.eval()
    moe(x)
    assert int(moe.load.sum()) == 0  # eval forward does not count


def test_load_stats_and_no_moe():
    s = load_stats(torch.tensor([3, 1, 0, 0]))
    assert s["max_violation"] == pytest.approx(3 / 1 - 1) and s["load_0"] == pytest.approx(0.75)
    assert balance_experts(FeedForward(4, 8)) == {}


def _ddp_worker(rank: int, world: int, port: int, q):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    moe = MoE(MoEConfig(dim=4, hidden=4, n_experts=3, top_k=1, bias_update_rate=0.5))
    moe.load.copy_(torch.tensor([[6, 0, 0], [0, 0, 3]][rank]))  # each rank alone would update differently
    stats = balance_experts(moe)
    q.put((rank, moe.expert_bias.tolist(), stats["max_violation"]))
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_balancer_all_reduces_loads_across_ranks():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # global load [6, 0, 3], mean 3 -> signs [-1, +1, 0]
    assert res[0][1] == res[1][1] == [-0.5, 0.5, 0.0]
    assert res[0][2] == pytest.approx(6 / 3 - 1)
