"""LLM-as-judge: another model scores each answer from 1 to 5.

The rubric weighs correctness, completeness and faithfulness to the
instruction, and asks for one overall integer score. Any OpenAI-compatible
endpoint can judge (JUDGE_URL / JUDGE_MODEL / JUDGE_API_KEY): a hosted model,
or a local llama.cpp server.

Judges do not always answer in the requested form, so parsing is strict and
total: every reply maps to a score from 1 to 5 or to None ("unparseable"),
never to a guess. Unparseable replies are counted and reported, not averaged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

SCALE = (1, 5)

JUDGE_SYSTEM = (
    "You are a strict grader of answers written by an AI assistant. "
    "Score the answer from 1 to 5, judging together:\n"
    "- correctness: are its facts, numbers and reasoning right?\n"
    "- completeness: does it answer everything the question asks?\n"
    "- faithfulness: does it follow the instruction and stay on topic, without invented content?\n"
    "5 = correct, complete and faithful; 4 = minor flaw; 3 = partly right or partly missing; "
    "2 = mostly wrong or off-topic; 1 = wrong, empty or unrelated.\n"
    'Reply with JSON only, on one line: {"score": <integer 1-5>, "reason": "<one short sentence>"}'
)


@dataclass(frozen=True)
class JudgeItem:
    question: str
    answer: str
    reference: str | None = None


@dataclass(frozen=True)
class JudgeVerdict:
    score: int | None
    reply: str


def build_judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The chat messages that ask the judge to score one answer."""
    parts = [f"Question:\n{item.question.strip()}"]
    if item.reference:
        parts.append(f"Reference answer (correct):\n{item.reference.strip()}")
    parts.append(f"Answer to grade:\n{item.answer.strip() or '(empty)'}")
    parts.append('Grade the answer. Reply with JSON only: {"score": <integer 1-5>, "reason": "..."}')
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def _in_scale(value: object) -> int | None:
    """``value`` as an integer score on the scale, or None (non-integers and out-of-range included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"-?\d+(\.0+)?", value):
            return None
        value = float(value)
    if isinstance(value, (int, float)) and float(value).is_integer():
        score = int(value)
        return score if SCALE[0] <= score <= SCALE[1] else None
    return None


def _first_json_object(text: str) -> dict | None:
    """The first ``{...}`` in ``text`` that parses as a JSON object (code fences and prose around it allowed)."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


_NUMBER = r"(-?\d+(?:\.\d+)?)"
_LABELLED = re.compile(rf"\b(?:overall\s+)?(?:score|rating|grade)\b[\"']?\s*(?:is|of|:|=)?\s*\**\s*{_NUMBER}", re.IGNORECASE)
_OUT_OF_FIVE = re.compile(rf"(?<![\w.]){_NUMBER}\s*(?:/|out\s+of)\s*5\b", re.IGNORECASE)
_ANY_NUMBER = re.compile(rf"(?<![\w.]){_NUMBER}")


def parse_judge_score(reply: str) -> int | None:
    """The score a judge's reply gives, or None when it gives no single valid one.

    In order:

    1. a JSON object in the reply decides alone: its ``score`` if that is an
       integer from 1 to 5 (``4``, ``4.0``, ``"4"``), else None; JSON cut
       short (a judge stopped by its token limit) is read as prose;
    2. prose with labelled scores (``Score: 4``, ``"score": 4``, ``rating 4``, ``4/5``,
       ``4 out of 5``): their value if they all agree and it is on the scale,
       else None;
    3. otherwise the reply's only number, if it is on the scale; several
       different numbers, no number, or an out-of-scale number give None.
    """
    found = _first_json_object(reply)
    if found is not None:
        return _in_scale(found.get("score"))
    labelled = [m.group(1) for m in _LABELLED.finditer(reply)] + [m.group(1) for m in _OUT_OF_FIVE.finditer(reply)]
    if labelled:
        values = {float(v) for v in labelled}
        return _in_scale(values.pop()) if len(values) == 1 else None
    numbers = {float(m.group(1)) for m in _ANY_NUMBER.finditer(reply)}
    if len(numbers) == 1:
        return _in_scale(numbers.pop())
    return None


def judge_answers(
    items: Iterable[JudgeItem],
    *,
    url: str,
    model: str,
    api_key: str | None = None,
    max_tokens: int = 128,
    timeout: float = 120.0,
) -> list[JudgeVerdict]:
    """Ask the judge at ``url`` (OpenAI-compatible, e.g. ``http://host:port/v1``) to score each item, greedily."""
    from openai import OpenAI
    from tqdm import tqdm

    client = OpenAI(base_url=url, api_key=api_key or "not-needed", timeout=timeout, max_retries=1)
    verdicts = []
    items = list(items)
    for item in tqdm(items, desc="judge", unit="answer", disable=None):
        response = client.chat.completions.create(
            model=model,
            messages=build_judge_messages(item),
            temperature=0.0,
            max_tokens=max_tokens,
        )
        reply = response.choices[0].message.content or ""
        verdicts.append(JudgeVerdict(parse_judge_score(reply), reply))
    return verdicts


def summarize_verdicts(verdicts: Sequence[JudgeVerdict]) -> dict[str, float | int | None]:
    """Mean score over parsed verdicts, and how many replies could not be parsed."""
    scores = [v.score for v in verdicts if v.score is not None]
    return {
        "judge_mean": sum(scores) / len(scores) if scores else None,
        "judge_scored": len(scores),
        "judge_unparseable": len(verdicts) - len(scores),
    }
