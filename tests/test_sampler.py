"""The shared-prefix decode (issue #12) vs the sampler before it, its device reads, and its CUDA graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinyr1.decode import PrefixDecoder
from tinyr1.hf_compat import cache_of
from tinyr1.logprobs import completion_logprobs
from tinyr1.loss import completion_mask
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo, right_to_left_pad
from tinyr1.model.writing import tiny_config
from tinyr1.rollout import Rollout, sample_group, sample_tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sampler_v1 import sample_group_v1  # noqa: E402

VOCAB, EOS = 14, 3


def _model(heads: int = 4, kv_heads: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyLlavaVideo:
    torch.manual_seed(seed)
    cfg = tiny_config(VOCAB, EOS, frames=4)
    cfg["text_config"].update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    m = TinyLlavaVideo(TinyLlavaConfig.from_dict(cfg), attn_implementation="sdpa")
    return m.to(dtype).requires_grad_(False).eval()


def _prompts(model: TinyLlavaVideo, lengths: tuple[int, ...], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids, vts = [], []
    for n in lengths:  # different lengths -> left padding in the shared prefill
        row = torch.randint(4, VOCAB, (n,), generator=g)
        row[min(2, n - 1)] = -200
        ids.append(row)
        vts.append(model.encode_video(torch.randn(4, 3, 32, 32, generator=g).to(model.compute_dtype)))
    return ids, vts


MODELS = {"gqa 4/2": (4, 2), "mha 4/4": (4, 4), "mqa 4/1": (4, 1)}
SHAPES = {"B3 G3": ((5, 9, 7), 3), "B1 G5": ((6,), 5), "B4 G1": ((5, 9, 7, 4), 1)}


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_tokens_and_logprobs_equal_the_sampler_before_shared_prefix_decode(arch: str, shape: str, sync_every: int) -> None:
    model = _model(*MODELS[arch])
    lengths, g = SHAPES[shape]
    finished_at: set[int] = set()
    for seed, (temperature, top_k, top_p) in enumerate([(1.0, 0, 1.0), (0.7, 6, 0.9), (0.0, 0, 1.0)]):
        ids, vts = _prompts(model, lengths, seed)
        kw = dict(group_size=g, max_new_tokens=12, eos_id=EOS, temperature=temperature, top_k=top_k, top_p=top_p)
        old_ids, old_logp = sample_group_v1(model, ids, vts, generator=torch.Generator().manual_seed(seed), **kw)
        new_ids, new_logp = sample_group(model, ids, vts, generator=torch.Generator().manual_seed(seed),
                                         sync_every=sync_every, **kw)
        assert torch.equal(new_ids, old_ids), f"{arch} {shape} T={temperature}"
        mask = completion_mask(new_ids, EOS).bool()
        torch.testing.assert_close(new_logp[mask], old_logp[mask], atol=1e-5, rtol=0)
        assert (new_logp[~mask] == 0).all()
        lengths_now = mask.sum(1)
        finished_at |= set(lengths_now[(new_ids == EOS).any(1)].tolist())
    assert len(finished_at) >= 2, "rows should finish at different steps"


def test_sampler_consumes_a_fixed_number_of_uniforms() -> None:
    """Whatever rows finish when, a call draws T x B*G uniforms: the generator's next draw is fixed."""
    model = _model()
    ids, vts = _prompts(model, (5, 9), 0)
    gen = torch.Generator().manual_seed(4)
    sample_group(model, ids, vts, group_size=3, max_new_tokens=10, eos_id=EOS, generator=gen, sync_every=2)
    ref = torch.Generator().manual_seed(4)
    torch.rand(10, 6, generator=ref)
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=ref))


def test_fixed_shape_step_equals_the_eager_step() -> None:
    """The step CUDA graphs capture (whole preallocated suffix, positions after t masked, K/V written
    through a device index) gives the eager step's logits: the graph's arithmetic, checked on CPU."""
    model = _model()
    ids, vts = _prompts(model, (5, 9, 7), 1)
    llm = model.llm
    embeds, mask, _ = model.splice(ids, vts)
    embeds, mask = right_to_left_pad(embeds, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def decoder() -> PrefixDecoder:
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        return PrefixDecoder(llm, cache_of(out), mask.bool(), group_size=2, max_new_tokens=6)

    eager, fixed = decoder(), decoder()
    gen = torch.Generator().manual_seed(0)
    positions = mask.sum(-1)[:, None].expand(3, 2)
    for t in range(5):
        tok = torch.randint(0, VOCAB, (3, 2), generator=gen)
        a = eager.step(tok, positions + t, t)
        b = fixed.step(tok, positions + t, torch.tensor(t), length=6)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "_unique",
            "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "tolist"}


class DeviceReads(TorchDispatchMode):
    """Counts the ops that make a CUDA device wait for the host (a value read, a data-dependent
    shape, a copy to the CPU) as they are dispatched: on the CPU the same ops run, so the count
    is what a GPU would see."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        to_cpu = name == "_to_copy" and str((kwargs or {}).get("device", "")) == "cpu" and args[0].device.type != "cpu"
        if name in SYNC_OPS or to_cpu:
            self.count += 1
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sync_every", [4, 16])
def test_decode_reads_the_device_at_most_once_per_sync_every_tokens(sync_every: int) -> None:
    """Reads during decode = reads(T2) - reads(T1): the prefill's are the same in both calls. EOS is
    an id the model never samples, so every call runs all T steps."""
    model = _model()
    ids, vts = _prompts(model, (5, 9), 2)

    def reads(steps: int) -> int:
        with DeviceReads() as mode:
            sample_group(model, ids, vts, group_size=4, max_new_tokens=steps, eos_id=VOCAB + 7,
                         generator=torch.Generator().manual_seed(0), sync_every=sync_every)
        return mode.count

    t1, t2 = 8, 8 + 4 * sync_every
    extra = reads(t2) - reads(t1)
    assert extra <= (t2 - t1) // sync_every, f"{extra} device reads over {t2 - t1} tokens"


def test_bf16_decode_is_as_accurate_as_the_hf_decode() -> None:
    """The GPU's numerics on the CPU: in bf16 the new decode samples the old (HF attention) decode's
    tokens, and its log-probs are as close to the same weights in fp32 as the old decode's are."""
    model = _model(dtype=torch.bfloat16, seed=3)
    exact = _model(seed=3)
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids, vts = _prompts(model, (5, 9, 7), 5)
    kw = dict(group_size=3, max_new_tokens=10, eos_id=EOS)
    got, logp = sample_group(model, ids, vts, generator=torch.Generator().manual_seed(1), sync_every=4, **kw)
    old, old_logp = sample_group_v1(model, ids, vts, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(got, old)
    n = got.shape[0]
    ro = Rollout(features=[], video_tokens=[v.float() for v in vts], prompt_ids=ids,
                 row_prompt=torch.arange(3).repeat_interleave(3), completion_ids=got,
                 completion_mask=completion_mask(got, EOS), truncated=torch.zeros(n, dtype=torch.bool),
                 texts=[""] * n, rewards=torch.zeros(n, 1), reward_total=torch.zeros(n), advantages=torch.zeros(n),
                 reward_stats={})
    with torch.no_grad():
        ref, _ = completion_logprobs(exact, ro, torch.arange(n), temperature=1.0, backend="torch")  # fp32
    mask = completion_mask(got, EOS).bool()
    err, old_err = (logp - ref)[mask].abs(), (old_logp - ref)[mask].abs()
    assert err.mean() <= 1.5 * old_err.mean() + 1e-3 and err.max() <= 1.5 * old_err.max() + 1e-3, (
        f"new mean {err.mean():.4f} max {err.max():.4f}; old mean {old_err.mean():.4f} max {old_err.max():.4f}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_gives_the_eager_tokens() -> None:
    model = _model().cuda()
    ids, vts = _prompts(model.cpu(), (5, 9, 7), 6)
    model = model.cuda()
    vts = [v.cuda() for v in vts]
    kw = dict(group_size=4, max_new_tokens=24, eos_id=EOS, temperature=1.0, top_k=0, top_p=1.0, sync_every=4)
    eager = sample_group(model, ids, vts, generator=torch.Generator().manual_seed(0), **kw)
    graphed = sample_group(model, ids, vts, generator=torch.Generator().manual_seed(0), cuda_graphs=True, **kw)
    assert torch.equal(graphed[0], eager[0])
    torch.testing.assert_close(graphed[1], eager[1], atol=1e-4, rtol=0)


def test_rollout_benchmark_runs_all_three_samplers(capsys: pytest.CaptureFixture[str]) -> None:
    from rollout import main as rollout_benchmark

    rollout_benchmark(["--hidden", "64", "--layers", "1", "--vocab", "512", "--prompt", "40", "--video-tokens", "16",
                       "--prompts", "2", "--group", "2", "--new-tokens", "4", "--reps", "1"])
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| (")]
    assert [ln[:5] for ln in table] == ["| (a)", "| (b)", "| (c)"]
    assert all("MiB" in ln for ln in table)


@pytest.mark.parametrize("bf16", [False, True])
def test_token_sampler_equals_the_full_vocabulary_cdf(bf16: bool) -> None:
    """The top-k candidate CDF picks the tokens the full-vocabulary CDF picks (the sampler before
    issue #12), also with bf16 logits, whose many exact ties at the k-th value HF keeps. (Not
    top-p on bf16 logits: there, equal probabilities put the nucleus cut exactly on a tie, and
    which tied token an unstable sort drops first is arbitrary in both samplers.)"""
    from sampler_v1 import sample_tokens_v1

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2048, 3000, generator=gen) * 3
    if bf16:
        logits = logits.bfloat16()
        kth = logits.float().topk(50, dim=-1).values[:, -1:]
        assert ((logits.float() == kth).sum(-1) > 1).any(), "the test needs ties at the k-th logit"
    u = torch.rand(2048, generator=gen)
    cases = [(1.0, 50, 1.0), (0.7, 50, 0.9), (1.3, 5, 0.5), (1.0, 0, 0.8), (1.0, 2999, 1.0), (0.6, 20, 1.0)]
    for temperature, top_k, top_p in [c for c in cases if not (bf16 and c[2] < 1)]:
        got, lp = sample_tokens(logits, u, temperature=temperature, top_k=top_k, top_p=top_p)
        want, want_lp = sample_tokens_v1(logits, u, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(got, want), (temperature, top_k, top_p, (got != want).sum())
        torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)


def test_one_generator_per_prompt_samples_each_prompt_as_if_alone() -> None:
    """Data-parallel ranks sample their prompts in one call with a generator per prompt: each
    prompt's rows are what a call with that prompt and its generator alone gives."""
    model = _model()
    ids, vts = _prompts(model, (5, 9, 7), 3)
    kw = dict(group_size=3, max_new_tokens=12, eos_id=EOS, top_k=6, sync_every=4)
    both, _ = sample_group(model, ids, vts, generator=[torch.Generator().manual_seed(10 + b) for b in range(3)], **kw)
    for b in range(3):
        alone, _ = sample_group(model, ids[b : b + 1], vts[b : b + 1], generator=torch.Generator().manual_seed(10 + b), **kw)
        rows = both[3 * b : 3 * b + 3]
        assert torch.equal(rows[:, : alone.shape[1]], alone) and (rows[:, alone.shape[1] :] == EOS).all()
    with pytest.raises(ValueError, match="one per prompt"):
        sample_group(model, ids, vts, generator=[torch.Generator()], **kw)
