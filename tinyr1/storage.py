"""Writing to disk safely: where a run, an evaluation or a merge will write is checked for
writability before any work starts, and a full or read-only disk met while writing becomes one
`DiskError` that names the path, the cause and roughly how much room is needed.

Libraries report a full disk in their own words (torch: "inline_container.cc ... unexpected pos" or
"file write failed"; safetensors: "SafetensorError ... No space left on device"; Python: OSError 28
or 30), so `disk_error` recognises all of them.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from tinyr1.errors import DiskError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
# Library messages that mean "the write did not complete" (no errno survives their wrapping).
_FULL_TEXTS = ("no space left", "disk quota", "file too large", "unexpected pos", "file write failed")
_READ_ONLY_TEXTS = ("read-only file system", "permission denied")


def existing_ancestor(path: Path) -> Path:
    """The nearest folder of `path` (itself included) that exists: where a mkdir would begin."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Refuse before any work when `path` (a folder to create or fill) cannot be written: a file
    there, a read-only file system, missing permission. A probe file is created and removed, since
    access(2) alone misses some cases (ACLs, network file systems)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise DiskError(f"{what} {target} is a file, not a folder; choose a folder")
    base = existing_ancestor(target)
    try:
        fd, probe = tempfile.mkstemp(prefix=".tinyr1-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DiskError(
            f"{what} {target} is not writable ({err.strerror or err} in {base}); nothing was started. "
            "Fix: choose a folder you can write to, or make this one writable"
        ) from None


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free space on the file system holding `path` (or the folder it will be made in)."""
    try:
        return shutil.disk_usage(existing_ancestor(Path(path))).free
    except OSError:
        return None


def format_size(n: float) -> str:
    """Decimal, like df -H: 1.2 GB, 340 MB, 12 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_error(err: BaseException, path: str | os.PathLike[str], *, need_bytes: int | None = None,
               what: str = "writing", kept: str = "") -> DiskError | None:
    """The DiskError that `err` (raised while writing under `path`) really is, or None when it is
    not a disk problem. `need_bytes` is what the write needed (shown as "needs ~N"); `kept` says
    what survived ("the previous checkpoint step-000004 is intact")."""
    code = err.errno if isinstance(err, OSError) else None
    text = str(err).lower()
    full = code in FULL_ERRNOS or any(t in text for t in _FULL_TEXTS)
    read_only = code in READ_ONLY_ERRNOS or any(t in text for t in _READ_ONLY_TEXTS)
    if not (full or read_only):
        return None
    tail = f"; {kept}" if kept else ""
    if full:
        need = f" (needs ~{format_size(need_bytes)}" if need_bytes else " ("
        free = free_bytes(path)
        room = f"{', ' if need_bytes else ''}{format_size(free)} free)" if free is not None else ")"
        return DiskError(f"disk full at {path}{need}{room} while {what}{tail}. Free some space and run the "
                         "same command again (a training run continues with --resume)")
    return DiskError(f"cannot write {path}: {err.strerror if isinstance(err, OSError) and err.strerror else err} "
                     f"while {what}{tail}. Fix: make it writable or choose another folder")
