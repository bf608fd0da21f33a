"""Fused linear log-prob (torch path and Triton kernels under the interpreter) against float64 loops.

Shapes are small and odd (not multiples of any tile); inputs come from fixed seeds. Errors are
norm-wise relative: ||x - ref|| / ||ref||. The Triton and liger tests skip, saying so, when the
optional packages (`pip install "tinyr1[kernels]"`) are not installed. Triton cases run on CPU
tensors under the interpreter where there is no GPU and on CUDA tensors, compiled, where there is
one (tests/conftest.py decides); the reference is always float64 on the CPU.
"""

from __future__ import annotations

import copy
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from tinyr1.cli import main
from tinyr1.doctor import tiny_qwen2
from tinyr1.errors import ConfigError, DeviceError
from tinyr1.kernels import apply_liger, resolve_backend, token_logprobs
from tinyr1.kernels import bench as kernels_bench
from tinyr1.kernels.liger import LIGER_MIN_VERSION, liger_available, liger_unavailable_reason
from tinyr1.kernels.logprob import naive_token_logprobs
from tinyr1.memory_measure import LiveTensorBytes

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
N, H, V = 37, 45, 301
NO_TRITON = "the Triton kernels need the optional triton package (pip install 'tinyr1[kernels]')"
NO_LIGER = "the liger patches need the optional liger-kernel package (pip install 'tinyr1[kernels]')"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py: only where there is no GPU
ON_GPU_NO_INTERPRETER = "a GPU is present, so the Triton interpreter is off (tests/conftest.py)"


def _needs(backend: str) -> None:
    """Skip (with the reason) a Triton case when triton is not installed; torch always runs."""
    if backend == "triton":
        pytest.importorskip("triton", reason=NO_TRITON)


def _device(backend: str) -> torch.device:
    """Where a case runs: torch on the CPU; triton on the CPU under the interpreter, else on CUDA."""
    return torch.device("cpu" if backend == "torch" or INTERPRET else "cuda")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((x.detach().double().to(ref.device) - ref).norm() / ref.norm())


def _reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token float64 loop: logp_i = log_softmax(W h_i / T)[t_i], entropy of softmax(W h_i / T)."""
    logps, ents = [], []
    for i in range(h.shape[0]):
        z = (w @ h[i]) / temperature  # [V]
        logp_all = z - torch.logsumexp(z, 0)  # [V]
        logps.append(logp_all[t[i]])
        ents.append(-(logp_all.exp() * logp_all).sum())
    return torch.stack(logps), torch.stack(ents)


def _inputs(dtype: torch.dtype, n: int = N, hdim: int = H, vocab: int = V, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=gen).to(dtype)  # [N, H]
    w = (torch.randn(vocab, hdim, generator=gen) * 0.3).to(dtype)  # [V, H]
    t = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    return h, w, t


def _loss(lp: torch.Tensor, ent: torch.Tensor, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> torch.Tensor:
    """Only the outputs that are switched on enter the graph, so the other gets no gradient at all."""
    terms = [(x * g).sum() for x, g in ((lp, g_lp), (ent, g_ent)) if g is not None]
    return torch.stack(terms).sum()


def _check(backend: str, dtype: torch.dtype, temperature: float, g_lp_on: bool, g_ent_on: bool,
           weight_grad: bool = False, seed: int = 0, **kw: object) -> None:
    _needs(backend)
    h, w, t = _inputs(dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    g_lp, g_ent = torch.randn(N, dtype=torch.float64, generator=gen), torch.randn(N, dtype=torch.float64, generator=gen)
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_(weight_grad)
    lp_ref, ent_ref = _reference(h64, w64, t, temperature)
    loss_ref = _loss(lp_ref, ent_ref, g_lp if g_lp_on else None, g_ent if g_ent_on else None)
    grads_ref = torch.autograd.grad(loss_ref, [h64, w64] if weight_grad else [h64])

    dev = _device(backend)
    h_in, w_in = h.to(dev).requires_grad_(), w.to(dev).requires_grad_(weight_grad)
    if kw.get("splits"):
        from tinyr1.kernels.logprob_triton import triton_token_logprobs  # optional: imports triton

        lp, ent = triton_token_logprobs(h_in, w_in, t.to(dev), temperature, True, kw.get("chunk_size"), kw["splits"])
    else:
        lp, ent = token_logprobs(h_in, w_in, t.to(dev), temperature, with_entropy=True, backend=backend, **kw)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (N,)
    loss = _loss(lp, ent, g_lp.float().to(dev) if g_lp_on else None, g_ent.float().to(dev) if g_ent_on else None)
    grads = torch.autograd.grad(loss, [h_in, w_in] if weight_grad else [h_in])
    tol, msg = TOL[dtype], f"backend={backend} dtype={dtype} T={temperature} seed={seed}"
    assert _rel(lp, lp_ref) < tol, f"logp {_rel(lp, lp_ref):.2e} {msg}"
    assert _rel(ent, ent_ref) < tol, f"entropy {_rel(ent, ent_ref):.2e} {msg}"
    for name, g, g_ref in zip(("d hidden", "d weight"), grads, grads_ref):
        assert g.dtype == dtype, name
        assert _rel(g, g_ref) < tol, f"{name} {_rel(g, g_ref):.2e} {msg}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("temperature", "g_ent_on"), [(0.7, False), (1.6, True)], ids=["logp-grad", "logp+ent-grad"])
def test_matches_float64_reference(backend: str, dtype: torch.dtype, temperature: float, g_ent_on: bool) -> None:
    _check(backend, dtype, temperature, g_lp_on=True, g_ent_on=g_ent_on)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_through_entropy_only(backend: str) -> None:
    _check(backend, torch.float32, 0.8, g_lp_on=False, g_ent_on=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_gradient_when_lm_head_trains(backend: str, dtype: torch.dtype) -> None:
    _check(backend, dtype, 1.3, g_lp_on=True, g_ent_on=True, weight_grad=True)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_torch_path_any_tile_width(chunk_size: int) -> None:
    _check("torch", torch.float32, 0.9, g_lp_on=True, g_ent_on=False, chunk_size=chunk_size)


@pytest.mark.parametrize(("splits", "chunk_size"), [(3, 32), (10, 16)])
def test_triton_vocab_splits_combine(splits: int, chunk_size: int) -> None:
    """Several programs per token block: partial log-sum-exps merged in torch, dh by atomic adds."""
    _check("triton", torch.float32, 0.6, g_lp_on=True, g_ent_on=True, splits=splits, chunk_size=chunk_size)


# Norm-wise tolerances of the CUDA plan. The forward multiplies the inputs exactly (bf16/fp16
# products fit in fp32) and accumulates in fp32, so log-probs and entropies are fp32-accurate for
# every input dtype. The gradients are rounded to the input dtype twice (dz before the backward
# GEMMs, dh/dw on return): two units of that dtype's roundoff.
FWD_TOL = 1e-6
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


@pytest.mark.parametrize(("dtype", "sms", "atomic"), [
    (torch.bfloat16, 24, True), (torch.bfloat16, 1, False), (torch.float16, 24, True), (torch.float32, 24, True),
], ids=["bf16-24sm-splits", "bf16-1sm-one-split", "fp16-24sm-splits", "fp32-24sm-splits"])
def test_cuda_plan_matches_float64_reference(dtype: torch.dtype, sms: int, atomic: bool) -> None:
    """The exact launch plan a GPU with `sms` SMs gets (block sizes, warps, splits, bf16 operands in
    tl.dot), run under the interpreter here and compiled on a GPU machine, in all four outputs."""
    pytest.importorskip("triton", reason=NO_TRITON)
    from tinyr1.kernels.logprob_triton import cuda_plan, triton_token_logprobs

    n, hdim, vocab, temperature = 130, 80, 300, 0.9
    plan = cuda_plan(n, vocab, dtype, sms)
    # the shapes reach every path of the plan: several token blocks, partial last token block,
    # hidden slice and vocabulary tile, and (atomic) several programs per token block
    assert plan.row_blocks > 1 and n % plan.block_n and hdim > plan.block_h and hdim % plan.block_h
    assert vocab % plan.block_v and (plan.splits > 1) == atomic
    assert plan.upcast == (dtype == torch.float32)  # 16-bit inputs reach tl.dot as 16-bit operands
    h, w, t = _inputs(dtype, n=n, hdim=hdim, vocab=vocab, seed=7)
    gen = torch.Generator().manual_seed(8)
    g_lp, g_ent = torch.randn(n, dtype=torch.float64, generator=gen), torch.randn(n, dtype=torch.float64, generator=gen)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = _reference(h64, w64, t, temperature)
    dh_ref, dw_ref = torch.autograd.grad(_loss(lp_ref, ent_ref, g_lp, g_ent), [h64, w64])

    dev = _device("triton")
    h_in, w_in = h.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    lp, ent = triton_token_logprobs(h_in, w_in, t.to(dev), temperature, True, None, plan=plan)
    dh, dw = torch.autograd.grad(_loss(lp, ent, g_lp.float().to(dev), g_ent.float().to(dev)), [h_in, w_in])
    assert dh.dtype == dw.dtype == dtype
    errors = {"logp": _rel(lp, lp_ref), "entropy": _rel(ent, ent_ref), "d hidden": _rel(dh, dh_ref),
              "d weight": _rel(dw, dw_ref)}
    tols = {"logp": FWD_TOL, "entropy": FWD_TOL, "d hidden": GRAD_TOL[dtype], "d weight": GRAD_TOL[dtype]}
    assert all(errors[k] < tols[k] for k in errors), f"{plan}: errors {errors} vs tolerances {tols}"


def test_launcher_runs_cuda_plan() -> None:
    """token_logprobs(backend="triton") launches `cuda_plan`: for the device's SM count on CUDA, for
    INTERPRETER_SMS on CPU tensors (the interpreter), so every Triton test here runs the GPU plan."""
    pytest.importorskip("triton", reason=NO_TRITON)
    from tinyr1.kernels import logprob_triton as lt

    dev = _device("triton")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else lt.INTERPRETER_SMS
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.zeros(N, H, dtype=dtype, device=dev)  # [N, H]
        assert lt.plan_for(h, V) == lt.cuda_plan(N, V, dtype, sms)
        assert lt.plan_for(h, V, 32, 2) == lt.cuda_plan(N, V, dtype, sms, block_v=32, splits=2)


@pytest.mark.parametrize(("cuda", "exported", "interpret"), [
    (False, None, "1"), (False, "0", "1"), (True, "1", None), (True, None, None),
], ids=["no-cuda", "no-cuda-exported-0", "cuda-exported-1", "cuda"])
def test_conftest_interprets_only_without_a_gpu(monkeypatch: pytest.MonkeyPatch, cuda: bool, exported: str | None,
                                                interpret: str | None) -> None:
    """With a GPU the kernels must be compiled even when the environment exports TRITON_INTERPRET=1
    (.ci/run does); without one the interpreter is on whatever was exported."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # the one input of the decision
    monkeypatch.delenv("TINYR1_TEST_INTERPRET", raising=False)
    if exported is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", exported)
    runpy.run_path(str(Path(__file__).with_name("conftest.py")))  # monkeypatch restores the variable
    assert os.environ.get("TRITON_INTERPRET") == interpret


@pytest.mark.gpu
def test_gpu_runs_compiled_kernels() -> None:
    pytest.importorskip("triton", reason=NO_TRITON)
    from tinyr1.kernels import logprob_triton as lt

    assert not lt.INTERPRETED and not INTERPRET, "the gpu tests would run the interpreter"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_int32_targets_and_no_entropy(backend: str) -> None:
    _needs(backend)
    h, w, t = _inputs(torch.float32, seed=1)
    lp_ref, _ = _reference(h.double(), w.double(), t, 1.1)
    dev = _device(backend)
    with torch.no_grad():
        lp, ent = token_logprobs(h.to(dev), w.to(dev), t.int().to(dev), 1.1, backend=backend)  # type: ignore[arg-type]
    assert ent is None
    assert _rel(lp, lp_ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend: str) -> None:
    _needs(backend)
    h, w, t = (x.to(_device(backend)) for x in _inputs(torch.float32, n=0))
    h.requires_grad_()
    lp, ent = token_logprobs(h, w, t, with_entropy=True, backend=backend)  # type: ignore[arg-type]
    assert lp.shape == (0,) and ent is not None and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert h.grad is not None and h.grad.shape == (0, H)


def test_torch_path_never_holds_tokens_by_vocab() -> None:
    """Peak live bytes of forward + backward stay far below one [N, V] fp32 tensor (naive holds several)."""
    n, vocab = 64, 40_000
    h, w, t = _inputs(torch.float32, n=n, hdim=32, vocab=vocab, seed=2)
    full = n * vocab * 4
    peaks = {}
    for name in ("naive", "torch"):
        hg = h.clone().requires_grad_()
        with LiveTensorBytes() as live:
            if name == "naive":
                lp, ent = naive_token_logprobs(hg, w, t, 1.0, with_entropy=True)
            else:
                lp, ent = token_logprobs(hg, w, t, with_entropy=True, backend="torch", chunk_size=512)
            (lp.sum() + ent.sum()).backward()
            del lp, ent
        peaks[name] = live.peak
    assert peaks["naive"] >= 2 * full  # the tracker does see the full logits
    assert peaks["torch"] < full / 10, peaks


def test_resolve_backend() -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ConfigError, match='"auto", "triton", "torch"'):
        resolve_backend("cuda", "cpu")


@pytest.mark.skipif(not INTERPRET, reason=ON_GPU_NO_INTERPRETER)
def test_triton_backend_on_cpu_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason=NO_TRITON)
    assert resolve_backend("triton", "cpu") == "triton"  # the interpreter is on (conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DeviceError, match="needs CUDA"):
        resolve_backend("triton", "cpu")


def test_without_triton_auto_falls_back_and_triton_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    assert resolve_backend("auto", "cuda") == "torch"  # kernels = "auto" never needs the extra
    with pytest.raises(DeviceError, match=r"triton package is not installed.*tinyr1\[kernels\]"):
        resolve_backend("triton", "cuda")


def test_bad_inputs_are_reported() -> None:
    h, w, t = _inputs(torch.float32)
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(h, w, t + V)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        token_logprobs(h[:, :-1], w, t)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, t, 0.0)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        token_logprobs(h, w, t, chunk_size=0)


def test_triton_tile_must_be_a_power_of_two() -> None:
    pytest.importorskip("triton", reason=NO_TRITON)
    h, w, t = (x.to(_device("triton")) for x in _inputs(torch.float32))
    with pytest.raises(ValueError, match="power of two"):
        token_logprobs(h, w, t, backend="triton", chunk_size=48)


def test_apply_liger_does_nothing_on_cpu() -> None:
    model = tiny_qwen2("cpu")
    before = [type(m).__name__ for m in model.modules()]
    assert apply_liger(model) is False
    assert [type(m).__name__ for m in model.modules()] == before


@pytest.fixture
def fresh_liger_import(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a generator fixture
    """liger_kernel imported afresh (and the availability cache cleared) inside the test only."""
    saved = {k: v for k, v in sys.modules.items() if k == "liger_kernel" or k.startswith("liger_kernel.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    liger_unavailable_reason.cache_clear()
    yield
    for name in [k for k in sys.modules if k == "liger_kernel" or k.startswith("liger_kernel.")]:
        del sys.modules[name]
    sys.modules.update(saved)
    liger_unavailable_reason.cache_clear()


def test_liger_that_fails_to_import_is_unavailable_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   fresh_liger_import: None) -> None:
    """liger-kernel 0.5.0-0.5.6 is found by find_spec but its package import fails on transformers 5;
    here a stand-in 0.5.6 that does what those versions do first (the same transformers import)."""
    pytest.importorskip("triton", reason=NO_TRITON)
    pkg = tmp_path / "liger_kernel"
    (pkg / "transformers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "transformers" / "__init__.py").write_text(
        "from transformers.models.gemma.modeling_gemma import _CONFIG_FOR_DOC  # noqa\n")
    meta = tmp_path / "liger_kernel-0.5.6.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: liger-kernel\nVersion: 0.5.6\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert liger_available() is False
    reason = liger_unavailable_reason()
    assert reason is not None and "liger-kernel 0.5.6" in reason and "_CONFIG_FOR_DOC" in reason
    assert f"liger-kernel>={LIGER_MIN_VERSION}" in reason
    assert apply_liger(tiny_qwen2("cpu")) is False


def test_liger_available_imports_the_names_tinyr1_uses(fresh_liger_import: None) -> None:
    pytest.importorskip("liger_kernel", reason=NO_LIGER)
    assert liger_unavailable_reason() is None and liger_available()
    assert "liger_kernel.transformers.functional" in sys.modules  # imported, not just found


def test_liger_floor_in_the_extras() -> None:
    """pyproject's kernels and dev extras ask for the liger-kernel that imports (LIGER_MIN_VERSION)."""
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floors = [line for line in text.splitlines() if "liger-kernel>=" in line]
    assert len(floors) == 2 and all(f'"liger-kernel>={LIGER_MIN_VERSION}"' in line for line in floors), floors


@pytest.mark.gpu
def test_liger_patches_this_instance_only_and_matches_on_cuda() -> None:
    pytest.importorskip("liger_kernel", reason=NO_LIGER)
    model = tiny_qwen2("cuda")
    fused = copy.deepcopy(model)
    keys = list(fused.state_dict())
    params = {id(p) for p in fused.parameters()}
    assert apply_liger(fused) is True
    names = [type(m).__name__ for m in fused.modules()]
    assert names.count("LigerRMSNorm") == 5 and names.count("_LigerSwiGLUMLP") == 2  # 2 x 2 norms + final; 2 MLPs
    assert "Qwen2RMSNorm" not in names and "Qwen2MLP" not in names
    assert list(fused.state_dict()) == keys  # checkpoints stay loadable
    assert {id(p) for p in fused.parameters()} == params  # same Parameters: optimizer/LoRA unaffected
    assert "LigerRMSNorm" not in [type(m).__name__ for m in model.modules()]  # the copy is untouched
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1)).cuda()
    ref, out = model(ids).logits, fused(ids).logits
    assert _rel(out, ref.double()) < 1e-4
    ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert _rel(q.grad, p.grad.double()) < 1e-3, name
    llama = tiny_qwen2("cuda")
    llama.config.model_type = "llama"
    with pytest.raises(ValueError, match="Qwen2"):
        apply_liger(llama)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_on_cuda_matches_reference(dtype: torch.dtype) -> None:
    pytest.importorskip("triton", reason=NO_TRITON)
    h, w, t = (x.cuda() for x in _inputs(dtype, n=300, hdim=256, vocab=5003, seed=3))
    g = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).cuda()
    h64 = h.double().requires_grad_()
    z = (h64 @ w.double().t()) / 0.8
    lp_ref = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
    (dh_ref,) = torch.autograd.grad((lp_ref * g).sum(), h64)
    hg = h.clone().requires_grad_()
    lp, _ = token_logprobs(hg, w, t, 0.8, backend="triton")
    (dh,) = torch.autograd.grad((lp * g.float()).sum(), hg)
    assert _rel(lp, lp_ref) < TOL[dtype] and _rel(dh, dh_ref) < TOL[dtype]


def test_cli_bench_kernels_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert main(["bench", "kernels", "--tokens", "19", "--hidden", "8", "--vocab", "333", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "naive" in out and "torch" in out and "time / naive" in out


def _table_rows(out: str) -> dict[str, list[str]]:
    """Data rows of the rich table printed by `bench kernels`: method -> the other cells."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    return {r[0]: r[1:] for r in rows}


def _out_of_memory(*args: object, **kwargs: object) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.96 GiB")  # exists on CPU builds


def test_cli_bench_kernels_reports_oom_per_method(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An 8 GB card: naive runs out of CUDA memory. Its row says OOM and the other methods still run."""
    monkeypatch.setattr(kernels_bench, "naive_token_logprobs", _out_of_memory)
    assert main(["bench", "kernels", "--tokens", "19", "--hidden", "8", "--vocab", "333", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert rows["naive"] == ["OOM", "OOM", "-", "-", "-"], out
    assert float(rows["torch"][0]) >= 0 and float(rows["torch"][1]) >= 0
    assert rows["torch"][2:] == ["-", "-", "-"]  # no ratio to, or difference from, a method that did not run


def test_bench_oom_in_a_timed_run_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fits in the memory run, then runs out of memory in a timed one (fragmentation): OOM all the same."""
    real, calls = kernels_bench.naive_token_logprobs, []

    def naive_then_oom(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        calls.append(1)
        if len(calls) > 1:
            _out_of_memory()
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels_bench, "naive_token_logprobs", naive_then_oom)
    results = kernels_bench.bench_kernels(["naive", "torch"], 19, 8, 333, torch.float32, torch.device("cpu"), repeats=2)
    assert len(calls) == 2  # not called again after its OOM
    naive, fused = results
    assert (naive.error, naive.seconds, naive.peak_bytes, naive.max_abs_diff) == ("OOM", None, None, None)
    assert fused.error is None and fused.seconds is not None and fused.seconds > 0 and fused.max_abs_diff is None


def test_naive_peak_estimate_matches_a_measurement() -> None:
    """The sizing rule's naive term (12 bytes per logit) against the live-tensor peak of a real run."""
    n, hdim, vocab = 64, 32, 4000
    peak, _ = kernels_bench.measure_memory(kernels_bench._step_fn("naive", 1.0, False, None),
                                           kernels_bench.make_inputs(n, hdim, vocab, torch.float32, torch.device("cpu")))
    inputs = vocab * hdim * 4 + n * hdim * 4  # lm_head and hidden exist before the call
    estimate = kernels_bench.estimated_peak_bytes("naive", n, hdim, vocab, torch.float32) - inputs
    assert 0.97 * estimate <= peak <= estimate


def test_default_tokens_fit_the_free_memory() -> None:
    hdim, vocab, bf16, gib = 2048, 151_936, torch.bfloat16, 2**30
    every = ["naive", "torch", "triton", "liger"]
    n8 = kernels_bench.default_tokens(every, hdim, vocab, bf16, 7 * gib)  # an 8 GB card, 7 GiB free
    assert 256 <= n8 < 4096 and n8 % 256 == 0
    fits = [kernels_bench.estimated_peak_bytes("naive", n, hdim, vocab, bf16) <= 0.8 * 7 * gib for n in (n8, n8 + 256)]
    assert fits == [True, False]  # the largest multiple of 256 that fits
    assert kernels_bench.default_tokens(["torch", "triton", "liger"], hdim, vocab, bf16, 7 * gib) == 4096
    assert kernels_bench.default_tokens(every, hdim, vocab, bf16, 80 * gib) == 4096  # capped
    assert kernels_bench.default_tokens(every, hdim, vocab, bf16, gib // 2) == 16  # floor: naive will say OOM


def test_cli_bench_kernels_sizes_tokens_to_free_memory(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from tinyr1.cli import bench as cli_bench

    free = 100 * 2**20
    monkeypatch.setattr(cli_bench, "_free_bytes", lambda device: free)  # the machine's one input
    expected = kernels_bench.default_tokens(["naive", "torch"], 8, 5000, torch.float32, free)
    assert 256 <= expected < 4096
    assert main(["bench", "kernels", "--hidden", "8", "--vocab", "5000", "--repeats", "1"]) == 0
    raw = capsys.readouterr().out
    assert f"N={expected} (sized to 80% of 0.1 GiB free" in " ".join(raw.split())  # rich wraps long lines
    rows = _table_rows(raw)
    assert set(rows) == {"naive", "torch"} and "OOM" not in rows["naive"] + rows["torch"]
