"""Which rows each GPU trains on: every optimizer step's rows split so that the GPUs get about the same tokens.

With several processes (DDP), each GPU takes its own micro-batch and waits for the others at the gradient
all-reduce, so a step lasts as long as its longest micro-batch. Rows drawn at random differ in length (FineTome's
from a few dozen tokens to a thousand), and so do the micro-batches made of them: the GPU that drew the short ones
idles. :class:`BalancedSampler` draws the same shuffled order as a random sampler would, then within each group of
``processes x rows`` consecutive rows (the rows of one micro-batch on every GPU) hands the longest rows out first,
each to the GPU with the fewest tokens so far that still has room (:func:`balanced_window`). Every GPU still gets
exactly its BATCH_SIZE rows, each row is seen once per epoch, and the rows of an optimizer step are the same set
whatever the number of GPUs (so is the loss; only which GPU computes which part changes).

Used with packed (padding-free) micro-batches, whose cost is their token count; a padded batch costs its longest
row times its rows, which this would not balance. Pure functions, so tests pin them exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def balanced_window(window: Sequence[int], lengths: Sequence[int], processes: int) -> list[int]:
    """``window`` (row indices, ``processes`` x k of them) reordered as ``processes`` consecutive chunks of k rows,
    chunk r for process r, with the tokens (``lengths[row]``) spread as evenly as a greedy split gives: the longest
    row first, each to the chunk with the fewest tokens that has room (ties: the lower chunk). Inside a chunk the rows
    keep their order in ``window``. A window that does not divide evenly (the epoch's last) is left as it is."""
    if processes <= 1 or not window or len(window) % processes:
        return list(window)
    room = len(window) // processes
    chunks: list[list[int]] = [[] for _ in range(processes)]
    tokens = [0] * processes
    for place in sorted(range(len(window)), key=lambda i: (-lengths[window[i]], i)):
        chunk = min((c for c in range(processes) if len(chunks[c]) < room), key=lambda c: (tokens[c], c))
        chunks[chunk].append(place)
        tokens[chunk] += lengths[window[place]]
    return [window[place] for chunk in chunks for place in sorted(chunk)]


def balanced_order(order: Sequence[int], lengths: Sequence[int], rows: int, processes: int) -> list[int]:
    """``order`` with each window of ``rows`` x ``processes`` consecutive rows split by :func:`balanced_window`."""
    window = rows * processes
    out: list[int] = []
    for start in range(0, len(order), window):
        out += balanced_window(order[start:start + window], lengths, processes)
    return out


def chunk_tokens(order: Sequence[int], lengths: Sequence[int], rows: int) -> list[int]:
    """The tokens of each consecutive chunk of ``rows`` rows in ``order`` (what each micro-batch holds)."""
    return [sum(lengths[i] for i in order[start:start + rows]) for start in range(0, len(order), rows)]


class BalancedSampler:
    """A torch ``Sampler`` of row indices: a seeded shuffle per epoch (``seed + epoch``, the same on every process),
    then :func:`balanced_order`. Accelerate's sharding gives process r the r-th chunk of ``rows`` of each window, so
    the chunks :func:`balanced_window` made are the processes' micro-batches. ``set_epoch`` is called by the trainer
    at each epoch; an iteration without it moves to the next epoch, as accelerate's seeded sampler does."""

    def __init__(self, lengths: Sequence[int], rows: int, processes: int, seed: int):
        self.lengths = list(lengths)
        self.rows, self.processes, self.seed = rows, processes, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        import torch

        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        return balanced_order(shuffled, self.lengths, self.rows, self.processes)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        yield from order
        self.epoch += 1
