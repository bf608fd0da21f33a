"""Seconds per GRPO step of the tiny preset on the CPU: one process vs data-parallel ranks (torchrun).

Three launches of the same run (the tiny preset's model, data and shapes: 8 prompts x G = 8, 16 new
tokens, 8 frames, written to .tinyr1_cache/bench_ddp/ by the first launch; no cold start, no
evaluation, so every completion runs to 16 tokens and every step does the same work), each on the
same number of cores:

  plain      tinyr1 train --threads T                           one process, T threads
  torchrun1  torchrun --nproc_per_node 1 -m tinyr1 train --threads T      the same with per-prompt sampling
  torchrunN  torchrun --nproc_per_node N -m tinyr1 train --threads T/N   N ranks, T/N threads each

The time per step is the median of `step_time` in metrics.jsonl over the steps after `--warmup`
(under torchrun, the slowest rank's); rollout and update are the medians of their parts. It needs
a quiet machine: other work on the cores changes the result more than the launch does.

    python benchmarks/ddp.py                       # 2 cores: 1 x 2 threads vs 2 ranks x 1 thread
    python benchmarks/ddp.py --steps 6 --warmup 2  # a quick check that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ".tinyr1_cache/bench_ddp"  # its own tiny model and 64 clips, made by the first launch
SETS = ["coldstart.enabled=false", "data.eval=none", "train.eval_every=0", "train.save_every=0",
        "log.progress=false", "log.completions_every=0", f"model.path={CACHE}/model",
        f"data.train={CACHE}/data/train.jsonl", f"data.coldstart={CACHE}/data/coldstart.json",
        f"data.video_root={CACHE}/data", "data.synth_n=64",
        "data.synth_eval_n=0"]


def launch(kind: str, ranks: int, threads: int, steps: int, out: Path) -> tuple[list[str], float]:
    """Run one launch; (its command line, wall seconds)."""
    train = ["-m", "tinyr1", "train", "--preset", "tiny", "--threads", str(threads),
             *[a for s in [*SETS, f"train.steps={steps}", f"train.output_dir={out}"] for a in ("--set", s)]]
    if kind == "plain":
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *train]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return cmd, time.perf_counter() - t0


def medians(out: Path, warmup: int) -> tuple[float, float, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    if not rows:
        raise SystemExit(f"{out}: no step after the {warmup} warm-up steps; raise --steps")
    return tuple(statistics.median(r[k] for r in rows) for k in ("step_time", "time/rollout", "time/update"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2, help="threads in all (default 2)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel launch (default 2)")
    p.add_argument("--steps", type=int, default=20, help="GRPO steps per launch (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median (default 3)")
    args = p.parse_args()
    if args.cores % args.ranks:
        raise SystemExit(f"--cores {args.cores} must divide by --ranks {args.ranks}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, ranks, threads in (("plain", 1, args.cores), ("torchrun", 1, args.cores),
                                     ("torchrun", args.ranks, args.cores // args.ranks)):
            out = Path(tmp) / f"{kind}{ranks}"
            cmd, wall = launch(kind, ranks, threads, args.steps, out)
            step, rollout, update = medians(out, args.warmup)
            label = f"{'tinyr1 train' if kind == 'plain' else f'torchrun --nproc_per_node {ranks}'}, {ranks} x {threads} thread(s)"
            rows.append((label, step, rollout, update, wall))
    base = rows[0][1]
    print(f"### Data-parallel on the CPU ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores seen, load average {os.getloadavg()[0]:.1f} at the end)\n")
    print(f"`python benchmarks/ddp.py --cores {args.cores} --ranks {args.ranks} --steps {args.steps} "
          f"--warmup {args.warmup}` (torch {torch.__version__}); tiny preset, 8 prompts x G = 8, 16 new tokens, "
          f"median over steps {args.warmup + 1}-{args.steps}\n")
    print("| launch | s/step | rollout | update | vs one process | wall (s, with start-up) |")
    print("|---|--:|--:|--:|--:|--:|")
    for label, step, rollout, update, wall in rows:
        print(f"| {label} | {step:.2f} | {rollout:.2f} | {update:.2f} | {base / step:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
