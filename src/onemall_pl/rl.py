"""Stage 4, RL post-training: the ranking model as reward, DPO (Eq. 9) or GRPO (Eq. 10) (paper §3.3).

    onemall rl fit     -c configs/rl/tiny_grpo.yaml            # CPU, a few minutes
    onemall rl export  -c configs/rl/tiny_grpo.yaml            # -> artifacts/<dataset>/rl_grpo/
    onemall rl fit     -c configs/rl/tiny_dpo.yaml  && onemall rl export -c configs/rl/tiny_dpo.yaml
    onemall rl fit     -c configs/rl/paper.yaml -c configs/trainer/ddp.yaml --trainer.devices 8   # GPUs
    onemall evaluate rl --data_dir data/synth                  # Table 4 + the offline A/B (Table 3 analogue)

The loop of Figure 5, one training batch at a time (:class:`RLModule`, a :class:`PretrainModule`):

- **Policy**: the OneMall model, initialised from the pretrain artifact (``artifacts/<dataset>/pretrain``,
  read through its manifest; it must have been trained on the quantize artifact the data module reads).
- **Reference**: a frozen copy of the policy (``requires_grad`` off, eval mode), synced from it (weights
  and MoE routing biases) every ``sync_every`` optimiser steps; it is saved in checkpoints, so a resumed
  run continues with the same reference.
- **Requests**: a share ``replay_fraction`` of each training batch (paper: 2% of the training traffic;
  ``max(1, round(fraction x B))`` rows, drawn with a generator seeded by ``(seed, step, rank)``).
- **Responses**: for each replayed request the reference runs the trie-constrained beam search of width
  ``group_size`` (paper: 768) over the SIDs of the scenario's item type, so every response is a valid SID;
  a SID -> its first item in the trie (the quantize stage's rank order; collided SIDs name several items,
  the RL step scores the first, as the response "is" one item). A small trie can give fewer than
  ``group_size`` responses; the rest of the group is masked.
- **Reward**: the ranking model (``artifacts/<dataset>/reward``, :class:`onemall_pl.reward.RewardScorer`)
  scores each (user, item) pair from the request's raw behaviour histories, fused by Eq. 8; rewards are
  normalised within the group into advantages (:func:`onemall_pl.rl_objectives.group_advantages`).
- **Log-probabilities**: a response's log-probability is the sum over its SID levels of the level's
  log-softmax at its code, from a teacher-forced decode of the G responses with the user context computed
  once per request (:func:`sequence_logp`). The reference's are its beam scores (the same sum, computed
  while decoding; a test checks they equal the teacher-forced ones).
- **Objective**: ``ntp_weight x NTP + contrastive_weight x contrastive (Eq. 7, the same batch) +
  rl_weight x RL``, RL being
  - ``dpo`` (Eq. 9): the highest-advantage response is the positive, the others (or the ``dpo_negatives``
    lowest) with a strictly lower advantage are the negatives, ``dpo_beta`` (paper: 0.1-0.5);
  - ``grpo`` (Eq. 10): ``grpo_samples`` responses drawn without replacement from the group, advantages
    normalised over the whole group, clipped ratio ``pi / pi_ref`` (``clip_eps``), optional k3 KL.
  The paper notes that too large an RL weight degrades SID accuracy and the validity of generated SIDs:
  ``onemall evaluate rl`` reports both next to the rewards.

Logged per step: ``rl/reward_mean`` (the group's mean reward), ``rl/reward_top1`` (of the reference's
best beam), ``rl/group_fill`` (responses / group_size), ``rl/kl`` (k3 estimate of KL between reference
and policy on the responses), ``rl/loss`` and the algorithm's own (DPO: ``rl/dpo_acc``, the share of
pairs the policy ranks as the reward does; GRPO: ``rl/clip_frac``). Validation adds, on the first
``eval_requests`` requests, ``val/reward@10`` (mean fused reward of the policy's top-10 items) and
``val/valid_sid@10`` (share of the *unconstrained* top-10 beams that are SIDs of an item).

Measured once (tiny world ``data synth --preset tiny``, its quantize artifact a category-derived SID fixture
[64, 64, 256] rather than the tokenizer chain; pretrain ``configs/pretrain/tiny.yaml``; reward
``configs/reward/tiny.yaml`` for 1 epoch; ``tiny_{grpo,dpo}.yaml`` as shipped; one H100, about 60 s per
RL fit + export): on 512 test requests, beam 500, the Top10 fused reward went Base 6.64 -> DPO 7.06 ->
GRPO 7.75 (Top100 3.06 / 3.29 / 3.74, Top500 1.226 / 1.249 / 1.280), HR@50/100/500 moved by under 1.5
points, and the unconstrained valid-SID rate of the Top10 fell 80.9% -> 76.7% -> 72.5% (the paper's warning).
The simulator's oracle on the same requests (top 10 shown): expected clicks +4.1% (DPO) and +8.3% (GRPO)
over Base, orders +5.3% / +10.1%, GMV +5.9% / +9.9%, every 95% interval above 0.

Artifact ``<artifacts_root>/<dataset>/rl_<algo>/`` (``rl_dpo``, ``rl_grpo``: Base = the pretrain
artifact, DPO and GRPO live side by side for Table 4): the pretrain artifact's layout (``model.pt``,
``model.json``), stage ``rl``, upstream quantize + pretrain + reward manifests, test metrics (NTP,
Acc-SID, HR@K). Load any of the three with :func:`load_policy`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from onemall_pl.artifacts import ArtifactError, Manifest, check_upstream, load_manifest, write_artifact
from onemall_pl.data.schema import SCENARIOS
from onemall_pl.io import write_json
from onemall_pl.models.decoder import BEHAVIOURS, OneMall, OneMallConfig, count_params
from onemall_pl.pretrain import (
    SCENARIO_ITEM_TYPE,
    PretrainModule,
    SamplesCollate,
    SamplesDataModule,
    _ragged,
    _take,
    _window,
    load_pretrained,
)
from onemall_pl.retrieval import SIDTrie, beam_search
from onemall_pl.rl_objectives import dpo_loss, group_advantages, grpo_loss
from onemall_pl.stage import StageCLI

RAW_PAD = -1
"""Padding of the raw item-id histories handed to the reward scorer."""


# ----------------------------------------------------------------------------- data


class RLCollate(SamplesCollate):
    """:class:`SamplesCollate` plus what the reward scorer reads: ``batch["raw"]`` holds each behaviour's
    latest ``raw_len`` *raw* item ids (``seq_exposure`` ... ``[B, L]``, newest first, -1 padded; items
    without a SID stay in, the ranking model was trained on them) and, when the rows have them,
    ``user_id`` and ``ts`` (the simulator's oracle needs them for the offline A/B)."""

    def __init__(self, *args, raw_len: Mapping[str, int], **kw):
        super().__init__(*args, **kw)
        self.raw_len = dict(raw_len)

    def __call__(self, t: pa.Table) -> dict[str, Any]:
        batch = super().__call__(t)
        raw = {}
        for b in BEHAVIOURS:
            off, ids = _ragged(t.column(f"seq_{b}"), f"seq_{b}")
            raw[f"seq_{b}"] = torch.from_numpy(_window(off, ids, self.raw_len[b], newest_first=True, pad=RAW_PAD)[0])
        batch["raw"] = raw
        for c in ("user_id", "ts"):
            if c in t.column_names:
                batch[c] = torch.from_numpy(t.column(c).to_numpy().astype(np.int64))
        return batch


class RLDataModule(SamplesDataModule):
    """The pretrain stage's data (``samples`` + quantize artifact) with the reward scorer's inputs.

    Sequence lengths, targets per request and price bands are those the pretrained model was trained
    with (read from the pretrain artifact, never typed again); the quantize artifact must be the one
    the pretrain artifact was built from.

    Args:
        data_dir: the dataset folder (``items``, ``samples``).
        sid_artifact: the quantize artifact; default ``artifacts/<dataset>/quantize``.
        pretrain_artifact: the policy to start from; default: ``pretrain`` beside the quantize artifact.
        reward_artifact: the ranking model; default: ``reward`` beside the quantize artifact.
        batch_size: training requests per batch and per device (NTP + contrastive use all of them, RL
            replays ``rl.replay_fraction`` of them).
        eval_batch_size: requests per validation / test batch.
        num_workers: DataLoader workers of the training stream.
        seed: shuffling of the training stream and of the evaluation order.
    """

    def __init__(self, data_dir: str = "data/synth", sid_artifact: str | None = None,
                 pretrain_artifact: str | None = None, reward_artifact: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        name = Path(data_dir).resolve().name
        sid_artifact = sid_artifact or f"artifacts/{name}/quantize"
        here = Path(sid_artifact).parent
        pm = load_manifest(pretrain_artifact or here / "pretrain", stage="pretrain")
        rm = load_manifest(reward_artifact or here / "reward", stage="reward")
        meta = json.loads(pm.file("model.json").read_text())
        ml, pdata = meta["max_len"], pm.config.get("data", {})
        super().__init__(data_dir, sid_artifact, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         max_exposure=ml["exposure"], max_click=ml["click"], max_order=ml["order"],
                         max_targets=meta["max_targets"], num_workers=num_workers, seed=seed,
                         num_price_bands=pdata["num_price_bands"])
        check_upstream(pm, self.sid_manifest)
        self.pretrain_manifest, self.reward_manifest = pm, rm
        raw_len = {b: int(rm.size(f"max_{b}")) for b in BEHAVIOURS}
        self.collate = RLCollate(self.catalog, self.sids, self.max_len, meta["max_targets"], raw_len=raw_len)

    @property
    def pretrain_source(self) -> str:
        return self.pretrain_manifest.path

    @property
    def reward_source(self) -> str:
        return self.reward_manifest.path


# ----------------------------------------------------------------------------- policies


def load_policy(folder: str | Path, quantize: str | Path | Manifest | None = None,
                map_location: str = "cpu") -> tuple[OneMall, Manifest]:
    """The OneMall model of a pretrain (Base) or rl (DPO / GRPO) artifact, checked through its manifest;
    ``quantize``: fail unless it was trained on these SIDs."""
    return load_pretrained(folder, quantize, map_location, stages=("pretrain", "rl"))


class FreeTrie:
    """Every code at every level: beam search through it is *unconstrained* generation, the way to
    measure how many of a model's free top-K SIDs are valid (name an item). Duck-types the part of
    :class:`SIDTrie` that :func:`onemall_pl.retrieval.beam_search` uses; node = mixed-radix prefix key."""

    def __init__(self, codebook_sizes: Sequence[int], device: torch.device | str = "cpu"):
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        self.device = torch.device(device)

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    def n_nodes(self, level: int) -> int:
        return math.prod(self.codebook_sizes[:level])

    def mask(self, node_N: torch.Tensor, level: int) -> torch.Tensor:
        return torch.zeros(len(node_N), self.codebook_sizes[level], device=node_N.device)

    def child(self, node_N: torch.Tensor, code_N: torch.Tensor, level: int) -> torch.Tensor:
        return node_N * self.codebook_sizes[level] + code_N


def scenario_groups(scenario_B: torch.Tensor, tries: Mapping[str, SIDTrie], device) -> list[tuple[torch.Tensor, SIDTrie]]:
    """``(rows, trie)`` per scenario present: a scenario's requests are answered from its item type's trie."""
    out = []
    for s, scen in enumerate(SCENARIOS):
        rows = (scenario_B == s).nonzero(as_tuple=True)[0]
        if len(rows) == 0:
            continue
        typ = SCENARIO_ITEM_TYPE[scen]
        if typ not in tries:
            raise ArtifactError(f"no {typ} has a SID, so {scen} requests cannot be answered")
        trie = tries[typ]
        if trie.device != torch.device(device):
            trie = trie.to(device)
        out.append((rows, trie))
    return out


@torch.no_grad()
def sample_responses(model: OneMall, batch: dict, tries: Mapping[str, SIDTrie], group: int) -> dict[str, torch.Tensor]:
    """Beam-sample ``group`` valid SIDs per request (the reference's responses), per scenario trie.

    Returns ``sid`` ``[B, G, S]``, ``logp`` ``[B, G]`` (the model's sequence log-probability = beam score),
    ``item`` ``[B, G]`` (the SID's first item, -1 pad) and ``mask`` ``[B, G]``.
    """
    B, S, dev = len(batch["scenario"]), model.cfg.levels, batch["scenario"].device
    out = {"sid": torch.zeros(B, group, S, dtype=torch.long, device=dev),
           "logp": torch.zeros(B, group, device=dev),
           "item": torch.full((B, group), RAW_PAD, dtype=torch.long, device=dev),
           "mask": torch.zeros(B, group, dtype=torch.bool, device=dev)}
    was = model.training
    model.eval()
    try:
        for rows, trie in scenario_groups(batch["scenario"], tries, dev):
            sub = _take({k: batch[k] for k in ("scenario", *BEHAVIOURS)}, rows)
            res = beam_search(model.beam_model(sub), trie, group)
            K = res.sids.shape[1]
            out["sid"][rows, :K] = res.sids
            out["logp"][rows, :K] = res.scores.float()
            out["item"][rows, :K] = trie.items[trie.item_ptr[res.leaves]]  # a collided SID: its first item
            out["mask"][rows, :K] = True
    finally:
        model.train(was)
    return out


def sequence_logp(model: OneMall, batch: dict, sid_BGS: torch.Tensor, mask_BG: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` log pi(response) = sum over levels of log_softmax(head_l) at the response's code l,
    teacher-forced; the user context is encoded once per request. 0 where masked."""
    req_N, g_N = mask_BG.nonzero(as_tuple=True)
    ctx, ctx_mask = model.encode_user(batch)
    sid_NS = sid_BGS[req_N, g_N]
    h = model.decode(sid_NS, ctx, ctx_mask, req_N)  # [N, S+1, D]
    lp_N = sum(head(h[:, i]).float().log_softmax(-1).gather(1, sid_NS[:, i:i + 1])[:, 0]
               for i, head in enumerate(model.heads))
    return torch.zeros(mask_BG.shape, dtype=lp_N.dtype, device=lp_N.device).index_put((req_N, g_N), lp_N)


@torch.no_grad()
def policy_topk(model: OneMall, batch: dict, tries: Mapping[str, SIDTrie], beam: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's retrieval: top-``k`` item ids ``[B, k]`` (-1 pad; collided SIDs expand to all their
    items, as for HR@K) and the SID each came from ``[B, k, S]``, from a constrained beam of width ``beam``."""
    B, dev = len(batch["scenario"]), batch["scenario"].device
    items = torch.full((B, k), RAW_PAD, dtype=torch.long, device=dev)
    was = model.training
    model.eval()
    try:
        for rows, trie in scenario_groups(batch["scenario"], tries, dev):
            sub = _take({key: batch[key] for key in ("scenario", *BEHAVIOURS)}, rows)
            res = beam_search(model.beam_model(sub), trie, beam)
            items[rows] = trie.items_of(res.leaves, res.scores, k)[0]
    finally:
        model.train(was)
    return items


@torch.no_grad()
def valid_sid_rate(model: OneMall, batch: dict, tries: Mapping[str, SIDTrie], beam: int) -> torch.Tensor:
    """``[B, beam]`` bool: whether each of the model's *unconstrained* top-``beam`` SIDs names an item of
    the scenario's type (beam search over :class:`FreeTrie`)."""
    B, dev = len(batch["scenario"]), batch["scenario"].device
    free = FreeTrie(model.cfg.codebook_sizes, dev)
    out = torch.zeros(B, beam, dtype=torch.bool, device=dev)
    was = model.training
    model.eval()
    try:
        for rows, trie in scenario_groups(batch["scenario"], tries, dev):
            sub = _take({key: batch[key] for key in ("scenario", *BEHAVIOURS)}, rows)
            res = beam_search(model.beam_model(sub), free, beam)
            out[rows, :res.sids.shape[1]] = trie.leaf(res.sids) >= 0
    finally:
        model.train(was)
    return out


def user_batch(batch: dict) -> dict:
    """What the reward scorer reads of a batch: raw histories + scenario."""
    return {**batch["raw"], "scenario": batch["scenario"]}


# ----------------------------------------------------------------------------- module


@dataclass
class RLConfig:
    """Stage-4 settings (paper §3.3, §4.4)."""

    algo: Literal["dpo", "grpo"] = "grpo"
    replay_fraction: float = 0.02
    """share of each training batch replayed as RL requests (paper: 2%); at least one request per batch"""
    group_size: int = 64
    """G: responses the reference beam-samples per request (paper: 768)"""
    sync_every: int = 50
    """optimiser steps between reference syncs"""
    rl_weight: float = 0.1
    """lambda of the RL term (paper: too much RL hurts SID accuracy and validity)"""
    ntp_weight: float = 1.0
    contrastive_weight: float | None = None
    """None = the pretrained model's (Eq. 7)"""
    dpo_beta: float = 0.1
    """beta of Eq. 9 (paper: 0.1-0.5)"""
    dpo_negatives: int | None = None
    """negatives per request: None = every lower-advantage response, n = the n lowest"""
    grpo_samples: int = 16
    """responses drawn without replacement from the group for Eq. 10"""
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    """k3 KL penalty to the reference in GRPO (0 = off, as the paper writes Eq. 10)"""
    eval_requests: int = 64
    """validation requests scored for val/reward@10 and val/valid_sid@10 (0 = off)"""
    seed: int = 0

    def __post_init__(self):
        if self.algo not in ("dpo", "grpo"):
            raise ValueError(f"rl.algo must be 'dpo' or 'grpo', got {self.algo!r}")
        if not 0.0 < self.replay_fraction <= 1.0:
            raise ValueError(f"rl.replay_fraction must be in (0, 1], got {self.replay_fraction}")
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be >= 2 (a group needs a comparison), got {self.group_size}")
        if self.sync_every < 1:
            raise ValueError(f"rl.sync_every must be >= 1, got {self.sync_every}")
        if self.algo == "grpo" and not 1 <= self.grpo_samples <= self.group_size:
            raise ValueError(f"rl.grpo_samples={self.grpo_samples} must be in [1, group_size={self.group_size}]")
        if self.dpo_negatives is not None and self.dpo_negatives < 1:
            raise ValueError(f"rl.dpo_negatives must be >= 1 or null, got {self.dpo_negatives}")


class RLModule(PretrainModule):
    """The pretrained OneMall model post-trained with the ranking model as reward (module docstring).

    Args:
        pretrain_source: the pretrain artifact, the policy's starting point (linked from ``data.pretrain_source``);
            its model config is the policy's, never typed again.
        reward_source: the reward artifact, the ranking model (linked from ``data.reward_source``).
        rl: the RL settings (:class:`RLConfig`).
        sizes, sid_source: linked from the data module, as in pretraining (checked against the artifact).
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW and its warm-up / cosine schedule.
        beam, beam_requests, hr_k: the pretrain stage's HR@K evaluation.
        artifacts_root: ``export`` writes ``<artifacts_root>/<dataset>/rl_<algo>/``.
        net: only without a pretrain artifact (tests): the model's config, randomly initialised.
    """

    def __init__(self, pretrain_source: str | None = None, reward_source: str | None = None,
                 rl: RLConfig | None = None, sizes: dict[str, Any] | None = None, sid_source: str | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int = 10, min_lr_ratio: float = 1.0,
                 beam: int = 500, beam_requests: int | None = 256, hr_k: Sequence[int] = (50, 100, 500),
                 artifacts_root: str = "artifacts", net: OneMallConfig | None = None):
        rl = rl or RLConfig()
        state = None
        if pretrain_source is not None:
            policy, _ = load_pretrained(pretrain_source, quantize=sid_source)
            net, state = policy.cfg, policy.state_dict()
        elif net is None:
            raise ValueError("RLModule needs a pretrain_source (the pretrain artifact: the policy to post-train)")
        if rl.contrastive_weight is not None:
            net = dataclasses.replace(net, contrastive_weight=rl.contrastive_weight)
        super().__init__(net=net, sizes=sizes, sid_source=sid_source, lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, beam=beam,
                         beam_requests=beam_requests, hr_k=hr_k, artifacts_root=artifacts_root)
        if state is not None:
            try:
                self.model.load_state_dict(state)
            except RuntimeError as e:
                raise ArtifactError(f"{pretrain_source}: the pretrained model does not fit the sizes linked from "
                                    f"the data ({sizes}): {str(e).splitlines()[0]}") from None
        self.rl = rl
        self.save_hyperparameters({**self.hparams, "pretrain_source": pretrain_source,
                                   "reward_source": reward_source, "rl": dataclasses.asdict(rl)})
        self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.synced_at = 0
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))  # optimiser steps, for the manifest
        self.scorer = None  # the RewardScorer, loaded on first use (on the module's device)
        self.val_reward, self.val_valid = MeanMetric(), MeanMetric()

    # --- reference model
    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def sync_reference(self) -> None:
        """pi_ref <- pi (weights and routing biases)."""
        self.reference.load_state_dict(self.model.state_dict())
        self.synced_at = self.global_step if self._trainer is not None else self.synced_at

    def configure_optimizers(self):
        # the reference's parameters have no gradient: keep them out of the optimiser
        ref = {id(p) for p in self.reference.parameters()}
        conf = super().configure_optimizers()
        for g in conf["optimizer"].param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in ref]
        return conf

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        step = self.global_step
        self.trained_steps.fill_(step)
        if step and step % self.rl.sync_every == 0 and step != self.synced_at:
            self.sync_reference()

    # --- reward
    def reward_scorer(self):
        if self.scorer is None or getattr(self.scorer, "device", self.device) != self.device:
            from onemall_pl.reward import RewardScorer

            if self.hparams.reward_source is None:
                raise ValueError("RLModule has no reward_source (the reward artifact, linked from data.reward_source)")
            self.scorer = RewardScorer.from_artifact(self.hparams.reward_source, device=self.device)
        return self.scorer

    # --- the RL term
    def replay_rows(self, B: int) -> torch.Tensor:
        """The requests of this batch replayed for RL (seeded by step and rank, so resumes repeat them)."""
        n = min(B, max(1, round(self.rl.replay_fraction * B)))
        rank = self.global_rank if self._trainer is not None else 0
        g = torch.Generator().manual_seed(hash((self.rl.seed, self.global_step, rank)) % (2 ** 62))
        return torch.randperm(B, generator=g)[:n].sort().values.to(self.device)

    def rl_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The RL term on ``batch`` (the replayed requests): responses from the reference, rewards from
        the ranking model, advantages, then Eq. 9 or Eq. 10. Returns (loss, stats)."""
        rl = self.rl
        resp = sample_responses(self.reference, batch, self.tries, rl.group_size)
        mask = resp["mask"]
        reward = self.reward_scorer().score(user_batch(batch), resp["item"])["reward"].to(self.device).float()
        adv = group_advantages(reward, mask)
        logp = sequence_logp(self.model, batch, resp["sid"], mask)
        ref_logp = resp["logp"]
        m = mask.float()
        d = (ref_logp - logp).detach()
        stats = {"reward_mean": (reward * m).sum() / m.sum().clamp_min(1), "reward_top1": reward[:, 0].mean(),
                 "group_fill": m.mean(), "kl": ((torch.exp(d) - d - 1) * m).sum() / m.sum().clamp_min(1)}
        if rl.algo == "dpo":
            adv_m = adv.masked_fill(~mask, float("-inf"))
            pos = adv_m.argmax(1)
            neg = mask & (adv < adv.gather(1, pos[:, None]))
            if rl.dpo_negatives is not None:  # the n lowest-advantage responses
                order = adv.masked_fill(~neg, float("inf")).argsort(1)[:, :rl.dpo_negatives]
                neg = torch.zeros_like(neg).scatter(1, order, neg.gather(1, order))
            lp_pos, ref_pos = logp.gather(1, pos[:, None])[:, 0], ref_logp.gather(1, pos[:, None])[:, 0]
            loss = dpo_loss(lp_pos, ref_pos, logp, ref_logp, beta=rl.dpo_beta, neg_mask_BN=neg)
            margin = (lp_pos - ref_pos)[:, None] - (logp - ref_logp)
            stats["dpo_acc"] = ((margin > 0) & neg).sum() / neg.sum().clamp_min(1)
        else:
            g = torch.Generator(device="cpu").manual_seed(hash((rl.seed, self.global_step, 1)) % (2 ** 62))
            keys = torch.rand(mask.shape, generator=g).to(self.device).masked_fill(~mask, -1.0)
            sel = keys.topk(rl.grpo_samples, dim=1).indices
            sel_mask = mask.gather(1, sel)
            lp, old, a = logp.gather(1, sel), ref_logp.gather(1, sel), adv.gather(1, sel)
            loss = grpo_loss(lp, old, a, clip_eps=rl.clip_eps, mask_BG=sel_mask, kl_coef=rl.kl_coef, ref_logp_BG=old)
            ratio = torch.exp(lp - old).detach()
            clipped = ((ratio > 1 + rl.clip_eps) & (a > 0)) | ((ratio < 1 - rl.clip_eps) & (a < 0))
            stats["clip_frac"] = (clipped & sel_mask).sum() / sel_mask.sum().clamp_min(1)
        stats["advantage_std"] = ((adv ** 2 * m).sum() / m.sum().clamp_min(1)).sqrt()
        return loss, stats

    def training_step(self, batch, batch_idx):
        rl = self.rl
        out = self.model(batch)
        ntp = self.model.loss(out)["ntp"]
        con, con_acc = self.contrastive(out, batch["target"]["mask"])
        rows = self.replay_rows(len(batch["scenario"]))
        rl_term, stats = self.rl_loss(_take(batch, rows))
        loss = rl.ntp_weight * ntp + self.cfg.contrastive_weight * con + rl.rl_weight * rl_term
        B = len(batch["scenario"])
        self.log_dict({"train/loss": loss, "train/ntp": ntp, "train/contrastive": con,
                       "train/contrastive_acc": con_acc, "rl/loss": rl_term}, prog_bar=True, batch_size=B)
        self.log_dict({f"rl/{k}": v for k, v in stats.items()}, batch_size=len(rows))
        self.train_acc.update([lg.detach() for lg in out.logits], out.targets_NS, batch["scenario"][out.req_N])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=B)
        return loss

    # --- evaluation: the pretrain metrics + reward / validity of the policy's top 10
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        rows = (batch["row"] < self.rl.eval_requests).nonzero(as_tuple=True)[0]
        if len(rows) == 0:
            return
        sub = _take(batch, rows)
        items = policy_topk(self.model, sub, self.tries, 10, 10)
        r = self.reward_scorer().score(user_batch(sub), items)["reward"].float()
        valid = (items != RAW_PAD).float()
        self.val_reward.update(((r * valid).sum(1) / valid.sum(1).clamp_min(1)).to(self.device))
        self.val_valid.update(valid_sid_rate(self.model, sub, self.tries, 10).float().mean(1))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_reward.update_count:
            self.log_dict({"val/reward@10": self.val_reward.compute(), "val/valid_sid@10": self.val_valid.compute()})
        self.val_reward.reset()
        self.val_valid.reset()

    # --- the artifact
    def export_artifact(self, trainer: pl.Trainer, datamodule: RLDataModule | None, out: Path | None):
        if datamodule is None:
            raise ValueError("the rl export needs its data module (test metrics, upstream manifests)")
        dm = datamodule
        self.attach_data(dm)
        if trainer.global_rank != 0:
            return None
        out = out or Path(self.hparams.artifacts_root) / dm.dataset_name / f"rl_{self.rl.algo}"
        t0 = time.perf_counter()
        metrics = {"test": self.evaluate(dm.test_dataloader(), dm.leave_one_out), "steps": int(self.trained_steps)}
        metrics["eval_s"] = time.perf_counter() - t0
        params = count_params(self.model)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        meta = json.loads(dm.pretrain_manifest.file("model.json").read_text())
        meta["model"] = dataclasses.asdict(self.cfg)
        meta["rl"] = dataclasses.asdict(self.rl)

        def build(tmp: Path) -> None:
            torch.save(state, tmp / "model.pt")
            write_json(tmp / "model.json", meta)

        m = write_artifact(out, build, stage="rl", dataset=dm.dataset_name,
                           config={"model": dict(self.hparams), "data": dict(dm.hparams)},
                           upstream=[dm.sid_manifest, dm.pretrain_manifest, dm.reward_manifest],
                           sizes={"codebook_sizes": list(self.cfg.codebook_sizes), "params_total": params["total"],
                                  "params_active": params["active"], "algo": self.rl.algo},
                           metrics=metrics)
        rank_zero_info(f"rl artifact {out} (id {m.id}): test " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items() if "/" not in k))
        return m


# ----------------------------------------------------------------------------- CLI


class RLCLI(StageCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.sizes", "model.sizes", apply_on="instantiate")
        parser.link_arguments("data.sid_source", "model.sid_source", apply_on="instantiate")
        parser.link_arguments("data.pretrain_source", "model.pretrain_source", apply_on="instantiate")
        parser.link_arguments("data.reward_source", "model.reward_source", apply_on="instantiate")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        RLCLI(RLModule, RLDataModule, args=argv)
    except ArtifactError as e:
        print(f"onemall rl: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
