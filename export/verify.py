"""Checks every GGUF must pass before the export calls it done, then its held-out perplexity.

llama.cpp loads it and finds a chat template; the prompt tokens it builds equal the training tokenizer's;
its template ends a turn with training's end-of-turn token, one llama.cpp stops on; and chats stop
(STOP_CHECK=natural: by themselves). Each failure names what differs, so the fix is plain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import UserError

if TYPE_CHECKING:
    import numpy as np

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
#: Short chats that must end by themselves (the first STOP_PROMPTS of them are run).
STOP_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}],
    [{"role": "user", "content": "Say hello in one short sentence."}],
    [{"role": "user", "content": "Name one animal that lives in the sea."}],
    [{"role": "user", "content": "What colour is the sky on a clear day?"}],
    [{"role": "user", "content": "Give me one word that rhymes with cat."}],
]
STOP_BUDGET = 128
#: An assistant reply the end-of-turn check renders: whatever the template puts right after it ends the turn.
REPLY_MARKER = "Reply 7431 ends here."


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
    end_of_turn_id: int | None = None
    end_of_turn: str | None = None
    stop_prompts: int = 1
    longest_reply_tokens: int = 0

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

    The steps of its chat-completion handler: render with ``Jinja2ChatFormatter``, then tokenize with
    special tokens parsed, adding BOS only where the formatter did not.
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


def as_template_takes(tokenizer, messages: list[dict[str, str]], what: str) -> list[dict[str, str]]:
    """``messages`` as the training template takes them: where it refuses a system turn (Gemma-2's), the system
    text opens the first user turn instead, as Gemma-3's template puts it."""
    from jinja2 import TemplateError

    try:
        training_tokens(tokenizer, messages)
        return messages
    except TemplateError as err:
        if messages[0]["role"] != "system" or messages[1]["role"] != "user":
            raise VerifyError(f"{what}: the training chat template refuses it ({err})") from None
    system, user, *rest = messages
    return [{"role": "user", "content": f"{system['content']}\n\n{user['content']}"}, *rest]


def check_template_parity(llm, tokenizer, name: str) -> int:
    """Raise :class:`VerifyError` at the first token where llama.cpp and training disagree.

    Returns the number of tokens compared.
    """
    compared = 0
    for n, messages in enumerate(PARITY_CONVERSATIONS, 1):
        messages = as_template_takes(tokenizer, messages, f"{name}: chat template parity, conversation {n}")
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


def _is_special(tokenizer, token_id: int) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return token_id in set(tokenizer.all_special_ids) or bool(getattr(added.get(token_id), "special", False))


def end_of_turn_after(rendered: str, tokenize, tokenizer) -> tuple[int | None, str]:
    """The first special token a template puts after the assistant reply (None: it puts none), and that text."""
    after = rendered[rendered.rindex(REPLY_MARKER) + len(REPLY_MARKER):]
    for token_id in tokenize(after):
        if _is_special(tokenizer, token_id):
            return token_id, after
    return None, after


def template_end_of_turn(tokenizer) -> tuple[int | None, str]:
    """The end-of-turn token the training tokenizer's chat template closes an assistant reply with."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY_MARKER}], tokenize=False,
    )
    return end_of_turn_after(text, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer)


def gguf_template_end_of_turn(llm, tokenizer) -> tuple[int | None, str]:
    """The same, with the GGUF's own template rendered as llama-cpp-python renders it, tokenized by llama.cpp."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template=llm.metadata.get("tokenizer.chat_template"), eos_token=_token_text(llm, llm.token_eos()),
        bos_token=_token_text(llm, llm.token_bos()), add_generation_prompt=False,
    )
    text = formatter(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY_MARKER}]).prompt
    return end_of_turn_after(text, lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=True), tokenizer)


def describe(tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    return f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})"


def check_end_of_turn(llm, tokenizer, name: str) -> int:
    """The end-of-turn contract: training's template, the GGUF's template and the GGUF's stop ids agree.

    Returns the end-of-turn id. A failure names the token (text and id) that went wrong.
    """
    expected_eos = describe(tokenizer, tokenizer.eos_token_id)
    eot, after = template_end_of_turn(tokenizer)
    if eot is None:
        raise VerifyError(
            f"{name}: the training chat template puts no end-of-turn token after an assistant reply (it ends "
            f"the turn with {after!r}; the tokenizer's EOS is {expected_eos}): the model never learned where a "
            "reply ends and chats would not stop. Restore the end-of-turn token in the adapter folder's chat_template"
        )
    gguf_eot, gguf_after = gguf_template_end_of_turn(llm, tokenizer)
    if gguf_eot != eot:
        raise VerifyError(
            f"{name}: the GGUF's chat template ends an assistant turn with {describe(tokenizer, gguf_eot)} "
            f"(renders {gguf_after!r}), training's with {describe(tokenizer, eot)}: the GGUF lost the end-of-turn token"
        )
    eog = end_of_generation_ids(llm, eot)
    if eot not in eog:
        raise VerifyError(
            f"{name}: the template's end-of-turn token {describe(tokenizer, eot)} is not one of the GGUF's "
            f"end-of-generation ids {eog} ({', '.join(describe(tokenizer, i) for i in eog if i < len(tokenizer))}): "
            "llama.cpp would run past the end of every reply"
        )
    return eot


def end_of_generation_ids(llm, *candidates: int | None) -> list[int]:
    """Which of EOS, the GGUF's end-of-turn id and ``candidates`` llama.cpp ends a generation on. It also knows
    end-of-turn tokens by their text (Llama-3's ``<|eot_id|>``, Phi-3's ``<|end|>`` beside their EOS)."""
    import llama_cpp

    ids = {llm.token_eos(), llm.metadata.get("tokenizer.ggml.eot_token_id"), *candidates}
    return sorted(int(i) for i in ids if i is not None and 0 <= int(i) < llm.n_vocab()
                  and llama_cpp.llama_vocab_is_eog(llm._model.vocab, int(i)))


def check_stop(llm, tokenizer, name: str, mode: str, *, prompts: int = 1, budget: int = STOP_BUDGET,
               end_of_turn: int | None = None) -> tuple[list[int], str, str, int]:
    """The end-of-generation checks; returns (eos ids, first reply, finish_reason, longest reply in tokens)."""
    expected = tokenizer.eos_token_id
    eog = end_of_generation_ids(llm, expected, end_of_turn)
    if expected is None or expected not in eog:
        raise VerifyError(
            f"{name}: the GGUF ends generation on token ids {eog}, the tokenizer's EOS is "
            f"{describe(tokenizer, expected)}: chats would not stop"
        )
    stops = sorted({expected} | ({end_of_turn} if end_of_turn is not None else set()))
    chats = STOP_PROMPTS[:prompts]
    forced_reply = ""
    for token in stops:
        for messages in chats:
            forced = llm.create_chat_completion(
                messages=messages, max_tokens=8, temperature=0.0, logit_bias={token: 1000.0}
            )
            if forced["choices"][0]["finish_reason"] != "stop":
                raise VerifyError(f"{name}: llama.cpp did not stop on {describe(tokenizer, token)}")
            forced_reply = forced_reply or forced["choices"][0]["message"]["content"] or ""
    if mode == "eos_token":
        return eog, forced_reply, "stop", 0
    first, longest = "", 0
    for n, messages in enumerate(chats, 1):
        answer = llm.create_chat_completion(messages=messages, max_tokens=budget, temperature=0.0, seed=0)
        choice = answer["choices"][0]
        reply = choice["message"]["content"] or ""
        if choice["finish_reason"] != "stop":
            raise VerifyError(
                f"{name}: short chat {n} ({messages[-1]['content']!r}) did not end within {budget} tokens "
                f"(finish_reason {choice['finish_reason']!r}; reply began {reply[:60]!r}): the model never emitted "
                f"{' or '.join(describe(tokenizer, t) for t in stops)}. "
                "(STOP_CHECK=eos_token skips this part, for random-init test models only)"
            )
        first = first or reply
        longest = max(longest, int(answer["usage"]["completion_tokens"]))
    return eog, first, "stop", longest


#: Context of the llama.cpp instance the checks run in (the stop check's chats fit it).
CHECK_CTX = 1024
#: llama-cpp-python's own default batch: a chat prompt is evaluated in one decode.
CHECK_BATCH = 512


def open_gguf(path: Path, threads: int = 0, n_ctx: int = CHECK_CTX, n_batch: int = CHECK_BATCH):
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads or os.cpu_count() or 1,
                     verbose=False)
    except Exception as err:  # noqa: BLE001 - a file llama.cpp cannot open fails the export
        raise VerifyError(f"{path.name}: llama.cpp could not load it ({err})") from err


def run_checks(llm, name: str, tokenizer, *, stop_check: str = "natural", stop_prompts: int = 1,
               stop_max_tokens: int = STOP_BUDGET) -> Verification:
    """Every check on one open GGUF; raise :class:`VerifyError` on the first failure."""
    if not llm.metadata.get("tokenizer.chat_template"):
        raise VerifyError(f"{name}: no tokenizer.chat_template in its metadata; chats would use a guessed format")
    parity_tokens = check_template_parity(llm, tokenizer, name)
    eot = check_end_of_turn(llm, tokenizer, name)
    eog, reply, finish, longest = check_stop(llm, tokenizer, name, stop_check, prompts=stop_prompts,
                                             budget=stop_max_tokens, end_of_turn=eot)
    return Verification(
        chat_template=True,
        parity_conversations=len(PARITY_CONVERSATIONS),
        parity_tokens=parity_tokens,
        eos_token_ids=eog,
        stop_check=stop_check,
        reply=reply,
        finish_reason=finish,
        end_of_turn_id=eot,
        end_of_turn=tokenizer.convert_ids_to_tokens(eot),
        stop_prompts=stop_prompts,
        longest_reply_tokens=longest,
    )


def verify_gguf(path: Path, tokenizer, *, stop_check: str = "natural", threads: int = 0, stop_prompts: int = 1,
                stop_max_tokens: int = STOP_BUDGET) -> Verification:
    """Run every check on one GGUF; raise :class:`VerifyError` on the first failure."""
    llm = open_gguf(path, threads)
    try:
        return run_checks(llm, path.name, tokenizer, stop_check=stop_check, stop_prompts=stop_prompts,
                          stop_max_tokens=stop_max_tokens)
    finally:
        llm.close()


def check_gguf(path: Path, tokenizer, texts: list[str], *, eval_ctx: int, eval_tokens: int | None,
               stop_check: str = "natural", threads: int = 0, stop_prompts: int = 1,
               stop_max_tokens: int = STOP_BUDGET) -> tuple[Verification, "np.ndarray"]:
    """Every check, then the held-out per-token NLL, with the file opened in llama.cpp once.

    The NLL covers ``texts`` tokenized by llama.cpp in windows of ``eval_ctx``,
    at most ``eval_tokens`` predicted tokens (evals/perplexity.py's definition);
    files that share a tokenizer get the same tokens, so a quantized file can be
    compared with the F16 one token by token.
    """
    from evals.perplexity import llama_token_nll

    llm = open_gguf(path, threads, n_ctx=max(CHECK_CTX, eval_ctx), n_batch=max(CHECK_BATCH, eval_ctx))
    try:
        verification = run_checks(llm, path.name, tokenizer, stop_check=stop_check, stop_prompts=stop_prompts,
                                  stop_max_tokens=stop_max_tokens)
        nll = llama_token_nll(llm, texts, eval_ctx, eval_tokens)
    finally:
        llm.close()
    if len(nll) == 0:
        raise VerifyError(f"{path.name}: EVAL_TEXT holds no paragraph of two tokens or more; "
                          "there is no perplexity to measure")
    return verification, nll


def read_eval_texts(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
