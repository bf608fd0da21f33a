"""`tinyr1 train`: cold start + GRPO from a preset or TOML, or resume a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from tinyr1.cli._args import add_threads_arg, apply_threads

if TYPE_CHECKING:
    from rich.console import Console

    from tinyr1.config import Config

ORDER = 10
EXIT_SIGNAL_BASE = 128  # stopped by signal N after saving a checkpoint: exit 128 + N (130 SIGINT, 143 SIGTERM)

EPILOG = """\
examples:
  tinyr1 train --preset tiny
      CPU demo: makes a tiny random checkpoint + synthetic videos, cold start, GRPO, evaluation
      (a few minutes on 2 cores; add --threads 1 when the machine is busy with other work)
  tinyr1 train --preset tiny-video
      CPU demo of video reasoning: which colour came first / last, which no single frame tells;
      prints held-out accuracy per question category before and after GRPO (under 10 minutes)
  tinyr1 train --preset 24gb --set data.train=nextqa_0-30s.jsonl --set data.video_root=videos/
      the paper's recipe with LoRA on one 24 GB GPU
  tinyr1 train --config my.toml --set rollout.num_generations=4 --set train.lr=2e-5
      a TOML of your own (it may start with base = "16gb" to inherit a preset)
  tinyr1 train --preset auto --set data.train=nextqa_0-30s.jsonl --set data.video_root=videos/
      the largest GPU preset the memory planner fits on this GPU (printed with the reason)
  tinyr1 train --resume runs/24gb-20261125-101500
      continue a stopped run exactly where its last checkpoint left it
  torchrun --nproc_per_node 4 -m tinyr1 train --preset 24gb --set data.train=...
      data-parallel on 4 GPUs: the same update as one GPU running all rollout.prompts_per_step
      prompts (README, "More than one GPU")

A run folder holds run.json (the run's id), config.toml (fully resolved), metrics.jsonl,
completions.jsonl, eval.jsonl, checkpoints/step-N/ and final/ (the LoRA adapter for `tinyr1 eval` /
`tinyr1 merge`). A fresh run needs a new or empty train.output_dir: an old run there is continued
with --resume or replaced with --force.
Ctrl-C finishes the current step, saves a checkpoint and exits; `--resume` continues.

exit status: 0 finished; 2 bad input, a refused folder or a full disk (the message says which and
the fix); 130 (SIGINT, Ctrl-C) or 143 (SIGTERM) stopped by that signal after saving a checkpoint,
resumable; 1 an internal error (a bug: please report it with the traceback).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="run cold-start SFT + GRPO (or resume a run)", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="preset name (see `tinyr1 presets list`), or auto: the largest GPU preset "
                     "the memory planner fits on this GPU")
    src.add_argument("--config", help="path to a TOML config")
    src.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value, same spelling as the TOML (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="start over in a train.output_dir that holds an old run: deletes that run's checkpoints, logs "
                   "and final adapter (without it a fresh run needs a new or empty folder)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the memory planner's check that the run fits the GPU (see `tinyr1 plan`)")
    p.add_argument("--rewards-path", action="append", default=[], metavar="DIR",
                   help="a folder custom reward modules (\"module:function\" in [rewards]) are imported from "
                   "(repeatable; the --config file's folder is searched too, never the working directory)")
    p.add_argument("--trust-rewards", action="store_true",
                   help="run custom reward modules from files or folders another user owns or can write "
                   "(e.g. resuming someone else's run folder); they are refused without it")
    add_threads_arg(p)
    p.set_defaults(func=run)


def check_custom_rewards(cfg: Config, search: list[Path], *, trust: bool, console: Console,
                         run_files: tuple[Path, ...] = ()) -> None:
    """Print the file of every custom reward before anything runs; refuse files the user did not
    write (another owner, or writable by others; on --resume also another user's run folder)
    without --trust-rewards. See tinyr1.reward_modules."""
    from tinyr1.errors import RewardError
    from tinyr1.reward_modules import describe, locate_all, untrusted_reasons

    found = locate_all(cfg.rewards.weights, search)
    if not found:
        return
    for line in describe({name: file for name, (file, _) in found.items()}):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    reasons = untrusted_reasons([file for file, _ in found.values()], dict(found.values()), run_files)
    if reasons and not trust:
        shown = "\n  ".join(reasons[:8])
        raise RewardError(
            f"custom reward code from a place you did not write would run in this process:\n  {shown}\n"
            "read the module(s) above; if you trust them, run again with --trust-rewards"
        )


def _check_memory(cfg: Config, no_check: bool) -> None:
    """Refuse a GPU run the planner says cannot fit, before any weights load (CPU runs are not checked)."""
    from tinyr1.memory import GiB, check_fits, nominal_gpu_gb

    if no_check or cfg.model.device == "cpu":
        return
    import torch

    from tinyr1 import distributed as dist

    if torch.cuda.is_available():  # this rank's own GPU (torchrun: LOCAL_RANK)
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        gb = nominal_gpu_gb(cfg.preset)
        if gb is None:
            return
        gpu = int(gb * GiB)
    check_fits(cfg, gpu, gpus=dist.world_size())  # each rank rolls out and updates its share of the prompts


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tinyr1 import distributed as dist
    from tinyr1.config_io import load_config, resolve_output_dir
    from tinyr1.device import configure_cuda_allocator
    from tinyr1.errors import ConfigError
    from tinyr1.reward_modules import search_folders
    from tinyr1.runfolder import check_fresh, read_identity
    from tinyr1.session import train
    from tinyr1.storage import check_writable

    console = Console()
    allocator = configure_cuda_allocator()  # before anything initializes CUDA
    threads_note = apply_threads(args.threads)  # load-aware default: a busy CPU slows, never stalls, a run
    if dist.init_from_env() and not dist.is_main():  # under torchrun: rank 0 speaks for the run
        console = Console(quiet=True)
    if threads_note:
        console.print(threads_note, highlight=False)
    if torch.cuda.is_available():
        console.print(allocator)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.toml there; pass a run folder written by `tinyr1 train`")
        if args.overrides or args.force:
            raise ConfigError("--resume continues a run with its stored config; --set and --force cannot be "
                              "combined with it")
        cfg = load_config(str(run_dir / "config.toml"))
        recorded = read_identity(run_dir).reward_files.values()
        search = search_folders(str(run_dir / "config.toml"), args.rewards_path, recorded)
        check_custom_rewards(cfg, search, trust=args.trust_rewards, console=console,
                             run_files=(run_dir / "config.toml", run_dir / "run.json"))
        dist.main_first(lambda: prepare_demo_assets(cfg, console))  # first: the planner then sizes the tiny model
        _check_memory(cfg, args.no_check)
        out = train(cfg, resume=run_dir, console=console, rewards_path=search)
    else:
        source = args.config or args.preset
        if args.preset == "auto":
            from tinyr1.cli.plan import resolve_auto_preset

            source, _ = resolve_auto_preset(args.overrides, console)
        if source is None:
            raise ConfigError("say what to train: --preset NAME (e.g. --preset tiny), --config FILE or --resume RUN_DIR")
        cfg = dist.broadcast_object(resolve_output_dir(load_config(source, args.overrides)))  # rank 0's {time}

        def checks() -> None:  # before anything is made or loaded
            check_fresh(Path(cfg.train.output_dir), force=args.force)
            check_writable(Path(cfg.train.output_dir), "train.output_dir")

        dist.main_first(checks)
        search = search_folders(args.config, args.rewards_path)
        check_custom_rewards(cfg, search, trust=args.trust_rewards, console=console)
        dist.main_first(lambda: prepare_demo_assets(cfg, console))  # first: the planner then sizes the tiny model
        _check_memory(cfg, args.no_check)
        out = train(cfg, console=console, force=args.force, rewards_path=search)
    from tinyr1.trainer import StopFlag

    if StopFlag.received is not None:  # stopped by a signal, checkpoint saved: say so in the exit status
        console.print(f"run folder: {out} (stopped by signal {StopFlag.received}; continue with --resume {out})")
        return EXIT_SIGNAL_BASE + StopFlag.received
    print_eval_summary(out, min(cfg.train.eval_samples, cfg.rollout.num_generations), console)
    console.print(f"run folder: {out}")
    return 0


def prepare_demo_assets(cfg: Config, console: Console) -> None:
    """The tiny demo's inputs, made on first use as `tinyr1 init-tiny` and `tinyr1 data synth` make
    them: a random checkpoint when `model.synth` is set and `model.path` has none, synthetic clips
    when `data.synth` is set and `data.train` does not exist yet. Every path is checked before
    anything is written, and nothing is written over an existing file (`synth.synthetic_target`)."""
    from tinyr1.errors import ConfigError
    from tinyr1.model.writing import write_tiny_checkpoint
    from tinyr1.synth import synthetic_target, write_synthetic

    size = cfg.video.image_size or 32
    d = cfg.data
    data_dir = synthetic_target({"train": d.train, "eval": d.eval, "coldstart": d.coldstart},
                                d.video_root) if d.synth else None
    model_dir = Path(cfg.model.path)
    make_model = cfg.model.synth and not (model_dir / "config.json").is_file()
    if make_model and (model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir()))):
        raise ConfigError(
            f"model.path = {cfg.model.path!r} holds files but no config.json, and model.synth = true would write a "
            "tiny random checkpoint there: a typo? Nothing was written. Fix: point model.path at a checkpoint "
            "folder or a new folder, or set model.synth = false"
        )
    if make_model:
        console.print(f"creating a tiny random TinyLLaVA-Video checkpoint at {cfg.model.path}")
        write_tiny_checkpoint(cfg.model.path, seed=cfg.data.synth_seed, frames=cfg.video.num_frames, image_size=size)
    if data_dir is not None:
        console.print(f"writing {d.synth_n} synthetic training clips (+{d.synth_eval_n} held out) to {data_dir}")
        write_synthetic(data_dir, d.synth_n, d.synth_seed, frames=cfg.video.num_frames, size=size,
                        eval_n=d.synth_eval_n, tasks=d.synth_tasks, coldstart_n=d.synth_coldstart_n)


def print_eval_summary(run_dir: Path, samples: int, console: Console) -> None:
    """Held-out accuracy at the first and last evaluation (after cold start, after GRPO), side by
    side, with standard errors; `samples` completions per clip made the sampled accuracy."""
    from rich.table import Table

    from tinyr1.cli.report import category_table
    from tinyr1.log import read_eval

    rows = read_eval(run_dir)
    if len(rows) < 2:
        return
    first, last = rows[0], rows[-1]
    table = Table(title=f"held-out accuracy ({int(last.get('n', 0))} clips)")
    for col in ("", "greedy", f"sampled (T, {samples} per clip)", "format"):
        table.add_column(col)
    for name, r in ((f"after cold start (step {first['step']})", first), (f"after GRPO (step {last['step']})", last)):
        sampled_se = f" ± {r['sampled_accuracy_stderr']:.3f}" if "sampled_accuracy_stderr" in r else ""
        table.add_row(name, f"{r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f}", f"{r['sampled_accuracy']:.3f}{sampled_se}",
                      f"{r['format_rate']:.3f}")
    table.add_row("GRPO gain", f"{last['accuracy'] - first['accuracy']:+.3f}",
                  f"{last['sampled_accuracy'] - first['sampled_accuracy']:+.3f}", "")
    console.print(table)
    category_table(rows, console)
