"""The dataset report: what the data became before a single step is trained.

Printed before every run (and by ``--dry-run``, which stops after it) and written to
OUTPUT_DIR as ``data_report.json`` (for tools), ``data_report.txt`` (for people) and
``data_report.png`` (the token-length histogram).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from loraship.atomic import write_json, write_png, write_text
from train.data import DataReport

BAR_WIDTH = 40


def histogram_lines(histogram: dict[str, list[int]]) -> list[str]:
    """The token-length histogram as text bars, one line per bin."""
    edges, counts = histogram["bin_edges"], histogram["counts"]
    top = max(counts) or 1
    width = len(str(edges[-1]))
    return [
        f"  {lo + 1:>{width}}-{hi:>{width}} tokens | {'#' * round(BAR_WIDTH * n / top):<{BAR_WIDTH}} {n}"
        for lo, hi, n in zip(edges, edges[1:], counts)
    ]


def report_text(report: DataReport, settings: dict[str, Any]) -> str:
    """The whole report as people read it: settings, counts, histogram, loss share, end-of-turn check."""
    lines = ["settings (resolved, secrets left out):"]
    lines += [f"  {key}={value}" for key, value in settings.items()]
    lines += report.lines()
    lines.append("data: token lengths of the kept rows:")
    lines += histogram_lines(report.length_histogram)
    return "\n".join(lines) + "\n"


def plot_histogram(histogram: dict[str, list[int]], path: Path, max_seq_length: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = histogram["bin_edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
           color="tab:blue", edgecolor="white")
    ax.axvline(max_seq_length, color="gray", linestyle=":", label=f"MAX_SEQ_LENGTH={max_seq_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    return write_png(path, fig)


def write_data_report(output_dir: Path, report: DataReport, settings: dict[str, Any]) -> str:
    """data_report.json/.txt/.png in ``output_dir``; returns the text."""
    text = report_text(report, settings)
    write_json(output_dir / "data_report.json", {"settings": settings, **asdict(report)})
    write_text(output_dir / "data_report.txt", text)
    plot_histogram(report.length_histogram, output_dir / "data_report.png", report.max_seq_length)
    return text
