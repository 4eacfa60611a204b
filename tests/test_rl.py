"""Stage 4 (onemall_pl.rl): responses, advantages, DPO / GRPO through the model, the reference sync, and
that RL raises the reward of the policy's top 10 (a tiny model, a random trie and a known reward here;
the real upstream artifacts in the slow end-to-end test at the bottom)."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from onemall_pl.models.decoder import OneMallConfig, example_batch
from onemall_pl.retrieval.beam import random_trie
from onemall_pl.rl import (
    RAW_PAD,
    FreeTrie,
    RLConfig,
    RLModule,
    policy_topk,
    sample_responses,
    sequence_logp,
    valid_sid_rate,
)
from onemall_pl.rl_objectives import group_advantages, grpo_loss

SIZES = (8, 8, 8)
N_ITEMS = 150


def _cfg(**kw):
    return OneMallConfig(codebook_sizes=SIZES, n_categories=8, n_price_bands=4, n_shops=8, max_seq_len=6,
                         item_dim=16, n_queries=2, dim=32, n_layers=1, n_heads=4, ffn_hidden=64, emb_dim=16, **kw)


class ItemReward:
    """A known reward: a fixed random value per item (the ranking model's place in these tests)."""

    def __init__(self, n_items=N_ITEMS, seed=0):
        self.value = torch.rand(n_items, generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def score(self, user_batch, item_ids):
        self.calls.append({k: v.clone() for k, v in user_batch.items()})
        r = torch.where(item_ids >= 0, self.value[item_ids.clamp_min(0)], torch.zeros(()))
        return {"ctr": r, "cvr": r, "ctcvr": r, "egpm": r, "reward": r}


def _tries(n_items=N_ITEMS, seed=0):
    t = random_trie(list(SIZES), n_items, seed)
    return {"product": t, "video": t, "live": t}


def _batch(cfg, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = example_batch(cfg, B, n_targets=2, generator=g)
    b["raw"] = {f"seq_{k}": torch.randint(N_ITEMS, (B, 5), generator=g) for k in ("exposure", "click", "order")}
    b["raw"]["seq_order"][:, 3:] = RAW_PAD
    return b


def _module(algo="grpo", tries=None, **rl):
    torch.manual_seed(0)
    kw = {"algo": algo, "group_size": 16, "grpo_samples": 8, "replay_fraction": 1.0, **rl}
    m = RLModule(net=_cfg(), rl=RLConfig(**kw), lr=1e-2, warmup_steps=1, weight_decay=0.0)
    m.tries, m.scorer = tries or _tries(), ItemReward()
    return m


def test_responses_are_valid_and_group_advantages_normalised():
    m = _module(tries=_tries(n_items=12))  # a trie with fewer SIDs than the group: the rest is masked
    batch = _batch(m.cfg)
    resp = sample_responses(m.reference, batch, m.tries, 16)
    trie = m.tries["product"]
    mask = resp["mask"]
    assert (mask.sum(1) < 16).all() and mask.any(1).all()
    assert (trie.leaf(resp["sid"][mask]) >= 0).all()  # every response is a valid SID ...
    leaves = trie.leaf(resp["sid"][mask])
    assert torch.equal(resp["item"][mask], trie.items[trie.item_ptr[leaves]])  # ... mapped to its first item
    assert (resp["item"][~mask] == RAW_PAD).all()
    # the beam scores are the reference's teacher-forced sequence log-probabilities
    torch.testing.assert_close(resp["logp"][mask], sequence_logp(m.reference, batch, resp["sid"], mask)[mask],
                               atol=1e-4, rtol=1e-4)
    reward = m.scorer.score({}, resp["item"])["reward"]
    adv = group_advantages(reward, mask)
    for b in range(len(adv)):
        a = adv[b][mask[b]]
        assert abs(float(a.mean())) < 1e-5 and abs(float(a.pow(2).mean().sqrt()) - 1) < 1e-3
    assert (adv[~mask] == 0).all()


def test_rl_loss_scores_the_request_histories():
    m = _module("grpo")
    batch = _batch(m.cfg)
    loss, stats = m.rl_loss(batch)
    assert loss.requires_grad and torch.isfinite(loss)
    call = m.scorer.calls[-1]
    assert torch.equal(call["seq_order"], batch["raw"]["seq_order"]) and torch.equal(call["scenario"], batch["scenario"])
    assert 0.99 < float(stats["advantage_std"]) < 1.01 and float(stats["group_fill"]) == 1.0
    assert float(stats["kl"]) < 1e-6  # policy == reference before any update


def _rl_only_steps(m, batch, steps, lr=0.05):
    opt = torch.optim.Adam(m.model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = m.rl_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_dpo_prefers_the_higher_reward_response():
    m = _module("dpo", dpo_beta=0.5)
    batch = _batch(m.cfg)
    resp = sample_responses(m.reference, batch, m.tries, 16)
    reward = m.scorer.score({}, resp["item"])["reward"]
    best, worst = reward.argmax(1, keepdim=True), reward.argmin(1, keepdim=True)

    def margin():
        with torch.no_grad():
            lp = sequence_logp(m.model, batch, resp["sid"], resp["mask"])
        return lp.gather(1, best) - lp.gather(1, worst)

    before = margin()
    _rl_only_steps(m, batch, 5)
    after = margin()
    assert (after > before).float().mean() >= 0.8, (before, after)  # the positive gains on the negatives


def test_grpo_clip_bounds_the_update():
    m = _module("grpo", clip_eps=0.2)
    batch = _batch(m.cfg)
    resp = sample_responses(m.reference, batch, m.tries, 16)
    mask = resp["mask"]
    logp = sequence_logp(m.model, batch, resp["sid"], mask)
    logp.retain_grad()
    adv = torch.ones_like(logp)
    # half the responses already 1.6x likelier than under pi_old (outside the clip), half at ratio 1
    shift = torch.zeros_like(logp)
    shift[:, ::2] = 0.5
    grpo_loss(logp, logp.detach() - shift, adv, clip_eps=0.2, mask_BG=mask).backward()
    g = logp.grad
    assert (g[:, ::2] == 0).all() and (g[:, 1::2][mask[:, 1::2]] != 0).all()
    # and a model parameter's gradient comes only from the unclipped responses
    p = m.model.heads[0].weight
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_reference_frozen_between_syncs_and_equal_after_sync(tmp_path):
    m = _module("grpo", sync_every=2)
    batches = [_batch(m.cfg, seed=s) for s in range(3)]
    seen = []

    def flat(model):
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            assert not any(p.requires_grad for p in module.reference.parameters())
            assert not module.reference.training and module.model.training
            seen.append((trainer.global_step, flat(module.reference), flat(module.model)))

        def on_train_end(self, trainer, module):
            seen.append((trainer.global_step, flat(module.reference), flat(module.model)))

    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()],
                         default_root_dir=tmp_path)
    trainer.fit(m, DataLoader(batches, batch_size=None))
    steps = [s for s, _, _ in seen]
    assert steps == [0, 1, 2, 3, 4, 5]
    refs, pols = {s: r for s, r, _ in seen}, {s: p for s, _, p in seen}
    assert torch.equal(refs[0], pols[0])  # starts as the policy
    assert not torch.equal(pols[1], pols[0]) and torch.equal(refs[1], refs[0])  # frozen between syncs
    assert torch.equal(refs[2], pols[2]) and not torch.equal(refs[2], refs[1])  # synced at step 2
    assert torch.equal(refs[3], refs[2]) and not torch.equal(refs[3], pols[3])
    assert torch.equal(refs[4], pols[4])
    assert torch.equal(refs[5], refs[4]) and not torch.equal(refs[5], pols[5])
    # the optimiser holds the policy's parameters only
    ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not ids & {id(p) for p in m.reference.parameters()}


def test_reference_is_checkpointed(tmp_path):
    m = _module("grpo")
    with torch.no_grad():
        m.model.heads[0].weight.add_(1.0)
    state = m.state_dict()
    assert any(k.startswith("reference.") for k in state)
    m2 = _module("grpo")
    m2.load_state_dict(state)
    assert torch.equal(m2.reference.heads[0].weight, m.reference.heads[0].weight)
    assert not torch.equal(m2.reference.heads[0].weight, m2.model.heads[0].weight)


def test_free_trie_measures_valid_sids():
    m = _module()
    batch = _batch(m.cfg)
    free = FreeTrie(SIZES)
    assert free.n_nodes(3) == 512 and free.n_nodes(0) == 1
    valid = valid_sid_rate(m.model, batch, m.tries, 20)
    assert valid.shape == (6, 20) and valid.any()
    full = {k: random_trie(list(SIZES), 4000, 1) for k in ("product", "video", "live")}  # ~every SID exists
    assert valid_sid_rate(m.model, batch, full, 20).float().mean() > 0.95
    assert valid.float().mean() < 0.95  # 150 items name a fraction of the 512 SIDs


def _top10_reward(m, batch):
    items = policy_topk(m.model, batch, m.tries, 16, 10)
    r = m.scorer.score({}, items)["reward"]
    return float((r.sum(1) / (items >= 0).sum(1)).mean())


@pytest.mark.parametrize("algo,gain", [("grpo", 0.05), ("dpo", 0.01)])
def test_rl_raises_the_top10_reward(algo, gain, tmp_path):
    m = _module(algo, group_size=32, grpo_samples=16, sync_every=5, rl_weight=1.0, ntp_weight=0.0,
                contrastive_weight=0.0, dpo_beta=0.5)
    batches = [_batch(m.cfg, B=8, seed=s) for s in range(4)]
    held_out = _batch(m.cfg, B=16, seed=99)
    before = _top10_reward(m, held_out)
    trainer = pl.Trainer(max_steps=25, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(m, DataLoader(batches, batch_size=None))
    after = _top10_reward(m, held_out)
    assert after > before + gain, (before, after)
