"""`python -m evals` from top to bottom: read the data, evaluate each model, write the report.

Every input is read and checked before any model is loaded, so a wrong path
fails in a second, not after minutes of generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from loraship.atomic import atomic_path, write_json, write_text
from loraship.envsettings import public_settings
from loraship.manifest import build_manifest, write_manifest

from evals import gsm8k, identity, judge, perplexity, report
from evals.generate import chat_answers, is_gguf, resolve_model_path
from evals.settings import EvalError, EvalSettings

GSM8K_INSTRUCTION = "Solve the problem. End your answer with '#### ' followed by the final number."


@dataclass
class EvalData:
    """Everything the chosen tasks read, loaded once for all models."""

    identity_rows: list[dict] = field(default_factory=list)
    general_rows: list[dict] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    gsm8k_rows: list[dict] = field(default_factory=list)


def load_data(settings: EvalSettings) -> EvalData:
    data = EvalData()
    limit = settings.limit
    if {"identity", "general", "judge"} & set(settings.tasks):
        rows = identity.load_heldout(settings.heldout)
        data.identity_rows = [r for r in rows if r["kind"] == "identity"][:limit]
        data.general_rows = [r for r in rows if r["kind"] == "general"][:limit]
    if "perplexity" in settings.tasks:
        if not settings.perplexity_text.is_file():
            raise EvalError(f"perplexity text {settings.perplexity_text} not found; set PERPLEXITY_TEXT")
        data.texts = perplexity.read_paragraphs(settings.perplexity_text)[:limit]
        if not data.texts:
            raise EvalError(f"{settings.perplexity_text} holds no text")
    if "gsm8k" in settings.tasks:
        if not settings.gsm8k_file.is_file():
            raise EvalError(f"GSM8K file {settings.gsm8k_file} not found; set GSM8K_FILE")
        data.gsm8k_rows = gsm8k.load_gsm8k(settings.gsm8k_file)[:limit]
    return data


def evaluate_model(label: str, model: str, settings: EvalSettings, data: EvalData) -> dict:
    """All chosen tasks on one model: its metrics and the answers behind them."""
    path = resolve_model_path(model, settings.quant)
    tasks = set(settings.tasks)
    metrics: dict[str, float | int | None] = {}
    answers: list[dict] = []
    started = time.monotonic()
    print(f"[evals] {label}: {path}", flush=True)

    asked = []
    if "identity" in tasks:
        asked += data.identity_rows
    if {"general", "judge"} & tasks:
        asked += data.general_rows
    conversations = [identity.prompt_of(r) for r in asked]
    conversations += [
        [{"role": "user", "content": f"{row['question']}\n\n{GSM8K_INSTRUCTION}"}] for row in data.gsm8k_rows
    ]
    if conversations:
        replies = chat_answers(path, conversations, max_new_tokens=settings.max_new_tokens,
                               n_ctx=settings.n_ctx, n_threads=settings.n_threads)
        chat_replies, gsm8k_replies = replies[: len(asked)], replies[len(asked):]
        for row, reply in zip(asked, chat_replies):
            answers.append({"kind": row["kind"], "question": identity.prompt_of(row)[-1]["content"],
                            "answer": reply, "reference": identity.reference_of(row)})
        identity_answers = [a["answer"] for a in answers if a["kind"] == "identity"]
        general_answers = [a for a in answers if a["kind"] == "general"]
        if "identity" in tasks:
            metrics["identity_share"] = identity.keyword_share(identity_answers, settings.identity_keyword)
            metrics["identity_n"] = len(identity_answers)
        if "general" in tasks:
            metrics["general_keyword_share"] = identity.keyword_share(
                [a["answer"] for a in general_answers], settings.identity_keyword)
            metrics["general_n"] = len(general_answers)
        if "judge" in tasks:
            verdicts = judge.judge_answers(
                [judge.JudgeItem(a["question"], a["answer"], a["reference"]) for a in general_answers],
                url=settings.judge_url, model=settings.judge_model, api_key=settings.api_key(),
                max_tokens=settings.judge_max_tokens,
            )
            for item, verdict in zip(general_answers, verdicts):
                item["judge_score"] = verdict.score
                item["judge_reply"] = verdict.reply
            metrics.update(judge.summarize_verdicts(verdicts))
        if data.gsm8k_rows:
            hits = [gsm8k.exact_match(reply, row["answer"]) for reply, row in zip(gsm8k_replies, data.gsm8k_rows)]
            metrics["gsm8k_accuracy"] = sum(hits) / len(hits)
            metrics["gsm8k_n"] = len(hits)
            for row, reply, hit in zip(data.gsm8k_rows, gsm8k_replies, hits):
                answers.append({"kind": "gsm8k", "question": row["question"], "answer": reply,
                                "reference": gsm8k.format_number(gsm8k.extract_final_number(row["answer"])),
                                "predicted": gsm8k.format_number(gsm8k.extract_final_number(reply)), "correct": hit})

    if data.texts:
        if is_gguf(path):
            nll = perplexity.gguf_nll(path, data.texts, n_ctx=settings.perplexity_n_ctx, n_threads=settings.n_threads)
        else:
            nll = perplexity.hf_nll(path, data.texts, n_ctx=settings.perplexity_n_ctx)
        metrics["perplexity"] = nll.perplexity
        metrics["perplexity_tokens"] = nll.tokens

    seconds = round(time.monotonic() - started, 1)
    print(f"[evals] {label}: done in {seconds} s", flush=True)
    return {"label": label, "path": str(path), "backend": "llama.cpp" if is_gguf(path) else "transformers",
            "seconds": seconds, "metrics": metrics, "answers": answers}


def card_folder(model: str, settings: EvalSettings) -> Path | None:
    """The export folder whose model card gets the results: MODEL's folder, when it has a manifest and a card."""
    path = resolve_model_path(model, settings.quant)
    folder = path.parent if is_gguf(path) else path
    if (folder / "README.md").is_file() and (folder / "manifest.json").is_file():
        return folder
    return None


def run(settings: EvalSettings) -> dict:
    """Evaluate BASE_MODEL (if set) and MODEL; write report.json, report.md, comparison.png and a manifest."""
    data = load_data(settings)
    targets = [("base", settings.base_model)] if settings.base_model else []
    targets.append(("tuned" if settings.base_model else "model", settings.model))
    for _, model in targets:
        resolve_model_path(model, settings.quant)  # fail on a bad path before any model loads
    models = [evaluate_model(label, model, settings, data) for label, model in targets]

    result = {
        "keyword": settings.identity_keyword,
        "tasks": list(settings.tasks),
        "settings": public_settings(settings),
        "models": models,
    }
    out = settings.output_dir
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "report.json", result)
        write_text(tmp / "report.md", report.markdown_report(result))
        report.bar_chart(models, settings.identity_keyword, tmp / "comparison.png")
        files = ["report.json", "report.md", "comparison.png"]
        write_manifest(tmp, build_manifest(
            kind="evaluation", stage="evals", folder=tmp, files=files,
            inputs={label: str(resolve_model_path(model, settings.quant)) for label, model in targets},
            settings=public_settings(settings), libraries=("llama-cpp-python", "torch", "transformers"),
            extra={label_metrics["label"]: label_metrics["metrics"] for label_metrics in models},
        ))
    result["output_dir"] = str(out)

    folder = card_folder(settings.model, settings) if settings.update_card else None
    if folder is not None:
        import shutil

        # The chart travels with the card so the image link in the README resolves.
        chart = "evals-comparison.png"
        with atomic_path(folder / chart) as tmp:
            shutil.copyfile(out / "comparison.png", tmp)
        report.update_model_card(folder, report.card_section(result, chart), attachments=[chart])
        result["card"] = str(folder / "README.md")
    return result
