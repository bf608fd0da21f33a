"""Run `tinyr1 ARGS...` and SIGKILL (or SIGTERM) this very process at a chosen moment.

    python tests/fault_runner.py POINT COUNT WHEN -- train --resume RUN

POINT names a function ("tinyr1.checkpoint:_fsync_dir", "torch.optim.AdamW:step"); on its COUNT-th
call in this process the process kills itself with SIGKILL `before` the call, `after` it returns,
`half` (torch.save / log_step: write half of the bytes, then die, as a kill mid-write would), or
sends itself SIGTERM `before` the call (`term`: the graceful stop, exit 143). Nothing else is
changed: the kill is a real signal to a real `tinyr1` process, so what is on disk afterwards is
exactly what such a kill leaves. Used by tests/test_faults.py.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die(how: str) -> None:
    if how == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_write(fn_name: str, args: tuple[Any, ...]) -> None:
    """Write half of what the call would write, then die."""
    if fn_name == "save":  # torch.save(obj, path)
        import torch

        buf = io.BytesIO()
        torch.save(args[0], buf)
        Path(args[1]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif fn_name == "log_step":  # RunLogger.log_step(self, step, metrics)
        logger, step, metrics = args[:3]
        line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        logger._metrics_f.write(line[: len(line) // 2])
        logger._metrics_f.flush()
    else:
        raise ValueError(f"no half write for {fn_name}")
    _die("kill")


def install(point: str, count: int, when: str) -> None:
    module_name, _, attr_path = point.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == count:
            if when == "half":
                _half_write(name, args)
            if when in ("before", "term"):
                _die("kill" if when == "before" else "term")
            out = real(*args, **kwargs)
            if when == "after":
                _die("kill")
            return out
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    point, count, when, sep, *rest = argv
    assert sep == "--", "usage: fault_runner.py POINT COUNT WHEN -- ARGS..."
    from tinyr1.cpu import configure_cpu_env

    configure_cpu_env()  # as `tinyr1` does, before torch loads
    install(point, int(count), when)
    from tinyr1.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
