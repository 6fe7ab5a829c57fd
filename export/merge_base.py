"""Which base the adapter is merged into (MERGE_BASE): the candidates, the rule that picks one, and its record.

Each candidate base is merged, converted and quantized to the shipped type (the first of QUANT_TYPES other
than F16), checked and scored; the rule then picks among the candidates whose files passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.ladder import RungScore, TextScore
    from export.publish import GGUFFile

#: Held-out NLLs closer than this (nats per token) count as a tie, broken by the KL to the model as trained.
TIE_NATS = 0.01
RULE = ("of the bases whose shipped file passes every check, the lower held-out NLL at the shipped type wins; "
        f"within {TIE_NATS} nats/token, the lower KL to the model as trained on those rows (no held-out rows: "
        "the lower KL on the general text)")


@dataclass
class Candidate:
    """One merge base on its way through the export: its files so far, their scores, and what failed."""

    base: str
    folder: Path
    #: Files that passed every check, in the order they were made.
    files: list[GGUFFile] = field(default_factory=list)
    #: Ladder rungs by name: ``merged``, ``F16``, then each quantized type.
    scores: dict[str, RungScore] = field(default_factory=dict)
    #: The first check that failed (the error's text) and the rung or file type it failed on.
    failure: str | None = None
    failed_at: str | None = None
    #: Merged yet (LADDER=false merges the next base only when one fails).
    built: bool = False

    @property
    def passed(self) -> bool:
        return self.failure is None

    def file(self, quant_type: str) -> GGUFFile | None:
        return next((f for f in self.files if f.quant_type == quant_type), None)


def shipped_type(quant_types: list[str]) -> str:
    """The type users run: the first of QUANT_TYPES other than F16 (F16 is always written, as the source)."""
    return next((t for t in quant_types if t != "F16"), "F16")


def merge_candidates(merge_base: str, trained_4bit: bool) -> list[str]:
    """The bases to merge into: MERGE_BASE=auto means both, but only a 4-bit-trained adapter has an NF4 base."""
    if merge_base == "auto":
        return ["original", "nf4"] if trained_4bit else ["original"]
    return [merge_base]


def unmeasured_order(setting: str, load_in_4bit: bool | None) -> list[str]:
    """LADDER=false: the order the bases are tried in, unscored; ``auto`` tries the NF4 round trip first for a 4-bit
    adapter (it was the closer base on every model measured, docs/benchmarks.md) and the original if it fails."""
    candidates = merge_candidates(setting, bool(load_in_4bit))
    return sorted(candidates, key=lambda c: c != "nf4") if setting == "auto" else candidates


def primary_text(candidates: list[Candidate], shipped: str) -> str:
    """``heldout`` when every candidate was scored on the fine-tune's held-out rows, else ``general``."""
    from export.ladder import GENERAL, HELDOUT

    scored = [c.scores[shipped] for c in candidates if shipped in c.scores]
    return HELDOUT if scored and all(HELDOUT in s.texts for s in scored) else GENERAL


def rank_candidates(candidates: list[Candidate], shipped: str, *, passed_only: bool = True) -> list[Candidate]:
    """The candidates that passed (or, ``passed_only=False``, all scored at ``shipped``), best first by :data:`RULE`."""
    from export.ladder import HELDOUT

    passed = [c for c in candidates if (c.passed or not passed_only) and shipped in c.scores]
    if not passed:
        return []
    text = primary_text(passed, shipped)

    def at(c: Candidate) -> TextScore:
        return c.scores[shipped].texts[text]

    if text != HELDOUT:
        return sorted(passed, key=lambda c: at(c).kl)
    best = min(at(c).nll for c in passed)
    tied = sorted((c for c in passed if at(c).nll <= best + TIE_NATS), key=lambda c: at(c).kl)
    return tied + sorted((c for c in passed if c not in tied), key=lambda c: at(c).nll)


def candidate_json(candidate: Candidate, shipped: str) -> dict:
    """One candidate in the manifest: passed or what failed, and its scores at the merged rung, F16 and shipped."""
    return {
        "passed": candidate.passed,
        "failure": candidate.failure,
        "failed_at": candidate.failed_at,
        "files": [f.name for f in candidate.files],
        "rungs": {name: score.to_json() for name, score in candidate.scores.items()
                  if name in ("merged", "F16", shipped)},
    }


def merge_base_record(setting: str, load_in_4bit: bool | None, shipped: str, candidates: list[Candidate],
                      chosen: Candidate | None, *, measured: bool = True) -> dict:
    """What the manifest says about the merge base: every candidate's numbers at the shipped type, the rule, why."""
    return {
        "setting": setting,
        "trained_in_4bit": load_in_4bit,
        "shipped_type": shipped,
        "rule": RULE if measured else "not measured (LADDER=false): " + " then ".join(
            unmeasured_order(setting, load_in_4bit)) + ", the first whose files pass every check",
        "chosen": chosen.base if chosen else None,
        "reason": choice_reason(setting, load_in_4bit, shipped, candidates, chosen, measured=measured),
        "candidates": {c.base: candidate_json(c, shipped) for c in candidates if c.built},
    }


def choice_reason(setting: str, load_in_4bit: bool | None, shipped: str, candidates: list[Candidate],
                  chosen: Candidate | None, *, measured: bool = True) -> str:
    """One sentence: the base kept and the numbers that kept it."""
    failed = "; ".join(f"{c.base} failed at {c.failed_at}" for c in candidates if not c.passed)
    failed = f"; {failed}" if failed else ""
    name = chosen.base if chosen else "none"
    if not measured:
        return f"{name} (MERGE_BASE={setting}, not measured (LADDER=false){failed})"
    if len(candidates) == 1 and setting == "auto":
        why = ("no train manifest says the adapter was trained in 4-bit" if load_in_4bit is None
               else "the adapter was trained on a full-precision base")
        return f"{name} (MERGE_BASE=auto, and {why}: there is no NF4 base to compare{failed})"
    if len(candidates) == 1:
        return f"{name} (MERGE_BASE={setting}{failed})"
    text = primary_text(candidates, shipped)
    numbers = ", ".join(f"{c.base} NLL {c.scores[shipped].texts[text].nll:.4f} KL {c.scores[shipped].texts[text].kl:.5f}"
                        for c in candidates if shipped in c.scores and c.passed)
    where = "held-out rows" if text == "heldout" else "general text (the adapter carries no held-out rows)"
    return f"{name} (MERGE_BASE=auto at {shipped} on the {where}: {numbers}{failed})"
