"""Does a question need the video, or does one frame answer it? A linear probe on the model's own
vision features says.

For every clip the frozen vision tower gives the features the connector reads ([P, Dv] per frame).
Two probes, one per task (each task's answer letters mean their own things), are fit by multinomial
logistic regression on the training clips and scored on held-out clips:

- **one frame**: trained on every frame of every training clip as its own example, scored on every
  frame of the held-out clips; the mean is the accuracy of a frame chosen at random. A video
  question must leave it near chance.
- **all frames**: the frames' features in order, concatenated. The control: it shows that the
  evidence is in the tower's features and that the probe can read it, so a chance one-frame result
  means "one frame does not tell", not "this probe sees nothing".

A linear probe is a lower bound on what the features hold; the trained model reads them through a
resampler and a transformer, so its accuracy can exceed the all-frames probe's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tinyr1.data import Sample
from tinyr1.evaluate import binomial_stderr, category_of
from tinyr1.model.tinyllava import TinyLlavaVideo


@dataclass(frozen=True)
class ProbeResult:
    task: str
    category: str
    classes: int  # options; chance = 1 / classes
    n_train: int  # training clips
    n_eval: int  # held-out clips
    one_frame: float  # held-out accuracy of one frame chosen at random
    all_frames: float  # held-out accuracy of the whole clip, frames in order

    @property
    def chance(self) -> float:
        return 1.0 / self.classes

    @property
    def one_frame_stderr(self) -> float:
        """Conservative: the frames of a clip are not independent, so clips count, not frames."""
        return binomial_stderr(self.one_frame, self.n_eval)

    @property
    def all_frames_stderr(self) -> float:
        return binomial_stderr(self.all_frames, self.n_eval)


def frame_features(model: TinyLlavaVideo, samples: Sequence[Sample],
                   load: Callable[[Sample], torch.Tensor]) -> torch.Tensor:
    """The tower's features of every frame of every clip, float32 [N, T, P*Dv]."""
    out = []
    for s in samples:
        pixels = load(s)  # [T, 3, S, S]
        feats = model.vision_features(pixels)  # [1, T*P, Dv]
        out.append(feats.reshape(pixels.shape[0], -1).float().cpu())  # [T, P*Dv]
    return torch.stack(out)  # [N, T, P*Dv]


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, *, l2: float = 1e-3,
               steps: int = 100) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression, standardized inputs, L2 on the weights, full-batch L-BFGS
    (deterministic). x [n, d], y [n] -> predict(x [m, d]) -> labels [m]."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # [n, d]
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    z64 = z.double()
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z64 @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach(), b.detach()
    return lambda q: (((q - mean) / std).double() @ w_ + b_).argmax(-1)


def _labels(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.tensor([ord(s.answer) - ord("A") for s in samples])  # [N]


def probe_tasks(model: TinyLlavaVideo, train: Sequence[Sample], held_out: Sequence[Sample],
                load: Callable[[Sample], torch.Tensor], *, l2: float = 1e-3) -> list[ProbeResult]:
    """One-frame and all-frames probe accuracy per task (the rows' `task` column, else their category)."""
    def task_of(s: Sample) -> str:
        return str(s.extra.get("task") or category_of(s) or "all")

    results = []
    for task in dict.fromkeys(task_of(s) for s in train):
        tr = [s for s in train if task_of(s) == task]
        ev = [s for s in held_out if task_of(s) == task]
        if not ev:
            continue
        classes = max(len(s.options or []) for s in tr + ev) or int(_labels(tr + ev).max()) + 1
        xtr, xev = frame_features(model, tr, load), frame_features(model, ev, load)  # [N, T, F]
        ytr, yev = _labels(tr), _labels(ev)
        n, t, f = xtr.shape
        one = fit_linear(xtr.reshape(n * t, f), ytr.repeat_interleave(t), classes, l2=l2)
        one_acc = (one(xev.reshape(-1, f)) == yev.repeat_interleave(t)).double().mean().item()
        whole = fit_linear(xtr.reshape(n, t * f), ytr, classes, l2=l2)
        all_acc = (whole(xev.reshape(len(ev), t * f)) == yev).double().mean().item()
        results.append(ProbeResult(task, category_of(tr[0]) or task, classes, len(tr), len(ev), one_acc, all_acc))
    return results
