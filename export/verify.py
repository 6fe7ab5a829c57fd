"""Checks every GGUF must pass before the export calls it done.

1. llama.cpp loads it, and its metadata carries ``tokenizer.chat_template``.
2. Template parity: the prompt tokens llama.cpp builds for fixed multi-turn
   conversations (the GGUF's own template rendered the way llama-cpp-python
   renders it, tokenized by llama.cpp) are identical to the training-time
   tokenizer's ``apply_chat_template`` tokens. A difference fails the export,
   naming the first differing position.
3. It stops: the end-of-generation ids in the GGUF are the tokenizer's, a chat
   whose next token is forced to be EOS ends with ``finish_reason == "stop"``
   (llama.cpp treats that id as the end), and with ``STOP_CHECK=natural`` a
   short greedy chat must also end by itself within a token budget (the EOS
   the fine-tune learned survived the merge). Random-init test models never
   stop by themselves; they run with ``STOP_CHECK=eos_token``, which does the
   first two parts only, and the manifest records which check ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraship.errors import UserError

#: Conversations whose prompt tokens must be identical in llama.cpp and in training.
PARITY_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a small assistant. How can I help?"},
        {"role": "user", "content": "Name three colours of the rainbow, please."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3? Explain in one line, with a café-style flourish: ☕"},
    ],
]
STOP_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
STOP_BUDGET = 128


class VerifyError(UserError):
    """A GGUF failed a check; the export stops before calling it done."""


@dataclass
class Verification:
    """What the checks found for one file (goes into the manifest)."""

    chat_template: bool
    parity_conversations: int
    parity_tokens: int
    eos_token_ids: list[int]
    stop_check: str
    reply: str
    finish_reason: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def training_tokens(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt tokens the training-time tokenizer builds for ``messages`` (+ generation prompt)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers may answer with a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def llama_cpp_tokens(llm, messages: list[dict[str, str]]) -> list[int]:
    """The prompt tokens llama-cpp-python builds for ``messages`` with the GGUF's own template.

    The same steps as its chat-completion handler for a GGUF template: render
    with ``Jinja2ChatFormatter`` (the GGUF's bos/eos strings), then tokenize the
    text with special tokens parsed, adding BOS only where the formatter did not.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    bos = _token_text(llm, llm.token_bos())
    eos = _token_text(llm, llm.token_eos())
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    result = formatter(messages=messages)
    return list(llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True))


def _token_text(llm, token: int) -> str:
    if token < 0:
        return ""
    return llm._model.token_get_text(token)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_template_parity(llm, tokenizer, name: str) -> int:
    """Raise :class:`VerifyError` at the first token where llama.cpp and training disagree.

    Returns the number of tokens compared.
    """
    compared = 0
    for n, messages in enumerate(PARITY_CONVERSATIONS, 1):
        ours = llama_cpp_tokens(llm, messages)
        theirs = training_tokens(tokenizer, messages)
        pos = first_difference(ours, theirs)
        if pos is not None:
            def show(ids: list[int]) -> str:
                if pos >= len(ids):
                    return "<end of prompt>"
                return f"{ids[pos]} {tokenizer.convert_ids_to_tokens(ids[pos])!r}"

            raise VerifyError(
                f"{name}: chat template parity failed on conversation {n}: first difference at token {pos} "
                f"(llama.cpp {show(ours)}, training tokenizer {show(theirs)}; {len(ours)} vs {len(theirs)} tokens). "
                "The GGUF would prompt the model differently from how it was trained: check the tokenizer's "
                "chat_template in the adapter folder"
            )
        compared += len(ours)
    return compared


def end_of_generation_ids(llm) -> list[int]:
    ids = {llm.token_eos()}
    eot = llm.metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        ids.add(int(eot))
    return sorted(i for i in ids if i >= 0)


def check_stop(llm, tokenizer, name: str, mode: str) -> tuple[list[int], str, str]:
    """The end-of-generation checks; returns (eos ids, reply, finish_reason)."""
    eog = end_of_generation_ids(llm)
    expected = tokenizer.eos_token_id
    if expected is None or expected not in eog:
        raise VerifyError(
            f"{name}: the GGUF ends generation on token ids {eog}, the tokenizer's EOS is {expected} "
            f"({tokenizer.eos_token!r}): chats would not stop"
        )
    forced = llm.create_chat_completion(
        messages=STOP_PROMPT, max_tokens=8, temperature=0.0, logit_bias={expected: 1000.0}
    )
    if forced["choices"][0]["finish_reason"] != "stop":
        raise VerifyError(f"{name}: llama.cpp did not stop on the EOS token {expected} ({tokenizer.eos_token!r})")
    if mode == "eos_token":
        return eog, forced["choices"][0]["message"]["content"] or "", "stop"
    answer = llm.create_chat_completion(messages=STOP_PROMPT, max_tokens=STOP_BUDGET, temperature=0.0, seed=0)
    choice = answer["choices"][0]
    reply = choice["message"]["content"] or ""
    if choice["finish_reason"] != "stop":
        raise VerifyError(
            f"{name}: a short chat did not end within {STOP_BUDGET} tokens (finish_reason "
            f"{choice['finish_reason']!r}; reply began {reply[:60]!r}): the model no longer emits "
            f"{tokenizer.eos_token!r}. (STOP_CHECK=eos_token skips this part, for random-init test models only)"
        )
    return eog, reply, "stop"


def open_gguf(path: Path, threads: int = 0, n_ctx: int = 1024):
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1, verbose=False)
    except Exception as err:  # noqa: BLE001 - a file llama.cpp cannot open fails the export
        raise VerifyError(f"{path.name}: llama.cpp could not load it ({err})") from err


def verify_gguf(path: Path, tokenizer, *, stop_check: str = "natural", threads: int = 0) -> Verification:
    """Run every check on one GGUF; raise :class:`VerifyError` on the first failure."""
    llm = open_gguf(path, threads)
    try:
        if not llm.metadata.get("tokenizer.chat_template"):
            raise VerifyError(f"{path.name}: no tokenizer.chat_template in its metadata; chats would use a guessed format")
        parity_tokens = check_template_parity(llm, tokenizer, path.name)
        eog, reply, finish = check_stop(llm, tokenizer, path.name, stop_check)
        return Verification(
            chat_template=True,
            parity_conversations=len(PARITY_CONVERSATIONS),
            parity_tokens=parity_tokens,
            eos_token_ids=eog,
            stop_check=stop_check,
            reply=reply,
            finish_reason=finish,
        )
    finally:
        llm.close()


def perplexity(path: Path, texts: list[str], *, n_ctx: int, threads: int = 0) -> float:
    """Perplexity of ``texts`` under the GGUF through llama.cpp (evals' definition)."""
    from evals.perplexity import gguf_perplexity

    return gguf_perplexity(path, texts, n_ctx=n_ctx, n_threads=threads or None)


def read_eval_texts(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
