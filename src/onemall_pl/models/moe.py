"""Feed-forward layers: a dense FFN (SwiGLU or GELU MLP) and a sparse mixture of experts (paper Eq. 6).

Written once, used by every model that needs an FFN (``make_ffn``). With one expert it is a
plain dense FFN; with ``E > 1`` each token goes to its top-``k`` experts, plus an optional
always-on shared expert (DeepSeekMoE, Liu et al. 2024c, the paper's reference).

Legend: T tokens (batch x length, flattened), D model dim, F expert hidden dim, E experts,
k experts per token.

Routing, auxiliary-loss-free (DeepSeek-V3; Wang et al. 2024, "Auxiliary-loss-free load
balancing strategy for mixture-of-experts"):

    s_TE = sigmoid(x W_r)                   affinity (``score_func="softmax"``: softmax(x W_r))
    idx_Tk = topk(s_TE + b_E)               the bias b steers *selection* only
    g_Tk = s[idx] / sum_k s[idx]            gates from the *unbiased* scores (sigmoid always
                                            renormalised; softmax: renormalised if ``norm_topk``)
    y = shared(x) + sum_k g_k * expert_{idx_k}(x)

``b`` is a buffer, never touched by autograd. The training loop calls :func:`balance_experts`
once per optimiser step: the tokens routed to each expert since the previous call (summed
over micro-batches, then all-reduced over ranks when ``torch.distributed`` is initialised, so
every rank applies the same update) move each bias by ``b_i += u * sign(mean_load - load_i)``.
The module itself never branches on the parallel strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEConfig:
    dim: int
    """Model dimension D."""
    hidden: int
    """Hidden dimension F of each expert (of the dense FFN when ``n_experts == 1``)."""
    n_experts: int = 1
    """E routed experts; 1 means a dense FFN (no router)."""
    top_k: int = 1
    """Experts per token."""
    n_shared: int = 0
    """Always-on shared experts (each of width ``hidden``)."""
    score_func: str = "sigmoid"
    """``sigmoid`` (DeepSeek-V3) or ``softmax`` router scores."""
    norm_topk: bool = True
    """Renormalise the top-k softmax gates to sum to 1 (sigmoid gates always are)."""
    bias_update_rate: float = 1e-3
    """u in ``b_i += u * sign(mean_load - load_i)``."""
    gated: bool = True
    """SwiGLU experts (3 matrices); False = the classic 2-matrix GELU MLP."""

    def __post_init__(self):
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoE needs n_experts >= 1 and 1 <= top_k <= n_experts, got "
                             f"n_experts={self.n_experts}, top_k={self.top_k}")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"MoE score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")


class FeedForward(nn.Module):
    """SwiGLU FFN ``w2(silu(w1 x) * w3 x)``, or with ``gated=False`` the MLP ``w2(gelu(w1 x))``."""

    def __init__(self, dim: int, hidden: int, gated: bool = True):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False) if gated else None
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """E experts (as :class:`FeedForward`) stored as stacked weights; tokens arrive sorted by expert."""

    def __init__(self, dim: int, hidden: int, n_experts: int, gated: bool = True):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden)) if gated else None
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                nn.init.normal_(w, std=0.02)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return F.gelu(x @ self.w1[e]) @ self.w2[e]
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def forward(self, x_TD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # one matmul per expert over its contiguous slice of tokens (E is small; no per-token loop)
        return torch.cat([self.expert(e, x) for e, x in enumerate(torch.split(x_TD, counts))])


class MoE(nn.Module):
    """Sparse MoE FFN with a shared expert and the loss-free balancer (see module docstring)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        assert cfg.n_experts > 1, "use FeedForward for a dense layer (make_ffn does)"
        self.cfg = cfg
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.dim, cfg.hidden, cfg.n_experts, cfg.gated)
        self.shared = FeedForward(cfg.dim, cfg.hidden * cfg.n_shared, cfg.gated) if cfg.n_shared else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))  # selection bias b (saved)
        # tokens routed since the last update; integer so mixed-precision buffer casts leave it exact
        self.register_buffer("load", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        logits_TE = self.router(x_TD).float()
        s_TE = logits_TE.sigmoid() if self.cfg.score_func == "sigmoid" else logits_TE.softmax(-1)
        k = self.cfg.top_k
        idx_Tk = torch.topk(s_TE + self.expert_bias, k, dim=-1).indices  # selection: biased
        g_Tk = s_TE.gather(1, idx_Tk)  # gates: unbiased
        if self.cfg.score_func == "sigmoid" or self.cfg.norm_topk:
            g_Tk = g_Tk / g_Tk.sum(-1, keepdim=True)

        counts_E = torch.bincount(idx_Tk.flatten(), minlength=self.cfg.n_experts)
        if self.training:
            self.load += counts_E

        # dispatch: sort the T*k (token, expert) assignments by expert, run each expert on its
        # slice, weight by the gate and scatter-add back to the tokens
        order = idx_Tk.flatten().argsort(stable=True)
        token = order // k
        y_sorted = self.experts(x_TD[token], counts_E.tolist())
        y_sorted = y_sorted * g_Tk.flatten()[order, None].to(y_sorted.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token, y_sorted.to(x_TD.dtype))
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(shape)

    @torch.no_grad()
    def apply_bias_update(self, load_E: torch.Tensor) -> dict[str, float]:
        """``b_i += u * sign(mean - load_i)`` from a (globally summed) load; returns its stats."""
        load_E = load_E.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load.zero_()
        return load_stats(load_E)


def load_stats(load_E: torch.Tensor) -> dict[str, float]:
    """Load fraction per expert and max violation ``max_i load_i / mean_load - 1`` (0 = balanced)."""
    load_E = load_E.float()
    total = load_E.sum().clamp_min(1)
    frac = (load_E / total).tolist()
    out = {"max_violation": float(load_E.max() / (total / load_E.numel()) - 1)}
    out.update({f"load_{i}": f for i, f in enumerate(frac)})
    return out


@torch.no_grad()
def balance_experts(model: nn.Module) -> dict[str, float]:
    """One loss-free balancing update of every :class:`MoE` in ``model``; call after each optimiser step.

    The loads of all layers go through one ``all_reduce`` (when distributed is initialised), so
    every rank applies the same bias update. Returns ``{"<layer>/max_violation": .., "<layer>/load_i": ..,
    "max_violation": max over layers}``; empty for a model without MoE layers.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        return {}
    loads = torch.cat([m.load for _, m in layers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    out, worst, start = {}, 0.0, 0
    for name, m in layers:
        e = m.cfg.n_experts
        stats = m.apply_bias_update(loads[start:start + e])
        start += e
        worst = max(worst, stats["max_violation"])
        out.update({(f"{name}/{k}" if name else k): v for k, v in stats.items()})
    out["max_violation"] = worst
    return out


def make_ffn(cfg: MoEConfig) -> nn.Module:
    """Dense SwiGLU FFN when ``n_experts == 1``, else a sparse :class:`MoE`."""
    return FeedForward(cfg.dim, cfg.hidden, cfg.gated) if cfg.n_experts == 1 else MoE(cfg)
