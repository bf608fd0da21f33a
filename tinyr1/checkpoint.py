"""Atomic checkpoints and exact resume.

A checkpoint is a folder `RUN/checkpoints/step-NNNNNN/` holding the PEFT adapter (loadable by plain
`peft`), the connector when it trains, optimizer + scheduler state, RNG states (every rank's, under
torchrun) and the data position. It is written into a temporary folder first and renamed into place only when complete,
so a run killed at any moment resumes from the last complete checkpoint. Nothing is unpickled
beyond tensors and plain containers (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tinyr1.errors import CheckpointError
from tinyr1.model.tinyllava import TinyLlavaVideo

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
ADAPTER = "adapter"
CONNECTOR_FILE = "connector.safetensors"
RANK_RNG_FILE = "rng_ranks.pt"  # {"world_size": N, "torchrun": bool, "states": N x rank_rng_state()}


@dataclass
class TrainState:
    """Where the loop is: what a resumed run needs besides tensors."""

    step: int = 0  # GRPO optimizer steps done
    epoch: int = 0
    position: int = 0  # next index into this epoch's sample order
    coldstart_done: bool = False
    bad_videos: list[str] = field(default_factory=list)
    seen: int = 0  # samples drawn so far (for the bad-video fraction)


def save_adapter(model: TinyLlavaVideo, out_dir: Path, *, train_connector: bool) -> None:
    """PEFT adapter folder (+ connector weights when trained): what `eval`/`merge` take."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.language_model.save_pretrained(str(out_dir))
    if train_connector:
        state = {k: v.detach().contiguous().cpu() for k, v in model.connector.resampler.state_dict().items()}
        save_file(state, str(out_dir / CONNECTOR_FILE))


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    *,
    model: TinyLlavaVideo,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    train_connector: bool,
    scaler: torch.amp.GradScaler | None = None,
    keep: int = 2,
    rank_rng: list[dict[str, torch.Tensor]] | None = None,
    torchrun: bool = False,
) -> Path:
    """Write step-N atomically; keep the newest `keep` checkpoints. `rank_rng`: each rank's
    `rank_rng_state()` in rank order (rank 0 writes them all); `torchrun`: the run samples with the
    per-prompt streams of a torchrun launch (`tinyr1.trainer.sample_completions`)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp / ADAPTER, train_connector=train_connector)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:  # fp16 loss scale and its growth tracker: part of an exact resume
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng = {"torch": torch.get_rng_state(), "sampler": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng.pt")
    if rank_rng is not None:
        torch.save({"world_size": len(rank_rng), "torchrun": torchrun, "states": rank_rng}, tmp / RANK_RNG_FILE)
    (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    (tmp / COMPLETE).write_text("ok\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first; half-written temp folders are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(
    ckpt: Path,
    *,
    model: TinyLlavaVideo,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Restore weights, optimizer, scheduler, loss scale, RNG and the loop position from `ckpt`."""
    from peft import set_peft_model_state_dict  # peft imports bitsandbytes: after loading.py's log filter

    adir = ckpt / ADAPTER
    weights = adir / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{ckpt} has no {ADAPTER}/adapter_model.safetensors; it cannot be resumed")
    set_peft_model_state_dict(model.language_model, load_file(str(weights)))
    if (adir / CONNECTOR_FILE).is_file():
        model.connector.resampler.load_state_dict(load_file(str(adir / CONNECTOR_FILE)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["sampler"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return TrainState(**json.loads((ckpt / "train_state.json").read_text()))


def rank_rng_state() -> dict[str, torch.Tensor]:
    """This process's global torch RNG state (+ its current CUDA device's): what differs per rank."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rank_rng(ckpt: Path, rank: int, world_size: int, torchrun: bool) -> tuple[int, bool]:
    """Restore rank `rank`'s RNG state from a checkpoint made the same way (same number of ranks,
    same launcher); returns how it was made: (ranks, torchrun). Older checkpoints: (1, False)."""
    path = Path(ckpt) / RANK_RNG_FILE
    if not path.is_file():
        return 1, False
    saved = torch.load(path, weights_only=True)
    made = int(saved["world_size"]), bool(saved.get("torchrun", False))
    if made == (world_size, torchrun):
        mine = saved["states"][rank]
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
    return made
