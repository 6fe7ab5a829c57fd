"""How fast the run trained: tokens and rows per second once the first steps (compiling, warming up) are past.

:class:`StepClock` notes, in the main process, the wall time and the tokens seen (transformers' count, over
all processes) at the end of every optimizer step. A step whose interval held an evaluation or a checkpoint
save is left out, as are the warm-up steps (:func:`warmup_steps`, also after a resume), so the figure is the
training's own pace: what ``train_summary.json`` reports as ``throughput`` and the ``done:`` line says, and
what bench/multi_gpu_scaling.py compares between one GPU and several. bench/train_throughput.py times its
steps with the same clock, waiting for the GPU before each reading.
"""

from __future__ import annotations

import time
from typing import Callable

from transformers import TrainerCallback


def warmup_steps(max_steps: int) -> int:
    """Steps left out at the start: the first tenth of the run, at least one and at most 10."""
    return max(1, min(10, max_steps // 10))


def steady_throughput(steps: list[tuple[int, float, int]], warmup: int, rows_per_step: int) -> dict | None:
    """The pace over ``steps`` (``(step, seconds, tokens)`` of each timed step) after step ``warmup`` (the last
    warm-up step, :meth:`StepClock.warmup_until`); None if no step is left to time."""
    kept = [(step, seconds, tokens) for step, seconds, tokens in steps if step > warmup]
    seconds = sum(seconds for _, seconds, _ in kept)
    if not kept or seconds <= 0:
        return None
    tokens = sum(tokens for _, _, tokens in kept)
    return {"from_step": kept[0][0], "to_step": kept[-1][0], "steps": len(kept), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "rows_per_s": round(rows_per_step * len(kept) / seconds, 2),
            "step_s": round(seconds / len(kept), 4)}


class StepClock(TrainerCallback):
    """The wall time and tokens of each optimizer step, from one step's end to the next, the first step's from its
    beginning (main process only).

    ``wait`` is called with the step count before each reading of the clock: the speed bench synchronizes CUDA
    there, so a step's time holds its GPU work, not only the CPU's queueing of it.
    """

    def __init__(self, clock=time.perf_counter, wait: Callable[[int], None] | None = None):
        self.clock = clock
        self.wait = wait
        self.steps: list[tuple[int, float, int]] = []
        #: The step this run began from (0, or the checkpoint's step on a resume); None before its first step.
        self.start_step: int | None = None
        self._last: tuple[float, int] | None = None
        self._tokens_at_start = 0
        self._interrupted = False

    def warmup_until(self, max_steps: int) -> int:
        """The last step left out as warm-up: :func:`warmup_steps` of the steps this run trains, past its start."""
        start = self.start_step or 0
        return start + warmup_steps(max_steps - start)

    def _now(self, state) -> float:
        if self.wait is not None:
            self.wait(state.global_step)
        return self.clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last, self._interrupted = None, False
        self._tokens_at_start = tokens_seen(state)

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer has counted the step's first micro-batch by now: its tokens count from the run's start.
        if state.is_world_process_zero and self._last is None:
            self._last = (self._now(state), self._tokens_at_start)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        now, tokens = self._now(state), tokens_seen(state)
        if self.start_step is None:
            self.start_step = state.global_step - 1
        if self._last is not None and not self._interrupted:
            self.steps.append((state.global_step, now - self._last[0], tokens - self._last[1]))
        self._last, self._interrupted = (now, tokens), False

    def on_evaluate(self, args, state, control, **kwargs):
        self._interrupted = True

    def on_save(self, args, state, control, **kwargs):
        self._interrupted = True


def tokens_seen(state) -> int:
    """transformers' count of input tokens so far (0 before it counts any, or without a state)."""
    return int(getattr(state, "num_input_tokens_seen", 0) or 0)
