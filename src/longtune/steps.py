"""Which examples each optimizer step trains on: from an in-memory list by a seeded plan (`PlannedSteps`), or
read in order from the training stream (`StreamedSteps`). Either gives every rank the step's global example list,
so the step's loss normaliser needs no communication; data-parallel rank d then takes the d-th slice."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from longtune.config import TrainConfig
from longtune.errors import DataError


@dataclass(frozen=True)
class StepPlan:
    """Which examples each optimizer step uses: a seeded permutation per epoch, cut into steps of
    batch * GA * dp examples (the last step of an epoch may be smaller); `StepData.micro_batches` gives each
    data-parallel rank its slice. Every rank can list the whole step, so the step's
    global loss-token count needs no communication."""

    num_examples: int
    batch_size: int
    grad_accum: int
    dp: int
    seed: int
    total_steps: int

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.dp

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.per_step)

    def epoch_of(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step / self.steps_per_epoch

    def step_examples(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[index * self.per_step : (index + 1) * self.per_step].tolist()


def plan_steps(num_examples: int, t: TrainConfig, dp: int = 1) -> StepPlan:
    args = (num_examples, t.per_device_train_batch_size, t.gradient_accumulation_steps, dp, t.seed)
    per_epoch = StepPlan(*args, 0).steps_per_epoch
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    return StepPlan(*args, max(total, 1))


@dataclass(frozen=True)
class StepData:
    """One optimizer step's examples on all ranks, in order."""

    examples: list
    ids: list[int] | None  # their indices in the in-memory example list (precomputed references); None streamed
    epoch: float  # epochs completed after this step
    ends_epoch: bool

    def micro_batches(self, batch_size: int, grad_accum: int, dp_rank: int) -> list[tuple[list, list[int] | None]]:
        """Rank dp_rank's micro-batches: (examples, ids) of the dp_rank-th slice of batch * GA, `batch_size` each."""
        per_rank = batch_size * grad_accum
        first, last = dp_rank * per_rank, (dp_rank + 1) * per_rank
        mine = self.examples[first:last]
        ids = self.ids[first:last] if self.ids is not None else None
        return [
            (mine[i : i + batch_size], ids[i : i + batch_size] if ids is not None else None)
            for i in range(0, len(mine), batch_size)
        ]

    def rounds(self, batch_size: int, grad_accum: int) -> int:
        """Micro-batches every rank runs this step: those of rank 0, which has the most (the others pad with
        blank micro-batches so that all issue the same collectives)."""
        return math.ceil(min(len(self.examples), batch_size * grad_accum) / batch_size)


class PlannedSteps:
    """The steps of an in-memory example list by a StepPlan: random access, so resuming replays nothing."""

    def __init__(self, plan: StepPlan, examples: list):
        self.plan = plan
        self.examples = examples
        self.total_steps = plan.total_steps
        self.steps_per_epoch: int | None = plan.steps_per_epoch

    def step(self, index: int) -> StepData:
        """Step index + 1 (0-based index, like StepPlan)."""
        ids = self.plan.step_examples(index)
        return StepData([self.examples[i] for i in ids], ids, self.plan.epoch_of(index + 1),
                        (index + 1) % self.plan.steps_per_epoch == 0)

    def skip(self, steps: int) -> None:
        """Nothing to do: any step can be listed directly."""


class StreamedSteps:
    """Steps read in order from the training stream: `open_epoch(e)` starts pass e over the data (re-read,
    reshuffled). Every rank reads the same stream, so every rank builds the same global list per step. An
    epoch's last step may be smaller, as with StepPlan; the stream is read one example ahead so that the step
    ending an epoch is known as such. `epoch` counts completed passes (the length of a pass is not known)."""

    steps_per_epoch: int | None = None

    def __init__(self, open_epoch: Callable[[int], Iterator[Any]], per_step: int, total_steps: int):
        self._open_epoch = open_epoch
        self.per_step = per_step
        self.total_steps = total_steps
        self._epochs_done = 0
        self._stream: Iterator[Any] | None = None
        self._head: Any = None
        self._next_index = 0

    def step(self, index: int) -> StepData:
        if index != self._next_index:
            raise ValueError(f"streamed steps are read in order: step {index + 1} asked for after {self._next_index}")
        self._next_index += 1
        if self._stream is None:
            self._stream = iter(self._open_epoch(self._epochs_done))
            self._head = next(self._stream, _END)
            if self._head is _END:
                raise DataError(
                    "streaming: a pass over the training data gave no examples (every row was dropped or skipped, "
                    "or val_size held them all out)"
                )
        examples = []
        while len(examples) < self.per_step and self._head is not _END:
            examples.append(self._head)
            self._head = next(self._stream, _END)
        ends_epoch = self._head is _END
        if ends_epoch:
            self._epochs_done += 1
            self._stream = None
        return StepData(examples, None, float(self._epochs_done), ends_epoch)

    def skip(self, steps: int) -> None:
        """Replay the stream through the first `steps` steps without training (resume): every row they used is
        read and tokenized again."""
        for index in range(self._next_index, steps):
            self.step(index)


_END = object()
