"""Atomic checkpoints and exact resume.

A checkpoint is a folder `RUN/checkpoints/step-NNNNNN/` holding the PEFT adapter (loadable by plain
`peft`), the connector when it trains, optimizer + scheduler state, RNG states (every rank's, under
torchrun) and the data position. It is written into a temporary folder first (`.tmp-step-NNNNNN-RUNID-PID`) and renamed
into place only when complete, so a run killed at any moment resumes from the last complete
checkpoint. Nothing is unpickled beyond tensors and plain containers (`torch.load(weights_only=True)`).

Each checkpoint carries the id of its run (`TrainState.run_id`, from the run folder's run.json):
pruning and resume only ever touch this run's checkpoints. A failed save (a full disk) removes its
temporary folder and keeps the previous checkpoints; a checkpoint that cannot be read back on
resume is moved aside (`corrupt-step-N`) and the newest intact one is used instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tinyr1.errors import CheckpointError
from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.storage import disk_error, tree_bytes

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
STEP_RE = re.compile(r"step-\d+")
TMP_RE = re.compile(r"\.tmp-step-\d+-(?:(?P<run>[0-9a-f]+)-)?\d+")  # .tmp-step-N-[RUNID-]PID
FINAL_TMP_RE = re.compile(r"\.final\.tmp-\d+")  # save_adapter's temp name for RUN/final
ADAPTER = "adapter"
CONNECTOR_FILE = "connector.safetensors"
RANK_RNG_FILE = "rng_ranks.pt"  # torchrun runs: {"world_size": N, "torchrun": True, "states": N x rank_rng_state()}


@dataclass
class TrainState:
    """Where the loop is: what a resumed run needs besides tensors."""

    step: int = 0  # GRPO optimizer steps done
    epoch: int = 0
    position: int = 0  # next index into this epoch's sample order
    coldstart_done: bool = False
    bad_videos: list[str] = field(default_factory=list)
    seen: int = 0  # samples drawn so far (for the bad-video fraction)
    run_id: str = ""  # the run this state belongs to (RUN/run.json; "" for runs from before run ids)


def save_adapter(model: TinyLlavaVideo, out_dir: Path, *, train_connector: bool) -> None:
    """PEFT adapter folder (+ connector weights when trained): what `eval`/`merge` take. Written
    into a temporary sibling and renamed into place, so `out_dir` is never half an adapter."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.language_model.save_pretrained(str(tmp))
        if train_connector:
            state = {k: v.detach().contiguous().cpu() for k, v in model.connector.resampler.state_dict().items()}
            save_file(state, str(tmp / CONNECTOR_FILE))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Write step-N atomically; keep the newest `keep` checkpoints of this run (`state.run_id`).
    `rank_rng`: each rank's `rank_rng_state()` in rank order (rank 0 writes them all); `torchrun`:
    the run samples with the per-prompt streams of a torchrun launch (`trainer.sample_completions`).

    A write that fails (a full or read-only disk) removes the temporary folder, keeps every earlier
    checkpoint and raises a DiskError naming the path and the room needed.
    """
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / temp_name(final.name, state.run_id)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
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
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a half checkpoint must not keep a full disk full
        previous = complete_checkpoints(run_dir, run_id=state.run_id)
        need = max([tree_bytes(p) for p in previous[-1:]] + [_state_bytes(model, optimizer)])
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no checkpoint was written yet"
        named = disk_error(err, root, need_bytes=need, what=f"saving checkpoint {final.name}", kept=kept)
        if named is None:
            raise
        raise named from err
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(run_dir, run_id=state.run_id)[:-keep]:
        (old / COMPLETE).unlink(missing_ok=True)  # first: a half-deleted checkpoint is never "complete"
        shutil.rmtree(old, ignore_errors=True)
    return final


def temp_name(step_name: str, run_id: str) -> str:
    """The temporary folder a save of `step_name` writes: this run's and this process' by name."""
    return f"{TMP_PREFIX}{step_name}-{run_id}-{os.getpid()}" if run_id else f"{TMP_PREFIX}{step_name}-{os.getpid()}"


def _state_bytes(model: TinyLlavaVideo, optimizer: torch.optim.Optimizer) -> int:
    """About what one checkpoint takes before the first exists: trainable weights + optimizer state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor))
    return params + (moments or 2 * params)


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def checkpoint_run_id(ckpt: Path) -> str | None:
    """The run id a checkpoint was written by ("" before run ids existed); None when unreadable."""
    try:
        data = json.loads((ckpt / "train_state.json").read_text())
        return str(data.get("run_id", "")) if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def complete_checkpoints(run_dir: Path, *, run_id: str | None = None) -> list[Path]:
    """Finished checkpoints, oldest first; half-written temp folders are ignored. With `run_id`,
    only that run's (a checkpoint whose state cannot be read belongs to no run)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if STEP_RE.fullmatch(p.name) and (p / COMPLETE).is_file()]
    if run_id is not None:
        done = [p for p in done if checkpoint_run_id(p) == run_id]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path, *, run_id: str | None = None) -> Path | None:
    found = complete_checkpoints(run_dir, run_id=run_id)
    return found[-1] if found else None


def remove_stale_temps(run_dir: Path, run_id: str) -> list[Path]:
    """Delete the temporary folders that interrupted saves of this run left: checkpoints
    (`.tmp-step-N-RUNID-PID`; runs from before run ids: `.tmp-step-N-PID`), the final adapter
    (`RUN/.final.tmp-PID`) and checkpoints whose pruning was interrupted (`step-N` without its
    COMPLETE marker, which pruning removes first). Call with the run folder locked: no save of this
    run is in progress then. Another run's folders are never touched."""
    root = Path(run_dir) / CHECKPOINTS
    stale = [p for p in (sorted(root.glob(f"{TMP_PREFIX}step-*")) if root.is_dir() else [])
             if (m := TMP_RE.fullmatch(p.name)) and (m.group("run") or "") == run_id]
    stale += [p for p in (sorted(root.glob("step-*")) if root.is_dir() else [])
              if STEP_RE.fullmatch(p.name) and p.is_dir() and not (p / COMPLETE).exists()
              and checkpoint_run_id(p) in (run_id, None)]
    stale += [p for p in sorted(Path(run_dir).glob(".final.tmp-*")) if FINAL_TMP_RE.fullmatch(p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


@dataclass(frozen=True)
class _Stored:
    """Everything a checkpoint holds, read into memory (so a corrupt file fails before anything is applied)."""

    state: TrainState
    adapter: dict[str, torch.Tensor]
    connector: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def read_checkpoint(ckpt: Path) -> _Stored:
    """Read every file of `ckpt`; any file missing, truncated or corrupt is a CheckpointError."""
    adir = ckpt / ADAPTER
    weights = adir / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{ckpt} has no {ADAPTER}/adapter_model.safetensors; it cannot be resumed")
    try:
        state = TrainState(**json.loads((ckpt / "train_state.json").read_text()))
        adapter = load_file(str(weights))
        connector = load_file(str(adir / CONNECTOR_FILE)) if (adir / CONNECTOR_FILE).is_file() else None
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
        scheduler = torch.load(ckpt / "scheduler.pt", weights_only=True)
        scaler = torch.load(ckpt / "scaler.pt", weights_only=True) if (ckpt / "scaler.pt").is_file() else None
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except Exception as err:  # noqa: BLE001 - json, safetensors and torch each fail their own way
        cause = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{ckpt.name} is unreadable ({type(err).__name__}: {cause})") from err
    return _Stored(state, adapter, connector, optimizer, scheduler, scaler, rng)


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
    return _apply(read_checkpoint(ckpt), model=model, optimizer=optimizer, scheduler=scheduler,
                  generator=generator, scaler=scaler)


def _apply(stored: _Stored, *, model: TinyLlavaVideo, optimizer: torch.optim.Optimizer, scheduler: Any,
           generator: torch.Generator, scaler: torch.amp.GradScaler | None) -> TrainState:
    from peft import set_peft_model_state_dict  # peft imports bitsandbytes: after loading.py's log filter

    set_peft_model_state_dict(model.language_model, stored.adapter)
    if stored.connector is not None:
        model.connector.resampler.load_state_dict(stored.connector)
    optimizer.load_state_dict(stored.optimizer)
    scheduler.load_state_dict(stored.scheduler)
    if scaler is not None and stored.scaler is not None:
        scaler.load_state_dict(stored.scaler)
    torch.set_rng_state(stored.rng["torch"])
    generator.set_state(stored.rng["sampler"])
    if "cuda" in stored.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(stored.rng["cuda"])
    return stored.state


def resume_latest(
    run_dir: Path,
    *,
    run_id: str,
    note: Callable[[str], None],
    model: TinyLlavaVideo,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState | None:
    """Restore the newest intact checkpoint of this run; None when there is none.

    Checkpoints of another run are left alone (and said so). A checkpoint that cannot be read is
    moved aside to `corrupt-step-N` (not deleted: it may be worth a look) and the next older one
    is tried, so a corrupted latest checkpoint costs the steps since the one before, not the run.
    """
    for ckpt in reversed(complete_checkpoints(run_dir)):
        owner = checkpoint_run_id(ckpt)
        if owner is not None and owner != run_id:
            note(f"{ckpt} belongs to another run ({owner or 'no run id'}; this one is {run_id or 'without an id'}): "
                 "not used, left in place")
            continue
        try:
            stored = read_checkpoint(ckpt)
        except CheckpointError as err:
            aside = ckpt.with_name(f"corrupt-{ckpt.name}")
            os.replace(ckpt, aside)
            note(f"{err}: moved it to {aside} and resuming from the newest intact checkpoint before it")
            continue
        note(f"resuming from {ckpt} (step {stored.state.step})")
        return _apply(stored, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator,
                      scaler=scaler)
    return None


def rank_rng_state() -> dict[str, torch.Tensor]:
    """This process's global torch RNG state (+ its current CUDA device's): what differs per rank."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rank_rng(ckpt: Path, rank: int, world_size: int, torchrun: bool) -> tuple[int, bool]:
    """Restore rank `rank`'s RNG state from a checkpoint made the same way (same number of ranks,
    same launcher); returns how it was made: (ranks, torchrun); (1, False) for a plain run's checkpoint."""
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
