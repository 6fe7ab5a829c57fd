"""The quality ladder: two held-out texts scored at every hand-off of the export, against rung 1.

Rungs: ``adapter`` (the base as training loaded it + the unmerged adapter: the reference), ``merged``,
``F16`` and each quantized GGUF. The texts: the fine-tune's own held-out rows (the train run's eval
split, loss on the tokens training put in the loss) and general prose (EVAL_TEXT). Every rung scores
the same token ids, so a loss shows as a number; a rung that loses more than LADDER_MAX_* against its
parent fails.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from export.inputs import ExportError
from export.metrics import Reference, score_windows

if TYPE_CHECKING:
    import numpy as np

FULL_PRECISION = "full precision"
QUANTIZED = "quantized"
#: The two texts every rung is scored on, in the order the manifest and the card show them.
HELDOUT = "heldout"
GENERAL = "general"


class LadderError(ExportError):
    """A rung of the ladder lost more quality than the settings allow."""


# --- memory ------------------------------------------------------------------

GIB = 1024**3
#: Python with torch, transformers and bitsandbytes imported.
BASE_MARGIN = 1 * GIB
#: transformers' load and cast and the allocator's slack, as a share of the float32 model.
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
                f"x 4 bytes), {self.logp_bytes / GIB:.2f} GiB for rung 1's log-probs (2 texts x {ladder_tokens} "
                f"LADDER_TOKENS x {self.vocab:,} vocabulary x 4 bytes), {self.margin_bytes / GIB:.1f} GiB margin")


def ladder_memory_need(base_dir: Path, ladder_tokens: int) -> MemoryNeed:
    """One merged model in float32, rung 1's log-probs on both texts and a margin (rung 1's model is freed first)."""
    from export.merge import base_weight_shapes, read_base_config

    parameters = sum(math.prod(shape) for shape, _ in base_weight_shapes(base_dir).values())
    config = read_base_config(base_dir)
    vocab = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0)
    model_bytes = 4 * parameters
    return MemoryNeed(parameters=parameters, vocab=vocab, model_bytes=model_bytes, logp_bytes=2 * 4 * ladder_tokens * vocab,
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
    #: Per window, the rows scored (row ``i`` predicts token ``i + 1``); None: every row.
    scored: list[list[int]] | None = None

    @property
    def positions(self) -> int:
        """Predicted tokens scored: every window's tokens but its first, or the ``scored`` rows."""
        if self.scored is not None:
            return sum(len(rows) for rows in self.scored)
        return sum(len(w) - 1 for w in self.windows)

    @property
    def longest(self) -> int:
        return max(len(w) for w in self.windows)


def build_heldout_eval_set(rows: Iterable[tuple[list[int], list[int]]], vocab: int,
                           max_positions: int) -> EvalSet | None:
    """The train run's held-out rows, scored where training's labels are (None: no row has one).

    Each row is one window, as training saw it; it stops at its last scored token, and the rows stop at
    ``max_positions`` scored predictions.
    """
    from loraship.heldout import IGNORE_INDEX

    windows: list[list[int]] = []
    scored: list[list[int]] = []
    left = max_positions
    for input_ids, labels in rows:
        picked = [i for i in range(len(input_ids) - 1) if labels[i + 1] != IGNORE_INDEX][:left]
        if not picked:
            continue
        windows.append(list(input_ids[: picked[-1] + 2]))
        scored.append(picked)
        left -= len(picked)
        if left <= 0:
            break
    return EvalSet(windows=windows, vocab=vocab, scored=scored) if windows else None


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
class TextScore:
    """One rung on one text: mean NLL, and how far its next-token distributions are from rung 1's."""

    tokens: int
    nll: float
    perplexity: float
    kl: float
    top1: float

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("nll", "perplexity", "kl", "top1"):
            data[key] = float(f"{data[key]:.7g}")  # significant digits: a KL of 3e-6 must not print as 0
        return data


@dataclass
class RungScore:
    """One rung of the ladder (a row of the table), on each text (``heldout``, ``general``)."""

    rung: str
    what: str
    parent: str | None
    kind: str
    texts: dict[str, TextScore]
    seconds: float

    def to_json(self) -> dict:
        return {"rung": self.rung, "what": self.what, "parent": self.parent, "kind": self.kind,
                **{name: score.to_json() for name, score in self.texts.items()}, "seconds": round(self.seconds, 2)}


def score_rung(
    rung: str, what: str, parent: str | None, kind: str, logits: Callable[[list[list[int]]], Iterable["np.ndarray"]],
    eval_sets: dict[str, EvalSet], references: dict[str, Reference] | None,
) -> tuple[RungScore, dict[str, Reference] | None]:
    """Score ``logits(windows)`` on every text; rung 1 (no ``references``) returns the references it makes."""
    started = time.perf_counter()
    texts, made = {}, {}
    for name, eval_set in eval_sets.items():
        nll, kl, top1, made[name] = score_windows(logits(eval_set.windows), eval_set.windows, eval_set.vocab,
                                                  None if references is None else references[name], eval_set.scored)
        texts[name] = TextScore(tokens=eval_set.positions, nll=nll, perplexity=math.exp(nll), kl=kl, top1=top1)
    score = RungScore(rung=rung, what=what, parent=parent, kind=kind, texts=texts,
                      seconds=time.perf_counter() - started)
    return score, (made if references is None else None)


def score_hf(rung: str, what: str, parent: str | None, model, eval_sets: dict[str, EvalSet],
             references: dict[str, Reference] | None) -> tuple[RungScore, dict[str, Reference] | None]:
    return score_rung(rung, what, parent, FULL_PRECISION, lambda windows: hf_logits(model, windows), eval_sets,
                      references)


def score_gguf(rung: str, path: Path, parent: str, eval_sets: dict[str, EvalSet], references: dict[str, Reference],
               *, n_ctx: int, threads: int = 0, quantized: bool) -> RungScore:
    """One llama.cpp load scores every text; its context fits the longest window (a held-out row may be long)."""
    from llama_cpp import Llama

    n_ctx = max(n_ctx, *(s.longest for s in eval_sets.values()))
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                n_threads=threads or os.cpu_count() or 1, verbose=False)
    try:
        score, _ = score_rung(rung, f"{path.name} (llama.cpp)", parent, QUANTIZED if quantized else FULL_PRECISION,
                              lambda windows: gguf_logits(llm, windows), eval_sets, references)
    finally:
        llm.close()
    return score


# --- the rungs' models ----------------------------------------------------------


def hf_logits(model, windows: list[list[int]]) -> Iterator["np.ndarray"]:
    """Logits of a transformers model for each window, one window at a time, computed where the model is."""
    import torch

    with torch.inference_mode():
        for window in windows:
            yield model(torch.tensor([window], device=model.device)).logits[0].float().cpu().numpy()


def gguf_logits(llm, windows: list[list[int]]) -> Iterator["np.ndarray"]:
    """llama.cpp's logits for each window, fed as token ids so every rung scores the same tokens."""
    import numpy as np

    for window in windows:
        llm.reset()
        llm.eval(window)
        yield np.array(llm.scores[: len(window)], dtype=np.float32)


def trained_model(base_dir: Path, adapter_dir: Path, load_in_4bit: bool):
    """Rung 1, the base loaded as training loaded it plus the unmerged adapter; and each 4-bit weight's NF4Spec.

    The specs are read from the loaded model, so the NF4 merge base round-trips exactly these weights.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export.merge import NF4Spec

    # On the CPU even where there is a GPU (bitsandbytes would take it): the path CI measures, and the NF4 merge
    # base's round trip runs on the CPU too.
    kwargs: dict = {"dtype": torch.float32, "device_map": {"": "cpu"}}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        # train/model.py's 4-bit load, with fp32 compute (what runs on a CPU).
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


#: What train/model.py's load_for_training asks bitsandbytes for (blocksize None: its default); a train manifest's
#: ``inputs.quantization`` (same keys) overrides it.
TRAINED_4BIT = {"quant_type": "nf4", "double_quant": True, "blocksize": None}


def nf4_specs_as_trained(base_dir: Path, quantization: dict | None = None) -> dict:
    """Each 4-bit weight's NF4Spec without loading a weight (LADDER=false has no rung 1 to read them from).

    transformers chooses the layers bitsandbytes quantizes; asking it on a meta-device copy of the
    model gives :func:`trained_model`'s answer for free.
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


# --- thresholds ---------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How much one hand-off may lose: NLL rise and KL-from-rung-1 growth, in nats per token."""

    nll_rise: float
    kl_rise: float
    nll_setting: str
    kl_setting: str


#: How messages name each text.
TEXT_NAMES = {HELDOUT: "the fine-tune's held-out rows", GENERAL: "the general text"}


def check_rung(score: RungScore, parent: RungScore, limits: Limits, *, kl_limited: bool = True) -> None:
    """Raise :class:`LadderError` naming the rung, the text and the number when it lost more than ``limits`` allow.

    ``kl_limited=False`` checks the NLL only: merged into another base than training's (the original base of a
    4-bit adapter), the KL from the model as trained measures the NF4 rounding the merge removes on purpose.
    """
    problems = []
    for name, text in score.texts.items():
        before = parent.texts.get(name)
        if before is None:
            continue
        nll_rise, kl_rise = text.nll - before.nll, text.kl - before.kl
        if nll_rise > limits.nll_rise:
            problems.append(f"on {TEXT_NAMES[name]} the mean NLL rose by {nll_rise:.4f} nats/token ({before.nll:.4f} "
                            f"-> {text.nll:.4f}; allowed {limits.nll_rise:g}, {limits.nll_setting})")
        if kl_limited and kl_rise > limits.kl_rise:
            problems.append(f"on {TEXT_NAMES[name]} the KL from the trained model grew by {kl_rise:.4f} nats/token "
                            f"({before.kl:.4f} -> {text.kl:.4f}; allowed {limits.kl_rise:g}, {limits.kl_setting})")
    if problems:
        raise LadderError(
            f"quality ladder: rung {score.rung!r} ({score.what}) lost too much against {parent.rung!r}: "
            + "; ".join(problems)
            + ". Something in this hand-off changed the model (see the ladder in the log); "
            "raise the setting only if you accept that loss"
        )
