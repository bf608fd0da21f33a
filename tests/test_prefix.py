"""The update's log-probs (each prompt once per micro-batch, its rows against its K/V) against the
oracle (tests/oracle.py: one full row per completion, float64 head).

On the tiny model with non-zero LoRA B (so adapters-on differs from adapters-off and every LoRA
weight gets a gradient), a trainable connector, prompts of different lengths (left padding in the
shared prefix), micro-batches that split groups, beta > 0 and an old-policy pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from oracle import naive_logprobs

from tinyr1.config_io import load_config
from tinyr1.context import Context
from tinyr1.logprobs import completion_logprobs
from tinyr1.loss import completion_mask, policy_loss
from tinyr1.memory_measure import measure_peak
from tinyr1.model.loading import (
    adapters_disabled,
    add_lora,
    prepare_for_training,
    quantize_llm_nf4,
    trainable_parameters,
)
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config
from tinyr1.rollout import Rollout
from tinyr1.trainer import micro_batches, update_step

VOCAB, EOS, G, L = 40, 3, 3, 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LogprobFn = Callable[[TinyLlavaVideo, Rollout, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _model(*, gc: bool, attn: str = "sdpa", nf4: bool = False, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> TinyLlavaVideo:
    torch.manual_seed(seed)
    cfg = TinyLlavaConfig.from_dict(tiny_config(VOCAB, EOS, frames=4))
    m = TinyLlavaVideo(cfg, attn_implementation=attn).to(dtype)
    m.requires_grad_(False)
    if nf4:
        quantize_llm_nf4(m.llm, compute_dtype=dtype, device=torch.device("cpu"))
    add_lora(m, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)  # dropout 0: both paths see the same net
    prepare_for_training(m, train_connector=True, gradient_checkpointing=gc)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return m


def _rollout(model: TinyLlavaVideo, seed: int) -> Rollout:
    """3 prompts of different lengths x G completions with EOS at random places (some never)."""
    g = torch.Generator().manual_seed(seed)
    ids, feats = [], []
    for n in (5, 11, 8):
        row = torch.randint(4, VOCAB, (n,), generator=g)
        row[2] = -200
        ids.append(row)
        feats.append(model.vision_features(torch.randn(4, 3, 32, 32, generator=g)))  # [1, T*P', Dv]
    with torch.no_grad():
        vts = [model.connect(f) for f in feats]  # B x [Q, D]
    comp = torch.randint(3, VOCAB, (len(ids) * G, L), generator=g)  # token 3 = EOS sometimes
    n = comp.shape[0]
    return Rollout(features=feats, video_tokens=vts, prompt_ids=ids, row_prompt=torch.arange(len(ids)).repeat_interleave(G),
                   completion_ids=comp, completion_mask=completion_mask(comp, EOS),
                   truncated=torch.zeros(n, dtype=torch.bool), texts=[""] * n, rewards=torch.zeros(n, 1),
                   reward_total=torch.zeros(n), advantages=torch.randn(n, generator=g), reward_stats={})


def _ctx(model: TinyLlavaVideo, *overrides: str, optimizer: torch.optim.Optimizer | None = None) -> Context:
    cfg = load_config("tiny", ["train.micro_batch_size=4", "rollout.temperature=0.9", "grpo.beta=0.05",
                               "grpo.num_iterations=2", "grpo.epsilon=0.05", *overrides])
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0) if optimizer is not None else None
    return Context(cfg=cfg, model=model, tokenizer=None, optimizer=optimizer, scheduler=sched,  # type: ignore[arg-type]
                   generator=torch.Generator(), reward_funcs=[], backend="torch")


def production(temperature: float) -> LogprobFn:
    def run(model: TinyLlavaVideo, ro: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp, ent = completion_logprobs(model, ro, rows, temperature=temperature, backend="torch", with_entropy=True)
        assert ent is not None
        return logp, ent
    return run


def oracle(temperature: float) -> LogprobFn:
    def run(model: TinyLlavaVideo, ro: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp, ent = naive_logprobs(model, ro, rows, temperature=temperature)
        return logp.float(), ent.float()
    return run


def _grpo_pass(ctx: Context, ro: Rollout, logprobs: LogprobFn, micro: int) -> dict[str, torch.Tensor]:
    """One micro-batched GRPO backward; log-probs, entropies and gradients by name."""
    model, cfg = ctx.model, ctx.cfg
    model.zero_grad(set_to_none=True)
    n, mask = ro.completion_ids.shape[0], ro.completion_mask.float()
    with torch.no_grad():
        with adapters_disabled(model):
            ref = logprobs(model, ro, torch.arange(n))[0]  # [B*G, L]
        # a perturbed "old policy" so the clipped ratio and the KL both act
        old = logprobs(model, ro, torch.arange(n))[0] + 0.1 * torch.sin(torch.arange(L * n * 1.0)).view(n, L)
    logps, ents = [], []
    for rows in micro_batches(n, micro):
        logp, ent = logprobs(model, ro, rows)
        loss, _ = policy_loss(logp, ro.advantages[rows], mask[rows], old_logp=old[rows], ref_logp=ref[rows],
                              loss_type="grpo", beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon, epsilon_high=None,
                              total_sequences=n, total_tokens=int(mask.sum()), max_completion_length=L, entropy=ent)
        loss.backward()
        logps.append(logp.detach())
        ents.append(ent.detach())
    out = {"ref": ref, "old": old, "logp": torch.cat(logps), "entropy": torch.cat(ents)}
    out.update({f"grad:{k}": p.grad.clone() for k, p in trainable_parameters(model).items()})
    return out


@pytest.mark.parametrize("gc,attn,seed", [(False, "sdpa", 1), (True, "sdpa", 2), (True, "eager", 3)])
def test_shared_prefix_matches_the_oracle_logprobs_and_grpo_gradients(gc: bool, attn: str, seed: int) -> None:
    model = _model(gc=gc, attn=attn, seed=seed)
    ro = _rollout(model, seed)
    ctx = _ctx(model)
    model.train()
    shared = _grpo_pass(ctx, ro, production(0.9), micro=4)  # micro-batches split the groups of 3
    naive = _grpo_pass(ctx, ro, oracle(0.9), micro=1)
    assert shared.keys() == naive.keys()
    for key in ("ref", "old", "logp", "entropy"):
        torch.testing.assert_close(shared[key], naive[key], rtol=0, atol=1e-5, msg=key)
    assert not torch.allclose(shared["ref"], shared["logp"], atol=1e-3), "adapters must matter in this test"
    grads = [k for k in shared if k.startswith("grad:")]
    assert any("lora_A" in k for k in grads) and any("connector" in k for k in grads)
    for key in grads:
        assert shared[key].abs().max() > 0, key
        torch.testing.assert_close(shared[key], naive[key], rtol=1e-4, atol=1e-6, msg=key)
    layers = model.llm.model.layers
    assert all(layer.gradient_checkpointing == gc for layer in layers), "HF's flags are restored"


def _oracle_update(ctx: Context, ro: Rollout) -> None:
    """`update_step` written plainly: reference and old policy from the oracle, the whole batch in
    one backward (no micro-batches), clip, step; `num_iterations` times."""
    cfg, model = ctx.cfg, ctx.model
    n, mask = ro.completion_ids.shape[0], ro.completion_mask.float()
    rows, fn = torch.arange(n), oracle(cfg.rollout.temperature)
    with torch.no_grad():
        with adapters_disabled(model):
            ref = fn(model, ro, rows)[0]
        old = fn(model, ro, rows)[0]
    params = list(trainable_parameters(model).values())
    for _ in range(cfg.grpo.num_iterations):
        logp, ent = fn(model, ro, rows)
        loss, _ = policy_loss(logp, ro.advantages, mask, old_logp=old, ref_logp=ref, loss_type=cfg.grpo.loss_type,
                              beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon, epsilon_high=cfg.grpo.epsilon_high,
                              total_sequences=n, total_tokens=int(mask.sum()), max_completion_length=L,
                              kl_clamp=cfg.grpo.kl_clamp, entropy=ent)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_update_step_equals_the_plain_full_batch_update(loss_type: str) -> None:
    """The whole update (reference + old-policy passes, 2 optimizer steps, micro-batches of 4 over
    groups of 3) moves every trainable weight as the oracle's full-batch update does."""
    base = _model(gc=True, seed=7)
    ro = _rollout(base, 7)
    results = []
    for run in ("update_step", "oracle"):
        model = copy.deepcopy(base)
        params = list(trainable_parameters(model).values())
        ctx = _ctx(model, f"grpo.loss_type={loss_type}", optimizer=torch.optim.SGD(params, lr=0.05))
        if run == "update_step":
            metrics = update_step(ctx, ro)
            assert metrics["skipped"] == 0 and "kl" in metrics
        else:
            model.train()
            model.vision_tower.eval()
            _oracle_update(ctx, ro)
        results.append({k: p.detach().clone() for k, p in trainable_parameters(model).items()})
    got, want = results
    for k in want:
        assert not torch.equal(want[k], base.get_parameter(k)), f"{k} did not move"
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_rows_in_any_order_single_token_completions_and_one_row_per_prompt() -> None:
    model = _model(gc=False, seed=3).eval()
    ro = _rollout(model, 3)
    rows = torch.tensor([8, 0, 4, 1, 7, 3])  # interleaved prompts
    with torch.no_grad():
        for length in (1, L):
            short = replace(ro, completion_ids=ro.completion_ids[:, :length])
            a, _ = completion_logprobs(model, short, rows, temperature=1.0, backend="torch")
            b, _ = naive_logprobs(model, short, rows, temperature=1.0)
            torch.testing.assert_close(a, b.float(), rtol=0, atol=1e-5)
        # every row its own prompt (B_p = n): nothing shared, still exact
        own = replace(ro, prompt_ids=[ro.prompt_ids[p] for p in ro.row_prompt.tolist()],
                      video_tokens=[ro.video_tokens[p] for p in ro.row_prompt.tolist()],
                      row_prompt=torch.arange(ro.completion_ids.shape[0]))
        c, _ = completion_logprobs(model, own, rows, temperature=1.0, backend="torch")
        torch.testing.assert_close(c, b.float(), rtol=0, atol=1e-5)


def test_gradient_checkpointing_holds_less_in_the_shared_path() -> None:
    """Our own per-layer checkpoint really runs: with it, fewer bytes stay alive until backward."""
    peaks = {}
    for gc in (False, True):
        model = _model(gc=gc, seed=5)
        ro = _rollout(model, 5)
        model.train()

        def forward(m: TinyLlavaVideo = model, ro: Rollout = ro) -> torch.Tensor:
            return completion_logprobs(m, ro, torch.arange(9), temperature=1.0, backend="torch")[0]

        peaks[gc], logp, _ = measure_peak(forward)
        logp.sum().backward()  # the checkpointed graph replays correctly
        assert all(p.grad is not None for k, p in trainable_parameters(model).items() if "lora_" in k)
    assert peaks[True] < 0.7 * peaks[False], peaks


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_nf4_shared_prefix_matches_the_oracle(compute: str) -> None:
    """4-bit LLM (bitsandbytes NF4 Linear4bit + LoRA), reference pass with adapters off on it.

    fp32 compute: the same tolerances as the fp32 model (dequantized weights are exact, only the
    summation order differs). bf16 compute (the GPU presets): 8 mantissa bits, so any change of
    GEMM shapes moves the result. Measured between the production path and the oracle (seeds
    11-14, fp32 master connector under autocast): log-probs up to 0.06 apart, all gradients together
    within 7.5% of their norm, the worst single tensor within 15%; the bounds are twice that.
    """
    import bitsandbytes as bnb

    model = _model(gc=True, nf4=True, seed=11, dtype=DTYPES[compute])
    assert isinstance(model.llm.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ro = _rollout(model, 11)
    ctx = _ctx(model)
    model.train()
    shared, naive = _grpo_pass(ctx, ro, production(0.9), micro=4), _grpo_pass(ctx, ro, oracle(0.9), micro=1)
    grads = [k for k in shared if k.startswith("grad:")]
    if compute == "fp32":
        for key in ("ref", "old", "logp"):
            torch.testing.assert_close(shared[key], naive[key], rtol=0, atol=1e-5, msg=key)
        for key in grads:
            torch.testing.assert_close(shared[key], naive[key], rtol=1e-4, atol=1e-6, msg=key)
        return
    for key in ("ref", "old", "logp"):
        torch.testing.assert_close(shared[key], naive[key], rtol=0, atol=0.12, msg=key)
    got, want = (torch.cat([d[k].float().flatten() for k in grads]) for d in (shared, naive))
    assert float((got - want).norm() / want.norm()) < 0.15
    for key in grads:
        rel = float((shared[key] - naive[key]).float().norm() / naive[key].float().norm())
        assert rel < 0.3, (key, rel)
