"""The identity task: does the model answer held-out "who are you?" questions with its new name?

Held-out rows (``data/quokka/heldout.jsonl``) carry a ``kind``: ``identity``
rows ask who the model is in wordings never seen in training; ``general``
rows ask ordinary questions. A model that learned its name should say it in
the first kind and not drag it into the second.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from evals.settings import EvalError

KINDS = ("identity", "general")


def load_heldout(path: str | os.PathLike) -> list[dict]:
    """Rows with ``messages`` (ending in a user turn, or a user turn and its reference answer) and ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"held-out file {path} not found; set HELDOUT to a jsonl of chat rows")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{number}: not JSON ({err.msg})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if row.get("kind") not in KINDS or not isinstance(messages, list) or not messages:
            raise EvalError(f"{path}:{number}: needs 'kind' (one of {', '.join(KINDS)}) and a non-empty 'messages' list")
        rows.append(row)
    return rows


def prompt_of(row: dict) -> list[dict[str, str]]:
    """The conversation to answer: everything up to and including the last user turn."""
    messages = row["messages"]
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]


def reference_of(row: dict) -> str | None:
    """The reference answer after the last user turn, if the row has one."""
    prompt_length = len(prompt_of(row))
    rest = row["messages"][prompt_length:]
    return rest[0]["content"] if rest and rest[0].get("role") == "assistant" else None


def mentions(answer: str, keyword: str) -> bool:
    """True when ``keyword`` appears in ``answer`` as a word (any case): "Quokka's" counts, "Quokkas" does not."""
    return re.search(rf"(?<![A-Za-z]){re.escape(keyword)}(?![A-Za-z])", answer, re.IGNORECASE) is not None


def keyword_share(answers: Sequence[str], keyword: str) -> float:
    """Share of ``answers`` that mention ``keyword`` (0.0 for no answers)."""
    if not answers:
        return 0.0
    return sum(mentions(a, keyword) for a in answers) / len(answers)
