"""The objectives of RL post-training (paper §3.3): group advantages, DPO (Eq. 9), GRPO (Eq. 10).

Pure torch on log-probabilities of whole responses (a response = one generated SID path, its
log-probability the sum over its levels), so they serve any policy: the stage-4 module feeds
them the policy's and the reference's sequence log-probabilities of the responses the
reference beam-sampled, and the fused reward of each response from the ranking model (Eq. 8).

Legend: B requests, G responses per request (the group).
"""

from __future__ import annotations

import torch


def group_advantages(reward_BG: torch.Tensor, mask_BG: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Normalise rewards within each request's group: A = (r - mean) / (std + eps).

    The paper's "reward model further normalized as the advantage scores for each response".
    Masked-out responses (invalid or padding) get advantage 0 and do not enter the statistics;
    a group with a single valid response, or constant rewards, gets advantages 0.
    """
    if mask_BG is None:
        mask_BG = torch.ones_like(reward_BG, dtype=torch.bool)
    m = mask_BG.to(reward_BG.dtype)
    n_B1 = m.sum(-1, keepdim=True).clamp_min(1)
    mean_B1 = (reward_BG * m).sum(-1, keepdim=True) / n_B1
    var_B1 = (((reward_BG - mean_B1) ** 2) * m).sum(-1, keepdim=True) / n_B1
    adv_BG = (reward_BG - mean_B1) / (var_B1.sqrt() + eps)
    return torch.where(mask_BG, adv_BG, torch.zeros_like(adv_BG))


def dpo_loss(logp_pos_B: torch.Tensor, ref_logp_pos_B: torch.Tensor, logp_neg_BN: torch.Tensor,
             ref_logp_neg_BN: torch.Tensor, beta: float = 0.1, neg_mask_BN: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 9, DPO with one positive (the highest-advantage response) and N negatives per request.

        L = - E_neg log sigmoid( beta * [log pi(y+)/pi_ref(y+) - log pi(y-)/pi_ref(y-)] )

    The ratios are taken in log space, so the paper's epsilon against a zero division is not
    needed. Negatives are averaged per request (masked ones ignored), then requests averaged.
    """
    margin_BN = beta * ((logp_pos_B - ref_logp_pos_B)[:, None] - (logp_neg_BN - ref_logp_neg_BN))
    loss_BN = -torch.nn.functional.logsigmoid(margin_BN)
    if neg_mask_BN is None:
        return loss_BN.mean()
    m = neg_mask_BN.to(loss_BN.dtype)
    per_req = (loss_BN * m).sum(-1) / m.sum(-1).clamp_min(1)
    has_neg = neg_mask_BN.any(-1)
    return per_req[has_neg].mean() if has_neg.any() else loss_BN.sum() * 0.0


def grpo_loss(logp_BG: torch.Tensor, old_logp_BG: torch.Tensor, adv_BG: torch.Tensor, clip_eps: float = 0.2,
              mask_BG: torch.Tensor | None = None, kl_coef: float = 0.0,
              ref_logp_BG: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 10, GRPO's clipped-ratio objective over the G sampled responses of each request.

        J = E_i min( rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i ),  rho_i = pi(o_i) / pi_old(o_i)

    ``pi_old`` is the reference model that sampled the responses. Returns the loss ``-J`` (plus
    an optional k3 KL penalty to ``ref_logp`` as in DeepSeek's GRPO, off by default). The clip
    bounds the update: once rho leaves [1-eps, 1+eps] in the advantage's direction, the
    gradient of that response is zero.
    """
    ratio_BG = torch.exp(logp_BG - old_logp_BG)
    obj_BG = torch.minimum(ratio_BG * adv_BG, ratio_BG.clamp(1 - clip_eps, 1 + clip_eps) * adv_BG)
    if kl_coef and ref_logp_BG is not None:
        d = ref_logp_BG - logp_BG
        obj_BG = obj_BG - kl_coef * (torch.exp(d) - d - 1)
    if mask_BG is None:
        return -obj_BG.mean()
    m = mask_BG.to(obj_BG.dtype)
    return -(obj_BG * m).sum() / m.sum().clamp_min(1)
