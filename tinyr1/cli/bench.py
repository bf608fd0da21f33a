"""`tinyr1 bench`: measured speed and memory (results go to docs/BENCHMARKS.md).

Structure: `register` builds the `bench` parser (`_add_bench_parser`) and its sub-commands
(`kernels`). `bench --preset NAME` runs whole GRPO steps (`_bench_root` -> tinyr1.preset_bench);
`bench` alone prints help.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyr1.cli._args import add_threads_arg, apply_threads
from tinyr1.errors import ConfigError, DeviceError

if TYPE_CHECKING:  # heavy imports, only for annotations
    from rich.table import Table

    from tinyr1.kernels.bench import BenchResult

ORDER = 90

BENCH_HELP = """\
Benchmarks that measure time and peak memory on this machine.

`tinyr1 bench --preset NAME` builds the preset's architecture with random weights (nothing is
downloaded), loads it through the training loader (NF4, LoRA, gradient checkpointing, kernels as
the preset says), runs 1 warm-up + K real GRPO steps (the trainer's rollout_step + update_step) on
synthetic videos at the preset's shapes, and prints seconds per step (rollout / update), generated
tokens per second and peak memory beside the planner's estimate for the same shapes.
Peak memory: CUDA max_memory_allocated per phase; CPU: live tensor bytes of one extra step, and
the peak RSS. EOS is suppressed (completions run to max_new_tokens) unless --allow-eos.
On a CPU, presets other than tiny run at a reduced scale (printed): LLM 2 layers x 256, vision
1 layer x 128, 2 prompts, <= 32 new tokens; G, frames, image size, video tokens, vocabulary,
micro-batch (lowered only to divide the rows) and LoRA rank stay. --scale full/reduced and --layers/--hidden/... change that.

Examples:
  tinyr1 bench --preset tiny --threads 1    # CPU, the tiny demo model: ~20 s (1 thread is faster on a busy machine)
  tinyr1 bench --preset 12gb --steps 3 --json 12gb.json
  tinyr1 bench --preset 24gb --layers 4 --set rollout.max_new_tokens=64   # CPU, a larger reduced run
  tinyr1 bench --preset 24gb --backends peft,unsloth   # GPU: the two LoRA backends side by side
  tinyr1 bench kernels                      # per-token log-probs at Qwen2.5-3B shapes
  tinyr1 bench kernels --tokens 1024 --methods naive,torch
"""

KERNELS_HELP = """\
Per-token log-probs of a GRPO update, forward + backward, at Qwen2.5-3B shapes
(H = 2048, V = 151,936, N = 4096 tokens, or fewer when 80% of the free memory - CUDA: free device
memory, CPU: available RAM - cannot hold the hungriest method; printed). Methods:
  naive   full logits [N x V] -> log_softmax -> gather (what the fused paths replace)
  torch   tinyr1's vocabulary-tiled pure-torch path (the CPU path)
  triton  tinyr1's Triton kernels (CUDA)
  liger   liger-kernel's fused linear cross-entropy with reduction="none" (CUDA)
Peak memory is what the call allocates above its inputs (CUDA: max_memory_allocated; CPU: live
tensor bytes tracked by a TorchDispatchMode). Time is the median of --repeats runs per method
after one warm-up run, the methods interleaved so a busy machine slows them alike.
Ratios are against naive. The naive path needs about 3 x N x V x 4 bytes. A method that runs out
of CUDA memory shows OOM in the table and the others still run.

Examples:
  tinyr1 bench kernels                                   # all methods that run here
  tinyr1 bench kernels --tokens 1024 --repeats 3
  tinyr1 bench kernels --methods torch,triton --dtype bf16 --entropy
"""

_DTYPES = ("fp32", "bf16", "fp16")


def _methods(text: str) -> list[str]:
    from tinyr1.kernels.bench import METHODS  # light: no torch kernels are built on import

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return names


def register(subparsers: Any) -> None:
    parser = _add_bench_parser(subparsers)
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=False)
    _add_kernels(sub)


def _add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure speed and memory (whole GRPO steps of a preset; kernels)", description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.set_defaults(func=_bench_root, bench_parser=parser)
    parser.add_argument("--preset", help="bench whole GRPO steps of this preset (see `tinyr1 presets list`)")
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps after 1 warm-up (default 3)")
    parser.add_argument("--scale", choices=("auto", "full", "reduced"), default="auto",
                        help="auto: reduced on a CPU unless the preset is the tiny demo (default auto)")
    for knob, what in (("layers", "LLM layers"), ("hidden", "LLM hidden size (heads/FFN scale along)"),
                       ("vision-layers", "vision layers that run"), ("vision-hidden", "vision hidden size"),
                       ("vocab", "vocabulary size")):
        parser.add_argument(f"--{knob}", type=int, default=None, metavar="N", help=f"reduce: {what}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, as in train (repeatable; applied after the reduction)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: the preset's")
    add_threads_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, videos and sampling (default 0)")
    parser.add_argument("--allow-eos", action="store_true", help="let completions stop at EOS (default: run to max_new_tokens)")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                        help="write (and reuse, when its config matches) the random checkpoint here instead of a temp dir")
    parser.add_argument("--backends", default=None, metavar="LIST",
                        help="compare model.backend values side by side, e.g. peft,unsloth (same checkpoint, "
                             "seed and shapes; peft runs first)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    return parser


def _add_kernels(sub: Any) -> None:
    p = sub.add_parser(
        "kernels", help="fused log-prob kernels vs. full logits", description=KERNELS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--tokens", type=int, default=None,
                   help="N, tokens per call (default 4096, or fewer so that the methods fit in free memory)")
    p.add_argument("--hidden", type=int, default=2048, help="H, hidden size (default 2048, Qwen2.5-3B)")
    p.add_argument("--vocab", type=int, default=151936, help="V, vocabulary (default 151936, Qwen2.5)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--methods", type=_methods, default=None,
                   help="comma list of naive,torch,triton,liger (default: those that run on the device)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T (default 1.0)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method after the warm-up (default 2)")
    p.add_argument("--entropy", action="store_true", help="also compute per-token entropies (logged, no grad)")
    p.add_argument("--chunk-size", type=int, default=None, help="vocabulary tile for torch/triton (default: auto)")
    p.set_defaults(func=_kernels)


def _bench_root(args: argparse.Namespace) -> int:
    if args.preset is None:
        args.bench_parser.print_help()
        return 2

    from rich.console import Console

    from tinyr1.preset_bench import print_result, run_preset_bench

    console = Console()
    apply_threads(args.threads, auto=False)  # a benchmark measures torch's own default unless told
    knobs = {k: getattr(args, k) for k in ("layers", "hidden", "vision_layers", "vision_hidden", "vocab")}
    bad = [f"--{k.replace('_', '-')}" for k, v in knobs.items() if v is not None and v < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)} must be at least 1")
    common = dict(steps=args.steps, scale=args.scale, knobs=knobs, overrides=args.overrides, device=args.device,
                  seed=args.seed, allow_eos=args.allow_eos, checkpoint_dir=args.checkpoint_dir,
                  on_status=lambda msg: console.print(f"[dim]{msg}[/]"))
    if args.backends is not None:
        from tinyr1.preset_bench import print_comparison, run_backend_comparison

        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        results = run_backend_comparison(args.preset, backends, **common)
        for res in results:
            print_result(res, console)
        print_comparison(results, console)
        payload: Any = [r.to_json() for r in results]
    else:
        result = run_preset_bench(args.preset, **common)
        print_result(result, console)
        payload = result.to_json()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def _available_bytes() -> int:
    """RAM a new allocation can get: Linux MemAvailable (free + reclaimable cache), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _free_bytes(device: Any) -> int:
    """Memory the benchmark may use: free device memory on CUDA, available RAM on the CPU."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return _available_bytes()


def _check_args(args: argparse.Namespace, device: Any, methods: list[str]) -> None:
    from tinyr1.kernels.liger import liger_unavailable_reason
    from tinyr1.kernels.logprob import triton_available

    for name in ("tokens", "hidden", "vocab", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    gpu_only = [m for m in methods if m in ("triton", "liger")]
    if gpu_only and device.type != "cuda":
        raise DeviceError(f"method(s) {', '.join(gpu_only)} need CUDA; this run is on {device}. "
                          "Use --methods naive,torch on the CPU.")
    if "triton" in methods and not triton_available():
        raise DeviceError("method triton needs the triton package: pip install 'tinyr1[kernels]'")
    if "liger" in methods and (reason := liger_unavailable_reason()) is not None:
        raise DeviceError(f"method liger: {reason}")
    naive_bytes = 3 * args.tokens * args.vocab * 4
    if "naive" in methods and device.type == "cpu" and naive_bytes > 0.8 * _available_bytes():
        raise DeviceError(f"naive needs about {naive_bytes / 2**30:.1f} GiB for --tokens {args.tokens}, more than this "
                          f"machine has free ({_available_bytes() / 2**30:.1f} GiB); lower --tokens or drop naive from --methods.")


def _machine(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _kernels(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tinyr1.kernels.bench import OOM, bench_kernels, default_tokens

    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda but CUDA is not available here; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    methods = args.methods or (["naive", "torch", "triton", "liger"] if use_cuda else ["naive", "torch"])
    dtype_name = args.dtype or ("bf16" if use_cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    sized = ""
    if args.tokens is None and args.hidden >= 1 and args.vocab >= 1:
        free = _free_bytes(device)
        args.tokens = default_tokens(methods, args.hidden, args.vocab, dtype, free)
        sized = f" (sized to 80% of {free / 2**30:.1f} GiB free; --tokens to choose)"
    _check_args(args, device, methods)
    console = Console()
    console.print(f"[bold]bench kernels[/]: N={args.tokens}{sized} H={args.hidden} V={args.vocab} {dtype_name} "
                  f"T={args.temperature} entropy={args.entropy} on {_machine(device)}; "
                  f"median of {args.repeats} interleaved runs after 1 warm-up")

    def show(r: BenchResult) -> None:
        if r.error == OOM:
            console.print(f"  {r.method}: out of CUDA memory at N={args.tokens} (lower --tokens to measure it)")
        elif r.seconds is not None and r.peak_bytes is not None:
            console.print(f"  {r.method}: {r.seconds:.3f} s, peak {r.peak_bytes / 2**20:.1f} MiB")

    results = bench_kernels(methods, args.tokens, args.hidden, args.vocab, dtype, device, args.temperature,
                            args.repeats, args.entropy, args.chunk_size, on_result=show)
    console.print(_table(results))
    return 0


def _table(results: list[BenchResult]) -> Table:
    """The results as a rich Table; a failed method (OOM) shows its error, ratios need both runs."""
    from rich.table import Table

    base = next((r for r in results if r.method == "naive" and r.error is None), None)
    table = Table(title="forward + backward of per-token log-probs")
    for col in ("method", "time (s)", "peak memory (MiB)", "time / naive", "naive memory / memory", "max |Δ logp|"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        if r.error is not None:
            table.add_row(r.method, r.error, r.error, "-", "-", "-")
            continue
        table.add_row(
            r.method, f"{r.seconds:.3f}", f"{r.peak_bytes / 2**20:.1f}",
            f"{r.seconds / base.seconds:.2f}x" if base else "-",
            f"{base.peak_bytes / max(r.peak_bytes, 1):.1f}x" if base else "-",
            f"{r.max_abs_diff:.2e}" if r.max_abs_diff is not None else "-",
        )  # fmt: skip
    return table
