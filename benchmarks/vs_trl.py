"""tinyr1 vs TRL's GRPOTrainer: seconds per GRPO step (rollout, update) and peak memory, one run.

Both frameworks train LoRA adapters on the *same* randomly initialized Qwen2-shaped LLM:

- tinyr1 gets a TinyLLaVA-Video checkpoint (tiny frozen SigLIP + resampler connector) whose LLM is
  that Qwen2, and runs its real step: `trainer.rollout_step` + `trainer.update_step` on one
  (random-pixel) video + question. Prompt length = text tokens + video tokens.
- TRL gets the same Qwen2 weights as a plain `Qwen2ForCausalLM` folder and a *text* prompt of exactly
  the same token length (the tinyr1 chat prompt with `<image>` replaced by filler words, trimmed or
  padded to the count), and runs `GRPOTrainer.train()`.

Matched: G, completion length (every completion runs to max_new_tokens: tinyr1's EOS id is set to one
no token has, TRL gets `min_new_tokens = max_completion_length`), one prompt per step, micro-batch,
LoRA (r, alpha, targets), NF4 or none, beta (reference = adapters off in both), loss "grpo",
num_iterations 1, temperature 1, no top-k/top-p, gradient checkpointing, AdamW, lr.

Each framework runs in its own subprocess (fair peak RSS); the parent sends "step" commands to each
in turn, so the two never run at once and a busy machine slows both alike. Per framework: warm-up
steps, one memory step (CPU: `LiveTensorBytes` peak of live tensors during the step + resident
tensors), then timed steps. TRL's rollout = `_generate_and_score_completions` minus the no-grad
log-prob passes inside it (reference/old policy), which tinyr1 counts in its update; timed by a
subclass of GRPOTrainer, no library code is patched. TRL's step = on_step_begin..on_step_end.

    python benchmarks/vs_trl.py                        # CPU defaults
    python benchmarks/vs_trl.py --quant nf4 --json out.json
    python benchmarks/vs_trl.py --device cuda --hidden 2048 --layers 36 --vocab 151936 --video-tokens 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_trl_workers.py beside this file
from vs_trl_workers import MARK, QUESTION, Spec  # noqa: E402

WORKERS = Path(__file__).resolve().parent / "vs_trl_workers.py"

# ---- building the shared model ---------------------------------------------------------------
def write_models(spec: Spec, work: Path) -> Spec:
    """One random TinyLLaVA-Video checkpoint for tinyr1; its LLM saved as a Qwen2 folder for TRL."""
    import torch

    from tinyr1.evaluate import prompt_tensor
    from tinyr1.model.loading import load_tinyllava
    from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
    from tinyr1.model.writing import tiny_config, write_checkpoint
    from tinyr1.tokenizer import build_tiny_tokenizer, load_tokenizer

    tdir, hdir = work / "tinyr1", work / "trl"
    build_tiny_tokenizer(tdir)
    tok = load_tokenizer(tdir)
    if spec.vocab < len(tok):
        raise SystemExit(f"--vocab {spec.vocab} is smaller than the tokenizer ({len(tok)} tokens)")
    raw = tiny_config(spec.vocab, tok.eos_token_id, image_size=spec.image_size, frames=spec.frames)
    raw.update(hidden_size=spec.hidden, group=spec.frames, num_queries=spec.video_tokens, tokenizer_model_max_length=8192)
    raw["text_config"].update(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
        max_position_embeddings=8192, initializer_range=0.02,
    )
    torch.manual_seed(spec.seed)
    model = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False)
    write_checkpoint(tdir, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)
    del model
    llm = load_tinyllava(tdir, dtype="fp32", device="cpu").model.llm  # the exact weights tinyr1 loads
    llm.generation_config.eos_token_id = tok.eos_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    llm.save_pretrained(hdir)
    tok.save_pretrained(hdir)
    ids = prompt_tensor(tok, QUESTION, "train")  # [P] with one -200
    total = ids.numel() - 1 + spec.video_tokens
    text = matched_text_prompt(tok, total)
    return Spec(**{**asdict(spec), "tinyr1_dir": str(tdir), "trl_dir": str(hdir), "prompt_tokens": total,
                   "trl_prompt": text})


def matched_text_prompt(tok: Any, total: int) -> str:
    """tinyr1's chat prompt with `<image>` replaced by filler words, `total` tokens exactly."""
    from tinyr1.prompts import build_prompt, render_chat

    head, tail = render_chat(build_prompt(QUESTION, mode="train")).split("<image>")
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    n = max(total - count(head + tail), 0)
    while True:
        text = head + " red" * n + tail
        got = count(text)
        if got == total:
            return text
        if got > total and n == 0:
            raise SystemExit(f"cannot build a {total}-token text prompt (the bare prompt has {got})")
        n += total - got


# ---- parent: run both, interleaved -----------------------------------------------------------
class Worker:
    def __init__(self, name: str, spec_path: Path, log_path: Path, threads: int) -> None:
        self.name, self.log_path = name, log_path
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKERS), name, str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.flush()
        tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the {self.name} worker stopped (exit {self.proc.wait()}); last log lines:\n{tail}")

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.log.close()


def schedule(warmup: int, timed: int, memory: bool) -> list[str]:
    return ["warmup"] * warmup + (["memory"] if memory else []) + ["timed"] * timed


def run_both(spec: Spec, work: Path, kinds: list[str], names: tuple[str, ...], log_dir: Path) -> dict[str, dict[str, Any]]:
    """Start both workers, then alternate them step by step (who goes first alternates too)."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    workers = {n: Worker(n, spec_path, log_dir / f"vs_trl_{n}.log", spec.threads) for n in names}
    steps: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    info: dict[str, dict[str, Any]] = {}
    try:
        for n, w in workers.items():
            info[n] = w.read()
        for i, kind in enumerate(kinds):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                workers[n].send(kind)
                steps[n].append({"kind": kind, **workers[n].read()})
                print(f"  step {i + 1}/{len(kinds)} ({kind}) {n}: {steps[n][-1]['total']:.2f} s", file=sys.stderr)
        for n, w in workers.items():
            w.send("quit")
            info[n].update(w.read())
    finally:
        for w in workers.values():
            w.close()
    return {n: summarize(steps[n], info[n], spec) for n in names}


def summarize(steps: list[dict[str, Any]], info: dict[str, Any], spec: Spec) -> dict[str, Any]:
    timed = [s for s in steps if s["kind"] == "timed"]
    measured = [s for s in steps if s["kind"] != "warmup" and s["step_peak"] is not None]
    mean = lambda key: sum(s[key] for s in timed) / max(len(timed), 1)  # noqa: E731
    out: dict[str, Any] = {k: mean(k) for k in ("rollout", "update", "total")}
    out["total_std"] = (sum((s["total"] - out["total"]) ** 2 for s in timed) / max(len(timed) - 1, 1)) ** 0.5
    out["total_median"] = statistics.median(s["total"] for s in timed) if timed else float("nan")
    if measured:
        best = max(measured, key=lambda s: s["step_peak"])
        cuda = spec.device.startswith("cuda")
        out["step_peak_bytes"] = best["step_peak"] if not cuda else best["step_peak"] - best["resident"]
        out["resident_bytes"] = best["resident"]
        out["peak_bytes"] = best["step_peak"] if cuda else best["resident"] + best["step_peak"]
    out["peak_rss_bytes"] = info.get("peak_rss")
    out["completion_tokens"] = steps[-1]["completion_tokens"]
    out["prompt_tokens"] = steps[-1]["prompt_tokens"]
    out["steps"] = steps
    return out


def print_table(res: dict[str, dict[str, Any]], spec: Spec) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = lambda b: f"{b / 2**20:,.1f}" if b else "-"  # noqa: E731
    peak_name = "peak GPU alloc (MiB)" if spec.device.startswith("cuda") else "peak tensors (MiB)"
    cols = ["framework", "rollout s/step", "update s/step", "total s/step", "median", peak_name, "of which step", "peak RSS (MiB)",
            "prompt tok", "completion tok"]
    table = Table(title=f"GRPO step, G={spec.group_size}, {spec.max_new_tokens} new tokens, prompt {spec.prompt_tokens} "
                        f"tokens, Qwen2 {spec.hidden}x{spec.layers} vocab {spec.vocab}, LoRA r={spec.lora_r}, "
                        f"quant={spec.quant}, beta={spec.beta}, {spec.device} {spec.dtype}")
    for c in cols:
        table.add_column(c, justify="left" if c == "framework" else "right")
    for n, r in res.items():
        table.add_row(n, f"{r['rollout']:.3f}", f"{r['update']:.3f}", f"{r['total']:.3f} ± {r['total_std']:.3f}",
                      f"{r['total_median']:.3f}",
                      mib(r.get("peak_bytes")), mib(r.get("step_peak_bytes")), mib(r["peak_rss_bytes"]),
                      str(r["prompt_tokens"]), f"{r['completion_tokens']:.1f}")
    if len(res) == 2:
        a, b = res["tinyr1"], res["trl"]
        ratio = lambda k: f"{b[k] / a[k]:.2f}x" if a.get(k) and b.get(k) else "-"  # noqa: E731
        table.add_row("TRL / tinyr1", ratio("rollout"), ratio("update"), ratio("total"), ratio("total_median"),
                      ratio("peak_bytes"),
                      ratio("step_peak_bytes"), ratio("peak_rss_bytes"), "", "")
    Console(width=max(Console().width, 150)).print(table)


def markdown_table(res: dict[str, dict[str, Any]]) -> str:
    """The same numbers as a Markdown table, for docs/BENCHMARKS.md."""
    mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"  # noqa: E731
    lines = ["| framework | rollout s/step | update s/step | total s/step (mean ± sd) | median | peak tensors (MiB) "
             "| of which step | peak RSS (MiB) |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for n, r in res.items():
        lines.append(f"| {n} | {r['rollout']:.2f} | {r['update']:.2f} | {r['total']:.2f} ± {r['total_std']:.2f} | "
                     f"{r['total_median']:.2f} | {mib(r.get('peak_bytes'))} | {mib(r.get('step_peak_bytes'))} | "
                     f"{mib(r['peak_rss_bytes'])} |")
    if len(res) == 2:
        a, b = res["tinyr1"], res["trl"]
        q = [f"{b[k] / a[k]:.2f}x" if a.get(k) and b.get(k) else "-" for k in
             ("rollout", "update", "total", "total_median", "peak_bytes", "step_peak_bytes", "peak_rss_bytes")]
        lines.append("| **TRL / tinyr1** | " + " | ".join(f"**{x}**" for x in q) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="cpu", choices=["cpu", "cuda"])
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on cuda, fp32 on cpu")
    a("--hidden", type=int, default=256)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=2)
    a("--intermediate", type=int, default=None, help="default: 5.375 x hidden (Qwen2.5's ratio)")
    a("--vocab", type=int, default=8192, help="Qwen2.5: 151936")
    a("--frames", type=int, default=16)
    a("--video-tokens", type=int, default=256, help="tinyr1 video tokens (Q); the real model has 512")
    a("--image-size", type=int, default=32)
    a("-G", "--group-size", type=int, default=8)
    a("--max-new-tokens", type=int, default=64)
    a("--micro-batch", type=int, default=8, help="completions per forward/backward (must divide G)")
    a("--lora-r", type=int, default=16)
    a("--lora-alpha", type=float, default=32.0)
    a("--quant", default="none", choices=["none", "nf4"])
    a("--beta", type=float, default=0.01)
    a("--no-gradient-checkpointing", dest="gc", action="store_false")
    a("--lr", type=float, default=1e-5)
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1,
      help="CPU: torch threads per worker (0 = torch default). 1 is robust on a shared machine: with several "
           "threads, another process's load stalls OpenMP barriers and makes step times erratic")
    a("--warmup", type=int, default=1)
    a("--steps", type=int, default=4, help="timed steps per framework")
    a("--no-memory-step", dest="memory", action="store_false", help="CPU: skip the live-tensor tracked step")
    a("--frameworks", default="tinyr1,trl")
    a("--json", default=None, help="write the results here")
    a("--markdown", action="store_true", help="also print the table as Markdown")
    a("--log-dir", default=None, help="keep the workers' logs here (env VS_TRL_RECORD=1: what the memory peak holds)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.group_size % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide -G {args.group_size}")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")
    memory = args.memory and args.device == "cpu"
    kinds = schedule(args.warmup, args.steps, memory)
    inter = args.intermediate or int(math.ceil(args.hidden * 5.375 / 64) * 64)
    spec = Spec(args.device, dtype, args.hidden, args.layers, args.heads, args.kv_heads, inter, args.vocab, args.frames,
                args.video_tokens, args.image_size, args.group_size, args.max_new_tokens, args.micro_batch, args.lora_r,
                args.lora_alpha, args.quant, args.beta, args.gc, args.lr, args.seed, len(kinds),
                args.threads if args.device == "cpu" else 0)
    names = tuple(n for n in args.frameworks.split(",") if n)
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        spec = write_models(spec, Path(tmp))
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        res = run_both(spec, Path(tmp), kinds, names, log_dir)
    print_table(res, spec)
    if args.markdown:
        print(markdown_table(res))
    if args.json:
        load = os.getloadavg()
        meta = {"spec": {k: v for k, v in asdict(spec).items() if not k.endswith("_dir")}, "loadavg": load,
                "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.json).write_text(json.dumps({**meta, "results": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
