"""The comparison report: a markdown table, a PNG bar chart, and a section in the model card.

Numbers come from ``report.json`` (written by :mod:`evals.run`); everything
here only formats them, so the table, the chart and the card cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from loraship.atomic import write_png, write_text
from loraship.manifest import read_manifest, sha256_file, write_manifest

CARD_START = "<!-- loraship-evals:start -->"
CARD_END = "<!-- loraship-evals:end -->"

# (metric key, label, kind, count key, lower is better): "share" prints as a
# percentage, "value" as a number.
METRICS = [
    ("identity_share", "held-out identity questions answered with {keyword}", "share", "identity_n", False),
    ("general_keyword_share", "general questions whose answer mentions {keyword}", "share", "general_n", True),
    ("perplexity", "perplexity on held-out general text", "value", "perplexity_tokens", True),
    ("gsm8k_accuracy", "GSM8K exact match", "share", "gsm8k_n", False),
    ("judge_mean", "judge score 1-5 on general answers", "value", "judge_scored", False),
]
COUNT_UNITS = {"identity_n": "questions", "general_n": "questions", "perplexity_tokens": "tokens",
               "gsm8k_n": "problems", "judge_scored": "scored answers"}


def _format(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if kind == "share" else f"{value:.3f}"


def _change(base: float | None, tuned: float | None, kind: str) -> str:
    if base is None or tuned is None:
        return ""
    if kind == "share":
        return f"{100 * (tuned - base):+.1f} pts"
    if base == 0:
        return f"{tuned - base:+.3f}"
    return f"{100 * (tuned - base) / base:+.1f}%"


def present_metrics(models: Sequence[Mapping]) -> list[tuple[str, str, str, str]]:
    """The metrics that at least one model has, in display order."""
    return [m for m in METRICS if any(model["metrics"].get(m[0]) is not None for model in models)]


def markdown_table(models: Sequence[Mapping], keyword: str) -> str:
    """One row per metric, one column per model, and a change column when there are two models."""
    labels = [m["label"] for m in models]
    header = "| metric | " + " | ".join(labels) + (" | change |" if len(models) == 2 else " |")
    rule = "|---|" + "---:|" * len(models) + ("---:|" if len(models) == 2 else "")
    lines = [header, rule]
    for key, label, kind, count_key, lower_better in present_metrics(models):
        count = next((m["metrics"].get(count_key) for m in models if m["metrics"].get(count_key)), None)
        notes = ([f"{count} {COUNT_UNITS[count_key]}"] if count else []) + (["lower is better"] if lower_better else [])
        name = label.format(keyword=keyword) + (f" ({'; '.join(notes)})" if notes else "")
        cells = [_format(m["metrics"].get(key), kind) for m in models]
        if len(models) == 2:
            cells.append(_change(models[0]["metrics"].get(key), models[1]["metrics"].get(key), kind))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: Mapping) -> str:
    """The whole report.md: table, what was measured, and sample answers."""
    models = report["models"]
    keyword = report["keyword"]
    out = ["# Evaluation", "", markdown_table(models, keyword), ""]
    out.append("Models:")
    for model in models:
        out.append(f"- **{model['label']}**: `{model['path']}`")
    out += [
        "",
        "Answers are greedy (temperature 0), rendered with the model's own chat template and no system "
        "message (so the template's default system prompt applies, as in the served chat). Perplexity "
        f"uses windows of {report['settings'].get('PERPLEXITY_N_CTX')} tokens.",
        "",
    ]
    samples = [m for m in models if m.get("answers")]
    if samples:
        out += ["## Sample answers", ""]
        questions = {}
        for model in samples:
            for item in model["answers"][:6]:
                questions.setdefault((item["kind"], item["question"]), {})[model["label"]] = item["answer"]
        for (kind, question), answers in questions.items():
            out.append(f"**{question}** ({kind})")
            for label, answer in answers.items():
                flat = " ".join(answer.split())
                out.append(f"- {label}: {flat[:300]}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def bar_chart(models: Sequence[Mapping], keyword: str, path: str | os.PathLike) -> Path:
    """A PNG with one small bar panel per metric, models side by side; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = present_metrics(models)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4), squeeze=False)
    colors = ["#8c8c8c", "#d9822b", "#3b7dd8", "#59a14f"]
    for ax, (key, label, kind, _, lower_better) in zip(axes[0], metrics):
        values = [m["metrics"].get(key) for m in models]
        shown = [(100 * v if kind == "share" else v) if v is not None else 0.0 for v in values]
        bars = ax.bar([m["label"] for m in models], shown, color=colors[: len(models)])
        for bar, value in zip(bars, values):
            ax.annotate(_format(value, kind), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        title = label.format(keyword=keyword) + ("\n(lower is better)" if lower_better else "")
        ax.set_title(title, fontsize=9, wrap=True)
        if kind == "share":
            ax.set_ylim(0, 110)
            ax.set_ylabel("%")
        else:
            ax.set_ylim(0, max(shown + [1e-9]) * 1.2)
    fig.tight_layout()
    return write_png(path, fig, dpi=110)


def card_section(report: Mapping, chart_name: str | None = None) -> str:
    """The model-card section: the same table, between markers so a re-run replaces it."""
    lines = [CARD_START, "## Evaluation", "", markdown_table(report["models"], report["keyword"]), ""]
    lines.append(
        "Measured by `python -m evals` (greedy answers on held-out questions never seen in training; "
        "perplexity on held-out prose)."
    )
    if chart_name:
        lines += ["", f"![base versus tuned]({chart_name})"]
    lines.append(CARD_END)
    return "\n".join(lines) + "\n"


def replace_card_section(card: str, section: str) -> str:
    """``card`` with its evaluation section replaced, or ``section`` appended when it has none."""
    if CARD_START in card and CARD_END in card:
        head, rest = card.split(CARD_START, 1)
        tail = rest.split(CARD_END, 1)[1].lstrip("\n")
        return head + section + ("\n" + tail if tail else "")
    return card.rstrip("\n") + "\n\n" + section


def update_model_card(folder: str | os.PathLike, section: str, attachments: Sequence[str] = ()) -> Path | None:
    """Put ``section`` into ``folder/README.md`` atomically; None when the folder has no card.

    ``attachments`` are files already copied into ``folder`` that the card
    links to (the chart). The folder's manifest, when it has one, is brought
    up to date for the card and the attachments, so the folder still verifies
    and lists everything in it.
    """
    folder = Path(folder)
    card = folder / "README.md"
    if not card.is_file():
        return None
    write_text(card, replace_card_section(card.read_text(encoding="utf-8"), section))
    manifest = read_manifest(folder)
    if manifest is not None:
        entries = manifest.setdefault("files", [])
        for name in ("README.md", *attachments):
            entry = next((e for e in entries if e.get("name") == name), None)
            if entry is None and name == "README.md":
                continue  # a card the manifest does not track stays untracked
            if entry is None:
                entry = {"name": name}
                entries.append(entry)
            entry["size"] = (folder / name).stat().st_size
            entry["sha256"] = sha256_file(folder / name)
        write_manifest(folder, manifest)
    return card

