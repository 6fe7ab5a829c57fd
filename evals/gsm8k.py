"""Exact-match scoring for GSM8K-style answers: compare final numbers, not wording.

GSM8K reference solutions end with ``#### <number>``. A model's answer is
scored by the number it commits to: the first number after its last ``####``
when it writes one, otherwise the last number anywhere in the text. Numbers
compare by value, so ``$1,200.00`` equals ``1200``.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from evals.settings import EvalError

FINAL_MARKER = "####"

# A number: optional minus (not when it joins two words or numbers, as in
# "3-4" or "x-2"), optional dollar sign on either side of the minus, digits
# grouped by thousands commas or plain, optional decimals. A trailing period
# ends a sentence, so "72." is 72.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-)?\$?(?P<sign2>-)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?P<frac>\.\d+)?"
)


def find_numbers(text: str) -> list[Decimal]:
    """Every number in ``text``, in order, as exact decimals."""
    numbers = []
    for match in _NUMBER.finditer(text):
        digits = match.group("int").replace(",", "") + (match.group("frac") or "")
        value = Decimal(digits)
        if match.group("sign") or match.group("sign2"):
            value = -value
        numbers.append(value)
    return numbers


def extract_final_number(text: str) -> Decimal | None:
    """The number an answer commits to, or None when it gives none.

    After a ``####`` marker: the first number following the last marker
    (None if that part has no number, even when numbers appear before it).
    Without a marker: the last number in the text.
    """
    if FINAL_MARKER in text:
        tail = text.rsplit(FINAL_MARKER, 1)[1]
        numbers = find_numbers(tail)
        return numbers[0] if numbers else None
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def format_number(value: Decimal | None) -> str:
    """``Decimal('1200.00')`` -> ``'1200'``; None -> ``''`` (for reports)."""
    if value is None:
        return ""
    try:
        text = format(value.normalize(), "f")
    except InvalidOperation:
        return str(value)
    return "0" if text in ("-0", "0") else text


def exact_match(prediction: str, reference: str) -> bool:
    """True when both texts commit to the same number (a missing one never matches)."""
    predicted = extract_final_number(prediction)
    expected = extract_final_number(reference)
    return predicted is not None and expected is not None and predicted == expected


def load_gsm8k(path: str | os.PathLike) -> list[dict]:
    """Rows with ``question`` and ``answer`` (GSM8K's own jsonl layout)."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{number}: not JSON ({err.msg}); expected one object per line") from None
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise EvalError(f"{path}:{number}: each row needs string fields 'question' and 'answer' (GSM8K's jsonl layout)")
        rows.append(row)
    return rows
