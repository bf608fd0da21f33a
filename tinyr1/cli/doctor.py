"""`tinyr1 doctor`: check this machine before training on it.

Prints the environment (Python, torch and its CUDA build, driver, GPU, memory, compute capability,
bf16, and the versions of the packages training uses), then runs short self-tests, each PASS, FAIL
or SKIP with the reason. The GPU-only fast paths (compiled Triton kernels, bitsandbytes' CUDA
matmuls, liger, the paged optimizer) are compared with their references there; two real GRPO steps
of a tiny random model run on the device and their measured memory is set beside the planner's.
On a CPU the checks that need CUDA SKIP and say so. Exit status 1 when any check FAILs.
"""

from __future__ import annotations

import argparse

ORDER = 85

EPILOG = """\
examples:
  tinyr1 doctor
      everything (under 2 minutes on a GPU; ~15 s on a CPU, where the GPU checks SKIP)
  tinyr1 doctor --json doctor.json
      also save the environment and every result as JSON (attach it to a bug report)
  tinyr1 doctor --only nf4,grpo
      rerun some checks

checks, in order:
  nf4             bitsandbytes NF4 matmul (1 row: the 4-bit gemv path; 8 rows) and its input gradient,
                  built by tinyr1's own loader, vs x @ dequantize(W)^T
  logprob-triton  the compiled Triton log-prob kernels, forward and backward, vs the torch path
                  (CUDA; the Triton interpreter is for the tests and never runs here)
  liger           liger-kernel RMSNorm + SwiGLU patched into a tiny Qwen2: logits and gradients (CUDA)
  adamw8bit       3 steps of bitsandbytes' 8-bit AdamW (paged on CUDA) vs torch AdamW
  grpo            2 GRPO steps of a tiny random TinyLLaVA-Video on this device, set up as the GPU
                  presets are (NF4, LoRA, trained connector, KL reference, checkpointing, 8-bit AdamW)
  memory          one more step measured (CUDA: max_memory_allocated; CPU: live tensor bytes) beside
                  `tinyr1 plan`'s estimate for the same shapes
  preset          the GPU preset `--preset auto` would pick on this card (CUDA)

A FAIL says what differed and by how much. Missing optional packages (triton, liger-kernel) SKIP:
training then falls back to the torch paths. A missing bitsandbytes is a FAIL: the 4-bit LLM and the
8-bit optimizer need it (benchmarks/README.md: installing on a GPU machine without a network).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check the environment and the GPU paths (kernels, 4-bit, optimizer, two GRPO steps)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the environment and results as JSON")
    p.add_argument("--only", metavar="NAMES", default=None, help="comma list of checks to run (default: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tinyr1.doctor import CHECK_NAMES, run_checks, summary, to_json
    from tinyr1.environment import environment
    from tinyr1.errors import ConfigError

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    unknown = sorted(set(only or ()) - set(CHECK_NAMES))
    if unknown:
        raise ConfigError(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECK_NAMES)}")
    console = Console()
    env = environment()
    table = Table(title="tinyr1 doctor: environment", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in env:
        table.add_row(what, escape(value))
    console.print(table)

    with console.status("") as status:
        results = run_checks(only, on_start=lambda name: status.update(f"running check {name} ..."))
    colour = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    checks = Table(title="self-tests", title_justify="left")
    for col, kw in (("check", {}), ("status", {}), ("s", {"justify": "right"}), ("detail", {})):
        checks.add_column(col, **kw)
    for r in results:
        checks.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", f"{r.seconds:.1f}", escape(r.detail))
    console.print(checks)
    failed = any(r.status == "FAIL" for r in results)
    console.print(("[bold red]" if failed else "[green]") + escape(summary(results)) + "[/]")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_json(results, env), indent=2) + "\n")
        console.print(f"wrote {path}")
    return 1 if failed else 0
