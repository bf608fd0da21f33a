"""What each rank runs in tests/test_distributed.py: `torchrun --nproc-per-node 2 tests/dist_worker.py
SCENARIO ASSETS OUT`, and the config both the ranks and the one-process reference train with.

Scenarios: `equivalence` (2 GRPO steps for each loss type), `resume` (4 steps straight; 2, stop,
resume, 2), `crash` (rank 1's reward raises at step 2). Each rank joins the group through
`tinyr1.distributed.init_from_env`, as `tinyr1 train` does under torchrun.
"""

from __future__ import annotations

import json
import sys
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
    return root


def config(assets: Path, out: Path, *extra: str):  # -> Config
    """The tiny run both sides train: 6 cold-start steps (run by every rank, then broadcast), then
    8 prompts x G=4, up to 8 new tokens, fp32. One micro-batch holds a rank's 16 rows, so one
    process's two micro-batches are the ranks' batches."""
    return load_config("tiny", [
        f"model.path={assets / 'model'}", "model.synth=false", "data.synth=false",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.coldstart={assets / 'data' / 'coldstart.json'}",
        f"data.video_root={assets / 'data'}", "data.eval=none", "train.eval_every=0", "data.max_bad_fraction=0.1",
        "video.num_frames=4", "video.max_frames=4",
        "coldstart.enabled=true", "coldstart.steps=6", "coldstart.lr=1e-2", "coldstart.batch_size=8",
        "rollout.num_generations=4", "rollout.prompts_per_step=8", "rollout.max_new_tokens=8", "rollout.top_k=0",
        "rewards.r1=0", "rewards.length=1.0", "rewards.format=0.5", "grpo.beta=0.05", "grpo.noise_std=0.02",
        "train.micro_batch_size=16", "train.lr=1e-3", "train.save_every=0",
        "log.progress=false", "log.completions_every=1", "log.num_completions=32",
        f"train.output_dir={out}", *extra,
    ])


def equivalence(assets: Path, out: Path) -> None:
    from tinyr1.session import train

    for loss in LOSS_TYPES:
        train(config(assets, out / loss, f"grpo.loss_type={loss}", "train.steps=2", *LOSS_EXTRA[loss]))


def resume(assets: Path, out: Path) -> None:
    from tinyr1.session import train

    extra = ("train.steps=4", "data.eval=" + str(assets / "data" / "eval.jsonl"), "train.eval_every=2")
    train(config(assets, out / "straight", *extra))
    train(config(assets, out / "stopped", *extra), stop_after=2)
    train(load_config(str(out / "stopped" / "config.toml")), resume=out / "stopped")


def crash(assets: Path, out: Path) -> None:
    from tinyr1.session import train

    train(config(assets, out / "crash", "train.steps=4", "rewards.dist_worker:failing_reward=1.0"))


calls = 0


def failing_reward(completions: list, **_: object) -> list[float]:
    """A reward that breaks on rank 1 at its second call (step 2): a rank dying mid-run."""
    global calls
    calls += 1
    if dist.rank() == 1 and calls == 2:
        raise RuntimeError("rank 1 failed on purpose at step 2")
    return [0.0] * len(completions)


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, assets_dir, out_dir = sys.argv[1:4]
    dist.init_from_env()
    {"equivalence": equivalence, "resume": resume, "crash": crash}[scenario](Path(assets_dir), Path(out_dir))
