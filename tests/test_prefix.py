"""The update's shared prompt prefix against the unshared path (one full row per completion).

Both paths go through the trainer's own functions (`_no_grad_logprobs`, `_rows_logprobs`,
`update_step`) on the tiny model with non-zero LoRA B (so adapters-on differs from adapters-off and
every LoRA weight gets a gradient), prompts of different lengths (left padding in the shared
prefix), a micro-batch that splits groups, beta > 0 and an old-policy pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tinyr1 import trainer
from tinyr1.config import load_config
from tinyr1.loss import completion_mask, policy_loss
from tinyr1.memory_measure import measure_peak
from tinyr1.model.loading import add_lora, prepare_for_training, quantize_llm_nf4, trainable_parameters
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config
from tinyr1.rollout import Rollout, completion_logprobs

VOCAB, EOS, G, L = 40, 3, 3, 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def _rollout(model: TinyLlavaVideo, seed: int) -> tuple[Rollout, list[torch.Tensor]]:
    """3 prompts of different lengths x G completions with EOS at random places (some never)."""
    g = torch.Generator().manual_seed(seed)
    ids, feats = [], []
    for n in (5, 11, 8):
        row = torch.randint(4, VOCAB, (n,), generator=g)
        row[2] = -200
        ids.append(row)
        feats.append(model.vision_features(torch.randn(4, 3, 32, 32, generator=g)))  # [1, T*P', Dv]
    with torch.no_grad():
        vts = [model.connector(f)[0] for f in feats]  # B x [Q, D]
    comp = torch.randint(3, VOCAB, (len(ids) * G, L), generator=g)  # token 3 = EOS sometimes
    adv = torch.randn(len(ids) * G, generator=g)
    ro = Rollout(prompt_ids=ids, video_tokens=vts, group_size=G, completion_ids=comp,
                 completion_mask=completion_mask(comp, EOS), sample_logprobs=torch.zeros(comp.shape),
                 truncated=torch.zeros(comp.shape[0], dtype=torch.bool), texts=[""] * comp.shape[0],
                 advantages=adv)
    return ro, feats


def _ctx(model: TinyLlavaVideo, *overrides: str, optimizer: torch.optim.Optimizer | None = None) -> trainer.Ctx:
    cfg = load_config("tiny", ["train.micro_batch_size=4", "rollout.temperature=0.9", "grpo.beta=0.05",
                               "grpo.num_iterations=2", "grpo.epsilon=0.05", *overrides])
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0) if optimizer is not None else None
    return trainer.Ctx(cfg, model, None, optimizer, sched, torch.Generator(), [], "torch")


def _grpo_pass(ctx: trainer.Ctx, ro: Rollout, feats: list[torch.Tensor], share: bool | None) -> dict[str, torch.Tensor]:
    """One micro-batched GRPO backward as `update_step` runs it; log-probs and gradients by name."""
    model, cfg = ctx.model, ctx.cfg
    model.zero_grad(set_to_none=True)
    ref = trainer._no_grad_logprobs(ctx, ro, feats, True, share)  # [B*G, L]
    # a perturbed "old policy" so the clipped ratio and the KL both act
    old = trainer._no_grad_logprobs(ctx, ro, feats, False, share) + 0.1 * torch.sin(torch.arange(L * 9.0)).view(9, L)
    n, mask = ro.completion_ids.shape[0], ro.completion_mask.float()
    logps, ents = [], []
    for start in range(0, n, cfg.train.micro_batch_size):
        rows = torch.arange(start, min(start + cfg.train.micro_batch_size, n))
        logp, ent = trainer._rows_logprobs(ctx, ro, feats, rows, grad=True, entropy=True, share_prefix=share)
        loss, _ = policy_loss(logp, ro.advantages[rows], mask[rows], old_logp=old[rows], ref_logp=ref[rows],
                              loss_type="grpo", beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon, epsilon_high=None,
                              total_sequences=n,
                              total_tokens=int(mask.sum()), max_completion_length=L, entropy=ent)
        loss.backward()
        logps.append(logp.detach())
        ents.append(ent.detach())
    out = {"ref": ref, "old": old, "logp": torch.cat(logps), "entropy": torch.cat(ents)}
    out.update({f"grad:{k}": p.grad.clone() for k, p in trainable_parameters(model).items()})
    return out


@pytest.mark.parametrize("gc,attn", [(False, "sdpa"), (True, "sdpa"), (True, "eager")])
def test_shared_prefix_matches_unshared_logprobs_and_grpo_gradients(gc: bool, attn: str) -> None:
    seed = int(torch.randint(0, 10_000, ()).item())
    model = _model(gc=gc, attn=attn, seed=seed)
    ro, feats = _rollout(model, seed)
    ctx = _ctx(model)
    model.train()
    shared, full = _grpo_pass(ctx, ro, feats, None), _grpo_pass(ctx, ro, feats, False)
    assert shared.keys() == full.keys()
    for key in ("ref", "old", "logp", "entropy"):
        torch.testing.assert_close(shared[key], full[key], rtol=0, atol=1e-5, msg=key)
    assert not torch.allclose(shared["ref"], shared["logp"], atol=1e-3), "adapters must matter in this test"
    grads = [k for k in shared if k.startswith("grad:")]
    assert any("lora_A" in k for k in grads) and any("connector" in k for k in grads)
    for key in grads:
        assert shared[key].abs().max() > 0, key
        torch.testing.assert_close(shared[key], full[key], rtol=1e-4, atol=1e-6, msg=key)
    layers = model.llm.model.layers
    assert all(layer.gradient_checkpointing == gc for layer in layers), "HF's flags are restored"


def test_update_step_num_iterations_2_same_update_both_paths() -> None:
    """The whole update (reference + old-policy passes, 2 optimizer steps): same parameters and metrics."""
    base = _model(gc=True)
    ro, feats = _rollout(base, 7)
    results = []
    for share in (None, False):
        model = copy.deepcopy(base)
        params = list(trainable_parameters(model).values())
        ctx = _ctx(model, optimizer=torch.optim.SGD(params, lr=0.05))
        metrics = trainer.update_step(ctx, ro, feats, share_prefix=share)
        results.append((metrics, {k: p.detach().clone() for k, p in trainable_parameters(model).items()}))
    (m1, p1), (m2, p2) = results
    assert m1.keys() == m2.keys() and "kl" in m1
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k
    for k in p1:
        assert not torch.equal(p1[k], base.get_parameter(k)), f"{k} did not move"
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_rows_in_any_order_single_token_completions_and_distinct_prompts() -> None:
    model = _model(gc=False).eval()
    ro, _ = _rollout(model, 3)
    rows = torch.tensor([8, 0, 4, 1, 7, 3])  # interleaved prompts
    ids = [ro.prompt_ids[int(r) // G] for r in rows]
    vts = [ro.video_tokens[int(r) // G] for r in rows]
    with torch.no_grad():
        for length in (1, L):
            comp = ro.completion_ids[rows, :length]
            a, _ = completion_logprobs(model, ids, vts, comp, temperature=1.0, backend="torch")
            b, _ = completion_logprobs(model, ids, vts, comp, temperature=1.0, backend="torch", share_prefix=False)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # equal contents in distinct tensors are not merged; forcing the shared path there is still exact
        copies = [t.clone() for t in ids]
        c, _ = completion_logprobs(model, copies, vts, ro.completion_ids[rows], temperature=1.0, backend="torch",
                                   share_prefix=True)
        torch.testing.assert_close(c, b, rtol=0, atol=1e-5)


def test_gradient_checkpointing_holds_less_in_the_shared_path() -> None:
    """Our own per-layer checkpoint really runs: with it, fewer bytes stay alive until backward."""
    peaks = {}
    for gc in (False, True):
        model = _model(gc=gc)
        ro, _ = _rollout(model, 5)
        model.train()
        rows = torch.arange(9)
        ids, vts = [ro.prompt_ids[int(r) // G] for r in rows], [ro.video_tokens[int(r) // G] for r in rows]

        def forward(m=model, ids=ids, vts=vts, ro=ro):  # noqa: ANN001, ANN202 - bound loop variables
            return completion_logprobs(m, ids, vts, ro.completion_ids, temperature=1.0, backend="torch")[0]

        peaks[gc], logp, _ = measure_peak(forward)
        logp.sum().backward()  # the checkpointed graph replays correctly
        assert all(p.grad is not None for k, p in trainable_parameters(model).items() if "lora_" in k)
    assert peaks[True] < 0.7 * peaks[False], peaks


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_nf4_shared_prefix_matches_unshared(compute: str) -> None:
    """4-bit LLM (bitsandbytes NF4 Linear4bit + LoRA), reference pass with adapters off on it.

    fp32 compute: the same tolerances as the fp32 model (dequantized weights are exact, only the
    summation order differs). bf16 compute (the GPU presets): 8 mantissa bits, so any change of
    GEMM shapes moves the result; measured, the *unshared* path alone re-batched (micro-batch 4 vs 1)
    moves log-probs by up to 4e-2 and each gradient tensor by up to ~3% of its norm, and shared vs
    unshared stays within that. The bounds below are about twice that noise floor.
    """
    import bitsandbytes as bnb

    model = _model(gc=True, nf4=True, seed=11, dtype=DTYPES[compute])
    assert isinstance(model.llm.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ro, feats = _rollout(model, 11)
    ctx = _ctx(model)
    model.train()
    shared, full = _grpo_pass(ctx, ro, feats, None), _grpo_pass(ctx, ro, feats, False)
    grads = [k for k in shared if k.startswith("grad:")]
    if compute == "fp32":
        for key in ("ref", "old", "logp"):
            torch.testing.assert_close(shared[key], full[key], rtol=0, atol=1e-5, msg=key)
        for key in grads:
            torch.testing.assert_close(shared[key], full[key], rtol=1e-4, atol=1e-6, msg=key)
        return
    for key in ("ref", "old", "logp"):
        torch.testing.assert_close(shared[key], full[key], rtol=0, atol=0.1, msg=key)
    for key in grads:
        rel = float((shared[key] - full[key]).float().norm() / full[key].float().norm())
        assert rel < 0.08, (key, rel)
