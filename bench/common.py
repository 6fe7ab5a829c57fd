"""What several benches share: the library versions they ran with, their markdown tables, and loss parity."""

from __future__ import annotations

import platform
import statistics

#: The training stack whose versions a training bench records.
TRAINING_LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel", "triton",
                      "datasets")

#: Steps where the reference run's loss is below this (nats) are left out of :func:`median_loss_gap`: a run that
#: has learnt its few rows by heart (loss ~0.007) differs from another by rounding, not by how it learns.
MEMORIZED_LOSS = 1.0


def versions(libraries: tuple[str, ...] = TRAINING_LIBRARIES) -> dict[str, str | None]:
    """Python's version and each installed library's (None where it is not installed)."""
    import importlib.metadata as md

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in libraries:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def markdown_table(header: list[str], rows: list[list]) -> str:
    """``rows`` under ``header`` as a markdown table, each cell as ``str`` gives it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median_loss_gap(losses: list[float], reference: list[float]) -> float:
    """The median over the steps both ran of ``(loss - reference) / reference``: parity that one loss spike in either
    run does not decide (at a constant learning rate a spike can come at any step); NaN with no step to compare.
    Steps where the reference is under :data:`MEMORIZED_LOSS` are left out."""
    gaps = [(mine - theirs) / theirs for mine, theirs in zip(losses, reference) if theirs >= MEMORIZED_LOSS]
    return statistics.median(gaps) if gaps else float("nan")
