"""The quality ladder as people and the manifest read it: the log line, the JSON record, the card's tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.ladder import EvalSet, RungScore

#: The texts as the tables name them.
TEXT_LABELS = {"heldout": "held-out rows", "general": "general text"}


def log_line(score: RungScore) -> str:
    texts = "; ".join(f"{TEXT_LABELS[name]}: NLL {t.nll:.4f}, KL vs rung 1 {t.kl:.5f}, top-1 {100 * t.top1:.2f}%"
                      for name, t in score.texts.items())
    return f"ladder {score.rung}: {texts} ({score.seconds:.1f} s)"


def ladder_json(scores: list[RungScore], eval_sets: dict[str, EvalSet], limits: dict[str, dict]) -> dict:
    """The ladder as the manifest records it (``extra.ladder``)."""
    return {
        "texts": {name: {"positions": s.positions, "windows": len(s.windows)} for name, s in eval_sets.items()},
        "vocab": next(iter(eval_sets.values())).vocab,
        "reference": "rung 1 log-probabilities kept as float32 over the tokenizer's vocabulary",
        "limits": limits,
        "rungs": [s.to_json() for s in scores],
    }


def _cells(entry: dict | None, first: bool = False) -> list[str]:
    if entry is None:
        return ["", ""]
    return [f"{entry['nll']:.4f}", "reference" if first else f"{entry['kl']:.5f}"]


def ladder_markdown(rungs: list[dict]) -> str:
    """The ladder as a markdown table (from the manifest's ``rungs`` list)."""
    lines = [
        "| rung | model | held-out NLL | held-out KL | general NLL | general KL | general top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(rungs, 1):
        top1 = "reference" if n == 1 else f"{100 * r['general']['top1']:.2f}%"
        cells = [f"{n}. {r['rung']}", r["what"], *_cells(r.get("heldout"), n == 1), *_cells(r["general"], n == 1), top1]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_base_markdown(record: dict) -> str:
    """Each candidate base at the shipped type: held-out and general NLL, KL to the model as trained, checks."""
    shipped = record["shipped_type"]
    lines = [
        f"| merge base | held-out NLL ({shipped}) | held-out KL | general NLL | general KL | checks |",
        "|---|---|---|---|---|---|",
    ]
    for base, c in record["candidates"].items():
        rung = c["rungs"].get(shipped)
        cells = [*_cells(rung.get("heldout") if rung else None), *_cells(rung["general"] if rung else None)]
        checks = "passed" if c["passed"] else f"failed at {c['failed_at']}"
        lines.append(f"| {base}{' (kept)' if base == record['chosen'] else ''} | " + " | ".join(cells) + f" | {checks} |")
    return "\n".join(lines)


def quality_markdown(ladder: dict, merge_base: dict | None, eval_text: str) -> str:
    """The card's quality section: the ladder of the shipped files, then the merge-base choice."""
    texts = ladder["texts"]
    heldout = (f"{texts['heldout']['positions']} tokens of the fine-tune's own held-out rows (the train run's eval "
               "split, scored where training put the loss) and " if "heldout" in texts else "")
    text = f"""
## Quality ladder

Every rung scores the same token ids: {heldout}{texts['general']['positions']} tokens of general
text ({eval_text}). Rung 1 is the model as trained; KL is the mean KL(rung 1 || rung) of the
next-token distributions in nats per token. These are up to `LADDER_TOKENS` tokens of each text, as
the training tokenizer reads them; the file table above scores up to `EVAL_TOKENS` tokens as llama.cpp
tokenizes the general text, so its perplexities differ: compare within a table.

{ladder_markdown(ladder['rungs'])}
"""
    if merge_base and merge_base.get("candidates"):
        text += f"""
Merge base: {merge_base['reason']}. Rule: {merge_base['rule']}.

{merge_base_markdown(merge_base)}
"""
    elif merge_base:
        text += f"\nMerge base: {merge_base['reason']}.\n"
    return text
