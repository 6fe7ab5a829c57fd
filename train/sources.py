"""Where training rows come from: local JSON/JSONL/CSV/Parquet files or folders, or a Hub dataset.

Each row keeps where it came from ("data/x.jsonl line 7"), so every error about it can name the place.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from train.settings import DATA_SUFFIXES, TrainError



@dataclass(frozen=True)
class SourceRow:
    where: str  # "data/x.jsonl line 7": what a user needs to find the row
    row: dict[str, Any]


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise TrainError(f"DATASET={str(path)!r}: unsupported file type; use {', '.join(DATA_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise TrainError(f"DATASET={str(path)!r}: the folder holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def _read_file(path: Path) -> Iterator[SourceRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not path.read_text(encoding="utf-8").lstrip().startswith("[")):
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TrainError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(row, dict):
                    raise TrainError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield SourceRow(where, row)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise TrainError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise TrainError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
            yield SourceRow(f"{path} row {number}", row)
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield SourceRow(f"{path} line {reader.line_num}", dict(row))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield SourceRow(f"{path} row {number}", row)


def _read_hub(repo_id: str, config: str | None, split: str, token: str | None) -> Iterator[SourceRow]:
    import datasets

    try:
        data = datasets.load_dataset(repo_id, config, split=split, token=token)
    except Exception as err:  # noqa: BLE001 - unreachable Hub, missing repo/config/split: one clear line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainError(
            f"DATASET={repo_id!r}: could not load split {split!r}"
            + (f" of config {config!r}" if config else "")
            + f" from the Hub ({first}); check DATASET, DATASET_CONFIG, DATASET_SPLIT and HF_TOKEN"
        ) from err
    label = f"{repo_id}[{config + ':' if config else ''}{split}]"
    for number, row in enumerate(data, 1):
        yield SourceRow(f"{label} row {number}", row)


def read_rows(
    dataset: str, *, config: str | None = None, split: str = "train", max_samples: int | None = None,
    token: str | None = None,
) -> list[SourceRow]:
    """The first ``max_samples`` rows of a local file/folder or Hub dataset, each with where it came from."""
    path = Path(dataset).expanduser()
    if path.exists():
        source: Iterator[SourceRow] = (r for f in _data_files(path) for r in _read_file(f))
    else:
        source = _read_hub(dataset, config, split, token)
    rows = []
    for row in source:
        rows.append(row)
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not rows:
        raise TrainError(f"DATASET={dataset!r}: no rows found")
    return rows
