"""The quality ladder: one held-out eval set scored at every hand-off of the export.

Rungs, in the order the export makes them:

1. ``adapter``: the base as it was trained (4-bit NF4 through bitsandbytes when
   the adapter's manifest says ``load_in_4bit``, else full precision) with the
   adapter unmerged, through peft. This is the model training evaluated: the
   reference every other rung is compared with.
2. ``merged``: the merged full-precision Hugging Face folder (transformers).
3. ``F16``: the converted GGUF through llama.cpp.
4. one rung per quantized GGUF, through llama.cpp.

Every rung scores the *same token ids* (the training tokenizer's, fed to
llama.cpp with ``eval()`` rather than re-tokenized), in windows of at most
EVAL_CTX tokens, each window from an empty context. Per rung: the mean token
NLL and its perplexity; against rung 1: the mean KL(rung 1 || rung) of the
next-token distributions and the share of positions where both pick the same
top-1 token. Distributions are compared over the training tokenizer's vocabulary
(``len(tokenizer)``): llama.cpp and some configs pad the vocabulary, and the
padding columns are renormalized away on every rung alike.

Memory: rung 1's log-probabilities are kept for every scored position as
float32 over the tokenizer's vocabulary (``positions x vocab x 4`` bytes:
1,024 positions of SmolLM2's 49,152-token vocabulary are 192 MiB, of Llama-3's
128,256 tokens 501 MiB); LADDER_TOKENS caps the positions, and everything else
is one window at a time, but each merged candidate is scored in float32, 4 bytes
per parameter: that copy sets the ladder's peak. ``ladder_memory_need`` estimates
it from the base's safetensors headers and the export refuses to start without
it (LADDER=false skips the ladder instead). float32 rather than float16 or top-k: float16 rounds a
log-prob near -1.4 by up to 5e-4, which moved a hand-made KL by 1e-4 nats (see
tests/export/test_ladder.py), as much as a full-precision hand-off costs, and
top-k would turn the KL into a lower bound exactly where a broken rung spreads
probability into the tail.

A rung "loses" against its parent (rung 1 for ``merged``, ``merged`` for F16,
F16 for each quantized file) when its mean NLL rises, or its KL from rung 1
grows, by more than the settings allow.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from export.inputs import ExportError

if TYPE_CHECKING:
    import numpy as np

#: Rows of log-probabilities handled at once (bounds float64 scratch to rows x vocab x 8 bytes).
ROW_CHUNK = 64
FULL_PRECISION = "full precision"
QUANTIZED = "quantized"


class LadderError(ExportError):
    """A rung of the ladder lost more quality than the settings allow."""


# --- the metrics (pure) -----------------------------------------------------


def log_softmax(logits) -> "np.ndarray":
    """Row-wise log-probabilities in float64 (stable log-sum-exp)."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    shifted = rows - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logp, logp) -> "np.ndarray":
    """Per-row KL(p || q) in nats, from log-probabilities ``ref_logp`` (p) and ``logp`` (q).

    Terms where p is exactly 0 contribute nothing (0 * log 0 = 0). KL is never negative; a sum
    that rounding puts a hair below 0 (identical distributions) is reported as 0.
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


# --- memory ------------------------------------------------------------------

GIB = 1024**3
#: Fixed part of the margin: Python with torch, transformers and bitsandbytes imported. The export
#: peaked at 404 MiB up to the end of the merge before the ladder existed (docs/benchmarks.md).
BASE_MARGIN = 1 * GIB
#: Share of the float32 model added on top: transformers' load and cast and the allocator's slack.
#: The 1B-shaped export peaked at 8.74 GB RSS: 4.96 GB float32 model + 0.2 GB log-probs + the
#: bf16 checkpoint's 2.48 GB of mapped file pages (reclaimable, so not counted against available
#: memory) leaves 1.1 GB, which this margin (1 GiB + 0.5 GB) covers.
MODEL_MARGIN = 0.10


@dataclass(frozen=True)
class MemoryNeed:
    """The ladder's peak memory, estimated from the base's safetensors headers and config alone."""

    parameters: int
    vocab: int
    model_bytes: int
    logp_bytes: int
    margin_bytes: int

    @property
    def total(self) -> int:
        return self.model_bytes + self.logp_bytes + self.margin_bytes

    def explain(self, ladder_tokens: int) -> str:
        return (f"{self.model_bytes / GIB:.1f} GiB for the merged model in float32 ({self.parameters:,} parameters "
                f"x 4 bytes), {self.logp_bytes / GIB:.2f} GiB for rung 1's log-probs ({ladder_tokens} LADDER_TOKENS "
                f"x {self.vocab:,} vocabulary x 4 bytes), {self.margin_bytes / GIB:.1f} GiB margin")


def ladder_memory_need(base_dir: Path, ladder_tokens: int) -> MemoryNeed:
    """Peak memory of the ladder: one merged model in float32 at a time, plus rung 1's log-probs, plus a margin.

    Rung 1 (the trained model) is freed before any merged model loads, and a
    4-bit or same-size base is never bigger than the float32 merged model, so
    the merged model sets the peak.
    """
    import math

    from export.merge import base_weight_shapes, read_base_config

    parameters = sum(math.prod(shape) for shape, _ in base_weight_shapes(base_dir).values())
    config = read_base_config(base_dir)
    vocab = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0)
    model_bytes = 4 * parameters
    return MemoryNeed(parameters=parameters, vocab=vocab, model_bytes=model_bytes, logp_bytes=4 * ladder_tokens * vocab,
                      margin_bytes=BASE_MARGIN + int(MODEL_MARGIN * model_bytes))


def available_memory() -> int:
    """Bytes the kernel can hand out now without swapping (page cache included)."""
    import psutil

    return int(psutil.virtual_memory().available)


# --- the eval set -----------------------------------------------------------


@dataclass
class EvalSet:
    """Token windows (training tokenizer ids) and the vocabulary size distributions are compared over."""

    windows: list[list[int]]
    vocab: int

    @property
    def positions(self) -> int:
        """Predicted tokens: every window's tokens but its first."""
        return sum(len(w) - 1 for w in self.windows)


def build_eval_set(tokenizer, texts: Iterable[str], n_ctx: int, max_positions: int) -> EvalSet:
    """Tokenize ``texts`` the training tokenizer's way into windows, stopping at ``max_positions`` predictions."""
    from evals.perplexity import token_windows

    windows: list[list[int]] = []
    left = max_positions
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for window in token_windows(ids, n_ctx):
            window = window[: left + 1]
            if len(window) < 2:
                break
            windows.append([int(i) for i in window])
            left -= len(window) - 1
        if left <= 0:
            break
    if not windows:
        raise ExportError("EVAL_TEXT: no paragraph is two tokens long; the quality ladder has nothing to score")
    return EvalSet(windows=windows, vocab=len(tokenizer))


# --- scoring ----------------------------------------------------------------


@dataclass
class Reference:
    """Rung 1's log-probabilities, float32, one array per window."""

    logp: list["np.ndarray"] = field(default_factory=list)


@dataclass
class RungScore:
    """One rung of the ladder (a row of the table)."""

    rung: str
    what: str
    parent: str | None
    kind: str
    tokens: int
    nll: float
    perplexity: float
    kl: float
    top1: float
    seconds: float

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("nll", "perplexity", "kl", "top1"):
            data[key] = float(f"{data[key]:.7g}")  # significant digits: a KL of 3e-6 must not print as 0
        data["seconds"] = round(self.seconds, 2)
        return data


def score_windows(
    logits_per_window: Iterable["np.ndarray"], eval_set: EvalSet, reference: Reference | None,
) -> tuple[float, float, float, Reference | None]:
    """Mean NLL, mean KL from the reference, top-1 agreement; and a new Reference when none was given.

    ``logits_per_window`` yields, per window, at least ``len(window) - 1`` rows
    of logits (row ``i`` predicts token ``i + 1``) with at least ``vocab`` columns.
    """
    import numpy as np

    made = Reference() if reference is None else None
    nll = kl = 0.0
    agree = count = 0
    for n, (window, logits) in enumerate(zip(eval_set.windows, logits_per_window, strict=True)):
        rows = len(window) - 1
        logits = logits[:rows, : eval_set.vocab]
        targets = window[1:]
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


def score_rung(
    rung: str, what: str, parent: str | None, kind: str,
    logits_per_window: Iterable["np.ndarray"], eval_set: EvalSet, reference: Reference | None,
) -> tuple[RungScore, Reference | None]:
    started = time.perf_counter()
    nll, kl, top1, made = score_windows(logits_per_window, eval_set, reference)
    score = RungScore(rung=rung, what=what, parent=parent, kind=kind, tokens=eval_set.positions, nll=nll,
                      perplexity=math.exp(nll), kl=kl, top1=top1, seconds=time.perf_counter() - started)
    return score, made


# --- where the logits come from ---------------------------------------------


def hf_logits(model, windows: list[list[int]]) -> Iterator["np.ndarray"]:
    """Logits of a transformers model (CPU) for each window, one window at a time."""
    import torch

    with torch.inference_mode():
        for window in windows:
            yield model(torch.tensor([window])).logits[0].float().numpy()


def trained_model(base_dir: Path, adapter_dir: Path, load_in_4bit: bool):
    """Rung 1: the base as training loaded it, with the adapter unmerged; and how each 4-bit weight was stored.

    4-bit means what train/model.py asks for: NF4, double quantization, here
    with fp32 compute (what runs on a CPU). The second value maps each weight
    bitsandbytes quantized to its :class:`~export.merge.NF4Spec`, read from the
    loaded model itself, so that the NF4 merge base round-trips exactly those
    weights the same way (empty for a full-precision base).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export.merge import NF4Spec

    kwargs: dict = {"dtype": torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    specs = {}
    for name, module in base.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            specs[f"{name}.weight"] = NF4Spec(blocksize=int(state.blocksize), quant_type=str(state.quant_type),
                                              double_quant=bool(state.nested))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, specs


#: What train/model.py's load_for_training asks bitsandbytes for when LOAD_IN_4BIT is on: NF4, double
#: quantization, bitsandbytes' default blocksize (None here). A train manifest that records
#: ``inputs.quantization`` (same keys) overrides these; today's records only ``load_in_4bit``.
TRAINED_4BIT = {"quant_type": "nf4", "double_quant": True, "blocksize": None}


def nf4_specs_as_trained(base_dir: Path, quantization: dict | None = None) -> dict:
    """How training stored each 4-bit weight, derived without loading the model (LADDER=false has no rung 1).

    transformers picks the weights bitsandbytes quantizes (every linear layer
    but the output embedding and whatever is tied to it); we ask it the same
    question on a weightless (meta-device) copy of the model built from
    config.json, so the answer matches :func:`trained_model`'s without
    reading a single weight.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    from export.merge import NF4Spec

    wanted = {**TRAINED_4BIT, **{k: v for k, v in (quantization or {}).items() if k in TRAINED_4BIT}}
    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=wanted["quant_type"],
                                    bnb_4bit_use_double_quant=wanted["double_quant"],
                                    bnb_4bit_compute_dtype=torch.float32)
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config)
    return {
        f"{name}.weight": NF4Spec(blocksize=int(wanted["blocksize"] or module.weight.blocksize),
                                  quant_type=str(wanted["quant_type"]), double_quant=bool(wanted["double_quant"]))
        for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)
    }


def merged_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model


def gguf_logits(path: Path, windows: list[list[int]], n_ctx: int, threads: int = 0) -> Iterator["np.ndarray"]:
    """llama.cpp's logits for each window of token ids (fed as ids: no re-tokenization)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                n_threads=threads or os.cpu_count() or 1, verbose=False)
    try:
        for window in windows:
            llm.reset()
            llm.eval(window)
            yield np.array(llm.scores[: len(window)], dtype=np.float32)
    finally:
        llm.close()


def score_hf(rung: str, what: str, parent: str | None, model, eval_set: EvalSet,
             reference: Reference | None) -> tuple[RungScore, Reference | None]:
    return score_rung(rung, what, parent, FULL_PRECISION, hf_logits(model, eval_set.windows), eval_set, reference)


def score_gguf(rung: str, path: Path, parent: str, eval_set: EvalSet, reference: Reference, *,
               n_ctx: int, threads: int = 0, quantized: bool) -> RungScore:
    score, _ = score_rung(rung, f"{path.name} (llama.cpp)", parent, QUANTIZED if quantized else FULL_PRECISION,
                          gguf_logits(path, eval_set.windows, n_ctx, threads), eval_set, reference)
    return score


# --- thresholds ---------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How much one hand-off may lose: NLL rise and KL-from-rung-1 growth, in nats per token."""

    nll_rise: float
    kl_rise: float
    nll_setting: str
    kl_setting: str


def check_rung(score: RungScore, parent: RungScore, limits: Limits) -> None:
    """Raise :class:`LadderError` naming the rung and the number when it lost more than ``limits`` allow."""
    nll_rise = score.nll - parent.nll
    kl_rise = score.kl - parent.kl
    problems = []
    if nll_rise > limits.nll_rise:
        problems.append(f"mean NLL rose by {nll_rise:.4f} nats/token ({parent.nll:.4f} -> {score.nll:.4f}; "
                        f"allowed {limits.nll_rise:g}, {limits.nll_setting})")
    if kl_rise > limits.kl_rise:
        problems.append(f"KL from the trained model grew by {kl_rise:.4f} nats/token ({parent.kl:.4f} -> "
                        f"{score.kl:.4f}; allowed {limits.kl_rise:g}, {limits.kl_setting})")
    if problems:
        raise LadderError(
            f"quality ladder: rung {score.rung!r} ({score.what}) lost too much against {parent.rung!r}: "
            + "; ".join(problems)
            + ". Something in this hand-off changed the model (see the ladder in the log); "
            "raise the setting only if you accept that loss"
        )


# --- the table ----------------------------------------------------------------


def ladder_json(scores: list[RungScore], eval_set: EvalSet, limits: dict[str, dict]) -> dict:
    return {
        "eval_positions": eval_set.positions,
        "windows": len(eval_set.windows),
        "vocab": eval_set.vocab,
        "reference": "rung 1 log-probabilities kept as float32 over the tokenizer's vocabulary",
        "limits": limits,
        "rungs": [s.to_json() for s in scores],
    }


def ladder_markdown(rungs: list[dict]) -> str:
    """The ladder as a markdown table (from the manifest's ``rungs`` list)."""
    lines = [
        "| rung | model | mean NLL | perplexity | KL vs rung 1 | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(rungs, 1):
        kl = "reference" if n == 1 else f"{r['kl']:.5f}"
        top1 = "reference" if n == 1 else f"{100 * r['top1']:.2f}%"
        lines.append(f"| {n}. {r['rung']} | {r['what']} | {r['nll']:.4f} | {r['perplexity']:.3f} | {kl} | {top1} |")
    return "\n".join(lines)


def log_line(score: RungScore) -> str:
    return (f"ladder {score.rung}: NLL {score.nll:.4f}, perplexity {score.perplexity:.3f}, "
            f"KL vs rung 1 {score.kl:.5f}, top-1 agreement {100 * score.top1:.2f}% ({score.seconds:.1f} s)")
