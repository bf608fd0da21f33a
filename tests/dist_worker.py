"""What each rank runs in tests/test_distributed.py: `torchrun --nproc-per-node N tests/dist_worker.py
SCENARIO ASSETS OUT`, and the config the runs train with.

Scenarios: `equivalence` (2 GRPO steps for each loss type), `resume` (4 steps straight; 2, stop,
resume, 2). Each rank joins the group through
`tinyr1.distributed.init_from_env`, as `tinyr1 train` does under torchrun. `failing_reward` is the
reward that makes rank 1 fail in the CLI test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from tinyr1 import distributed as dist
from tinyr1.config_io import load_config
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.synth import write_synthetic

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Varied so each loss type also covers another part of the step: whole-batch reward scaling,
# gradient clipping at the global norm, no KL, two optimizer steps per rollout.
LOSS_EXTRA = {
    "grpo": ("grpo.scale_rewards=batch",),
    "bnpo": ("train.max_grad_norm=0.05",),
    "dr_grpo": ("grpo.beta=0",),
    "dapo": ("grpo.num_iterations=2", "grpo.epsilon_high=0.28"),
}
BAD_ID = "train_bad"  # an unreadable clip in the training set: the ranks must agree to skip it
BAD_ROW = 6  # train.seed 0 draws row 6 third: rank 0's slot, and the skip shifts a sample onto rank 1


def write_assets(root: Path) -> Path:
    """A tiny checkpoint, 24 synthetic clips plus one unreadable one (drawn in step 1), and
    cold-start answers cut to `<answer>X</answer>`: a few SFT steps then make completions end at
    different lengths, so the ranks' token counts differ (a random model almost never ends one)."""
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 24, seed=1, frames=4, size=32, eval_n=6, coldstart_n=8)
    coldstart = root / "data" / "coldstart.json"
    rows = json.loads(coldstart.read_text())
    for row in rows:
        answer = row["conversations"][1]["value"]
        row["conversations"][1]["value"] = answer[answer.index("<answer>"):]
    coldstart.write_text(json.dumps(rows))
    (root / "data" / "videos" / "bad.mp4").write_bytes(b"not a video" * 10)
    train = root / "data" / "train.jsonl"
    rows = train.read_text().splitlines()
    bad = dict(json.loads(rows[0]), id=BAD_ID, video_filename="./videos/bad.mp4")
    rows.insert(BAD_ROW, json.dumps(bad))
    train.write_text("\n".join(rows) + "\n")
    _cold_started_checkpoint(root)
    return root


def _cold_started_checkpoint(root: Path) -> None:
    """root/model_cs: root/model after 6 cold-start steps on those short answers, merged, so that
    every run starts from a model that ends its completions at different lengths without repeating
    the cold start."""
    from rich.console import Console

    from tinyr1.checkpoint import save_adapter
    from tinyr1.coldstart import run_coldstart
    from tinyr1.context import build_context, frames_loader, load_split
    from tinyr1.merge import merge_adapter

    cfg = config(root, root / "unused", f"model.path={root / 'model'}", "coldstart.enabled=true", "coldstart.steps=6")
    ctx = build_context(cfg, total_steps=1)
    run_coldstart(ctx, load_split(cfg, cfg.data.coldstart), frames_loader(cfg, 32), Console(quiet=True))
    save_adapter(ctx.model, root / "coldstart_adapter", train_connector=True)
    merge_adapter(root / "model", root / "coldstart_adapter", root / "model_cs")


def config(assets: Path, out: Path, *extra: str):  # -> Config
    """The tiny run both sides train: from the cold-started checkpoint, 8 prompts x G=4, up to 8 new
    tokens, fp32, no cold start. One micro-batch holds 16 rows (a rank's 4 prompts x G), so one
    rank's two micro-batches are two ranks' batches."""
    return load_config("tiny", [
        f"model.path={assets / 'model_cs'}", "model.synth=false", "data.synth=false",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.coldstart={assets / 'data' / 'coldstart.json'}",
        f"data.video_root={assets / 'data'}", "data.eval=none", "train.eval_every=0", "data.max_bad_fraction=0.1",
        "video.num_frames=4", "video.max_frames=4",
        "coldstart.enabled=false", "coldstart.lr=1e-2", "coldstart.batch_size=8",
        "rollout.num_generations=4", "rollout.prompts_per_step=8", "rollout.max_new_tokens=8", "rollout.top_k=0",
        "rewards.r1=0", "rewards.length=1.0", "rewards.format=0.5", "grpo.beta=0.05", "grpo.noise_std=0.02",
        "train.micro_batch_size=16", "train.lr=1e-3", "train.save_every=0",
        "log.progress=false", "log.completions_every=1", "log.num_completions=32",
        f"train.output_dir={out}", *extra,
    ])


def equivalence(assets: Path, out: Path) -> None:
    from rich.console import Console

    from tinyr1.session import train

    for loss in LOSS_TYPES:
        train(config(assets, out / loss, f"grpo.loss_type={loss}", "train.steps=2", *LOSS_EXTRA[loss]),
              console=Console(quiet=dist.rank() > 0 or dist.world_size() == 1))


def resume(assets: Path, out: Path) -> None:
    from tinyr1.session import train

    extra = ("train.steps=4", "data.eval=" + str(assets / "data" / "eval.jsonl"), "train.eval_every=2",
             "coldstart.enabled=true", "coldstart.steps=2", "coldstart.lr=1e-3")  # every rank, then rank 0's broadcast
    train(config(assets, out / "straight", *extra))
    train(config(assets, out / "stopped", *extra), stop_after=2)
    train(load_config(str(out / "stopped" / "config.toml")), resume=out / "stopped")




calls = 0
FAILED_AT = "TINYR1_TEST_FAILED_AT"  # file where failing_reward writes the time it raised


def failing_reward(completions: list, **_: object) -> list[float]:
    """A reward that breaks on rank 1 at its second call (step 2): a rank dying mid-run."""
    global calls
    calls += 1
    if dist.rank() == 1 and calls == 2:
        if os.environ.get(FAILED_AT):
            Path(os.environ[FAILED_AT]).write_text(f"{time.time()}\n")
        raise RuntimeError("rank 1 failed on purpose at step 2")
    return [float(len(c)) for c in completions]


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, assets_dir, out_dir = sys.argv[1:4]
    dist.init_from_env()
    {"equivalence": equivalence, "resume": resume}[scenario](Path(assets_dir), Path(out_dir))
