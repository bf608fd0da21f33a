"""Synthetic video QA: real H.264 clips of simple scenes whose answer is only in the pixels.

This is the tiny demo's and the tests' data. Each task has a FIXED option order (a shuffled
order left the answer letter at chance for a tiny random vision tower, docs/DESIGN.md), balanced
answer letters, and a templated think text naming the evidence for the cold start. Output:
`train.jsonl` (the paper's GRPO format), `coldstart.json` (LLaVA style), `eval.jsonl` (generic
format, held-out clips) and `videos/`. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from tinyr1.errors import ConfigError, DataError
from tinyr1.prompts import build_prompt, question_with_options

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
DEFAULT_TASKS = ("color",)  # the one a tiny random frozen tower learns (docs/DESIGN.md, "The tiny demo")
CLIP_FPS = 8
Render = Callable[[np.random.Generator, int, int, int], tuple[np.ndarray, dict[str, str]]]


@dataclass(frozen=True)
class Task:
    """A question with fixed options, a renderer (rng, answer index, T, S) -> (frames
    [T, S, S, 3] uint8, evidence words) and think templates filled from the evidence."""

    name: str
    question: str
    options: tuple[str, ...]
    render: Render
    thinks: tuple[str, ...]
    category: str = ""  # the eval's per-category column; the task name when empty

    @property
    def group(self) -> str:
        return self.category or self.name


def _canvas(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    shade = int(rng.integers(10, 60))
    return np.full((frames, size, size, 3), shade, dtype=np.uint8)  # [T, S, S, 3]


def _draw(video: np.ndarray, t: int, x: int, y: int, side: int, color: Sequence[int]) -> None:
    video[t, y : y + side, x : x + side] = color


def _jittered(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.array(rgb) + rng.integers(-15, 16, size=3), 0, 255).astype(np.uint8)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return _jittered(rng, list(PALETTE.values())[int(rng.integers(len(PALETTE)))])


def _wander(rng: np.random.Generator, video: np.ndarray, colors: Sequence[np.ndarray]) -> None:
    """One square wandering (bouncing) around the frame, colour colors[t] in frame t."""
    size = video.shape[1]
    side = max(4, size // 4)
    pos = rng.integers(0, size - side + 1, size=2)
    vel = rng.integers(-2, 3, size=2)
    for t, color in enumerate(colors):
        _draw(video, t, int(pos[0]), int(pos[1]), side, color)
        nxt = pos + vel
        vel = np.where((nxt < 0) | (nxt > size - side), -vel, vel)
        pos = np.clip(pos + vel, 0, size - side)


def _render_color(rng: np.random.Generator, k: int, frames: int, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """One square of colour k wandering (bouncing) around the frame."""
    video = _canvas(rng, frames, size)
    _wander(rng, video, [_jittered(rng, PALETTE[list(PALETTE)[k]])] * frames)
    return video, {}


def _segments(rng: np.random.Generator, frames: int, parts: int) -> np.ndarray:
    """Frame t's segment index [T]: `parts` runs of random lengths >= 1 (all compositions equally likely)."""
    if parts > frames:
        raise ValueError(f"{parts} colour runs need at least {parts} frames, got {frames}")
    cuts = np.sort(rng.choice(np.arange(1, frames), size=parts - 1, replace=False))
    return np.searchsorted(cuts, np.arange(frames), side="right")  # [T] in 0..parts-1


def _sequence_video(rng: np.random.Generator, names: list[str], frames: int, size: int) -> np.ndarray:
    """A wandering square showing the colours `names` in runs of random lengths."""
    video = _canvas(rng, frames, size)
    colors = [_jittered(rng, PALETTE[n]) for n in names]
    _wander(rng, video, [colors[i] for i in _segments(rng, frames, len(names))])
    return video


def _render_order(last: bool) -> Render:
    """The square changes colour once, at a random frame; the answer k is its first (or last)
    colour, the other colour is random. One frame shows one of the two colours, so it narrows the
    answer to two (at best 0.5 correct, chance 0.25); only the order of the frames tells which."""

    def render(rng: np.random.Generator, k: int, frames: int, size: int) -> tuple[np.ndarray, dict[str, str]]:
        names = list(PALETTE)
        other = names[(k + int(rng.integers(1, len(names)))) % len(names)]
        order = [other, names[k]] if last else [names[k], other]
        video = _sequence_video(rng, order, frames, size)
        return video, {"first": order[0], "second": order[1], "before": order[0], "last": order[1],
                       "Before": order[0].capitalize()}

    return render


def _render_changes(rng: np.random.Generator, k: int, frames: int, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """The square changes colour k times (k + 1 runs, each a colour other than the run before it's).
    Every run's colour is uniform over the palette, so one frame tells nothing about k."""
    names = list(PALETTE)
    seq = [names[int(rng.integers(len(names)))]]
    for _ in range(k):
        seq.append(names[(names.index(seq[-1]) + int(rng.integers(1, len(names)))) % len(names)])
    video = _sequence_video(rng, seq, frames, size)
    sequence = ", ".join(seq)
    return video, {"sequence": sequence, "Sequence": sequence[:1].upper() + sequence[1:],
                   "changes": "change" if k == 1 else "changes"}


def _render_count(rng: np.random.Generator, k: int, frames: int, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """k + 1 squares in distinct cells of a 3 x 3 grid, each a random palette colour."""
    video, cell = _canvas(rng, frames, size), size // 3
    side = max(2, cell - 4)
    cells = rng.choice(9, size=k + 1, replace=False)
    for c in cells:
        x0, y0 = int(c % 3) * cell + 2, int(c // 3) * cell + 2
        color = _random_color(rng)
        for t in range(frames):
            dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
            _draw(video, t, x0 + dx, y0 + dy, side, color)
    n = k + 1
    return video, {"squares": "square" if n == 1 else "squares", "are": "is" if n == 1 else "are"}


def _render_position(rng: np.random.Generator, k: int, frames: int, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """One square staying (with a 1-pixel jitter) in quadrant k: TL, TR, BL, BR."""
    video, side, half = _canvas(rng, frames, size), max(4, size // 4), size // 2
    color = _random_color(rng)
    x0 = (k % 2) * half + int(rng.integers(1, half - side))
    y0 = (k // 2) * half + int(rng.integers(1, half - side))
    for t in range(frames):
        dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
        _draw(video, t, x0 + dx, y0 + dy, side, color)
    return video, {}


_DIRECTION_ENDS = {0: ("right", "left"), 1: ("left", "right"), 2: ("bottom", "top"), 3: ("top", "bottom")}


def _render_direction(rng: np.random.Generator, k: int, frames: int, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """One square crossing the frame: k = left, right, up, down. The fixed coordinate is drawn from
    the moving one's stops, so one frame's (x, y) has the same distribution whichever way it moves
    (drawn from all pixels, a coordinate on the stops' grid gave the axis away: a one-frame probe
    read 0.40 of the answers, chance 0.25)."""
    video, side = _canvas(rng, frames, size), max(4, size // 4)
    color = _random_color(rng)
    track = np.linspace(0, size - side, frames).round().astype(int)  # start edge -> end edge
    other = int(track[int(rng.integers(frames))])
    if k in (0, 2):
        track = track[::-1]
    for t in range(frames):
        x, y = (int(track[t]), other) if k in (0, 1) else (other, int(track[t]))
        _draw(video, t, x, y, side, color)
    start, end = _DIRECTION_ENDS[k]
    return video, {"start": start, "end": end}


TASKS: dict[str, Task] = {
    "color": Task(
        "color", "What colour is the square?", tuple(PALETTE), _render_color,
        ("The square is {option}.", "I see a {option} square."),
    ),
    "count": Task(
        "count", "How many squares are there?", ("1", "2", "3", "4"), _render_count,
        ("I count {option} {squares} in the frames. That is option {letter}.",
         "There {are} {option} {squares} in the video, so the answer is {letter}."),
    ),
    "position": Task(
        "position", "Where is the square?", ("top left", "top right", "bottom left", "bottom right"),
        _render_position,
        ("The square stays in the {option} corner. That is option {letter}.",
         "The square is at the {option} of the frame, so the answer is {letter}."),
    ),
    "direction": Task(
        "direction", "Which way does the square move?", ("left", "right", "up", "down"), _render_direction,
        ("From the {start} to the {end}: {option}.", "It goes {option}, from the {start} to the {end}."),
    ),
    "first": Task(
        "first", "Which colour does the square have first?", tuple(PALETTE), _render_order(last=False),
        ("It is {first} first, then {second}.", "First {first}, then {second}."),
        category="order",
    ),
    "last": Task(
        "last", "Which colour does the square have last?", tuple(PALETTE), _render_order(last=True),
        ("It is {before}, then {last} last.", "{Before}, then {last} at the end."),
        category="order",
    ),
    "changes": Task(
        "changes", "How many times does the square change colour?", ("0", "1", "2", "3"), _render_changes,
        ("{Sequence}: {option} {changes}.", "It is {sequence}: {option} {changes}."),
    ),
}
# Names for several tasks at once: the questions that need more than one frame (docs/BENCHMARKS.md,
# "Temporal demo").
TASK_GROUPS: dict[str, tuple[str, ...]] = {"temporal": ("first", "last", "direction", "changes")}


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names with each group name replaced by its tasks, in order, without repeats."""
    out: list[str] = []
    for name in names:
        for task in TASK_GROUPS.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


def think_text(task: Task, k: int, template: int, evidence: dict[str, str]) -> str:
    """The cold-start reasoning for answer index k, naming what is seen in the frames."""
    option = task.options[k]
    fields = {"option": option, "Option": option[:1].upper() + option[1:], "letter": chr(ord("A") + k), **evidence}
    return task.thinks[template].format(**fields)


def corpus_texts() -> list[str]:
    """Every question, option block and think text the synthetic data can contain (for the
    tiny tokenizer, which must cover all of it compactly)."""
    texts = []
    for task in TASKS.values():
        problem = question_with_options(task.question, list(task.options))
        texts += [build_prompt(problem, mode="train"), build_prompt(problem, mode="eval")]
        for k in range(len(task.options)):
            for j in range(len(task.thinks)):
                for draw in range(2):  # evidence as the renderer words it (a 16 px clip is enough)
                    _, ev = task.render(np.random.default_rng([k, j, draw]), k, 8, 16)
                    letter = chr(ord("A") + k)
                    texts.append(f"<think>{think_text(task, k, j, ev)}</think> <answer>{letter}</answer>")
    return texts


def encode_video(path: str | os.PathLike[str], frames: np.ndarray) -> None:
    """Write uint8 [T, H, W, 3] frames as an H.264 (yuv420p) mp4 at CLIP_FPS with PyAV,
    single-threaded so the bytes depend only on the frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "8", "preset": "ultrafast", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))


@dataclass(frozen=True)
class _Item:
    id: str
    task: Task
    k: int
    video_rel: str
    think: str


def _make_split(out: Path, split: str, code: int, n: int, seed: int, tasks: Sequence[str], frames: int,
                size: int) -> list[_Item]:
    """Render and encode n clips; answer letters are balanced within each task."""
    plan_rng = np.random.default_rng([seed, code])
    task_of = plan_rng.permutation(np.arange(n) % len(tasks))
    answer_of = np.zeros(n, dtype=int)
    for j, name in enumerate(tasks):
        idx = np.flatnonzero(task_of == j)
        answer_of[idx] = plan_rng.permutation(np.arange(len(idx)) % len(TASKS[name].options))
    items = []
    for i in range(n):
        task, k = TASKS[tasks[int(task_of[i])]], int(answer_of[i])
        rng = np.random.default_rng([seed, code, i])
        video, evidence = task.render(rng, k, frames, size)  # [T, S, S, 3]
        rel = f"videos/{split}_{i:05d}.mp4"
        encode_video(out / rel, video)
        think = think_text(task, k, int(rng.integers(len(task.thinks))), evidence)
        items.append(_Item(f"{split}_{i:05d}", task, k, rel, think))
    return items


SYNTH_FILES = {"train": "train.jsonl", "eval": "eval.jsonl", "coldstart": "coldstart.json"}


def synthetic_target(paths: dict[str, str | None], video_root: str | None) -> Path | None:
    """The folder `data.synth = true` may write the synthetic set into, or None when data.train
    exists (nothing to write). Checked before anything is written: no data path may be a folder,
    and a missing data.train is only created as part of a new set whose every configured path
    names that set's own file (data.train = DIR/train.jsonl, data.eval = DIR/eval.jsonl, ...,
    data.video_root = DIR) in a new or empty DIR. Anything else is a typo, never a place to write."""
    for key, value in paths.items():
        if value is not None and Path(value).is_dir():
            raise ConfigError(f"data.{key} = {value!r} is a folder; it must name a dataset file "
                              f"(e.g. {Path(value) / SYNTH_FILES.get(key, 'train.jsonl')}). Nothing was written")
    train = paths.get("train")
    if train is None or Path(train).is_file():
        return None
    folder = Path(train).parent
    wanted = {f"data.{k}": folder / name for k, name in SYNTH_FILES.items() if k == "train" or paths.get(k)}
    got = {f"data.{k}": Path(paths[k]) for k in SYNTH_FILES if paths.get(k)}  # type: ignore[arg-type]
    if video_root is not None:
        wanted["data.video_root"], got["data.video_root"] = folder, Path(video_root)
    wrong = [f"{key} = {str(got[key])!r}" for key in wanted if got[key].resolve() != wanted[key].resolve()]
    if wrong:
        layout = ", ".join(f"{key} = {str(path)!r}" for key, path in wanted.items())
        raise ConfigError(
            f"data.train = {train!r} does not exist, and data.synth = true creates a synthetic set only as a "
            f"new folder its paths all name ({layout}); {' and '.join(wrong)} do not fit that: a typo? "
            "Nothing was written. Fix: point data.train at your dataset file, or set data.synth = false, "
            "or point the data paths at a new folder's train.jsonl / eval.jsonl / coldstart.json"
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"data.train = {train!r} does not exist, and data.synth = true would write the synthetic set into "
            f"{folder}, which already holds other files: a typo in data.train? Nothing was written. Fix: point "
            "data.train at your dataset file, or set data.synth = false, or choose a new folder"
        )
    return folder


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_synthetic(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    frames: int = 8,
    size: int = 32,
    eval_n: int = 500,
    coldstart_n: int = 64,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic dataset; returns {"train", "coldstart", "eval", "videos"} paths.

    train.jsonl: {"id", "problem", "solution", "video_filename": "./videos/..", "task"}
    coldstart.json: LLaVA rows whose gpt turn is "<think>evidence</think> <answer>X</answer>"
    eval.jsonl: {"id", "video", "question", "options", "answer", "task"} on held-out clips.

    `out_dir` must be new or empty unless `overwrite`: the set is written into a temporary sibling
    folder and renamed into place when complete, so an interrupted write leaves no half set and no
    user file is ever replaced.
    """
    tasks = expand_tasks(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DataError(f"unknown synthetic task(s) {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
    if size % 2 or size < 16:
        raise ValueError(f"size must be even and >= 16 (H.264 yuv420p), got {size}")
    final = Path(out_dir)
    if final.exists() and not final.is_dir():
        raise DataError(f"{final} exists and is not a folder; choose another folder for the synthetic set")
    in_place = final.is_dir() and any(final.iterdir())
    if in_place and not overwrite:
        raise DataError(
            f"{final} is not empty: synthetic data is written only into a new or empty folder, never over "
            "files; choose another folder (`tinyr1 data synth --force` writes over it)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final if in_place else final.parent / f".{final.name}.tmp-synth-{os.getpid()}"
    try:
        _write_set(out, n, seed, list(tasks), frames, size, eval_n, coldstart_n)
        if out != final:
            if final.is_dir():
                final.rmdir()  # empty (checked above)
            os.replace(out, final)
    finally:
        if out != final and out.exists():
            shutil.rmtree(out, ignore_errors=True)
    return {"train": final / "train.jsonl", "coldstart": final / "coldstart.json", "eval": final / "eval.jsonl",
            "videos": final / "videos"}


def _write_set(out: Path, n: int, seed: int, tasks: list[str], frames: int, size: int, eval_n: int,
               coldstart_n: int) -> None:
    """The three splits, their rows and videos, into `out`."""
    (out / "videos").mkdir(parents=True, exist_ok=True)

    train = _make_split(out, "train", 1, n, seed, tasks, frames, size)
    _write_jsonl(out / "train.jsonl", [
        {"id": it.id, "problem": question_with_options(it.task.question, list(it.task.options)),
         "solution": f"<answer>{chr(ord('A') + it.k)}</answer>", "video_filename": f"./{it.video_rel}",
         "task": it.task.name, "category": it.task.group}
        for it in train
    ])
    cold = _make_split(out, "coldstart", 2, coldstart_n, seed, tasks, frames, size)
    cold_rows = [
        {"id": it.id, "video": it.video_rel, "conversations": [
            {"from": "human", "value": build_prompt(
                question_with_options(it.task.question, list(it.task.options)), mode="train")},
            {"from": "gpt", "value": f"<think>{it.think}</think> <answer>{chr(ord('A') + it.k)}</answer>"},
        ]}
        for it in cold
    ]
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in cold_rows)
    (out / "coldstart.json").write_text(f"[\n{body}\n]\n" if cold_rows else "[]\n", encoding="utf-8")
    held = _make_split(out, "eval", 3, eval_n, seed, tasks, frames, size)
    _write_jsonl(out / "eval.jsonl", [
        {"id": it.id, "video": it.video_rel, "question": it.task.question, "options": list(it.task.options),
         "answer": chr(ord("A") + it.k), "task": it.task.name,
         "category": it.task.group}
        for it in held
    ])
