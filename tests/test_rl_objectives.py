import torch

from onemall_pl.rl_objectives import dpo_loss, group_advantages, grpo_loss


def test_group_advantages_zero_mean_unit_variance():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(4, 16, generator=g) * torch.tensor([1.0, 10.0, 0.01, 3.0])[:, None]
    a = group_advantages(r)
    assert torch.allclose(a.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(a.std(-1, unbiased=False), torch.ones(4), atol=1e-3)


def test_group_advantages_respects_mask_and_constant_groups():
    r = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    a = group_advantages(r, mask)
    assert a[0, 3] == 0 and torch.allclose(a[0, :3].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.all(a[1] == 0)


def test_dpo_prefers_the_higher_reward_response():
    """Gradient descent on the DPO loss raises the positive's log-prob relative to the negatives'."""
    logits = torch.zeros(1, 3, requires_grad=True)  # policy over 3 responses; 0 is the positive
    ref = torch.log_softmax(torch.zeros(1, 3), -1)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(20):
        logp = torch.log_softmax(logits, -1)
        loss = dpo_loss(logp[:, 0], ref[:, 0], logp[:, 1:], ref[:, 1:], beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(logits, -1)[0]
    assert p[0] > 0.8 and p[0] > p[1] and p[0] > p[2]
    # the loss itself is lower when the positive has the larger margin
    lo = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([[-3.0]]), torch.tensor([[-2.0]]))
    hi = dpo_loss(torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([[-1.0]]), torch.tensor([[-2.0]]))
    assert lo < hi


def test_grpo_clip_bounds_the_update():
    old = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    # ratios inside the clip range: every response gets a gradient
    logp = old.clone().requires_grad_(True)
    grpo_loss(logp, old, adv, clip_eps=0.2).backward()
    assert torch.all(logp.grad != 0)
    # ratio already above 1+eps for a positive advantage, below 1-eps for a negative: no gradient there
    shifted = (old + torch.tensor([[0.5, -0.5, 0.0, 0.0]])).requires_grad_(True)
    grpo_loss(shifted, old, adv, clip_eps=0.2).backward()
    assert shifted.grad[0, 0] == 0 and shifted.grad[0, 1] == 0
    assert shifted.grad[0, 2] != 0 and shifted.grad[0, 3] != 0
    # and the objective never exceeds the clipped value (1+eps)*A for positive advantages
    big = old + 5.0
    assert -grpo_loss(big[:, :1], old[:, :1], adv[:, :1], clip_eps=0.2) <= 1.2 + 1e-6
