"""The rollout phase three ways, side by side in one run: tokens per second and peak live memory.

(a) HF `generate` from `inputs_embeds` with `num_return_sequences = G` (what a plain HF loop does);
(b) tinyr1's sampler before issue #12 (benchmarks/sampler_v1.py: prefill once, K/V repeated to G
    rows, `torch.cat` per token, a device read per token);
(c) tinyr1's sampler now (`tinyr1.rollout.sample_group`: each prompt's K/V once, preallocated
    per-row K/V, one device read per `sync_every` tokens);
(d) with --cuda-graphs: (c) with each decode step replayed from a CUDA graph.

All three get the same random Qwen2-shaped LLM (a TinyLLaVA-Video whose video tokens are given),
the same B prompts of ~650 positions (512 video tokens + text, lengths differing by a few tokens so
the prefill pads), top-k 50 at temperature 1, and every completion runs to max_new_tokens (no
token is EOS), so all three do the same work. The three alternate within each repetition, so a
busy machine slows them alike; the time is the median over repetitions, on the CPU in CPU seconds
of this process (wall seconds are printed beside: on a shared machine they also count the turns of
other processes). Peak memory is measured in
a separate untimed call per sampler: live tensor bytes created during the call
(`tinyr1.memory_measure.LiveTensorBytes`; on CUDA `max_memory_allocated` above the start).

    python benchmarks/rollout.py                        # CPU defaults (as in docs/BENCHMARKS.md)
    python benchmarks/rollout.py --device cuda --hidden 2048 --layers 36 --heads 16 --kv-heads 2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_v1 import sample_group_v1  # noqa: E402

from tinyr1.memory_measure import measure_peak  # noqa: E402
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo  # noqa: E402
from tinyr1.model.writing import tiny_config  # noqa: E402
from tinyr1.rollout import sample_group  # noqa: E402


def build(args: argparse.Namespace) -> tuple[TinyLlavaVideo, list[torch.Tensor], list[torch.Tensor]]:
    raw = tiny_config(args.vocab, 0, frames=4)
    raw.update(hidden_size=args.hidden, num_queries=args.video_tokens, tokenizer_model_max_length=8192)
    raw["text_config"].update(
        hidden_size=args.hidden, intermediate_size=int(args.hidden * 5.375) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, max_position_embeddings=8192, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):  # random init where it runs: a 3B model initializes in seconds on a GPU
        model = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw))
    model = model.to(dtype).requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(1)
    ids, vts = [], []
    text = args.prompt - args.video_tokens + 1  # the -200 sentinel becomes the video tokens
    for b in range(args.prompts):
        row = torch.randint(1, args.vocab, (text - b % 3,), generator=gen)
        row[min(10, row.numel() - 1)] = -200
        ids.append(row)
        vts.append((torch.randn(args.video_tokens, args.hidden, generator=gen) * 0.02).to(args.device, dtype))
    return model, ids, vts


def samplers(model: TinyLlavaVideo, ids: list[torch.Tensor], vts: list[torch.Tensor],
             args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    never = args.vocab + 7  # an EOS no token has: every row runs to max_new_tokens
    kw = dict(group_size=args.group, max_new_tokens=args.new_tokens, eos_id=never, temperature=1.0, top_k=50, top_p=1.0)

    def hf() -> torch.Tensor:
        embeds, mask, _ = model.splice(ids, vts)
        from tinyr1.model.tinyllava import right_to_left_pad

        embeds, mask = right_to_left_pad(embeds, mask)
        return model.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
            num_return_sequences=args.group, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            eos_token_id=None, pad_token_id=0,
        )

    def v1() -> torch.Tensor:
        return sample_group_v1(model, ids, vts, generator=torch.Generator().manual_seed(0), **kw)[0]

    def new(graphs: bool = False) -> torch.Tensor:
        return sample_group(model, ids, vts, generator=torch.Generator().manual_seed(0), sync_every=args.sync_every,
                            cuda_graphs=graphs, **kw)[0]

    runs = {"(a) HF generate, num_return_sequences=G": hf, "(b) tinyr1 before #12": v1,
            "(c) tinyr1 shared-prefix decode": new}
    if args.cuda_graphs:
        runs["(d) (c) + CUDA graphs"] = lambda: new(graphs=True)
    return runs


def peak_bytes(fn: Callable[[], torch.Tensor], device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return measure_peak(fn)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="cpu", choices=["cpu", "cuda"])
    a("--dtype", default="fp32", choices=["fp32", "bf16"])
    a("--hidden", type=int, default=256)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=2)
    a("--vocab", type=int, default=151936, help="Qwen2.5's")
    a("--prompt", type=int, default=650, help="prompt positions (video tokens included)")
    a("--video-tokens", type=int, default=512)
    a("--prompts", type=int, default=4, help="B")
    a("--group", type=int, default=8, help="G")
    a("--new-tokens", type=int, default=128)
    a("--sync-every", type=int, default=16)
    a("--cuda-graphs", action="store_true", help="add (d): (c) with rollout.cuda_graphs (CUDA only)")
    a("--reps", type=int, default=3, help="timed repetitions of each (after one warm-up)")
    a("--threads", type=int, default=None)
    a("--only", default=None, help="comma-separated letters to run, e.g. 'b,c'")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids, vts = build(args)
    runs = samplers(model, ids, vts, args)
    if args.only:
        keep = {f"({x.strip()})" for x in args.only.split(",")}
        runs = {k: v for k, v in runs.items() if k[:3] in keep}
    tokens = args.prompts * args.group * args.new_tokens
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps + 1):
        for name, fn in runs.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            assert out.shape[-1] == args.new_tokens, (name, tuple(out.shape))
            if rep:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    peaks = {name: peak_bytes(fn, args.device) for name, fn in runs.items()}
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"{datetime.date.today()}, {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"`python benchmarks/rollout.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"Qwen2 {args.hidden}x{args.layers}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, {args.dtype}; "
          f"B={args.prompts} prompts of ~{args.prompt} positions, G={args.group}, {args.new_tokens} new tokens, "
          f"top-k 50; median of {args.reps}\n")
    # CPU seconds of this process: on a shared machine wall time also counts other processes' turns
    clock = cpu if args.device == "cpu" else times
    unit = "CPU s" if args.device == "cpu" else "s"
    print(f"| sampler | wall s / rollout | {unit} / rollout | tokens / {unit} | peak live memory | vs (b) speed | vs (b) memory |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    base = "(b) tinyr1 before #12"
    for name in runs:
        med = statistics.median(clock[name])
        speed = f"{statistics.median(clock[base]) / med:.2f}x" if base in clock else "-"
        mem = f"{peaks[name] / peaks[base] - 1:+.0%}" if base in peaks else "-"
        print(f"| {name} | {statistics.median(times[name]):.2f} | {med:.2f} | {tokens / med:,.0f} | "
              f"{peaks[name] / 2**20:,.1f} MiB | {speed} | {mem} |")


if __name__ == "__main__":
    main()
