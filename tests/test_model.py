"""The assembled TinyLLaVA-Video model against references composed by hand, NF4 + LoRA training
behaviour, gradient checkpointing, the adapters-off reference policy and generation.

Tiny checkpoints are written in the original on-disk layout and loaded through `load_tinyllava`
(no tokenizer needed: ids are chosen by hand).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from tinyr1.model import loading as L
from tinyr1.model.resampler import sinusoidal_encoding
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config, write_checkpoint
from tinyr1.rollout import sample_group

pytestmark = [  # library noise: PEFT reads a deprecated property; bitsandbytes' torch.compile import
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

VOCAB, EOS = 96, 2
IMG = -200


def write_tiny(out: Path, *, seed: int = 0, untied: bool = False, spread: bool = False) -> dict:
    """A random tiny checkpoint in the original layout; returns its raw config.

    `spread` gives the LLM unit-scale weights and an untied lm_head so that greedy decoding does not
    just repeat the last token (the default 0.02-std init does), which makes generation tests sharp.
    """
    raw = tiny_config(VOCAB, EOS)
    if untied or spread:
        raw["text_config"]["tie_word_embeddings"] = False
    torch.manual_seed(seed)
    model = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False)
    state = model.state_dict()
    if spread:
        g = torch.Generator().manual_seed(seed + 100)
        for k, v in state.items():
            if k.startswith("language_model.") and v.ndim == 2:
                state[k] = torch.randn(v.shape, generator=g) * v.shape[1] ** -0.5
        state["language_model.model.embed_tokens.weight"] = torch.randn(VOCAB, 128, generator=g)
    write_checkpoint(out, state, raw, tokenizer_dir=None, dtype=torch.float32)
    return raw


def pixels(frames: int, seed: int) -> torch.Tensor:
    return torch.rand(frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [T, 3, S, S]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    write_tiny(out, seed=0)
    return out


# ---- (a) logits vs. a reference composed by hand -------------------------------------------------
def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_perceiver_attention(sd: dict, p: str, media: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """Flamingo attention, one head at a time: Q from latents, K/V from cat(media, latents)."""
    heads, dim_head = 8, 64
    m = ref_layer_norm(media, sd[p + "norm_media.weight"], sd[p + "norm_media.bias"])  # [M, D]
    q_in = ref_layer_norm(lat, sd[p + "norm_latents.weight"], sd[p + "norm_latents.bias"])  # [Q, D]
    q = q_in @ sd[p + "to_q.weight"].T  # [Q, 512]
    kv = torch.cat([m, q_in]) @ sd[p + "to_kv.weight"].T  # [M+Q, 1024]
    k, v = kv[:, : heads * dim_head], kv[:, heads * dim_head :]
    outs = []
    for h in range(heads):
        s = slice(h * dim_head, (h + 1) * dim_head)
        att = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dim_head), dim=-1)  # [Q, M+Q]
        outs.append(att @ v[:, s])  # [Q, 64]
    return torch.cat(outs, dim=-1) @ sd[p + "to_out.weight"].T  # [Q, D]


def ref_pe_fp16(n: int, dim: int) -> torch.Tensor:
    """The original's table: fp32 angles written into an fp16 tensor, one position at a time."""
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # [D/2]
    pe = torch.empty(n, dim, dtype=torch.float16)
    for pos in range(n):
        ang = torch.tensor(float(pos)) * div  # [D/2] fp32
        pe[pos, 0::2] = torch.sin(ang).half()
        pe[pos, 1::2] = torch.cos(ang).half()
    return pe  # [n, D] fp16


def ref_group_resampler(sd: dict, feats: torch.Tensor, group: int, depth: int) -> torch.Tensor:
    """feats [N, Dv] -> [group * latents, D]: the original's near-equal split, one chunk at a time."""
    x = feats @ sd["linear.weight"].T + sd["linear.bias"]  # [N, D]
    avg, rem = divmod(x.shape[0], group)
    sizes = [avg + 1 if i < rem else avg for i in range(group)]
    outs, start = [], 0
    for size in sizes:
        chunk = x[start : start + size]  # [size, D]
        start += size
        lat = sd["latents"]  # [q, D]
        for layer in range(depth):
            p = f"layers.{layer}."
            lat = ref_perceiver_attention(sd, p + "0.", chunk, lat) + lat
            h = ref_layer_norm(lat, sd[p + "1.0.weight"], sd[p + "1.0.bias"]) @ sd[p + "1.1.weight"].T
            lat = F.gelu(h) @ sd[p + "1.3.weight"].T + lat
        outs.append(ref_layer_norm(lat, sd["norm.weight"], sd["norm.bias"]))
    assert start == x.shape[0]
    out = torch.cat(outs)  # [Q, D]
    return out + ref_pe_fp16(out.shape[0], out.shape[1]).float()


def public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def test_sinusoidal_encoding_is_built_in_fp16_like_the_original() -> None:
    pe = sinusoidal_encoding(40, 64)
    assert pe.dtype == torch.float16
    assert torch.equal(pe, ref_pe_fp16(40, 64))


def test_logits_equal_reference_composed_by_hand(ckpt: Path) -> None:
    raw = L.read_config(ckpt).raw
    weights = load_file(str(ckpt / "model.safetensors"))
    # vision: the full, untruncated HF SiglipVisionModel, hidden_states[-2] without token 0
    vcfg = SiglipVisionConfig(**public(raw["vision_config"]), attn_implementation="eager")
    vision = SiglipVisionModel(vcfg).eval()
    vprefix = "vision_tower._vision_tower.vision_model."
    vision.load_state_dict({k[len(vprefix) :]: v for k, v in weights.items() if k.startswith(vprefix)}, strict=True)
    # LLM: a stock Qwen2ForCausalLM from text_config, lm_head tied to the embedding
    llm = Qwen2ForCausalLM(Qwen2Config(**public(raw["text_config"]), attn_implementation="eager")).eval()
    lsd = {k[len("language_model.") :]: v for k, v in weights.items() if k.startswith("language_model.")}
    missing, unexpected = llm.load_state_dict(lsd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    csd = {k[len("connector._connector.") :]: v for k, v in weights.items() if k.startswith("connector.")}

    model = L.load_tinyllava(ckpt, load_tokenizer=False, device="cpu", dtype="fp32").model
    # 6 frames x 15 patch tokens = 90 tokens into 8 groups: sizes 12,12,11,... (uneven split exercised)
    vids = [pixels(6, 1), pixels(8, 2)]
    rows = [torch.tensor([5, 6, 7, IMG, 8, 9, 10]), torch.tensor([11, IMG, 12, 13, 14, 15, 16, 17, 18, 19])]
    with torch.no_grad():
        got = model(rows, [model.encode_video(v) for v in vids]).logits  # [2, S, V]
        for i, (ids, pix) in enumerate(zip(rows, vids)):
            hs = vision(pixel_values=pix, output_hidden_states=True).hidden_states
            assert len(hs) == vcfg.num_hidden_layers + 1
            feats = hs[-2][:, 1:].reshape(-1, vcfg.hidden_size)  # [T*15, 64]
            vt = ref_group_resampler(csd, feats, raw["group"], raw["num_resampler_layers"])  # [32, 128]
            assert vt.shape == (raw["num_queries"], raw["hidden_size"])
            p = int((ids == IMG).nonzero())
            emb = llm.model.embed_tokens
            embeds = torch.cat([emb(ids[:p]), vt, emb(ids[p + 1 :])])  # [L-1+Q, D]
            want = llm(inputs_embeds=embeds[None]).logits[0]  # [L-1+Q, V]
            assert got.shape[1] >= want.shape[0]
            diff = (got[i, : want.shape[0]] - want).abs().max().item()
            assert diff < 1e-5, f"row {i}: max abs diff {diff}"


def test_naive_resampler_builds_and_uses_all_latents(tmp_path: Path) -> None:
    raw = tiny_config(VOCAB, EOS)
    raw["connector_type"] = "naiveresampler"
    torch.manual_seed(0)
    model = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False)
    assert model.connector.resampler.latents.shape == (raw["num_queries"], raw["hidden_size"])
    write_checkpoint(tmp_path, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)
    loaded = L.load_tinyllava(tmp_path, load_tokenizer=False, device="cpu").model
    vt = loaded.encode_video(pixels(3, 0))  # [Q, D]
    assert vt.shape == (raw["num_queries"], raw["hidden_size"]) and torch.isfinite(vt).all()
    # the position encoding goes on the inputs: reversing the frame-token order changes the output
    feats = loaded.vision_features(pixels(3, 0))  # [1, 45, 64]
    conn = loaded.connector
    assert not torch.allclose(conn(feats), conn(feats.flip(1)), atol=1e-4)
    out = loaded([torch.tensor([3, IMG, 4])], [vt]).logits
    assert out.shape == (1, 2 + raw["num_queries"], VOCAB)


def test_config_ignores_private_and_unknown_keys() -> None:
    raw = tiny_config(VOCAB, EOS)
    raw["_name_or_path"] = "somewhere"
    raw["vision_config"]["_attn_implementation_autoset"] = True
    assert raw["text_config"]["_attn_implementation_autoset"] is True
    cfg = TinyLlavaConfig.from_dict(raw)
    qwen, siglip = cfg.qwen2(), cfg.siglip(truncate=False)
    assert not hasattr(qwen, "_attn_implementation_autoset")
    assert not hasattr(siglip, "_attn_implementation_autoset")
    assert (qwen.hidden_size, qwen.vocab_size, qwen.num_key_value_heads) == (128, VOCAB, 2)
    assert qwen.intermediate_size == 256 and qwen.rope_parameters["rope_theta"] == 1e6
    assert (siglip.hidden_size, siglip.num_hidden_layers, siglip.patch_size) == (64, 3, 8)
    assert cfg.siglip().num_hidden_layers == 2 and cfg.siglip().vision_use_head is False


# ---- (c) (d) (e) NF4 + LoRA training behaviour ------------------------------------------------------
def lora_model(ckpt: Path, *, quant: str, seed: int = 0) -> TinyLlavaVideo:
    model = L.load_tinyllava(ckpt, load_tokenizer=False, device="cpu", dtype="fp32", quant=quant).model  # type: ignore[arg-type]
    torch.manual_seed(seed)
    L.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=list(L.LORA_DEFAULT_TARGETS))
    return model


def batch(model: TinyLlavaVideo) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    vt = model.encode_video(pixels(4, 7))  # [Q, D]
    rows = [torch.tensor([5, 6, IMG, 7, 8, 9, 10, 11]), torch.tensor([12, IMG, 13, 14, 15])]
    labels = [torch.tensor([-100, -100, IMG, -100, 8, 9, 10, 11]), torch.tensor([-100, IMG, -100, 14, 15])]
    return rows, [vt, vt.flip(0)], labels


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_step(model: TinyLlavaVideo, opt: torch.optim.Optimizer) -> float:
    rows, vts, labels = batch(model)
    loss = model(rows, vts, labels=labels, use_cache=False).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_nf4_lora_step_changes_only_lora(ckpt: Path) -> None:
    import bitsandbytes as bnb

    model = lora_model(ckpt, quant="nf4")
    L.prepare_for_training(model, train_connector=False, gradient_checkpointing=True)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer = getattr(model.llm.model.layers[0].self_attn, name)
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit), name
        assert layer.base_layer.weight.dtype == torch.uint8 and layer.base_layer.weight.quant_state is not None
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(model.llm.model.layers[-1].mlp, name).base_layer, bnb.nn.Linear4bit)
    assert not isinstance(model.llm.lm_head, bnb.nn.Linear4bit)
    trainable = L.trainable_parameters(model)
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 4  # A and B for 7 targets x 4 layers
    before = snapshot(model)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    train_step(model, opt)
    # LoRA B starts at zero, so A gets no gradient in step 1; every B moves
    after1 = snapshot(model)
    for k in before:
        if "lora_B" in k:
            assert not torch.equal(before[k], after1[k]), k
        elif "lora_A" in k:
            assert torch.equal(before[k], after1[k]), k
    train_step(model, opt)
    after = snapshot(model)
    lora_keys = [k for k in before if "lora_" in k]
    assert len(lora_keys) == len(trainable)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == ("lora_" in k), f"{k}: changed={changed}"
    assert any(k.startswith("vision_tower.") for k in before) and any(k.startswith("connector.") for k in before)
    assert not model.vision_tower.training and model.llm.training


def test_gradient_checkpointing_gives_the_same_gradients(ckpt: Path) -> None:
    model = lora_model(ckpt, quant="none")
    with torch.no_grad():  # non-zero B so that every LoRA A gets a gradient
        g = torch.Generator().manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    calls = []  # a pre-hook: torch stops the recompute early, before the layer's last module returns
    model.llm.model.layers[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        L.prepare_for_training(model, train_connector=True, gradient_checkpointing=checkpointing)
        model.zero_grad(set_to_none=True)
        calls.clear()
        rows, vts, labels = batch(model)
        model(rows, vts, labels=labels, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in L.trainable_parameters(model).items()}

    plain = grads(False)
    assert len(calls) == 1
    ckpt_grads = grads(True)
    assert len(calls) == 2, "gradient checkpointing did not recompute the layer in backward"
    assert plain.keys() == ckpt_grads.keys() and any(n.startswith("connector.") for n in plain)
    for n in plain:
        assert plain[n].abs().max() > 0, n
        torch.testing.assert_close(ckpt_grads[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_adapters_disabled_is_the_base_model(ckpt: Path) -> None:
    base = L.load_tinyllava(ckpt, load_tokenizer=False, device="cpu", dtype="fp32", quant="nf4").model
    rows, vts, _ = batch(base)
    with torch.no_grad():
        base_logits = base(rows, vts).logits  # [2, S, V]
    model = lora_model(ckpt, quant="nf4")
    L.prepare_for_training(model, train_connector=False, gradient_checkpointing=False)
    opt = torch.optim.AdamW(L.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        train_step(model, opt)
    model.eval()
    with torch.no_grad():
        on = model(rows, vts).logits
        with L.adapters_disabled(model):
            off = model(rows, vts).logits
        on_again = model(rows, vts).logits
    mask = torch.tensor([[1] * on.shape[1], [1] * (4 + 32) + [0] * (on.shape[1] - 36)], dtype=torch.bool)
    torch.testing.assert_close(off[mask], base_logits[mask], rtol=0, atol=1e-6)
    assert (on[mask] - base_logits[mask]).abs().max() > 1e-3
    assert torch.equal(on, on_again)  # the context manager re-enabled the adapters


# ---- (f) generation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_model(tmp_path_factory: pytest.TempPathFactory) -> TinyLlavaVideo:
    out = tmp_path_factory.mktemp("spread")
    write_tiny(out, seed=1, spread=True)
    return L.load_tinyllava(out, load_tokenizer=False, device="cpu", dtype="fp32").model


def greedy_by_hand(model: TinyLlavaVideo, ids: torch.Tensor, vt: torch.Tensor | None, n: int) -> list[int]:
    """No cache, no generate(): full forward, argmax, append the id, repeat."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model([ids], [vt]).logits[0, -1]  # [V]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > 1e-3, "near tie: pick another seed"
            tok = int(logits.argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([tok])])
    return out


def test_greedy_sampler_returns_new_tokens_only_and_matches_greedy_by_hand(gen_model: TinyLlavaVideo) -> None:
    m = gen_model
    vt = m.encode_video(pixels(4, 11))
    rows = [torch.tensor([20, 21, IMG, 22, 23]), torch.tensor([30, IMG, 31, 32, 33, 34, 35, 36, 37]),
            torch.tensor([40, 41, 42])]
    vts = [vt, m.encode_video(pixels(8, 12)), None]
    n = 6
    want = [greedy_by_hand(m, r, v, n) for r, v in zip(rows, vts)]
    assert any(len(set(w)) > 2 for w in want), "degenerate model: the test would be weak"
    unused = next(t for t in range(3, VOCAB) if all(t not in w for w in want))
    kw = {"group_size": 1, "max_new_tokens": n, "temperature": 0.0, "eos_id": unused}
    for r, v, w in zip(rows, vts, want):
        got, _ = sample_group(m, [r], [v], **kw)
        assert got.tolist() == [w]  # new tokens only: no prompt ids in front
    batched, _ = sample_group(m, rows, vts, **kw)  # rows of different lengths, left-padded inside
    assert batched.tolist() == want


def test_greedy_sampler_stops_at_eos(gen_model: TinyLlavaVideo) -> None:
    m = gen_model
    rows = [torch.tensor([30, IMG, 31, 32, 33, 34, 35, 36, 37]), torch.tensor([40, 41, 42])]
    vts = [m.encode_video(pixels(8, 12)), None]
    want = [greedy_by_hand(m, r, v, 6) for r, v in zip(rows, vts)]
    # EOS = row 0's 3rd token (not earlier in row 0): row 0 stops there, and is EOS-padded if row 1 goes on
    eos = want[0][2]
    assert eos not in want[0][:2]
    stop = [w.index(eos) + 1 if eos in w else len(w) for w in want]
    kw = {"group_size": 1, "max_new_tokens": 6, "temperature": 0.0, "eos_id": eos, "sync_every": 4}
    one, _ = sample_group(m, rows[:1], vts[:1], **kw)
    assert one.tolist() == [want[0][:3]]
    both, _ = sample_group(m, rows, vts, **kw)
    assert both.shape[1] == max(stop)
    for i, w in enumerate(want):
        assert both[i].tolist() == w[: stop[i]] + [eos] * (both.shape[1] - stop[i])
