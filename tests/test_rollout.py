"""Prefix-shared rollout vs. an unshared, uncached reference sampler; chunked log-probs vs. full logits."""

from __future__ import annotations

import pytest
import torch

from tinyr1.logprobs import completion_logprobs
from tinyr1.loss import completion_mask
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config
from tinyr1.rollout import Rollout, filter_logits, sample_group, sample_tokens

VOCAB, EOS = 14, 3


@pytest.fixture(scope="module")
def model() -> TinyLlavaVideo:
    torch.manual_seed(0)
    m = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(VOCAB, EOS, frames=4)), attn_implementation="eager")
    # A 14-token vocabulary makes EOS likely enough that some rows stop early (finished rows are
    # dropped from the cache) and others run to max_new_tokens.
    return m.requires_grad_(False).eval()


def _prompts(model: TinyLlavaVideo, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids, vts = [], []
    for n in (5, 9, 7):  # different prompt lengths -> left padding in the shared prefill
        row = torch.randint(4, VOCAB, (n,), generator=g)
        row[2] = -200
        ids.append(row)
        with torch.no_grad():
            vts.append(model.encode_video(torch.randn(4, 3, 32, 32, generator=g)))
    return ids, vts


def _rollout(ids: list[torch.Tensor], vts: list[torch.Tensor], completions: torch.Tensor, group: int) -> Rollout:
    """Just what `completion_logprobs` reads (no features: the connector does not train here)."""
    n = completions.shape[0]
    return Rollout(features=[], video_tokens=vts, prompt_ids=ids, row_prompt=torch.arange(len(ids)).repeat_interleave(group),
                   completion_ids=completions, completion_mask=completion_mask(completions, EOS),
                   truncated=torch.zeros(n, dtype=torch.bool), texts=[""] * n, rewards=torch.zeros(n, 1),
                   reward_total=torch.zeros(n), advantages=torch.zeros(n), reward_stats={})


@torch.no_grad()
def reference_sample(model, prompt_ids, video_tokens, *, group_size, max_new_tokens, temperature, top_k, top_p, seed):
    """Row by row, no cache, full forward each step; same uniform per (row, step) as the shared sampler."""
    n = len(prompt_ids) * group_size
    gen = torch.Generator().manual_seed(seed)
    uniforms = []
    out = [[] for _ in range(n)]
    done = [False] * n
    for _t in range(max_new_tokens):
        u = torch.rand(n, generator=gen)
        uniforms.append(u)
        for r in range(n):
            if done[r]:
                continue
            p = r // group_size
            row = torch.cat([prompt_ids[p], torch.tensor(out[r], dtype=torch.long)])
            logits = model([row], [video_tokens[p]]).logits[0, -1:]
            tok, _ = sample_tokens(logits, u[r : r + 1], temperature=temperature, top_k=top_k, top_p=top_p)
            out[r].append(int(tok))
            done[r] = int(tok) == EOS
        if all(done):
            break
    return out


@pytest.mark.parametrize("temperature,top_k,top_p,seed", [(1.0, 0, 1.0, 11), (0.7, 20, 0.9, 12)])
def test_prefix_shared_sampling_equals_unshared_reference(model, temperature, top_k, top_p, seed):
    ids, vts = _prompts(model, seed)
    g, steps = 3, 10
    got, logp = sample_group(model, ids, vts, group_size=g, max_new_tokens=steps, eos_id=EOS,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=torch.Generator().manual_seed(seed))
    ref = reference_sample(model, ids, vts, group_size=g, max_new_tokens=steps, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
    assert got.shape[0] == len(ids) * g
    finished = 0
    for r, toks in enumerate(ref):
        assert got[r, : len(toks)].tolist() == toks, f"row {r}"
        assert (got[r, len(toks) :] == EOS).all()  # padding after EOS
        finished += toks[-1] == EOS and len(toks) < steps
    assert 0 < finished < len(ref), "the test should cover both finished and unfinished rows"
    # log-probs recorded while sampling == a plain full forward over prompt + completion (T-scaled)
    full = []
    for r in range(got.shape[0]):
        p = r // g
        row = torch.cat([ids[p], got[r]])
        logits = model([row], [vts[p]]).logits[0].float() / temperature  # [S, V]
        start = ids[p].numel() - 1 + vts[p].shape[0] - 1
        lp = logits[start : start + got.shape[1]].log_softmax(-1)
        full.append(lp.gather(1, got[r][:, None])[:, 0])
    full = torch.stack(full)
    mask = completion_mask(got, EOS).bool()
    assert torch.allclose(logp[mask], full[mask], atol=1e-4)
    # ... and the chunked update path gives the same numbers
    chunked, _ = completion_logprobs(model, _rollout(ids, vts, got, g), torch.arange(got.shape[0]),
                                     temperature=temperature, backend="torch")
    assert torch.allclose(chunked[mask], full[mask], atol=1e-4)


def test_chunked_logprob_gradients_match_full_logits(model):
    ids, vts = _prompts(model, 1)
    comp = torch.randint(4, VOCAB, (3, 6))
    m = model.train()
    lora_like = m.llm.model.layers[0].self_attn.q_proj.weight
    lora_like.requires_grad_(True)
    try:
        lp, _ = completion_logprobs(m, _rollout(ids, vts, comp, 1), torch.arange(3), temperature=0.9, backend="torch")
        (g1,) = torch.autograd.grad(lp.sum(), lora_like)
        full = []
        for r in range(3):
            logits = m([torch.cat([ids[r], comp[r]])], [vts[r]]).logits[0].float() / 0.9
            start = ids[r].numel() - 1 + vts[r].shape[0] - 1
            full.append(logits[start : start + 6].log_softmax(-1).gather(1, comp[r][:, None])[:, 0])
        full = torch.stack(full)
        (g2,) = torch.autograd.grad(full.sum(), lora_like)
    finally:
        lora_like.requires_grad_(False)
        m.eval()
    assert torch.allclose(lp, full, atol=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)


def test_filter_logits_top_k_top_p_match_definitions():
    torch.manual_seed(3)
    logits = torch.randn(4, 30)
    k = filter_logits(logits, 5, 1.0)
    assert ((k > float("-inf")).sum(-1) == 5).all()
    p = filter_logits(logits, 0, 0.8)
    for row, f in zip(logits, p):
        probs = row.softmax(-1)
        kept = f > float("-inf")
        # kept set = smallest set of most likely tokens whose mass reaches 0.8
        order = probs.argsort(descending=True)
        need = int((probs[order].cumsum(0) < 0.8).sum()) + 1
        assert set(order[:need].tolist()) == set(kept.nonzero().flatten().tolist())


def test_greedy_is_argmax():
    torch.manual_seed(4)
    logits = torch.randn(5, 11)
    tok, lp = sample_tokens(logits, torch.rand(5), temperature=0.0, top_k=0, top_p=1.0)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(lp, logits.log_softmax(-1).max(-1).values)
