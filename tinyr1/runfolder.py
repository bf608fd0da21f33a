"""A training run's folder: its identity, one process at a time, and the rules for reusing it.

- Identity: `run.json` (run id, creator uid and user, start time) is written when a run starts;
  every checkpoint carries the run id (`checkpoint.TrainState.run_id`), so pruning and resume
  never mix two runs' checkpoints.
- Reuse: a fresh run starts only in a new or empty folder. A folder that holds a run is continued
  with `--resume`, or replaced with `--force`, which deletes exactly that run's own outputs
  (`RUN_OUTPUTS`) and nothing else; a folder holding anything else is never written into.
- One process: `run_lock` holds an exclusive `flock` on `RUN/.lock` while a process trains (the
  kernel drops it when the process dies, even by SIGKILL), so two processes never write one run.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tinyr1.config import Config
from tinyr1.config_io import save_config
from tinyr1.errors import CheckpointError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CONFIG_FILE = "config.toml"
# What `tinyr1 train` writes into a run folder, and so all that --force removes.
RUN_OUTPUTS = (RUN_FILE, CONFIG_FILE, "metrics.jsonl", "completions.jsonl", "eval.jsonl", "curves.png",
               "checkpoints", "final")


@dataclass(frozen=True)
class RunIdentity:
    """The contents of run.json."""

    run_id: str  # 12 hex digits; "" for run folders made before run ids existed
    uid: int | None = None  # who started the run (os.getuid()); None where unknown
    user: str = ""
    created: str = ""  # ISO time the run started
    reward_files: dict[str, str] = field(default_factory=dict)  # custom reward "module:function" -> file


def _describe(run_dir: Path) -> str:
    """What a run folder holds, for the refusal message: its steps and whether it finished."""
    from tinyr1.checkpoint import complete_checkpoints

    steps = [int(p.name.split("-")[1]) for p in complete_checkpoints(run_dir)]
    parts = [f"checkpoints up to step {max(steps)}" if steps else "no checkpoint yet"]
    if (run_dir / "final").is_dir():
        parts.append("a final adapter")
    return ", ".join(parts)


def check_fresh(run_dir: Path, *, force: bool) -> None:
    """Refuse to start a new run in `run_dir` unless it is new or empty, or (with `force`) holds
    only an old tinyr1 run: a second run's checkpoints would otherwise mix with the first's."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise CheckpointError(f"train.output_dir {run_dir} is a file; choose a folder for the run")
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return
    if not ((run_dir / CONFIG_FILE).is_file() or (run_dir / RUN_FILE).is_file()):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(
            f"train.output_dir {run_dir} already holds files that are not a tinyr1 run ({shown}); a run is "
            "written only into a new or empty folder: choose another train.output_dir"
        )
    if not force:
        raise CheckpointError(
            f"train.output_dir {run_dir} already holds a run ({_describe(run_dir)}); continue it with "
            f"`tinyr1 train --resume {run_dir}`, start over in it with --force (deletes that run's "
            "checkpoints, logs and final adapter), or choose another train.output_dir"
        )


def start_run(run_dir: Path, cfg: Config, *, force: bool, reward_files: dict[str, str] | None = None) -> RunIdentity:
    """Make `run_dir` this new run's folder (call it holding `run_lock`): check it again, remove an old
    run's outputs when `force`, write config.toml, then run.json with a new run id (in that order: a
    kill between the two leaves a folder `--resume` starts from the beginning)."""
    check_fresh(run_dir, force=force)
    if force:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = ""
    save_config(cfg, run_dir / CONFIG_FILE)
    identity = RunIdentity(run_id=uuid.uuid4().hex[:12], uid=_uid(), user=user,
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           reward_files=dict(reward_files or {}))
    write_identity(run_dir, identity)
    return identity


def write_identity(run_dir: Path, identity: RunIdentity) -> None:
    tmp = run_dir / f".{RUN_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(asdict(identity), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / RUN_FILE)


def read_identity(run_dir: Path) -> RunIdentity:
    """run.json of `run_dir`; a folder from before run ids gets the empty id (its checkpoints have none)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return RunIdentity(run_id="")
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
        return RunIdentity(run_id=str(raw["run_id"]), uid=raw.get("uid"), user=str(raw.get("user", "")),
                           created=str(raw.get("created", "")), reward_files=dict(raw.get("reward_files") or {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is unreadable ({err}); it names the run its checkpoints belong to. Restore it, or start a "
            "new run in another folder"
        ) from None


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process: a second tinyr1 process on the same run is refused. The lock
    dies with the process, so a killed run never leaves its folder locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one process per run is then up to the user
        yield
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise CheckpointError(
                f"{run_dir} is in use by another tinyr1 process (pid {holder}); wait for it to finish or stop "
                "it (Ctrl-C saves a checkpoint) before starting or resuming this run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
