"""Padding-free micro-batches: rows packed into one, padded to a few lengths for CUDA graphs, folded steps.

Pure functions of token ids (tests/train/test_packing.py pins them); why each exists is in docs/performance.md.
"""

from __future__ import annotations

from typing import Sequence

from train.data import IGNORE_INDEX

#: Most tokens one folded micro-batch may hold (rows x MAX_SEQ_LENGTH, the worst case): 16 rows of
#: 1024 tokens; an 8B base with checkpointed layers holds this in well under 24 GB.
FOLD_TOKEN_BUDGET = 16384


def micro_batching(batch_size: int, grad_accum: int, max_seq_length: int, levers) -> tuple[int, int]:
    """``(rows per micro-batch, accumulation steps)`` for BATCH_SIZE x GRAD_ACCUM rows per optimizer step: folded into
    one packed micro-batch where the levers pack and fold and the rows fit :data:`FOLD_TOKEN_BUDGET`."""
    rows = batch_size * grad_accum
    if levers.fold_accumulation and levers.packing and grad_accum > 1 and rows * max_seq_length <= FOLD_TOKEN_BUDGET:
        return rows, 1
    return batch_size, grad_accum


#: The batch entry (a Python int) that counts a bucketed packed micro-batch's real tokens: the filler
#: that pads it to its bucket is not data. The trainer reads it and never passes it to the model.
REAL_TOKENS = "real_tokens"
#: A packed batch's key for the positions that carry a next-token label (:func:`label_positions`).
LABEL_POSITIONS = "label_positions"


def real_tokens(batch: dict) -> int:
    """How many of a collated batch's tokens are data: all of them, less a bucket's filler."""
    return int(batch[REAL_TOKENS]) if REAL_TOKENS in batch else int(batch["input_ids"].numel())


def label_positions(labels):
    """Where ``labels`` (a CPU tensor, rows x length) score a prediction: the flat indices, over rows x length, of
    the positions whose next token has a label (the LM head scores the hidden state at ``t`` against label ``t + 1``).

    Computed here, on the CPU, they let the GPU gather the scored positions without a boolean mask, whose
    indexing makes the CPU wait for the GPU (train/speed/trainer.py)."""
    rows, scored = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + scored


def bucket_length(tokens: int, per_octave: int = 8, smallest_step: int = 64) -> int:
    """The length a packed row of ``tokens`` is padded to: one of ``per_octave`` sizes per doubling.

    A CUDA graph replays one recorded shape; packed rows change length every step, so each new
    length would record a graph of its own. Rounding up to 8 sizes per octave (2048, 2304, 2560, ...)
    leaves a run a few dozen shapes at most, for less than 12.5% padding (6% on average).
    """
    if tokens < 1:
        raise ValueError(f"tokens={tokens}: a packed row holds at least one token")
    step = max(smallest_step, (1 << (tokens.bit_length() - 1)) // per_octave)
    return -(-tokens // step) * step


def collate_packed(rows: Sequence[dict[str, Sequence[int]]], bucket: bool = False, positions: bool = False):
    """A padding-free micro-batch: ``rows`` concatenated into one row of ``input_ids``, ``labels``, ``position_ids``.

    Position ids restart at 0 for each row; from that (and no ``attention_mask``) transformers
    builds a block-diagonal causal mask, so no token attends to another row. Each row's first
    label becomes -100: the model predicts label ``t`` from token ``t - 1``, which for a row's
    first token is the previous row's last one. Nothing is padded, so every token is real.

    Rows that all have one length hold no padding to remove: they stay separate rows (same
    position ids and labels), because a plain causal batch runs sdpa's flash kernel, which an
    explicit block-diagonal mask rules out (docs/performance.md).

    ``bucket`` (for CUDA graphs, which replay fixed shapes): the packed row is padded to
    :func:`bucket_length` with a filler segment of its own (token 0, positions from 0, no labels),
    which attends only to itself and adds nothing to the loss; :data:`REAL_TOKENS` counts the rest.
    ``positions``: :data:`LABEL_POSITIONS` lists the positions the LM head scores (:func:`label_positions`),
    for the trainer (train/speed/trainer.py), which takes the key out before the batch reaches the model.
    """
    import torch

    input_ids = [list(row["input_ids"]) for row in rows]
    labels = [[IGNORE_INDEX, *list(row["labels"])[1:]] for row in rows]
    position_ids = [list(range(len(ids))) for ids in input_ids]
    batch = {}
    if len({len(ids) for ids in input_ids}) > 1:
        input_ids, labels, position_ids = ([sum(part, [])] for part in (input_ids, labels, position_ids))
        real = len(input_ids[0])
        filler = bucket_length(real) - real if bucket else 0
        if filler:
            input_ids[0] += [0] * filler
            labels[0] += [IGNORE_INDEX] * filler
            position_ids[0] += list(range(filler))
            batch[REAL_TOKENS] = real
    labels = torch.tensor(labels, dtype=torch.long)
    if positions:
        batch[LABEL_POSITIONS] = label_positions(labels)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": labels,
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        **batch,
    }
