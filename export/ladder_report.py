"""The quality ladder as people and the manifest read it: the log line, the JSON record, the card's table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.ladder import EvalSet, RungScore


def log_line(score: RungScore) -> str:
    return (f"ladder {score.rung}: NLL {score.nll:.4f}, perplexity {score.perplexity:.3f}, "
            f"KL vs rung 1 {score.kl:.5f}, top-1 agreement {100 * score.top1:.2f}% ({score.seconds:.1f} s)")


def ladder_json(scores: list[RungScore], eval_set: EvalSet, limits: dict[str, dict]) -> dict:
    """The ladder as the manifest records it (``extra.ladder``)."""
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
