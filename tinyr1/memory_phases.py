"""Activation terms of the memory planner: the moments of the rollout and of the update.

Each moment is a dict `component -> (kind, bytes, note)`; `tinyr1.memory.estimate` adds weights and
training state and takes the largest moment of each phase. The per-token terms of one decoder layer
(`layer_ops`) follow what each op of HF Qwen2 + PEFT LoRA saves for backward: a frozen linear saves
nothing (its weight needs no grad), a LoRA branch saves its input — an fp32 copy when the compute
dtype is 16-bit (PEFT casts to the adapter's fp32), the dropout output and mask when dropout > 0 —
and SiLU, the gate*up product and SDPA save their inputs/outputs. Bytes are per token unless noted.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyr1.memory_arch import ADAPTER, Arch, RunShape, connector_tensors

Moment = dict[str, tuple[str, int, str]]


@dataclass(frozen=True)
class Op:
    name: str
    saves: float  # bytes/token this op is the first to save for backward (freed after its backward)
    backward: float  # bytes/token in flight while its backward runs (grads + temporaries)


def _lora(run: RunShape, din: int, target: str) -> tuple[float, bool]:
    """(bytes/token an adapter on a linear with input width din saves, whether it keeps the shared input)."""
    if target not in run.lora_targets:
        return 0.0, False
    a, saved = ADAPTER, run.lora_r * ADAPTER
    mask = 1 if run.device == "cuda" else a  # CUDA dropout masks are bool; the CPU's have the input dtype
    if run.lora_dropout > 0:
        return saved + din * (a + mask), False
    if run.c != a:
        return saved + din * a, False
    return saved, True


def _fused(run: RunShape, group: str) -> bool:
    """Whether the unsloth backend runs this group (qkv, o, mlp) as one fused autograd function:
    it binds a group only when all of its projections carry LoRA (`tinyr1.backends.unsloth`)."""
    names = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "mlp": ("gate_proj", "up_proj", "down_proj")}
    return run.backend == "unsloth" and all(t in run.lora_targets for t in names[group])


def layer_ops(arch: Arch, run: RunShape, *, expand_kv: bool, seq: int) -> list[Op]:
    """One Qwen2 decoder layer with grad, in forward order. `seq`: sequence length (eager scores).

    With the unsloth backend the fused groups follow unsloth's autograd functions instead: LoRA_QKV
    saves only its input X (LoRA weights are cast to X's dtype, no fp32 input copies) and writes dX
    into X in the backward; LoRA_W (o_proj) saves the attention output, which attention keeps
    anyway; LoRA_MLP saves X, gate(X) and up(X) and recomputes SwiGLU in the backward, where
    one [tokens, ffn] buffer is new (the rest is written in place)."""
    c, a, d, kv, f, h = run.c, ADAPTER, arch.hidden, arch.kv_dim, arch.ffn, arch.heads
    cast, p, liger = c != a, run.lora_dropout > 0, run.liger
    g = d * c  # the residual-stream gradient, held across the whole layer backward
    norm = 4.0 if liger else (4.0 * d if c != 4 else 0.0) + 4  # fp32 copy of the input (HF RMSNorm) + rstd
    qkv = [_lora(run, d, t) for t in ("q_proj", "k_proj", "v_proj")]
    qkv_saves = sum(s for s, _ in qkv) + (d * c if any(k for _, k in qkv) else 0)
    k_w = d if (expand_kv or run.attn == "eager") else kv  # K/V repeated to all heads
    if run.attn == "eager":
        attn = (d + 2 * k_w) * c + h * seq * (4 + c)  # q, K, V, softmax fp32 + its cast
    else:
        attn = (d + 2 * k_w) * c + d * c + h * 4  # q, K, V, output (already [B, S, H, d]) + logsumexp
    o_s, o_keep = _lora(run, d, "o_proj")
    o_saves = o_s + (d * c if o_keep and run.attn == "eager" else 0)
    norm2 = (d * c + 4.0) if liger or c == 4 else 4.0 * d + 4  # fp32: the residual itself
    gu = [_lora(run, d, t) for t in ("gate_proj", "up_proj")]
    gu_saves = sum(s for s, _ in gu) + (d * c if any(k for _, k in gu) else 0)
    act = (2 if liger else 3) * f * c  # gate, up (+ silu(gate))
    dn_s, dn_keep = _lora(run, f, "down_proj")
    dn_adapted = "down_proj" in run.lora_targets
    dn_bwd = f * max(a + (a if p else (c if cast else 0)), 2 * c) if dn_adapted else f * c
    qkv_op = (Op("q/k/v (fused)", d * c, g + (d + 2 * kv) * c) if _fused(run, "qkv")
              else Op("q/k/v", qkv_saves, g + (d + 2 * kv) * c + d * (a + c)))
    o_op = (Op("o_proj (fused)", d * c if run.attn == "eager" else 0, g + d * c) if _fused(run, "o")
            else Op("o_proj", o_saves, g + d * c + d * a))
    mlp_ops = ([Op("MLP (fused)", d * c + 2 * f * c, g + f * c)] if _fused(run, "mlp") else [
        Op("gate/up", gu_saves, g + 2 * f * c + d * (a + c)),
        Op("act", act, g + (f * c if liger else 3 * f * c)),
        Op("down", dn_s + (f * c if dn_keep else 0), g + dn_bwd),
    ])
    return [
        Op("input norm", norm, g + d * c + (2 * d * c if liger else 8.0 * d)),
        qkv_op,
        Op("attention", attn, g + 2 * d * c + 2 * k_w * c + (h * seq * 4 if run.attn == "eager" else 0)),
        o_op,
        Op("post norm", norm2, g + d * c + (2 * d * c if liger else 8.0 * d)),
        *mlp_ops,
    ]


def layer_saved(ops: list[Op], arch: Arch, run: RunShape) -> float:
    """Bytes/token one layer keeps for backward, plus its output."""
    return sum(op.saves for op in ops) + arch.hidden * run.c


def layer_backward_peak(ops: list[Op], arch: Arch, run: RunShape) -> float:
    """Bytes/token at the worst point of one checkpointed layer's recompute + backward.

    Recompute recreates everything the layer saves (plus its output for a moment) while the incoming
    gradient waits; then ops run backward in reverse and each op's saved tensors are freed after it.
    """
    total = sum(op.saves for op in ops)
    worst = total + 2 * arch.hidden * run.c
    prefix = total
    for op in reversed(ops):
        worst = max(worst, prefix + op.backward)
        prefix -= op.saves
    return worst


def nograd_layer_peak(arch: Arch, run: RunShape, seq: int) -> float:
    """Bytes/token of the largest transient of one decoder layer run without grad (prefill, reference)."""
    c, a, d, f = run.c, ADAPTER, arch.hidden, arch.ffn
    up = f * 2 * a if "up_proj" in run.lora_targets else 0  # LoRA branch result, promoted to fp32
    mlp = 2 * d * c + f * (2 * c) + up
    if _fused(run, "mlp"):  # unsloth: gate, up and silu(gate) * up alive together, LoRA in the compute dtype
        mlp = 2 * d * c + 3 * f * c
    attn = 2 * d * c + 3 * (d + 2 * arch.kv_dim) * c
    if run.attn == "eager":
        attn += arch.heads * seq * (4 + 2 * c)
    return max(mlp, attn)


def connector_saved(arch: Arch, run: RunShape) -> int:
    """Bytes the connector (trainable) keeps for backward for one video of `run.frames` frames."""
    c, d = run.c, arch.hidden
    inner = arch.connector_heads * arch.connector_dim_head
    m_all, q = run.frames * arch.kept_patches, arch.num_queries // arch.group
    per_chunk_layer_q = q * (3 * d + 2 * inner + 2 * arch.connector_ff_mult * d) * c + 6 * q * 4
    media = m_all + arch.group * q  # cat(media, latents) rows over all chunks
    per_layer = media * (d + 2 * inner) * c + arch.group * per_chunk_layer_q
    per_layer += arch.connector_heads * q * media * c + m_all * 8  # softmax + LayerNorm stats of media
    return int(m_all * d * c + arch.resampler_layers * per_layer + arch.num_queries * d * c)


def connector_casts(arch: Arch, run: RunShape) -> int:
    """16-bit copies autocast makes of a trained connector's fp32 master weights: alive while the
    connector runs without grad, saved for its backward with grad (`TinyLlavaVideo.connect`)."""
    return sum(connector_tensors(arch)) * run.c if run.train_connector and run.c < 4 else 0


def connector_nograd_peak(arch: Arch, run: RunShape) -> int:
    c, d = run.c, arch.hidden
    inner = arch.connector_heads * arch.connector_dim_head
    m_all = run.frames * arch.kept_patches
    chunk = m_all // arch.group + 1 + arch.num_queries // arch.group
    return int(m_all * d * c + chunk * (2 * d + 2 * inner) * c + arch.num_queries * d * c)


def vision_moment(arch: Arch, run: RunShape) -> int:
    """Encoding one video without grad: pixels, one SigLIP layer's transient, output, features copy."""
    c, dv, fv, t, p = run.c, arch.vision_hidden, arch.vision_ffn, run.frames, arch.patches
    layer = 2 * dv * c + 2 * fv * c
    if run.attn == "eager":
        layer = max(layer, 5 * dv * c + arch.vision_heads * p * (4 + 2 * c))
    pixels = t * 3 * arch.image_size**2 * c
    return int(pixels + t * p * (layer + dv * c) + t * arch.kept_patches * dv * c)


def kv_bytes(arch: Arch, run: RunShape, rows: int, seq: int) -> int:
    return 2 * arch.layers * rows * arch.kv_dim * seq * run.c


def sampling_bytes(arch: Arch, run: RunShape, rows: int) -> int:
    """Per decode step ([rows, V] each): logits, their fp32 copy, /T (none at T = 1), then top-k/top-p
    filtering and the probabilities, or the probabilities and the CDF (`rollout.sample_tokens`)."""
    c = run.c
    base = c + (4 if c != 4 else 0) + (4 if run.temperature != 1.0 else 0)
    topk = 4 if 0 < run.top_k < arch.vocab else 0
    filt = base + topk + (22 if run.top_p < 1 else 4)
    end = base + 8  # probabilities + CDF; the filtered copy is gone by then
    return rows * arch.vocab * max(filt, end)


def rollout_moments(arch: Arch, run: RunShape) -> dict[str, Moment]:
    c, d, b, rows = run.c, arch.hidden, run.prompts, run.rows
    feat = run.frames * arch.kept_patches * arch.vision_hidden * c
    vt = arch.num_queries * d * c
    s_p = run.prompt_tokens - 1 + arch.num_queries
    kept: Moment = {"vision features (kept for update)": ("kept", b * feat, f"{b} videos x {run.frames} frames")}
    enc = {"vision features (kept for update)": ("kept", (b - 1) * feat, f"{b - 1} videos encoded so far"),
           "vision tower transient": ("activation", vision_moment(arch, run), f"one video, {run.frames} frames")}
    conn = {**kept, "video tokens": ("kept", (b - 1) * vt, ""),
            "connector transient": ("activation", connector_nograd_peak(arch, run) + connector_casts(arch, run),
                                    "no grad" + (", 16-bit copies of the fp32 weights" if connector_casts(arch, run) else ""))}
    videos = {**kept, "video tokens": ("kept", b * vt, f"{b} x {arch.num_queries} tokens")}
    embeds = b * s_p * d * c
    prefill = {**videos, "prompt embeddings": ("activation", 2 * embeds, f"{b} x {s_p} positions, padded copy"),
               "prompt K/V": ("activation", kv_bytes(arch, run, b, s_p), f"{b} prompts prefilled once"),
               "prefill layer transient": ("activation", int(b * s_p * nograd_layer_peak(arch, run, s_p)), "")}
    # tinyr1.decode: the prompts' K/V once, each row's own K/V preallocated for max_new_tokens
    suffix = kv_bytes(arch, run, rows, run.max_new_tokens)
    logits = rows * arch.vocab * c
    scores = rows * arch.heads * (s_p + run.max_new_tokens) * (c + 2 * 4)  # q.K (16-bit), fp32 copy, exp
    step = max(scores + logits, sampling_bytes(arch, run, rows))
    decode = {**videos,
              "prompt K/V": ("activation", kv_bytes(arch, run, b, s_p), f"{b} prompts x {s_p} positions, once each"),
              "completion K/V": ("activation", suffix, f"{rows} rows x {run.max_new_tokens} positions, preallocated"),
              "decode step transient": ("activation", step, "logits + sampling buffers / attention scores"),
              "completion ids / log-probs": ("activation", rows * run.max_new_tokens * 16, "and the step's uniforms")}
    return {"encode video": enc, "connector": conn, "prefill": prefill, "decode": decode}


def max_prompts_per_microbatch(run: RunShape) -> int:
    n, g, mb = run.rows, run.group_size, run.micro_batch
    return max(len({r // g for r in range(s, min(s + mb, n))}) for s in range(0, n, mb))


def logprob_terms(arch: Arch, run: RunShape, n: int) -> tuple[int, int, int]:
    """(saved for backward, forward transient, backward transient) of the per-token log-prob on n tokens."""
    c, d = run.c, arch.hidden
    if run.logprob_backend == "triton":
        return n * 8, n * 4 * 4 * 64, n * d * (4 + c)  # lse/entropy; [4, splits, N] partials; fp32 dh + cast
    from tinyr1.kernels.logprob import default_tile  # heavy: imports torch, which planning never needs

    tile = default_tile(n, arch.vocab)
    h32 = n * d * 4 if c != 4 else 0
    w32 = tile * d * 4 if c != 4 else 0
    fwd = h32 + w32 + 2 * n * tile * 4  # fp32 hidden, weight tile, logits tile z and exp(z)
    bwd = n * d * 4 + (2 * n * d * c if c != 4 else 0)  # W[target] in fp32 (-> dh in place), cast back
    return n * d * 4 + n * 12, fwd, bwd  # mean_w [N, D] fp32 + lse, logp, entropy


def update_shapes(arch: Arch, run: RunShape) -> tuple[int, int, int, int]:
    """(prompts k, prompt positions S_p, completion rows mb, completion positions L') of one update
    micro-batch: each of its k prompts runs once, its mb rows run their L' = L - 1 tokens against the
    prompt's K/V repeated to them (`rollout.shared_prefix_hidden`)."""
    return (max_prompts_per_microbatch(run), run.prompt_tokens - 1 + arch.num_queries, min(run.micro_batch, run.rows),
            max(run.max_new_tokens - 1, 1))


def update_moments(arch: Arch, run: RunShape) -> dict[str, Moment]:
    c, d = run.c, arch.hidden
    k, s_p, mb, ls = update_shapes(arch, run)
    tokens, n = k * s_p + mb * ls, mb * run.max_new_tokens  # positions through the layers; log-prob rows
    ops = layer_ops(arch, run, expand_kv=True, seq=s_p)  # explicit masks: K/V repeated to all heads
    kv_rows = 2 * mb * s_p * d * c  # the prompt's K/V (all heads) repeated to the rows, saved by attention
    feat = run.frames * arch.kept_patches * arch.vision_hidden * c
    base: Moment = {
        "vision features (kept for update)": ("kept", run.prompts * feat, "from the rollout"),
        "video tokens": ("kept", run.prompts * arch.num_queries * d * c, "from the rollout"),
        "rollout tensors": ("kept", run.rows * run.max_new_tokens * 30, "ids, masks, log-probs"),
    }
    if run.beta > 0 and run.train_connector:  # the initial connector's tokens for the KL reference
        base["reference video tokens"] = ("kept", run.prompts * arch.num_queries * d * c, "frozen initial connector")
    if run.beta > 0 or run.num_iterations > 1:
        base["reference log-probs"] = ("kept", run.rows * run.max_new_tokens * 4 * (1 + int(run.num_iterations > 1)), "")
    conn = k * connector_saved(arch, run) + connector_casts(arch, run) if run.train_connector else 0
    masks = (k * s_p * s_p + mb * ls * (s_p + ls)) * c  # additive prompt / completion masks
    shared = 2 * tokens * arch.head_dim * c + masks  # cos/sin + masks
    per_layer = (tokens * layer_saved(ops, arch, run) + kv_rows) if not run.grad_checkpointing else tokens * d * c
    offload = run.grad_checkpointing == "offload"  # the checkpoints wait in host RAM: offloaded_bytes()
    lp_saved, lp_fwd, lp_bwd = logprob_terms(arch, run, n)
    norm_saved = (n * d * 4 if (c != 4 and not run.liger) else 0) + n * d * c  # the [n, L, D] cat + fp32 norm input
    ckpt = "layer inputs (checkpoints)" if run.grad_checkpointing else "layer activations (no checkpointing)"
    if offload:
        ckpt = "layer inputs (on their way to host RAM)"
    where = f"{k} x {s_p} prompt + {mb} x {ls} completion positions"
    fwd: Moment = {**base,
        "connector activations": ("activation", conn, f"{k} video(s) with grad") if conn else ("activation", 0, ""),
        ckpt: ("activation", int(per_layer * (2 if offload else arch.layers) + tokens * d * c), where),
        "rotary tables / masks": ("activation", int(shared), ""),
        "final norm + hidden states": ("activation", norm_saved + n * d * c, f"{n} completion positions"),
        "log-prob saved + tiles": ("activation", lp_saved + lp_fwd, run.logprob_backend)}
    lp_back = {**fwd, "log-prob saved + tiles": ("activation", lp_saved + lp_bwd + tokens * d * c, "backward")}
    if run.grad_checkpointing:
        layer = tokens * layer_backward_peak(ops, arch, run) + 2 * kv_rows  # + the repeated K/V's gradient
        back: Moment = {**base, "connector activations": fwd["connector activations"],
            ckpt: ("activation", tokens * d * c * (1 if offload else arch.layers), where),
            "rotary tables / masks": fwd["rotary tables / masks"],
            "checkpointed layer recompute + backward": ("activation", int(layer), "largest transient")}
    else:
        back = {**fwd, "layer backward": ("activation", int(tokens * ops[-1].backward), "")}
    out = {"log-prob forward": fwd, "log-prob backward": lp_back, "layer backward": back}
    if run.train_connector:  # weight-grad buffers of every connector weight fill while its saved tensors drain
        sizes = connector_tensors(arch)
        buffers = (sum(sizes) + 2 * max(sizes)) * c
        out["connector backward"] = {**base, "connector activations": fwd["connector activations"],
            "connector weight-grad buffers": ("activation", buffers, "one per weight, shared by all chunks"),
            "embedding gradient": ("activation", k * s_p * d * c, "")}
    if run.beta > 0 or run.num_iterations > 1:
        _, ref_fwd, _ = logprob_terms(arch, run, n)
        layer_nograd = tokens * nograd_layer_peak(arch, run, s_p) + kv_rows
        out["reference forward"] = {**base,
            "reference forward transient": ("activation", int(2 * tokens * d * c + layer_nograd + ref_fwd + n * d * c),
                                            "no grad, adapters off")}
    return out


def offloaded_bytes(arch: Arch, run: RunShape) -> int:
    """Host RAM (pinned) for the checkpointed layer inputs of one update micro-batch when
    `gradient_checkpointing = "offload"`: every layer's prompt and completion inputs (else 0)."""
    if run.grad_checkpointing != "offload":
        return 0
    k, s_p, mb, ls = update_shapes(arch, run)
    return (k * s_p + mb * ls) * arch.hidden * run.c * arch.layers
