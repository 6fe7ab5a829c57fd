"""Which rows each GPU trains on (train/balance.py): every step's rows split into micro-batches of about the same
tokens, each row once, and the same rows per optimizer step whatever the number of GPUs."""

from __future__ import annotations

import random

from train.balance import BalancedSampler, balanced_order, balanced_window, chunk_tokens


def test_the_longest_rows_go_out_first_each_to_the_chunk_with_the_fewest_tokens():
    lengths = {10: 100, 11: 90, 12: 60, 13: 50, 14: 20, 15: 10}
    # 100 -> chunk 0; 90 -> 1; 60 -> 1 (90 < 100); 50 -> 0 (100 < 150); 20 -> 0 (150 = 150, the lower chunk);
    # chunk 0 is full, 10 -> 1. Inside a chunk the rows keep their order in the window.
    assert balanced_window([15, 14, 13, 12, 11, 10], lengths, 2) == [14, 13, 10, 15, 12, 11]
    assert chunk_tokens([14, 13, 10, 15, 12, 11], lengths, 3) == [170, 160]


def test_every_row_is_kept_once_and_each_process_gets_its_rows():
    rng = random.Random(0)
    lengths = [rng.randint(3, 1000) for _ in range(64)]
    window = rng.sample(range(64), 24)
    split = balanced_window(window, lengths, 4)
    assert sorted(split) == sorted(window)
    tokens = chunk_tokens(split, lengths, 6)
    assert len(tokens) == 4 and max(tokens) - min(tokens) <= max(lengths)


def test_one_process_or_an_uneven_last_window_is_left_in_its_order():
    lengths = list(range(1, 11))
    assert balanced_window([3, 1, 2], lengths, 1) == [3, 1, 2]
    assert balanced_window([3, 1, 2], lengths, 2) == [3, 1, 2]
    assert balanced_order([9, 8, 1, 2, 7], lengths, 2, 2) == [9, 1, 8, 2, 7]  # 7: the last, uneven window


def test_random_rows_split_far_more_evenly_than_drawn():
    rng = random.Random(1)
    lengths = [min(1000, max(3, round(rng.lognormvariate(5.8, 0.75)))) for _ in range(2000)]
    order = list(range(2000))
    rng.shuffle(order)

    def worst_gap(sequence):
        tokens = chunk_tokens(sequence, lengths, 8)
        return sum(abs(a - b) for a, b in zip(tokens[0::2], tokens[1::2])) / (len(tokens) // 2)

    assert worst_gap(balanced_order(order, lengths, 8, 2)) < worst_gap(order) / 5


def test_an_optimizer_step_holds_the_same_rows_on_one_gpu_or_several():
    lengths = [random.Random(2).randint(5, 500) for _ in range(96)]
    one = BalancedSampler(lengths, 16, 1, seed=7).order()  # BATCH_SIZE 8, GRAD_ACCUM 2, folded into 16 rows
    two = BalancedSampler(lengths, 8, 2, seed=7).order()  # BATCH_SIZE 8 on each of 2 GPUs
    four = BalancedSampler(lengths, 4, 4, seed=7).order()
    steps = [[set(order[start:start + 16]) for start in range(0, 96, 16)] for order in (one, two, four)]
    assert steps[0] == steps[1] == steps[2]
    assert two != one  # the rows moved between the GPUs


def test_the_shuffle_is_seeded_per_epoch_and_the_same_in_every_process():
    lengths = list(range(5, 45))
    sampler = BalancedSampler(lengths, 4, 2, seed=3)
    assert len(sampler) == 40
    first = list(sampler)
    again = BalancedSampler(lengths, 4, 2, seed=3)
    assert list(again) == first  # another process draws the same order
    assert list(again) != first  # iterating again moves to the next epoch
    sampler.set_epoch(0)
    assert list(sampler) == first and sampler.epoch == 1
