"""Custom reward modules (`"module:function"` in `[rewards]`): where they may come from, and
whether to run them.

A reward is code that runs in the training process, so a config is not allowed to name just any
importable module: `rewards."os:system" = 1` would call `os.system`, and resuming someone else's
run folder would run whatever its config.toml names. The rules:

- A custom module is resolved only as a file in the search folders: the folder of the `--config`
  TOML, the folders given with `--rewards-path`, and, on `--resume`, the folders the run's modules
  were found in when it started (recorded in run.json). Never from `sys.path`, the working directory
  or installed packages.
- Standard-library and builtin module names are refused outright, as are names that an installed
  package or an already imported module holds (the file would shadow it).
- The file is printed before anything runs (`tinyr1 train` shows each).
- "A folder the user did not write": the module file, or a folder between it and its search
  folder, is owned by another user or writable by group or others; on `--resume`, also a run
  folder whose config.toml or run.json another user owns. Such modules run only with
  `--trust-rewards` (`untrusted_reasons` says why).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tinyr1.errors import RewardError

RewardFn = Callable[..., list[float]]
FORBIDDEN_MODULES = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names)


def split_name(name: str) -> tuple[str, str]:
    """'module:function' -> (module, function); anything else is a RewardError."""
    module, _, attr = name.partition(":")
    if not module or not attr or not all(part.isidentifier() for part in module.split(".")) \
            or not attr.isidentifier():
        raise RewardError(f"reward {name!r}: custom rewards are written 'module:function', e.g. 'my_rewards:brevity'")
    return module, attr


def locate(name: str, search: Sequence[str | os.PathLike[str]]) -> tuple[Path, Path]:
    """(module file, the search folder it is in) for a custom reward name; refused names and names
    found in no search folder are a RewardError saying where it looked."""
    module, _ = split_name(name)
    top = module.split(".")[0]
    if top in FORBIDDEN_MODULES:
        raise RewardError(
            f"reward {name!r}: {top!r} is a standard-library or builtin module, refused as a reward (it could run "
            "any code); a custom reward is a function in your own .py file, named 'your_file:function'"
        )
    rel = Path(*module.split("."))
    for root in search:
        for candidate in (Path(root) / rel.with_suffix(".py"), Path(root) / rel / "__init__.py"):
            if candidate.is_file():
                return candidate.resolve(), Path(root).resolve()
    where = ", ".join(str(Path(r)) for r in search) or "none given"
    raise RewardError(
        f"reward {name!r}: no {rel.with_suffix('.py')} in the reward folders ({where}). Custom reward modules are "
        "imported only from the config file's folder and from --rewards-path DIR: put the file there or pass "
        "--rewards-path with its folder"
    )


def locate_all(weights: Iterable[str], search: Sequence[str | os.PathLike[str]]) -> dict[str, tuple[Path, Path]]:
    """name -> (module file, its search folder) for every custom ("module:function") reward name."""
    return {name: locate(name, search) for name in weights if ":" in name}


def _origin(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).resolve() if spec is not None and spec.origin not in (None, "built-in", "frozen") else None


def import_reward(name: str, search: Sequence[str | os.PathLike[str]]) -> RewardFn:
    """Import the function a custom reward names, from its file in `search` only."""
    module, attr = split_name(name)
    file, root = locate(name, search)
    top = module.split(".")[0]
    loaded = sys.modules.get(module)
    if loaded is None:
        if top not in sys.modules:
            other = _origin(top)  # an installed package of that name: the file would shadow it
            if other is not None and not other.is_relative_to(root):
                raise RewardError(f"reward {name!r}: {top!r} is installed ({other}); rename {file} so it cannot "
                                  "shadow it")
        sys.path.insert(0, str(root))
        try:
            loaded = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - the user's module failed: say which and why
            raise RewardError(f"reward {name!r}: importing {file} failed ({type(err).__name__}: {err})") from err
        finally:
            sys.path.remove(str(root))
    got = Path(getattr(loaded, "__file__", None) or "").resolve()
    if got != file:
        raise RewardError(f"reward {name!r}: {module!r} in use comes from {got}, not {file}; rename your file so "
                          "its module name is unique")
    fn = getattr(loaded, attr, None)
    if fn is None or not callable(fn):
        raise RewardError(f"reward {name!r}: {file} has no callable {attr!r}")
    return fn


def _owner(st: os.stat_result) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
    except (ImportError, KeyError):
        return f"uid {st.st_uid}"


def untrusted_reasons(files: Iterable[Path], roots: dict[Path, Path] | None = None,
                      run_files: Iterable[Path] = ()) -> list[str]:
    """Why these reward files may not be the user's own: each file and each folder from it up to
    its search folder (`roots[file]`, else its own folder) must be owned by the current user and
    not writable by group or others; each of `run_files` (a resumed run's config.toml, run.json)
    must be owned by the user. [] means trusted. Without uids (Windows) nothing is checked."""
    if not hasattr(os, "getuid"):
        return []
    uid, reasons = os.getuid(), []
    for file in files:
        stop = (roots or {}).get(file, file.parent)
        chain = [file, *[p for p in file.parents if p == stop or p.is_relative_to(stop)]]
        for p in chain:
            st = p.stat()
            if st.st_uid != uid:
                reasons.append(f"{p} belongs to {_owner(st)}, not to you")
            elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                reasons.append(f"{p} can be written by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}")
    for f in run_files:
        if f.exists() and (st := f.stat()).st_uid != uid:
            reasons.append(f"{f} (which names the reward modules) belongs to {_owner(st)}, not to you")
    return reasons


def describe(files: dict[str, Path]) -> list[str]:
    """One line per custom reward for the console: name and the file that will run."""
    return [f"custom reward {name}: {file}" for name, file in files.items()]


def search_folders(config_file: str | None, rewards_path: Sequence[str], recorded: Iterable[str] = ()) -> list[Path]:
    """Where custom reward modules are looked for, in order: --rewards-path, the --config file's
    folder, the folders a resumed run's modules came from."""
    out: list[Path] = [Path(p) for p in rewards_path]
    if config_file is not None and Path(config_file).is_file():
        out.append(Path(config_file).resolve().parent)
    out += [Path(f).parent for f in recorded]
    return list(dict.fromkeys(out))
