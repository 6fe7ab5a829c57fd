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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

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


def nll_from_logits(logits, tokens: Sequence[int]) -> NllSum:
    """Summed NLL of ``tokens[1:]`` given row ``i`` of ``logits`` predicts token ``i + 1``.

    ``logits`` is a ``(len(tokens), vocab)`` array (numpy); only the first
    ``len(tokens) - 1`` rows are used. Computed in float64 with a stable
    log-sum-exp.
    """
    import numpy as np

    rows = np.asarray(logits[: len(tokens) - 1], dtype=np.float64)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    picked = rows[np.arange(len(targets)), targets]
    return NllSum(float((log_norm - picked).sum()), int(len(targets)))


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def gguf_nll(gguf_path: str | os.PathLike, texts: Iterable[str], n_ctx: int = DEFAULT_N_CTX,
             n_threads: int | None = None) -> NllSum:
    """Summed NLL of ``texts`` under the GGUF model (llama.cpp, all logits kept)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=n_threads or default_threads(),
        verbose=False,
    )
    try:
        result = NllSum(0.0, 0)
        for text in texts:
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            for window in token_windows(tokens, n_ctx):
                llm.reset()
                llm.eval(window)
                result = result + nll_from_logits(llm.scores[: len(window)], window)
        return result
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
