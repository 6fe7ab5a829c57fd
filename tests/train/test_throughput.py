"""The training's pace: tokens and rows per second over the timed steps, without warm-up, evaluations or saves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.throughput import StepClock, steady_throughput, warmup_steps


def test_the_pace_counts_only_the_steps_after_the_warm_up():
    steps = [(2, 9.0, 100), (3, 0.5, 1000), (4, 1.5, 3000)]  # step 2 compiled
    assert steady_throughput(steps, warmup=2, rows_per_step=8) == {
        "from_step": 3, "to_step": 4, "steps": 2, "seconds": 2.0, "tokens_per_s": 2000.0, "rows_per_s": 8.0,
        "step_s": 1.0}


def test_no_pace_without_a_timed_step_past_the_warm_up():
    assert steady_throughput([], warmup=1, rows_per_step=8) is None
    assert steady_throughput([(1, 3.0, 10)], warmup=1, rows_per_step=8) is None


@pytest.mark.parametrize(("max_steps", "warmup"), [(4, 1), (40, 4), (120, 10), (700, 10)])
def test_the_warm_up_is_a_tenth_of_the_run_between_one_and_ten_steps(max_steps, warmup):
    assert warmup_steps(max_steps) == warmup


def step_end(clock: StepClock, step: int, tokens: int, main: bool = True):
    clock.on_step_end(None, SimpleNamespace(global_step=step, num_input_tokens_seen=tokens,
                                            is_world_process_zero=main), None)


def test_the_clock_times_each_step_from_the_last_ones_end_and_skips_an_evaluation_or_a_save():
    now = iter([10.0, 11.0, 20.0, 21.5, 30.0, 31.0])
    clock = StepClock(clock=lambda: next(now))
    clock.on_train_begin(None, None, None)
    step_end(clock, 1, 100)             # 10.0: the first end starts the clock
    step_end(clock, 2, 300)             # 11.0
    clock.on_evaluate(None, None, None)
    step_end(clock, 3, 500)             # 20.0: held the evaluation
    step_end(clock, 4, 800)             # 21.5
    clock.on_save(None, None, None)
    step_end(clock, 5, 900)             # 30.0: held the save
    step_end(clock, 6, 1000)            # 31.0
    assert clock.steps == [(2, 1.0, 200), (4, 1.5, 300), (6, 1.0, 100)]


def test_after_a_resume_the_warm_up_counts_from_the_step_the_run_began_at():
    fresh, resumed = StepClock(clock=lambda: 0.0), StepClock(clock=lambda: 0.0)
    step_end(fresh, 1, 0)
    step_end(resumed, 51, 0)  # continued from checkpoint-50: its first steps compile again
    assert (fresh.start_step, fresh.warmup_until(100)) == (0, 10)
    assert (resumed.start_step, resumed.warmup_until(100)) == (50, 55)  # a tenth of the 50 steps it trains


def test_only_the_main_process_keeps_time():
    clock = StepClock(clock=lambda: 1.0)
    for step in (1, 2, 3):
        step_end(clock, step, step * 10, main=False)
    assert clock.steps == []
