"""`tinyr1 plan`: will this preset fit my GPU, and where does the memory go?

An analytic estimate of the peak GPU memory of the rollout phase (video encoding, prefill, decoding
with the KV cache of B x G rows) and of the update phase (checkpointed forward/backward of one
micro-batch, fused log-probs), by component, before anything is loaded. `tinyr1 train` runs the
same check and refuses a preset that cannot fit.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

ORDER = 15

EPILOG = """\
examples:
  tinyr1 plan --preset 12gb
      the table for the 12 GB preset, checked against a 12 GB card
  tinyr1 plan --preset 8gb --set rollout.num_generations=64
      an impossible override: "does not fit", with the cheapest changes that would fit
  tinyr1 plan --preset 24gb --gpu-gb 16 --set rollout.max_new_tokens=384
      would the 24 GB recipe fit a 16 GB card with shorter completions?
  tinyr1 plan --config my.toml --gpu-gb 11 --prompt-tokens 220
  tinyr1 plan --preset auto
      the largest GPU preset that fits this machine's GPU, and why
  tinyr1 plan --preset auto --gpu-gb 12
      the same choice for a 12 GiB card (no GPU needed)
  tinyr1 plan --preset 24gb --gpus 4
      per-GPU memory of a data-parallel run on 4 GPUs (torchrun): each rolls out and updates 2 of the 8
      prompts per step

How to read it: each phase's peak is the largest of a few moments (rollout: encode a video,
prefill, decode; update: log-prob forward/backward, backward through one checkpointed layer,
connector backward, reference forward). The numbers are tensor bytes (what
torch.cuda.max_memory_allocated reports) plus two modelled overheads: allocator fragmentation
(~12%) and the CUDA context (~0.5 GiB). "fits" leaves 10% of the card free (display, other
processes). Completions are assumed to run to max_new_tokens (the worst case). The activation
model is checked against measured live tensor bytes on the CPU (tests/test_memory.py).

--preset auto plans every GPU preset (24gb, 16gb, 12gb, 8gb, with your --set values) against the
card (--gpu-gb, or the GPU torch sees) and takes the largest that needs at most 75% of it, the
headroom the presets are sized with (failing that, the largest that 'fits').
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="estimate peak GPU memory of a preset, by component, and whether it fits",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="preset name (see `tinyr1 presets list`), or auto: the largest that fits the GPU")
    src.add_argument("--config", help="path to a TOML config")
    p.add_argument("--gpu-gb", type=float, default=None, metavar="N",
                   help="card size in GiB (default: from the preset name, e.g. 12gb -> 12)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="data-parallel GPUs (torchrun --nproc_per_node x nodes): memory is per GPU, each holding "
                   "rollout.prompts_per_step / N prompts (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=160, metavar="N",
                   help="text tokens per prompt: template + question + options + suffix (default 160)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value, same spelling as the TOML (repeatable)")
    p.set_defaults(func=run)


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n / 1024:.1f} KiB"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinyr1.config_io import load_config
    from tinyr1.distributed import check_prompts_divisible
    from tinyr1.errors import ConfigError
    from tinyr1.memory import GiB, advise, arch_for_config, estimate, gib, need_bytes, nominal_gpu_gb, verdict
    from tinyr1.memory_arch import MARGIN, RunShape

    if args.prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    console = Console()
    preset, gpu_gb = args.preset, args.gpu_gb
    if preset == "auto":
        gpu = int(gpu_gb * GiB) if gpu_gb is not None else None
        preset, card_bytes = resolve_auto_preset(args.overrides, console, gpu_bytes=gpu)
        gpu_gb = card_bytes / GiB  # judge against the card that was detected, not the preset's name
    cfg = load_config(args.config or preset, args.overrides)
    check_prompts_divisible(cfg.rollout.prompts_per_step, args.gpus)
    arch, shape = arch_for_config(cfg), RunShape.from_config(cfg, args.prompt_tokens, gpus=args.gpus)
    est = estimate(arch, shape)
    per_gpu = f" per GPU ({cfg.rollout.prompts_per_step} over {args.gpus} GPUs)" if args.gpus > 1 else ""
    title = (f"{cfg.preset}: B={shape.prompts} prompts{per_gpu} x G={shape.group_size}, {shape.frames} frames, "
             f"{shape.max_new_tokens} new tokens, micro-batch {shape.micro_batch}, LoRA r={shape.lora_r}, "
             f"{shape.quant}/{shape.dtype} on {shape.device}")
    if shape.backend != "peft" or shape.grad_checkpointing == "offload":
        title += f", backend {shape.backend}" + (", offloaded checkpoints" if shape.grad_checkpointing == "offload" else "")
    if cfg.model.dtype == "auto" and shape.device == "cuda":
        title += " (dtype auto: bf16 where the GPU supports it, else fp16 with loss scaling, the same bytes)"
    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column(f"rollout ({est.rollout_moment})", justify="right")
    table.add_column(f"update ({est.update_moment})", justify="right")
    table.add_column("note", style="dim")
    for kind in ("weights", "state", "kept", "activation"):
        for ln in (x for x in est.lines if x.kind == kind):
            table.add_row(ln.name, _fmt(ln.rollout), _fmt(ln.update), ln.note)
        table.add_section()
    table.add_row("[bold]tensors (peak allocated)", _fmt(est.phase_total("rollout")), _fmt(est.phase_total("update")), "")
    for ln in (x for x in est.lines if x.kind == "overhead"):
        table.add_row(ln.name, _fmt(ln.rollout), _fmt(ln.update), ln.note)
    all_kinds = ("weights", "state", "kept", "activation", "overhead")
    table.add_row("[bold]total", _fmt(est.phase_total("rollout", all_kinds)),
                  _fmt(est.phase_total("update", all_kinds)), "")
    host = [x for x in est.lines if x.kind == "host"]
    if host:
        table.add_section()
        for ln in host:  # not GPU memory: beside the total, not in it
            table.add_row(ln.name, _fmt(ln.rollout), _fmt(ln.update), ln.note)
    console.print(table)
    need = need_bytes(est)
    gpu_gb = gpu_gb if gpu_gb is not None else nominal_gpu_gb(cfg.preset)
    if shape.device == "cpu":
        console.print(f"peak {gib(need)} of CPU memory for tensors (device = cpu: no GPU check)")
        return 0
    if gpu_gb is None:
        console.print(f"needs {gib(need)}; pass --gpu-gb N for a verdict")
        return 0
    card = int(gpu_gb * GiB)
    result = verdict(need, card)
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}[result]
    console.print(f"[bold {colour}]{result}[/]: needs {gib(need)} of a {gpu_gb:g} GiB card{' on each GPU' if args.gpus > 1 else ''} "
                  f"({need / card:.0%}; 'fits' means <= {1 - MARGIN:.0%})")
    if args.gpus > 1:
        console.print("  data-parallel: NCCL's own communication buffers (outside PyTorch's allocator, usually "
                      "well under 1 GiB) are not counted; the gradient all-reduce runs after the backward, "
                      "in 64 MB buckets, below the update's peak")
    if result != "fits":
        fixes = advise(arch, shape, card)
        if not fixes:
            console.print("no change of G, frames, new tokens, micro-batch, LoRA rank or prompts makes it fit")
        for fix in fixes:
            console.print(f"  {fix.flags(args.gpus)}   -> {gib(fix.need)}")
    return 0


def resolve_auto_preset(overrides: list[str], console: Console, gpu_bytes: int | None = None) -> tuple[str, int]:
    """`--preset auto` -> (the largest GPU preset the planner fits on the card, the card's bytes),
    printing why. The card is `gpu_bytes`, else CUDA device 0's total memory; no CUDA is a
    DeviceError (with the CPU demo's name), a card too small for every preset a ConfigError."""
    from tinyr1.errors import ConfigError, DeviceError
    from tinyr1.memory import PRESET_BUDGET, GiB, auto_preset

    label = f"{gpu_bytes / GiB:.1f} GiB (given)" if gpu_bytes is not None else ""
    if gpu_bytes is None:
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(
                "--preset auto picks a preset for this machine's GPU, but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). On a CPU, run the "
                "demo with --preset tiny; to plan for a card you do not have, pass --preset NAME --gpu-gb N "
                "(`tinyr1 plan --preset auto --gpu-gb N` picks for a card of N GiB); `tinyr1 doctor` checks the setup."
            )
        props = torch.cuda.get_device_properties(0)
        gpu_bytes = int(props.total_memory)
        label = f"{props.name}, {gpu_bytes / GiB:.1f} GiB"
    name, reasons = auto_preset(gpu_bytes, overrides)
    if name is None:
        raise ConfigError(
            f"--preset auto: no GPU preset fits {label}: " + "; ".join(reasons)
            + ". `tinyr1 plan --preset 8gb` lists the cheapest changes that would fit."
        )
    console.print(f"auto: {label}: {reasons[-1].removesuffix(' -> chosen')}", highlight=False, soft_wrap=True)
    for line in reasons[:-1]:  # the larger presets, and why not
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    if "but above" in reasons[-1]:
        console.print(f"[yellow]auto: {name} needs more than the {PRESET_BUDGET:.0%} of the card the presets are "
                      f"sized for; watch the first steps' memory (`tinyr1 plan --preset {name}` shows where it goes)[/]")
    return name, gpu_bytes
