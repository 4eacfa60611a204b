import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from onemall_pl.models.decoder import OneMall, example_batch, preset
from onemall_pl.retrieval import SIDTrie, beam_search, exhaustive_search, hf_generate, retrieve
from onemall_pl.retrieval.beam import HFStepModel, random_trie, tiny_hf_lm

SIZES = [6, 5, 4]


def _sids_items():
    sids = np.array([[0, 1, 2], [0, 1, 3], [0, 4, 0], [5, 0, 0], [0, 1, 2], [3, 3, 3], [5, 0, 0], [0, 1, 2]])
    return sids, np.array([10, 11, 12, 13, 14, 15, 16, 17])


def test_trie_structure_masks_and_collisions():
    sids, items = _sids_items()
    trie = SIDTrie(sids, items, SIZES)
    assert [trie.n_nodes(lvl) for lvl in range(4)] == [1, 3, 4, 5]
    valid = {tuple(s[:lvl]) for s in sids.tolist() for lvl in range(4)}
    for lvl in range(3):
        prefixes = trie.sids_at(lvl)
        mask = trie.mask(torch.arange(len(prefixes)), lvl)
        for i, p in enumerate(prefixes.tolist()):
            allowed = {c for c in range(SIZES[lvl]) if tuple(p) + (c,) in valid}
            assert set(torch.nonzero(mask[i] == 0).flatten().tolist()) == allowed
            for c in allowed:
                child = trie.child(torch.tensor([i]), torch.tensor([c]), lvl)
                assert trie.sids_at(lvl + 1)[child].tolist() == [p + [c]]
    leaf = trie.leaf(torch.tensor([[0, 1, 2], [5, 0, 0], [1, 1, 1]]))
    assert leaf[2] == -1 and trie.sids(leaf[:2]).tolist() == [[0, 1, 2], [5, 0, 0]]
    # collided SIDs expand to all their items in sid_table order, then cut at k
    got, score = trie.items_of(leaf[None, :2], torch.tensor([[-1.0, -2.0]]), k=4)
    assert got.tolist() == [[10, 14, 17, 13]] and score.tolist() == [[-1.0, -1.0, -1.0, -2.0]]
    got, _ = trie.items_of(leaf[None, 1:2], torch.tensor([[-1.0]]), k=4)
    assert got.tolist() == [[13, 16, -1, -1]]


def test_trie_from_sid_table_and_errors():
    sids, items = _sids_items()
    table = pa.table({"item_id": pa.array(items), "sid": pa.array(sids.tolist(), pa.list_(pa.int32()))})
    trie = SIDTrie.from_sid_table(table, SIZES)
    assert trie.n_items == 8 and trie.children_lists()[(0, 1)] == [2, 3]
    with pytest.raises(ValueError, match="level 2 code outside codebook of size 5"):
        SIDTrie(np.array([[0, 5, 0]]), np.array([1]), SIZES)
    with pytest.raises(ValueError, match="levels"):
        SIDTrie.from_sid_table(table, [6, 5])


def _hf(seed=0):
    model, offsets = tiny_hf_lm(SIZES, seed=seed, hidden=32)
    prompt = torch.randint(2, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(seed))
    return model, offsets, prompt


def test_beam_returns_only_valid_sids_and_matches_exhaustive():
    trie = random_trie(SIZES, 40, seed=1)
    model, offsets, prompt = _hf()
    valid = {tuple(s) for s in trie.sids(torch.arange(trie.n_nodes(3))).tolist()}
    for beam in (1, 3, 7, 200):
        res = beam_search(HFStepModel(model, prompt, offsets, SIZES), trie, beam)
        assert res.sids.shape == (3, min(beam, trie.n_nodes(3)), 3)
        assert {tuple(s) for s in res.sids.reshape(-1, 3).tolist()} <= valid
        assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()
    # a beam as wide as the widest level explores everything: equal to scoring every SID
    full = exhaustive_search(HFStepModel(model, prompt, offsets, SIZES), trie, k=10)
    wide = beam_search(HFStepModel(model, prompt, offsets, SIZES), trie, beam=max(trie.n_nodes(i) for i in range(4)))
    assert torch.equal(wide.sids[:, :10], full.sids)
    assert torch.allclose(wide.scores[:, :10], full.scores, atol=1e-5)
    # brute force over every SID of the codebook, through the model's full softmax
    lp = torch.log_softmax(model(input_ids=prompt[:1]).logits[0, -1], -1)
    best = max((sum(_lp_of(model, prompt[:1], offsets, s)), s) for s in valid)
    assert tuple(full.sids[0, 0].tolist()) == best[1] and lp.shape[0] == model.config.vocab_size


def _lp_of(model, prompt, offsets, sid):
    ids = torch.cat([prompt[0], torch.tensor([offsets[i] + c for i, c in enumerate(sid)])])
    lp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
    P = prompt.shape[1]
    return [lp[P - 1 + i, offsets[i] + c].item() for i, c in enumerate(sid)]


@pytest.mark.parametrize("beam", [4, 10])
def test_beam_equals_hf_generate(beam):
    sizes = [12, 8, 8]
    trie = random_trie(sizes, 300, seed=2)
    model, offsets = tiny_hf_lm(sizes, seed=3, hidden=32)
    prompt = torch.randint(2, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    ours = beam_search(HFStepModel(model, prompt, offsets, sizes), trie, beam)
    with torch.no_grad():
        hf = hf_generate(model, prompt, trie, offsets, beam)
    assert torch.equal(ours.sids, hf.sids)
    assert torch.allclose(ours.scores, hf.scores, atol=1e-4)
    assert (hf.leaves >= 0).all()


def test_onemall_retrieval_exact_on_tiny_trie_and_items():
    torch.manual_seed(0)
    cfg = preset("tiny", codebook_sizes=(6, 5, 4))
    model = OneMall(cfg).eval()
    batch = example_batch(cfg, 2, seq_len=8, generator=torch.Generator().manual_seed(0))
    sids, items = _sids_items()
    trie = SIDTrie(sids, items, cfg.codebook_sizes)
    got, scores, res = retrieve(model, batch, trie, beam=50, k=6)
    full = exhaustive_search(model.beam_model(batch), trie, k=5)
    assert torch.equal(res.sids, full.sids) and torch.allclose(res.scores, full.scores, atol=1e-5)
    assert got.shape == (2, 6) and set(got.flatten().tolist()) <= set(items.tolist())
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    for b in range(2):  # the item list is the ranked SIDs expanded through the collisions
        expect = list(itertools.chain.from_iterable(
            [int(i) for i, s in zip(items, sids) if list(s) == sid] for sid in res.sids[b].tolist()))[:6]
        assert got[b].tolist() == expect
    # beam search over OneMall equals teacher-forced log-probs of the returned SIDs
    batch["target"] = {k: v[:, :1].repeat(1, 5, *[1] * (v.ndim - 2)) for k, v in batch["target"].items()}
    batch["target"]["sid"] = res.sids
    out = model(batch)
    tf = sum(lg.log_softmax(-1).gather(1, out.targets_NS[:, i:i + 1])[:, 0] for i, lg in enumerate(out.logits))
    assert torch.allclose(tf.view(2, 5), res.scores, atol=1e-5)
    with pytest.raises(ValueError, match="codebook_sizes"):
        retrieve(model, batch, random_trie([6, 5, 5], 10), beam=4, k=2)


def test_bench_reports_figures():
    from onemall_pl.retrieval import bench

    threads = torch.get_num_threads()
    out = bench(beams=(4, 8), requests=2, prompt_len=4, codebook_sizes=(16, 8, 8), n_items=300, repeats=1, threads=1)
    assert out["B4"]["identical_topk"] == out["B8"]["identical_topk"] == "yes"
    assert out["B8"]["ours_ms"] > 0 and out["B8"]["speedup"] > 0 and out["torch_threads"] == 1
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="first codes"):
        bench(beams=(32,), codebook_sizes=(16, 8, 8), n_items=300, repeats=1)
