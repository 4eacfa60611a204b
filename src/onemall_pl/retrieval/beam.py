"""Trie-constrained beam search over semantic IDs, for any step model, and SID -> top-K items.

The search is generic over a :class:`StepModel` (``start`` gives the first level's log-probs,
``step`` continues the chosen beams by one code), so the same code runs the OneMall decoder
(``OneMall.beam_model(batch)``: cross-attention K/V once per request, self-attention cache
over the S steps) and a Hugging Face causal LM (:class:`HFStepModel`, its ``past_key_values``).

Each level is one vectorised step for every beam of every request: add the beam's score to
the model's log-probs, mask codes the trie does not allow after the beam's prefix with -inf,
one ``topk`` over ``K x V`` per request. A beam's score is the sum of its codes' log-probs
(the model's full softmax, as Hugging Face scores it), so only valid SIDs are ever emitted.
The width at level l is ``min(beam, number of trie prefixes of length l)``; every request then
has at least that many valid candidates (each prefix has a child), so no beam is ever -inf.

Legend: B requests, K beams, V codebook size of a level, S levels, P prompt length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from onemall_pl.retrieval.trie import SIDTrie


class StepModel(Protocol):
    def start(self) -> torch.Tensor:
        """Log-probs ``[B, V_1]`` of the first SID level for each request."""

    def step(self, parent_BK: torch.Tensor, token_BK: torch.Tensor, level: int) -> torch.Tensor:
        """Continue beam ``parent_BK`` (index among the request's previous beams) with code ``token_BK``
        of ``level`` (0-based); return log-probs ``[B, K, V_{level+1}]``."""


@dataclass
class BeamResult:
    sids: torch.Tensor  # [B, K, S] valid SIDs, best first
    scores: torch.Tensor  # [B, K] sum of log-probs
    leaves: torch.Tensor  # [B, K] trie leaf of each SID


@torch.no_grad()
def beam_search(model: StepModel, trie: SIDTrie, beam: int) -> BeamResult:
    """Constrained beam search of width ``beam`` (level 1 is limited by the trie's first codes)."""
    if beam < 1:
        raise ValueError(f"beam width must be >= 1, got {beam}")
    logp = model.start()[:, None]  # [B, 1, V1]
    B, dev = logp.shape[0], logp.device
    node = torch.zeros(B, 1, dtype=torch.long, device=dev)  # the root
    score = torch.zeros(B, 1, device=dev)
    sids = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)
    parent = code = None
    for level in range(trie.levels):
        if level:
            logp = model.step(parent, code, level - 1)
        k_prev, V = node.shape[1], logp.shape[-1]
        if V != trie.codebook_sizes[level]:
            raise ValueError(f"the model gives {V} codes at SID level {level + 1} but the trie's codebook has "
                             f"{trie.codebook_sizes[level]} (codebook_sizes {list(trie.codebook_sizes)})")
        cand = trie.mask(node.flatten(), level).view(B, k_prev, V)  # 0 / -inf, then summed in place
        cand += logp
        cand += score[..., None]
        score, flat = cand.view(B, -1).topk(min(beam, trie.n_nodes(level + 1)), dim=-1)
        parent, code = flat // V, flat % V
        node = trie.child(node.gather(1, parent).flatten(), code.flatten(), level).view_as(code)
        sids = torch.cat([sids.gather(1, parent[..., None].expand(-1, -1, level)), code[..., None]], dim=-1)
    assert torch.isfinite(score).all(), "a beam ended on an invalid SID"
    return BeamResult(sids, score, node)


@torch.no_grad()
def retrieve(model, batch: dict, trie: SIDTrie, beam: int, k: int) -> tuple[torch.Tensor, torch.Tensor, BeamResult]:
    """OneMall beam search, then SID -> items: top-``k`` item ids ``[B, k]`` (-1 pad), their SID scores,
    and the beams. Collided SIDs expand to all their items, in ``sid_table`` order."""
    if tuple(model.cfg.codebook_sizes) != trie.codebook_sizes:
        raise ValueError(f"model codebook_sizes {list(model.cfg.codebook_sizes)} differ from the trie's "
                         f"{list(trie.codebook_sizes)}")
    was_training = model.training
    model.eval()
    try:
        res = beam_search(model.beam_model(batch), trie, beam)
    finally:
        model.train(was_training)
    items, scores = trie.items_of(res.leaves, res.scores, k)
    return items, scores, res


@torch.no_grad()
def exhaustive_search(model: StepModel, trie: SIDTrie, k: int) -> BeamResult:
    """Score every SID in the trie (teacher-forced through ``model``) and keep the top ``k``; for tests.

    Runs the step model with all prefixes as "beams", so it is exact and only for small tries.
    """
    logp = model.start()[:, None]  # beams = the level's nodes, in order (level 0: the root)
    B = logp.shape[0]
    score = torch.zeros(B, 1, device=logp.device)
    parent = code = None
    for level in range(trie.levels):
        if level:
            logp = model.step(parent, code, level - 1)
        child = torch.arange(trie.n_nodes(level + 1), device=logp.device)
        parent = (torch.searchsorted(trie.ptr[level], child, right=True) - 1).expand(B, -1)
        code = trie.code[level + 1][child].expand(B, -1)
        step_lp = logp.float().gather(1, parent[..., None].expand(-1, -1, logp.shape[-1])).gather(2, code[..., None])
        score = score.gather(1, parent) + step_lp[..., 0]
    top, idx = score.topk(min(k, score.shape[1]), dim=-1)
    return BeamResult(trie.sids(idx.flatten()).view(B, -1, trie.levels), top, idx)


# ---------------------------------------------------------------------------------------------
# Hugging Face causal LMs: SID codes as tokens (level l's code c -> offsets[l] + c)


class HFStepModel:
    """A Hugging Face causal LM as a :class:`StepModel` over a prompt, with its KV cache."""

    def __init__(self, model, input_ids_BP: torch.Tensor, offsets: list[int], codebook_sizes: list[int]):
        self.model, self.ids, self.offsets, self.sizes = model, input_ids_BP, offsets, codebook_sizes
        self.cache = None

    def _logp(self, logits_BV: torch.Tensor, level: int) -> torch.Tensor:
        # full-vocabulary softmax (as HF beam search scores), then the level's slice of codes
        lp = logits_BV.float().log_softmax(-1)
        return lp[:, self.offsets[level]:self.offsets[level] + self.sizes[level]]

    def start(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, use_cache=True)
        self.cache = out.past_key_values
        return self._logp(out.logits[:, -1], 0)

    def step(self, parent_BK: torch.Tensor, token_BK: torch.Tensor, level: int) -> torch.Tensor:
        B, K = token_BK.shape
        k_prev = self.cache.layers[0].keys.shape[0] // B
        flat = (parent_BK + torch.arange(B, device=parent_BK.device)[:, None] * k_prev).flatten()
        self.cache.reorder_cache(flat)
        out = self.model(input_ids=(token_BK + self.offsets[level]).view(B * K, 1), past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        return self._logp(out.logits[:, -1], level + 1).view(B, K, -1)


def hf_generate(model, input_ids_BP: torch.Tensor, trie: SIDTrie, offsets: list[int], beam: int) -> BeamResult:
    """The same search with ``model.generate(num_beams=beam, prefix_allowed_tokens_fn=...)``."""
    P, S = input_ids_BP.shape[1], trie.levels
    allowed = {p: [offsets[len(p)] + c for c in cs] for p, cs in trie.children_lists().items()}

    def prefix_allowed_tokens_fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        gen = sent[P:].tolist()
        return allowed[tuple(t - offsets[i] for i, t in enumerate(gen))]

    out = model.generate(input_ids_BP, attention_mask=torch.ones_like(input_ids_BP), num_beams=beam,
                         num_return_sequences=beam, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                         do_sample=False, max_new_tokens=S, min_new_tokens=S, length_penalty=0.0,
                         early_stopping=True, eos_token_id=None, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    B = input_ids_BP.shape[0]
    gen = out.sequences[:, P:P + S] - torch.tensor(offsets[:S], device=out.sequences.device)
    sids = gen.view(B, beam, S)
    return BeamResult(sids, out.sequences_scores.view(B, beam), trie.leaf(sids))


def tiny_hf_lm(codebook_sizes: list[int], seed: int = 0, hidden: int = 64, layers: int = 2, init_std: float = 0.5):
    """A small random Qwen2 causal LM whose vocabulary is 2 specials + every level's codes.

    ``init_std`` is large so the random model's log-probs are spread out (few near-ties).
    Returns the model (eval mode) and the token offset of each level.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    offsets = [2 + sum(codebook_sizes[:i]) for i in range(len(codebook_sizes))]
    cfg = Qwen2Config(vocab_size=2 + sum(codebook_sizes), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=init_std, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, offsets


def random_trie(codebook_sizes: list[int], n_items: int, seed: int = 0) -> SIDTrie:
    """A trie over ``n_items`` random SIDs (uniform codes; collisions happen as they come)."""
    g = torch.Generator().manual_seed(seed)
    sids = torch.stack([torch.randint(c, (n_items,), generator=g) for c in codebook_sizes], dim=-1)
    return SIDTrie(sids, torch.arange(n_items), codebook_sizes)


def bench(beams: tuple[int, ...] = (50, 100, 500), requests: int = 4, prompt_len: int = 16,
          codebook_sizes: tuple[int, ...] = (1024, 1024, 1024), n_items: int = 50_000, repeats: int = 3,
          seed: int = 0, threads: int = 1) -> dict:
    """Our beam search vs ``generate(num_beams=B, prefix_allowed_tokens_fn=...)`` on one tiny random
    Qwen2 LM and one random trie: identical ordered top-K (yes/no), max score gap, median
    wall-clock and process CPU time of each and their ratios, per beam width. ``threads``: torch
    threads while timing (1 keeps figures steady on a shared, oversubscribed machine, where
    spinning OpenMP threads inflate both clocks; 0 leaves torch's setting)."""
    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench(beams, requests, prompt_len, codebook_sizes, n_items, repeats, seed, threads=0)
        finally:
            torch.set_num_threads(before)
    sizes = list(codebook_sizes)
    model, offsets = tiny_hf_lm(sizes, seed)
    trie = random_trie(sizes, n_items, seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(2, model.config.vocab_size, (requests, prompt_len), generator=g)
    out: dict = {"trie": {"items": trie.n_items, "level1_codes": trie.n_nodes(1), "sids": trie.n_nodes(trie.levels)},
                 "requests": requests, "torch_threads": torch.get_num_threads()}
    for B in beams:
        if B > trie.n_nodes(1):
            raise ValueError(f"beam {B} exceeds the trie's {trie.n_nodes(1)} first codes; HF would pad with dead beams")
        ours = beam_search(HFStepModel(model, prompt, offsets, sizes), trie, B)
        with torch.no_grad():
            hf = hf_generate(model, prompt, trie, offsets, B)
        t_ours = _median_time(lambda b=B: beam_search(HFStepModel(model, prompt, offsets, sizes), trie, b), repeats)
        with torch.no_grad():
            t_hf = _median_time(lambda b=B: hf_generate(model, prompt, trie, offsets, b), repeats)
        out[f"B{B}"] = {"identical_topk": "yes" if torch.equal(ours.sids, hf.sids) else "no",
                        "max_score_gap": float((ours.scores - hf.scores).abs().max()),
                        "ours_ms": 1e3 * t_ours[0], "hf_ms": 1e3 * t_hf[0], "speedup": t_hf[0] / t_ours[0],
                        "ours_cpu_ms": 1e3 * t_ours[1], "hf_cpu_ms": 1e3 * t_hf[1],
                        "speedup_cpu": t_hf[1] / t_ours[1]}
    return out


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time (the latter is steadier on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]
