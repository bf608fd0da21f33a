"""loss.py against naive per-token Python loops in float64, including micro-batch accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from tinyr1.loss import (
    completion_mask,
    group_advantages,
    k3_kl,
    policy_loss,
    sum_metrics,
    truncated_rows,
)

EOS = 7
F64 = torch.float64


# ----------------------------------------------------------------------------- naive references


def naive_mask(ids: list[list[int]], eos: set[int], mask_truncated: bool) -> list[list[int]]:
    out = []
    for row in ids:
        m, done = [], False
        for tok in row:
            m.append(0 if done else 1)
            if tok in eos:
                done = True
        if mask_truncated and not done:
            m = [0] * len(row)
        out.append(m)
    return out


def naive_advantages(rewards: list[float], g: int, scale: str, eps: float) -> tuple[list[float], float]:
    n = len(rewards)
    all_mean = sum(rewards) / n
    all_std = math.sqrt(sum((r - all_mean) ** 2 for r in rewards) / (n - 1))
    adv, zero_groups = [], 0
    for start in range(0, n, g):
        grp = rewards[start : start + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        zero_groups += abs(std) < 1e-8
        for r in grp:
            if scale == "group":
                adv.append((r - mean) / (std + eps))
            elif scale == "batch":
                adv.append((r - mean) / (all_std + eps))
            else:
                adv.append(r - mean)
    return adv, zero_groups / (n // g)


def naive_loss(
    logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    loss_type: str,
    beta: float,
    eps: float,
    eps_high: float,
    max_len: int,
    kl_clamp: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Full-batch loss, one token at a time; logp may require grad (autograd through scalars)."""
    n, length = mask.shape
    seq_terms, total, tokens = [], 0.0, 0
    low = high = 0
    kl_sum = 0.0
    for i in range(n):
        a = float(adv[i])
        s, cnt = 0.0, 0
        for t in range(length):
            if mask[i, t] == 0:
                continue
            lp = logp[i, t]
            o = lp.detach() if old is None else old[i, t]
            r = torch.exp(lp - o)
            rc = min(max(r, torch.tensor(1 - eps, dtype=F64)), torch.tensor(1 + eps_high, dtype=F64))
            term = -min(r * a, rc * a)
            low += int(r.item() < 1 - eps and a < 0)
            high += int(r.item() > 1 + eps_high and a > 0)
            if beta != 0:
                d = ref[i, t] - lp
                kl = torch.exp(d) - d - 1
                if kl_clamp is not None:
                    kl = torch.clamp(kl, -kl_clamp, kl_clamp)
                kl_sum += kl.item()
                term = term + beta * kl
            s = s + term
            cnt += 1
        seq_terms.append(s / max(cnt, 1))
        total = total + s
        tokens += cnt
    if loss_type == "grpo":
        loss = sum(seq_terms) / n
    elif loss_type in ("bnpo", "dapo"):
        loss = total / tokens
    else:
        loss = total / (n * max_len)
    metrics = {
        "clip_ratio/low_mean": low / tokens,
        "clip_ratio/high_mean": high / tokens,
        "clip_ratio/region_mean": (low + high) / tokens,
    }
    if beta != 0:
        metrics["kl"] = kl_sum / tokens
    return loss, metrics


# ----------------------------------------------------------------------------- fixtures


def random_batch(seed: int, n: int = 12, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (n, length), generator=g)  # [n, L], EOS = 7 appears at random
    ids[0] = torch.tensor([1] * length)  # a truncated row
    ids[1, 0] = EOS  # EOS as the very first token
    mask = completion_mask(ids, EOS)  # [n, L]
    logp = -torch.rand(n, length, generator=g, dtype=F64) * 3  # [n, L]
    old = logp + 0.4 * torch.randn(n, length, generator=g, dtype=F64)  # mu > 1: policy moved
    ref = logp + 1.2 * torch.randn(n, length, generator=g, dtype=F64)  # some k3 > 1.5
    adv = torch.randn(n, generator=g, dtype=F64)  # [n]
    adv[2] = 0.0
    # Garbage where mask = 0: must not leak into loss or gradients.
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, -1e4))
    old = torch.where(mask.bool(), old, torch.full_like(old, float("-inf")))
    ref = torch.where(mask.bool(), ref, torch.full_like(ref, float("nan")))
    return {"ids": ids, "mask": mask, "logp": logp, "old": old, "ref": ref, "adv": adv}


# ----------------------------------------------------------------------------- tests


def test_completion_mask_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (20, 11), generator=g)
    ids[3] = 1
    for eos in (5, [5, 4]):
        eos_set = {eos} if isinstance(eos, int) else set(eos)
        for mt in (False, True):
            got = completion_mask(ids, eos, mask_truncated=mt)
            want = naive_mask(ids.tolist(), eos_set, mt)
            assert got.tolist() == want
        trunc = truncated_rows(ids, eos)
        assert trunc.tolist() == [not any(t in eos_set for t in row) for row in ids.tolist()]
        assert bool(trunc[3])


def test_completion_mask_includes_first_eos_only() -> None:
    ids = torch.tensor([[3, EOS, EOS, EOS], [EOS, 1, 2, 3], [1, 2, 3, 4]])
    assert completion_mask(ids, EOS).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert completion_mask(ids, EOS, mask_truncated=True).tolist()[2] == [0, 0, 0, 0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop(scale: str) -> None:
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(24, generator=g, dtype=F64)
    rewards[8:12] = 1.5  # a zero-variance group
    rewards[16:20] = -2.0  # another
    adv, metrics = group_advantages(rewards, 4, scale=scale)
    want, frac = naive_advantages(rewards.tolist(), 4, scale, 1e-4)
    torch.testing.assert_close(adv, torch.tensor(want, dtype=F64), atol=1e-6, rtol=0)
    assert metrics["frac_reward_zero_std"] == pytest.approx(frac) == pytest.approx(2 / 6)
    assert metrics["reward"] == pytest.approx(sum(rewards.tolist()) / 24, abs=1e-9)
    assert metrics["reward_std"] == pytest.approx(float(rewards.std()), abs=1e-9)


def test_group_advantages_noise_is_seeded_gaussian() -> None:
    rewards = torch.randn(4096, generator=torch.Generator().manual_seed(2), dtype=F64)
    clean, _ = group_advantages(rewards, 8)
    noisy, _ = group_advantages(rewards, 8, noise_std=0.02, generator=torch.Generator().manual_seed(3))
    again, _ = group_advantages(rewards, 8, noise_std=0.02, generator=torch.Generator().manual_seed(3))
    expected = 0.02 * torch.randn(4096, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(noisy - clean, expected, atol=1e-9, rtol=0)
    assert torch.equal(noisy, again)
    assert 0.018 < float((noisy - clean).std()) < 0.022


def test_group_advantages_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(8), 4, scale="groups")  # type: ignore[arg-type]


CASES = [
    # loss_type, beta, old?, eps_high, kl_clamp
    ("grpo", 0.04, True, None, None),
    ("grpo", 0.0, False, None, None),
    ("bnpo", 0.04, True, 0.28, None),
    ("dr_grpo", 0.04, True, 0.28, 1.5),
    ("dapo", 0.0, True, 0.28, None),
    ("dapo", 0.1, False, None, 100.0),
]


@pytest.mark.parametrize(("loss_type", "beta", "use_old", "eps_high", "kl_clamp"), CASES)
@pytest.mark.parametrize("splits", [[12], [5, 7], [2, 7, 3]])
def test_policy_loss_matches_loop_and_accumulates(
    loss_type: str,
    beta: float,
    use_old: bool,
    eps_high: float | None,
    kl_clamp: float | None,
    splits: list[int],
) -> None:
    b = random_batch(seed=CASES.index((loss_type, beta, use_old, eps_high, kl_clamp)))
    eps, max_len = 0.2, 11
    mask = b["mask"]
    old = b["old"] if use_old else None
    ref = b["ref"] if beta else None

    naive_lp = b["logp"].clone().requires_grad_(True)
    want, want_metrics = naive_loss(
        naive_lp, b["adv"], mask, old, ref, loss_type, beta, eps, eps_high or eps, max_len, kl_clamp
    )
    want.backward()
    if use_old:  # the test is only meaningful if both clip sides are hit
        assert want_metrics["clip_ratio/low_mean"] > 0 and want_metrics["clip_ratio/high_mean"] > 0
    if kl_clamp == 1.5:
        assert want_metrics["kl"] < 1.5  # and some tokens were clamped:
        assert bool((k3_kl(b["logp"], b["ref"])[mask.bool()] > 1.5).any())

    lp = b["logp"].clone().requires_grad_(True)
    total_loss, parts, start = 0.0, [], 0
    for size in splits:
        sl = slice(start, start + size)
        start += size
        loss, metrics = policy_loss(
            lp[sl],
            b["adv"][sl],
            mask[sl],
            old_logp=None if old is None else old[sl],
            ref_logp=None if ref is None else ref[sl],
            loss_type=loss_type,  # type: ignore[arg-type]
            beta=beta,
            epsilon=eps,
            epsilon_high=eps_high,
            total_sequences=12,
            total_tokens=int(mask.sum()),
            max_completion_length=max_len,
            kl_clamp=kl_clamp,
        )
        loss.backward()
        total_loss += loss.item()
        parts.append(metrics)
    got = sum_metrics(parts)
    assert total_loss == pytest.approx(want.item(), abs=1e-6)
    assert got["loss"] == pytest.approx(want.item(), abs=1e-6)
    assert torch.isfinite(lp.grad).all()
    torch.testing.assert_close(lp.grad, naive_lp.grad, atol=1e-6, rtol=0)
    assert float(lp.grad[~mask.bool()].abs().max()) == 0.0
    for key, value in want_metrics.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert ("kl" in got) == (beta != 0)


def test_on_policy_gradient_is_advantage_weighted() -> None:
    """old_logp=None: ratio 1, d loss / d logp = -A * mask / normalizer (the paper's form)."""
    b = random_batch(seed=5)
    lp = b["logp"].clone().requires_grad_(True)
    tokens = int(b["mask"].sum())
    loss, metrics = policy_loss(
        lp, b["adv"], b["mask"], old_logp=None, ref_logp=None, loss_type="dapo", beta=0.0,
        epsilon=0.2, epsilon_high=None, total_sequences=12, total_tokens=tokens, max_completion_length=9,
    )  # fmt: skip
    loss.backward()
    want_grad = -b["adv"].unsqueeze(1) * b["mask"].to(F64) / tokens
    torch.testing.assert_close(lp.grad, want_grad, atol=1e-12, rtol=0)
    assert loss.item() == pytest.approx(float(-(b["adv"] * b["mask"].sum(1)).sum() / tokens), abs=1e-12)
    assert metrics["clip_ratio/region_mean"] == 0


def test_dapo_world_normalizer_and_entropy_metric() -> None:
    b = random_batch(seed=6)
    mask, tokens = b["mask"], int(b["mask"].sum())
    ent = torch.rand(12, 9, dtype=F64)
    kw = dict(old_logp=b["old"], ref_logp=None, beta=0.0, epsilon=0.2, epsilon_high=None,
              total_sequences=12, total_tokens=tokens, max_completion_length=9)  # fmt: skip
    local, m = policy_loss(b["logp"], b["adv"], mask, loss_type="dapo", entropy=ent, **kw)  # type: ignore[arg-type]
    bnpo, _ = policy_loss(b["logp"], b["adv"], mask, loss_type="bnpo", **kw)  # type: ignore[arg-type]
    world, _ = policy_loss(
        b["logp"],
        b["adv"],
        mask,
        loss_type="dapo",
        world_tokens=3 * tokens,
        world_size=2,
        **kw,  # type: ignore[arg-type]
    )
    assert float(local) == pytest.approx(float(bnpo), abs=1e-12)  # one process: bnpo == dapo
    assert float(world) == pytest.approx(float(local) * tokens / (3 * tokens / 2), abs=1e-12)
    assert float(m["entropy"]) == pytest.approx(float((ent * mask).sum() / tokens), abs=1e-12)


def test_beta_without_reference_is_an_error() -> None:
    b = random_batch(seed=7)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(
            b["logp"], b["adv"], b["mask"], old_logp=None, ref_logp=None, loss_type="grpo", beta=0.1,
            epsilon=0.2, epsilon_high=None, total_sequences=12, total_tokens=10, max_completion_length=9,
        )  # fmt: skip


def test_float32_inputs_work() -> None:
    b = random_batch(seed=8)
    lp = b["logp"].float().requires_grad_(True)
    loss, _ = policy_loss(
        lp, b["adv"].float(), b["mask"], old_logp=b["old"].float(), ref_logp=b["ref"].float(),
        loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=None, total_sequences=12,
        total_tokens=int(b["mask"].sum()), max_completion_length=9,
    )  # fmt: skip
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(lp.grad).all()
