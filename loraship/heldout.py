"""The train run's eval split as the export scores it: each row's token ids and training's labels.

Train writes it into the adapter folder; export scores every rung of its quality ladder on it, with the
loss on the tokens training put in the loss. Token ids, not text: the rows come back exactly as trained
(chat template, masking, truncation) without the export importing the train stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

HELDOUT_ROWS = "heldout_rows.jsonl"
#: The label of a token outside the loss (transformers' and train's convention).
IGNORE_INDEX = -100


def write_heldout_rows(folder: Path, rows: Iterable[tuple[Sequence[int], Sequence[int]]]) -> dict:
    """``folder/heldout_rows.jsonl``, one ``{"input_ids", "labels"}`` object a line; returns its counts."""
    count = tokens = loss_tokens = 0
    with open(folder / HELDOUT_ROWS, "w", encoding="utf-8") as fh:
        for input_ids, labels in rows:
            fh.write(json.dumps({"input_ids": [int(i) for i in input_ids], "labels": [int(i) for i in labels]},
                                separators=(",", ":")) + "\n")
            count += 1
            tokens += len(input_ids)
            loss_tokens += sum(1 for label in labels if label != IGNORE_INDEX)
    return {"file": HELDOUT_ROWS, "rows": count, "tokens": tokens, "loss_tokens": loss_tokens}


def read_heldout_rows(folder: Path) -> list[tuple[list[int], list[int]]] | None:
    """The rows ``folder`` carries (None: it carries none); a malformed line raises ValueError naming it."""
    path = folder / HELDOUT_ROWS
    if not path.is_file():
        return None
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            input_ids, labels = [int(i) for i in row["input_ids"]], [int(i) for i in row["labels"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} line {n}: not an object with integer lists input_ids and labels ({err})") from err
        if len(input_ids) != len(labels):
            raise ValueError(f"{path} line {n}: {len(input_ids)} input_ids but {len(labels)} labels")
        rows.append((input_ids, labels))
    return rows
