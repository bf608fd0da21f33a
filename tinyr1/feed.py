"""Feeds samples to the trainer: a seeded order per epoch, frames decoded once per visit, bad
videos skipped and counted (the run stops only when more than `max_bad_fraction` are bad).

The position (epoch, index) is part of the checkpoint, so a resumed run sees the same samples.

Under torchrun every rank walks the same global order and keeps the same position; each decodes
only its contiguous share of the batch (`tinyr1.distributed`). Which videos are unreadable is
agreed between ranks, so the global batch is the one a single process would draw, whatever the
number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tinyr1 import distributed as dist
from tinyr1.checkpoint import TrainState
from tinyr1.errors import DataError, VideoError


class SampleFeeder:
    """Yields (sample, frames [T, 3, S, S]) batches in a reproducible order."""

    def __init__(
        self,
        samples: Sequence[Any],
        load_frames: Callable[[Any], torch.Tensor],
        *,
        seed: int,
        max_bad_fraction: float,
        state: TrainState | None = None,
        on_skip: Callable[[str], None] | None = None,
    ) -> None:
        if not samples:
            raise DataError("the training set is empty: nothing to train on")
        self.samples = samples
        self.load_frames = load_frames
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.on_skip = on_skip
        st = state or TrainState()
        self.epoch, self.position, self.seen = st.epoch, st.position, st.seen
        self.bad = list(st.bad_videos)
        self.run_id = st.run_id
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.samples), generator=gen).tolist()

    def state(self) -> TrainState:
        return TrainState(epoch=self.epoch, position=self.position, seen=self.seen, bad_videos=list(self.bad),
                          run_id=self.run_id)

    def next_batch(self, n: int) -> list[tuple[Any, torch.Tensor]]:
        """The next n readable samples of the global order with their frames; under torchrun, this
        rank's contiguous share of them (n / world size)."""
        if dist.world_size() > 1:
            return self._next_share(n)
        out: list[tuple[Any, torch.Tensor]] = []
        while len(out) < n:
            sample = self._draw()
            self.seen += 1
            try:
                out.append((sample, self.load_frames(sample)))
            except VideoError as err:
                self._skip(str(err))  # a VideoError starts with the video's path
        return out

    def _draw(self) -> Any:
        """The next sample of the order (a new epoch's permutation when this one is used up)."""
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        sample = self.samples[self._order[self.position]]
        self.position += 1
        return sample

    def _next_share(self, n: int) -> list[tuple[Any, torch.Tensor]]:
        """`next_batch` under torchrun: the same draws, skips and counters as one process, but each
        rank decodes only the candidates that would land in its slots; the ranks then exchange which
        failed. A skip shifts later samples to other slots, so a slot decoded elsewhere is decoded
        again here (only after an unreadable video)."""
        world, me = dist.world_size(), dist.rank()
        share = n // world
        mine = range(me * share, (me + 1) * share)
        picked: list[Any] = []  # the global batch, in order
        frames: dict[int, torch.Tensor] = {}  # global slot -> [T, 3, S, S] decoded here
        while len(picked) < n:
            candidates = [self._draw() for _ in range(n - len(picked))]
            local: dict[int, torch.Tensor] = {}
            errors: dict[int, str] = {}
            for j, sample in enumerate(candidates):
                if len(picked) + j in mine:
                    try:
                        local[j] = self.load_frames(sample)
                    except VideoError as err:
                        errors[j] = str(err)
            for other in dist.all_gather_objects(errors):
                errors.update(other)
            for j, sample in enumerate(candidates):
                self.seen += 1
                if j in errors:
                    self._skip(errors[j])  # a VideoError starts with the video's path
                    continue
                if j in local:
                    frames[len(picked)] = local[j]
                picked.append(sample)
        out = []
        for slot in mine:
            pixels = frames.get(slot)
            out.append((picked[slot], pixels if pixels is not None else self.load_frames(picked[slot])))
        return out

    def _skip(self, what: str) -> None:
        self.bad.append(what)
        if self.on_skip is not None:
            self.on_skip(f"skipped unreadable video ({len(self.bad)} so far): {what}")
        if len(self.bad) > self.max_bad_fraction * max(self.seen, len(self.samples)):
            listed = "\n  ".join(self.bad[:20])
            raise DataError(
                f"{len(self.bad)} of {self.seen} videos drawn so far are unreadable, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}:\n  {listed}\n"
                "fix: run `tinyr1 data check FILE --video-root DIR` and repair or drop these rows"
            )
