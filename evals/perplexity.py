"""Perplexity of a model on plain text, for a GGUF (llama.cpp) or an HF folder (torch).

Both paths measure the same thing so their numbers can be compared:

* each text is tokenized the model's own way (BOS only where the model's
  tokenizer adds one), then cut into consecutive windows of at most ``n_ctx``
  tokens; every window is scored on its own, from an empty context;
* inside a window, token ``i`` is predicted from tokens ``0..i-1``; the first
  token of a window is context only, never predicted;
* perplexity is ``exp`` of the mean negative log-likelihood over every
  predicted token of every text (a token-weighted mean, not a mean of
  per-text perplexities).

Non-overlapping windows make the figure slightly pessimistic for long texts
(the start of each window has little context) but keep it exact, cheap and
identical across the two back ends; short paragraphs rarely need a second
window at all.

Two files that tokenize a text the same way (a GGUF and its quantizations) can
be compared token by token: :func:`paired_ratio` turns their per-token NLLs into
the perplexity ratio and a 95% interval for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np

DEFAULT_N_CTX = 512


@dataclass(frozen=True)
class NllSum:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    total: float
    tokens: int

    def __add__(self, other: "NllSum") -> "NllSum":
        return NllSum(self.total + other.total, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        if self.tokens == 0:
            raise ValueError("no token was predicted: every text is shorter than two tokens")
        return self.total / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


def token_windows(tokens: Sequence[int], n_ctx: int) -> list[list[int]]:
    """Consecutive windows of at most ``n_ctx`` tokens; windows of one token predict nothing and are dropped."""
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, got {n_ctx}")
    windows = [list(tokens[start : start + n_ctx]) for start in range(0, len(tokens), n_ctx)]
    return [w for w in windows if len(w) >= 2]


def token_nll_from_logits(logits, tokens: Sequence[int]) -> "np.ndarray":
    """Per predicted token: the NLL of ``tokens[i + 1]`` under row ``i`` of ``logits`` (float64, nats).

    ``logits`` is a ``(len(tokens), vocab)`` array (numpy); only the first
    ``len(tokens) - 1`` rows are used. Stable log-sum-exp: the row's largest
    logit is subtracted before ``exp`` (computed in float32, where the shifted
    values lie in ``[-inf, 0]``) and the sum of exponentials is taken in float64.
    """
    import numpy as np

    rows = np.asarray(logits[: len(tokens) - 1], dtype=np.float32)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = peak[:, 0].astype(np.float64) + np.log(np.exp(rows - peak).sum(axis=1, dtype=np.float64))
    return log_norm - rows[np.arange(len(targets)), targets].astype(np.float64)


def nll_from_logits(logits, tokens: Sequence[int]) -> NllSum:
    """Summed NLL of ``tokens[1:]`` given row ``i`` of ``logits`` predicts token ``i + 1``."""
    nll = token_nll_from_logits(logits, tokens)
    return NllSum(float(nll.sum()), int(len(nll)))


def capped_windows(token_lists: Iterable[Sequence[int]], n_ctx: int, max_tokens: int | None = None) -> list[list[int]]:
    """Each token list cut into windows (:func:`token_windows`), in order, until ``max_tokens`` tokens are predicted.

    The last window is shortened so that the predictions add up to exactly
    ``max_tokens`` when the texts hold that many (``None``: no cap).
    """
    windows: list[list[int]] = []
    left = max_tokens
    for tokens in token_lists:
        for window in token_windows(tokens, n_ctx):
            if left is not None:
                window = window[: left + 1]
                if len(window) < 2:
                    return windows
                left -= len(window) - 1
            windows.append(window)
    return windows


def llama_window_logits(llm, window: Sequence[int]) -> "np.ndarray":
    """llama.cpp's logits at every position of ``window``, evaluated from an empty context.

    ``llm`` is an open ``llama_cpp.Llama`` whose ``n_batch`` is at least
    ``len(window)``; it need not have been made with ``logits_all`` (the same
    instance can also serve chats, which then skip computing logits they never
    read). This is ``Llama.eval`` with every position marked as an output.
    The returned ``(len(window), vocab)`` array is a view of llama.cpp's buffer,
    valid until the next call on ``llm``.
    """
    import numpy as np

    if len(window) > llm.n_batch:
        raise ValueError(f"a window of {len(window)} tokens needs n_batch >= {len(window)} "
                         f"(the Llama has {llm.n_batch})")
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    llm._batch.set_batch(batch=list(window), n_past=0, logits_all=True)
    llm._ctx.decode(llm._batch)
    vocab = llm.n_vocab()
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(window) * vocab,)).reshape(len(window), vocab)


def llama_token_nll(llm, texts: Iterable[str], n_ctx: int, max_tokens: int | None = None) -> "np.ndarray":
    """Per-token NLL of ``texts`` under an open llama.cpp model, in order, at most ``max_tokens`` of them.

    Each text is tokenized by llama.cpp with BOS as the model adds it, cut
    into windows of ``n_ctx`` (:func:`capped_windows`), and every window is
    scored from an empty context. ``llm`` needs ``n_batch >= n_ctx``.
    """
    import numpy as np

    tokenized = (llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in texts)
    parts = [token_nll_from_logits(llama_window_logits(llm, window), window)
             for window in capped_windows(tokenized, n_ctx, max_tokens)]
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    return np.concatenate(parts) if parts else np.zeros(0)


def paired_ratio(reference_nll, other_nll) -> tuple[float, float, float]:
    """Perplexity ratio ``other / reference`` on the same tokens, and its 95% interval ``(ratio, low, high)``.

    Both arguments are per-token NLLs of the same token sequence (same
    tokenizer, same windows). The ratio is ``exp(mean(other - reference))``;
    the interval is ``exp(mean +- 1.96 * sd / sqrt(n))`` of those per-token
    differences (a normal approximation: the tokens are treated as independent).
    """
    import numpy as np

    ref = np.asarray(reference_nll, dtype=np.float64)
    other = np.asarray(other_nll, dtype=np.float64)
    if ref.shape != other.shape or ref.size < 2:
        raise ValueError(f"paired_ratio needs two per-token NLLs of one token sequence "
                         f"(got {ref.size} and {other.size})")
    diff = other - ref
    mean = float(diff.mean())
    half = 1.96 * float(diff.std(ddof=1)) / math.sqrt(diff.size)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def gguf_nll(gguf_path: str | os.PathLike, texts: Iterable[str], n_ctx: int = DEFAULT_N_CTX,
             n_threads: int | None = None) -> NllSum:
    """Summed NLL of ``texts`` under the GGUF model (llama.cpp)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads or default_threads(),
                verbose=False)
    try:
        nll = llama_token_nll(llm, texts, n_ctx)
        return NllSum(float(nll.sum()), int(len(nll)))
    finally:
        llm.close()


def gguf_perplexity(gguf_path: str | os.PathLike, texts: Iterable[str], n_ctx: int = DEFAULT_N_CTX,
                    n_threads: int | None = None) -> float:
    """Perplexity of ``texts`` under a GGUF model, through llama.cpp."""
    return gguf_nll(gguf_path, texts, n_ctx=n_ctx, n_threads=n_threads).perplexity


def hf_nll(model_dir: str | os.PathLike, texts: Iterable[str], n_ctx: int = DEFAULT_N_CTX) -> NllSum:
    """Summed NLL of ``texts`` under a Hugging Face model folder (fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    result = NllSum(0.0, 0)
    with torch.inference_mode():
        for text in texts:
            tokens = tokenizer(text, add_special_tokens=True)["input_ids"]
            for window in token_windows(tokens, n_ctx):
                logits = model(torch.tensor([window])).logits[0]
                result = result + nll_from_logits(logits.float().numpy(), window)
    return result


def hf_perplexity(model_dir: str | os.PathLike, texts: Iterable[str], n_ctx: int = DEFAULT_N_CTX) -> float:
    """Perplexity of ``texts`` under a Hugging Face model folder, through transformers."""
    return hf_nll(model_dir, texts, n_ctx=n_ctx).perplexity


def read_paragraphs(path: str | os.PathLike) -> list[str]:
    """A text file as paragraphs (blank-line separated): one perplexity text each."""
    text = Path(path).read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
