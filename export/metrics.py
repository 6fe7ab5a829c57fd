"""The quality ladder's numbers, pure: token NLL, KL from a reference, top-1 agreement, over token windows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np

#: Rows of log-probabilities handled at once (bounds float64 scratch to rows x vocab x 8 bytes).
ROW_CHUNK = 64


def log_softmax(logits) -> "np.ndarray":
    """Row-wise log-probabilities in float64 (stable log-sum-exp)."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    shifted = rows - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logp, logp) -> "np.ndarray":
    """Per-row KL(p || q) in nats, from log-probabilities ``ref_logp`` (p) and ``logp`` (q).

    0 * log 0 counts as 0; a sum rounding puts a hair below 0 (identical distributions) is reported as 0.
    """
    import numpy as np

    ref = np.asarray(ref_logp, dtype=np.float64)
    other = np.asarray(logp, dtype=np.float64)
    p = np.exp(ref)
    with np.errstate(invalid="ignore"):  # -inf - (-inf) where both give a token no probability
        terms = np.where(p > 0, p * (ref - other), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def top1_matches(ref_logp, logp) -> "np.ndarray":
    """Per row: True where both distributions put their largest probability on the same token."""
    import numpy as np

    return np.argmax(np.asarray(ref_logp), axis=-1) == np.argmax(np.asarray(logp), axis=-1)


def target_nll(logp, targets: Sequence[int]) -> "np.ndarray":
    """Per row: minus the log-probability of that row's target token."""
    import numpy as np

    logp = np.asarray(logp)
    return -logp[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)].astype(np.float64)


@dataclass
class Reference:
    """Rung 1's log-probabilities, one array per window.

    float32, not float16 or top-k: float16 moves a KL by 1e-4 nats (a whole full-precision hand-off),
    top-k would understate the KL of a rung that spreads probability into the tail.
    """

    logp: list["np.ndarray"] = field(default_factory=list)


def score_windows(
    logits_per_window: Iterable["np.ndarray"], windows: list[list[int]], vocab: int, reference: Reference | None,
    scored: list[list[int]] | None = None,
) -> tuple[float, float, float, Reference | None]:
    """Mean NLL, mean KL from the reference, top-1 agreement; and a new Reference when none was given.

    ``logits_per_window`` yields, per window, at least ``len(window) - 1`` rows of logits (row ``i``
    predicts token ``i + 1``); only the first ``vocab`` columns count, so vocabulary padding drops out.
    ``scored`` names, per window, the rows that count (default: all); the Reference keeps only those.
    """
    import numpy as np

    made = Reference() if reference is None else None
    nll = kl = 0.0
    agree = count = 0
    for n, (window, logits) in enumerate(zip(windows, logits_per_window, strict=True)):
        if scored is None:
            rows, targets = len(window) - 1, window[1:]
            logits = logits[:rows, :vocab]
        else:
            rows, targets = len(scored[n]), [window[i + 1] for i in scored[n]]
            logits = np.asarray(logits)[np.asarray(scored[n], dtype=np.int64), :vocab]
        kept = []
        for start in range(0, rows, ROW_CHUNK):
            logp = log_softmax(logits[start : start + ROW_CHUNK])
            nll += float(target_nll(logp, targets[start : start + ROW_CHUNK]).sum())
            if made is not None:
                kept.append(logp.astype(np.float32))
            else:
                ref = reference.logp[n][start : start + ROW_CHUNK]
                kl += float(kl_divergence(ref, logp).sum())
                agree += int(top1_matches(ref, logp).sum())
        if made is not None:
            made.logp.append(np.concatenate(kept))
        count += rows
    if made is not None:
        return nll / count, 0.0, 1.0, made
    return nll / count, kl / count, agree / count, None
