"""Training rows: turn every format into one conversation form, render, mask, filter, split.

Longer than most modules because one place decides what trains: every row format, the masking and the
end-of-turn checks live together.

The pipeline per row is::

    raw row --to_conversation--> [{"role", "content"}, ...]
            --render_conversation--> text + the character spans the assistant wrote
            --tokenize_conversation--> input_ids + labels (-100 outside the loss)

The formatting and masking functions are pure (a row and a tokenizer in, lists
out), so the tests pin exact labels for one row of every supported format.
Reading files and the Hub is train/sources.py; length filtering and the seeded split live below.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from jinja2 import TemplateError

from train.settings import TrainError
from train.sources import SourceRow, read_rows  # noqa: F401 (read_rows: data.read_rows, as the stage reads it)

IGNORE_INDEX = -100

ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

# Columns that identify each format, checked in this order by DATASET_FORMAT=auto.
FORMAT_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("sharegpt", ("conversations",)),
    ("messages", ("messages",)),
    ("alpaca", ("instruction", "output")),
    ("instruction_response", ("instruction", "response")),
    ("gsm8k", ("question", "answer")),
    ("text", ("text",)),
]


class RowError(ValueError):
    """What is wrong with one row (the caller adds where the row is)."""


# --------------------------------------------------------------------------
# Formats -> one conversation form
# --------------------------------------------------------------------------


def detect_format(columns: Sequence[str]) -> str:
    """The format whose identifying columns are all present."""
    present = set(columns)
    for name, needed in FORMAT_COLUMNS:
        if set(needed) <= present:
            return name
    known = "; ".join(f"{name}: {'+'.join(cols)}" for name, cols in FORMAT_COLUMNS)
    raise TrainError(
        f"DATASET_FORMAT=auto: cannot tell the format from columns {sorted(present)}; "
        f"expected one of ({known}); set DATASET_FORMAT explicitly if the columns are right"
    )


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # CSV/Parquet gaps come back as NaN
        if required:
            raise RowError(f"missing '{key}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"'{key}' is empty")
    return value


def _turns(items: Any, column: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(items, (list, tuple)) or not items:
        raise RowError(f"'{column}' must be a non-empty list of turns")
    messages = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise RowError(f"'{column}' turn {i} is not an object")
        role = item.get(role_key, item.get("role"))
        content = item.get(content_key, item.get("content"))
        if role not in ROLE_NAMES:
            raise RowError(f"'{column}' turn {i} has unknown {role_key} {role!r} (allowed: {', '.join(ROLE_NAMES)})")
        if not isinstance(content, str):
            raise RowError(f"'{column}' turn {i} has no text in '{content_key}'")
        messages.append({"role": ROLE_NAMES[role], "content": content})
    return messages


_INST = re.compile(r"<s>\s*\[INST\](?P<user>.*?)\[/INST\](?P<answer>.*?)(?:</s>|(?=<s>)|\Z)", re.DOTALL)
_SYS = re.compile(r"^\s*<<SYS>>(?P<system>.*?)<</SYS>>", re.DOTALL)


def parse_llama2_text(text: str) -> list[dict[str, str]]:
    """Turn ``<s>[INST] q [/INST] a </s>`` text (one or more exchanges) back into turns."""
    messages: list[dict[str, str]] = []
    for match in _INST.finditer(text):
        user = match.group("user")
        sys_match = _SYS.match(user)
        if sys_match and not messages:
            messages.append({"role": "system", "content": sys_match.group("system").strip()})
            user = user[sys_match.end() :]
        messages.append({"role": "user", "content": user.strip()})
        answer = match.group("answer").strip()
        if answer:
            messages.append({"role": "assistant", "content": answer})
    if not messages:
        raise RowError("'text' is not in the '<s>[INST] prompt [/INST] answer </s>' form")
    return messages


def to_conversation(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """One row of any supported format as ``[{"role", "content"}, ...]``."""
    if fmt == "sharegpt":
        messages = _turns(row.get("conversations"), "conversations", "from", "value")
    elif fmt == "messages":
        messages = _turns(row.get("messages"), "messages", "role", "content")
    elif fmt in ("alpaca", "instruction_response"):
        answer_key = "output" if fmt == "alpaca" else "response"
        prompt = _text(row, "instruction")
        extra = _text(row, "input", required=False).strip() or _text(row, "context", required=False).strip()
        if extra:
            prompt = f"{prompt.rstrip()}\n\n{extra}"
        messages = []
        system = _text(row, "system", required=False).strip()
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, answer_key)}]
    elif fmt == "gsm8k":
        messages = [
            {"role": "user", "content": _text(row, "question")},
            {"role": "assistant", "content": _text(row, "answer")},
        ]
    elif fmt == "text":
        messages = parse_llama2_text(_text(row, "text"))
    else:  # settings validation makes this unreachable
        raise RowError(f"unknown format {fmt!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError("has no assistant answer to learn from")
    return messages


# --------------------------------------------------------------------------
# Rendering and masking (pure)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedConversation:
    text: str
    #: ``(start, end)`` character ranges of ``text`` the assistant wrote (its end-of-turn marker included).
    assistant_spans: tuple[tuple[int, int], ...]


def render_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> RenderedConversation:
    """Render with the tokenizer's chat template and find each assistant turn in the text.

    Each assistant turn is located by rendering the conversation up to it (with
    the generation prompt) and up to and including it: the difference is what
    the model must produce, the end-of-turn token included so that it learns to
    stop. Where the template renders earlier turns differently once later ones
    follow (Qwen3 drops an answer's empty think block, Phi-3 closes only the last
    turn with EOS, Mistral's moves the system text to the last question), each
    answer is found by its text instead, through the end-of-turn token after it.
    """

    def render(part: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        through = render(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            return RenderedConversation(text=text, assistant_spans=answers_by_text(tokenizer, messages, text))
        spans.append((len(before), len(through)))
    return RenderedConversation(text=text, assistant_spans=tuple(spans))


def answers_by_text(tokenizer: Any, messages: list[dict[str, str]], text: str) -> tuple[tuple[int, int], ...]:
    """Each answer's span in ``text``: found after the turns before it, through the next end-of-turn token."""
    end_of_turn = end_of_turn_token(tokenizer) or tokenizer.eos_token
    spans, cursor = [], 0
    for message in messages:
        if message["role"] == "system":  # some templates move it (Mistral's: into the last question)
            continue
        content = message["content"].strip()
        start = text.find(content, cursor)
        closed = text.find(end_of_turn, start + len(content)) if start >= 0 else -1
        if start < 0 or (message["role"] == "assistant" and closed < 0):
            raise TrainError(
                "the chat template renders earlier turns differently once later ones are added, and an answer's "
                "text is not in the rendered conversation as written, so assistant turns cannot be located; set "
                "ASSISTANT_ONLY_LOSS=false or CHAT_TEMPLATE to a prefix-stable template"
            )
        cursor = start + len(content)
        if message["role"] == "assistant":
            cursor = closed + len(end_of_turn)
            spans.append((start, cursor))
    return tuple(spans)


def label_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token whose text starts inside one of ``spans``."""
    mask = []
    for start, end in offsets:
        mask.append(end > start and any(lo <= start < hi for lo, hi in spans))
    return mask


def tokenize_conversation(
    tokenizer: Any, rendered: RenderedConversation, *, assistant_only: bool = True
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``; labels are -100 outside the assistant's text when ``assistant_only``."""
    # The template writes the special tokens (bos included) as text already.
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if not assistant_only:
        return input_ids, list(input_ids)
    mask = label_mask(encoded["offset_mapping"], rendered.assistant_spans)
    return input_ids, [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, mask)]


_PROBE = "Loraship-end-of-turn-probe"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant's answer (None if none).

    It is what the model emits to stop: ``<|im_end|>`` for SmolLM2, ``<|eot_id|>`` for
    Llama-3, ``</s>`` for Llama-2 and Mistral.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.rfind(_PROBE) + len(_PROBE):]
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    found = [(after.find(tok), -len(tok), tok) for tok in special if tok and tok in after]
    return min(found)[2] if found else None


def check_template_ends_turns(tokenizer: Any, base_model: str) -> str:
    """The chat template must close an assistant answer with a special token, or the model never learns to stop:
    checked once, before any row is read. Returns that token."""
    token = end_of_turn_token(tokenizer)
    if token is None:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        after = text[text.rfind(_PROBE) + len(_PROBE):]
        raise TrainError(
            f"BASE_MODEL={base_model!r}: its chat template ends an assistant answer without a special token "
            f"(after it: {after!r}; EOS is {tokenizer.eos_token!r}), so a model trained on it never learns to stop; "
            "give the template an end-of-turn token (chat_template in tokenizer_config.json), or CHAT_TEMPLATE for a "
            "base without one"
        )
    return token


def end_of_turn_problem(example: "Example", token_id: int) -> str | None:
    """Why ``example``'s last answer does not teach the model to stop (None when it does).

    The last run of trained labels is the last answer (all of the text without
    ASSISTANT_ONLY_LOSS); the end-of-turn token must be in it, with its label kept.
    """
    last = max(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    start = last
    while start > 0 and example.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if token_id in example.labels[start : last + 1]:
        return None
    if token_id in example.input_ids[start:]:
        return "is masked (label -100), so the model would not learn to stop"
    return "is missing after the last answer (the chat template does not close the answer with it)"


def check_end_of_turn(examples: Sequence["Example"], tokenizer: Any) -> tuple[str, int]:
    """Every untruncated example must train its last answer's end-of-turn token: ``(token, examples checked)``."""
    token = end_of_turn_token(tokenizer) or tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(token)
    checked, problems = 0, []
    for example in examples:
        if example.truncated:
            continue
        checked += 1
        problem = end_of_turn_problem(example, token_id)
        if problem:
            problems.append(f"{example.where}: the end-of-turn token {token!r} {problem}")
    if problems:
        shown = problems[:MAX_ROW_ERRORS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more rows")
        shown.append(
            f"fix the chat template (CHAT_TEMPLATE, or the base model's) so that each answer ends with {token!r}"
        )
        raise TrainError("\n".join(shown))
    return token, checked


def check_token_ids(examples: Sequence["Example"], rows: int, base_model: str) -> None:
    """Every token id must name a row of the base model's token embedding (``rows`` of them): a tokenizer with more
    tokens than the model has rows would otherwise stop the run deep inside the GPU's lookup, or read nothing."""
    problems = []
    for example in examples:
        if not example.input_ids or (min(example.input_ids) >= 0 and max(example.input_ids) < rows):
            continue  # the common case, at C speed
        outside = sorted({token for token in example.input_ids if not 0 <= token < rows})
        if outside:
            problems.append(f"{example.where}: token id{'s' if len(outside) > 1 else ''} "
                            f"{', '.join(map(str, outside[:5]))}{' ...' if len(outside) > 5 else ''} "
                            f"outside the model's {rows:,} embedding rows")
    if problems:
        shown = problems[:MAX_ROW_ERRORS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more rows")
        shown.append(f"BASE_MODEL={base_model!r}: its tokenizer does not match its weights (tokens added without "
                     "resizing the embedding?); use the tokenizer saved with the model, or a model whose embedding "
                     "has a row for every token")
        raise TrainError("\n".join(shown))


def length_histogram(lengths: Sequence[int], max_length: int, bins: int = 10) -> dict[str, list[int]]:
    """Counts of ``lengths`` in ``bins`` bins of (nearly) equal width: ``edges[i] < length <= edges[i + 1]``."""
    import bisect

    bins = max(1, min(bins, max_length))
    edges = [i * max_length // bins for i in range(bins + 1)]
    counts = [0] * bins
    for length in lengths:
        counts[min(bins - 1, max(0, bisect.bisect_left(edges, length) - 1))] += 1
    return {"bin_edges": edges, "counts": counts}


# --------------------------------------------------------------------------
# Rows -> examples, filtered and split
# --------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str
    truncated: bool = False


@dataclass
class DataReport:
    dataset: str
    format: str
    rows: int = 0
    kept: int = 0
    dropped_long: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0
    train_loss_tokens: int = 0
    eval_tokens: int = 0
    longest: int = 0
    max_seq_length: int = 0
    #: Share of the train tokens whose label counts toward the loss.
    loss_token_share: float = 0.0
    #: The special token that closes an assistant turn, checked in every (untruncated) example.
    end_of_turn_token: str | None = None
    end_of_turn_checked: int = 0
    #: Token lengths of the kept rows (train and eval): ``bin_edges`` has one more entry than ``counts``.
    length_histogram: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"data: {self.rows} rows read from {self.dataset} (format: {self.format})",
            f"data: kept {self.kept}; dropped {self.dropped_long} longer than MAX_SEQ_LENGTH={self.max_seq_length}; "
            f"truncated {self.truncated} to MAX_SEQ_LENGTH (LONG_ROWS=truncate); "
            f"dropped {self.dropped_no_loss} with no trainable token left after truncation",
            f"data: split {self.train_rows} train / {self.eval_rows} eval; train tokens {self.train_tokens}, "
            f"{self.train_loss_tokens} of them in the loss ({self.loss_token_share:.1%}); eval tokens {self.eval_tokens}; "
            f"longest row {self.longest}",
            f"data: every answer ends with the end-of-turn token {self.end_of_turn_token!r}, trained "
            f"({self.end_of_turn_checked} examples checked; truncated ones lose it by design)",
        ]


MAX_ROW_ERRORS_SHOWN = 10


def build_examples(
    rows: Sequence[SourceRow], tokenizer: Any, *, fmt: str, max_seq_length: int, long_rows: str = "drop",
    assistant_only: bool = True, report: DataReport | None = None,
) -> list[Example]:
    """Tokenize and mask every row; enforce MAX_SEQ_LENGTH; malformed rows are an error naming each."""
    report = report or DataReport(dataset="", format=fmt)
    report.rows = len(rows)
    examples, problems = [], []
    for source in rows:
        try:
            messages = to_conversation(source.row, fmt)
            rendered = render_conversation(tokenizer, messages)
        except RowError as err:
            problems.append(f"{source.where}: {err} (DATASET_FORMAT={fmt})")
            continue
        except TemplateError as err:  # Gemma's template refuses a system turn, Mistral's unalternating roles
            problems.append(f"{source.where}: the chat template refuses this conversation ({err})")
            continue
        input_ids, labels = tokenize_conversation(tokenizer, rendered, assistant_only=assistant_only)
        if len(input_ids) > max_seq_length:
            if long_rows == "drop":
                report.dropped_long += 1
                continue
            input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
            truncated = True
        else:
            truncated = False
        if all(label == IGNORE_INDEX for label in labels):
            report.dropped_no_loss += 1
            continue
        report.truncated += truncated
        examples.append(Example(input_ids, labels, source.where, truncated))
    if problems:
        shown = problems[:MAX_ROW_ERRORS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more malformed rows")
        raise TrainError("\n".join(shown))
    report.kept = len(examples)
    if not examples:
        raise TrainError(
            f"DATASET={report.dataset!r}: no rows left after filtering ({report.dropped_long} longer than "
            f"MAX_SEQ_LENGTH={max_seq_length}, {report.dropped_no_loss} with no assistant tokens); "
            "raise MAX_SEQ_LENGTH or set LONG_ROWS=truncate"
        )
    return examples


def split_examples(
    examples: Sequence[Example], *, eval_fraction: float, eval_size: int | None, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then the first ``eval_size`` (or ``eval_fraction`` of all, at least one) go to eval."""
    n_eval = eval_size if eval_size is not None else (max(1, round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0)
    if n_eval >= len(examples):
        what = f"EVAL_SIZE={eval_size}" if eval_size is not None else f"EVAL_FRACTION={eval_fraction}"
        raise TrainError(
            f"{what}: leaves no training rows ({len(examples)} rows after filtering); lower it or add data"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eval_part = [examples[i] for i in sorted(order[:n_eval])]
    train_part = [examples[i] for i in order[n_eval:]]
    return train_part, eval_part


def prepare_data(settings: Any, tokenizer: Any, token: str | None = None) -> tuple[list[Example], list[Example], DataReport]:
    """Everything from DATASET to the tokenized train and eval examples, with counts."""
    check_template_ends_turns(tokenizer, settings.base_model)
    rows = read_rows(
        settings.dataset, config=settings.dataset_config, split=settings.dataset_split,
        max_samples=settings.max_samples, token=token,
    )
    fmt = settings.dataset_format
    if fmt == "auto":
        fmt = detect_format(list(rows[0].row.keys()))
    report = DataReport(dataset=settings.dataset, format=fmt)
    examples = build_examples(
        rows, tokenizer, fmt=fmt, max_seq_length=settings.max_seq_length, long_rows=settings.long_rows,
        assistant_only=settings.assistant_only_loss, report=report,
    )
    train, evaluation = split_examples(
        examples, eval_fraction=settings.eval_fraction, eval_size=settings.eval_size, seed=settings.seed
    )
    report.train_rows, report.eval_rows = len(train), len(evaluation)
    report.train_tokens = sum(len(e.input_ids) for e in train)
    report.train_loss_tokens = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in train)
    report.eval_tokens = sum(len(e.input_ids) for e in evaluation)
    report.longest = max(len(e.input_ids) for e in examples)
    report.max_seq_length = settings.max_seq_length
    report.loss_token_share = report.train_loss_tokens / report.train_tokens
    report.length_histogram = length_histogram([len(e.input_ids) for e in examples], settings.max_seq_length)
    report.end_of_turn_token, report.end_of_turn_checked = check_end_of_turn(examples, tokenizer)
    return train, evaluation, report


def to_hf_dataset(examples: Sequence[Example]):
    """A ``datasets.Dataset`` with exactly ``input_ids`` and ``labels`` (what the trainer consumes)."""
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
