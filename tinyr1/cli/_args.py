"""Arguments shared by several commands (`eval`, `generate`, `train`, `bench`), spelled once."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --adapter: what to load."""
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (original layout)")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder (RUN/final), applied unmerged")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Greedy by default; sampling knobs and the prompt variant."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="top-k when sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold when sampling (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--prompt", default="eval", choices=["eval", "train"],
                   help="eval: the R1 instruction on its own line (default); train: the GRPO training prompt")


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """How to load: 4-bit or not, dtype, device."""
    p.add_argument("--quant", default="none", choices=["none", "nf4"], help="load the LLM in 4-bit (GPU memory)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads: torch's CPU threads (a 2-thread process can stall behind other work on 2 cores)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: one per core that other processes leave free, from the "
                   "load average; OMP_NUM_THREADS is respected)")


def apply_threads(threads: int | None, *, auto: bool = True) -> str:
    """Give torch `threads` CPU threads, or (`auto`) the load-aware default of `tinyr1.cpu`;
    returns a line for the console when the choice is not torch's own ("" otherwise)."""
    import torch

    from tinyr1.cpu import choose_threads

    if threads is None and not auto:
        return ""
    chosen, why = choose_threads(threads, torch.get_num_threads())
    if chosen is not None:
        torch.set_num_threads(chosen)
    return why
