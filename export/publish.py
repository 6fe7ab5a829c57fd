"""What the export folder carries besides the GGUFs: manifest, model card, Ollama Modelfile; the Hub push."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraship.embedded import EMBEDDED, EMBEDDED_NAME
from loraship.hub import looks_like_repo_id, push_folder
from loraship.manifest import build_manifest

EMBEDDED_REPO = f"HuggingFaceTB/{EMBEDDED_NAME}"
LIBRARIES = ("torch", "transformers", "peft", "safetensors", "llama-cpp-python", "gguf", "huggingface-hub")


@dataclass
class GGUFFile:
    """One GGUF the export wrote, and what we learned about it."""

    path: Path
    quant_type: str
    fallbacks: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None
    #: Per-token NLL behind ``perplexity`` (numpy, not written anywhere): the paired comparison with F16.
    token_nll: Any = None

    @property
    def name(self) -> str:
        return self.path.name


def hub_base_model(base_model: str) -> str | None:
    """The base as a Hub repo id for the card's metadata (None for a local folder)."""
    if base_model == EMBEDDED:
        return EMBEDDED_REPO
    return base_model if looks_like_repo_id(base_model) else None


def perplexity_table(files: list[GGUFFile]) -> dict[str, Any]:
    """Each file's perplexity, the tokens it was measured on, and its ratio to the F16 file's (the reference).

    Where both files carry per-token NLLs of the same tokens, the ratio comes
    with a 95% interval (evals.perplexity.paired_ratio).
    """
    from evals.perplexity import paired_ratio

    reference = next((f for f in files if f.quant_type == "F16"), None)
    table = {}
    for f in files:
        if f.perplexity is None:
            continue
        entry: dict[str, Any] = {"perplexity": round(f.perplexity, 4), "tokens": None, "relative_to_f16": None,
                                 "relative_to_f16_95": None}
        if f.token_nll is not None:
            entry["tokens"] = len(f.token_nll)
        if reference is not None and reference.perplexity:
            entry["relative_to_f16"] = round(f.perplexity / reference.perplexity, 4)
            if (f is not reference and f.token_nll is not None and reference.token_nll is not None
                    and len(f.token_nll) == len(reference.token_nll) >= 2):
                _, low, high = paired_ratio(reference.token_nll, f.token_nll)
                entry["relative_to_f16_95"] = [round(low, 4), round(high, 4)]
        table[f.quant_type] = entry
    return table


def _ratio_cell(entry: dict[str, Any]) -> str:
    rel = entry.get("relative_to_f16")
    if not rel:
        return "n/a"
    interval = entry.get("relative_to_f16_95")
    if interval is None:
        return f"{rel:.4f}x"
    return f"{rel:.4f}x ({interval[0]:.4f}-{interval[1]:.4f})"


def _tokens_note(table: dict[str, Any]) -> str:
    counts = sorted({e["tokens"] for e in table.values() if e.get("tokens")})
    return f", {counts[0]} predicted tokens" if len(counts) == 1 else ""


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


def model_card(
    name: str, base_model: str, adapter_source: str, files: list[GGUFFile], *,
    eval_text: str, lora_file: str | None = None, ladder: dict | None = None, merge_base: dict | None = None,
) -> str:
    """README.md with Hub metadata and how to run the files."""
    base_repo = hub_base_model(base_model)
    types = [f.quant_type for f in files]
    meta = ["---"]
    if base_repo:
        meta.append(f"base_model: {base_repo}")
    meta += ["tags:", "  - gguf", "  - llama.cpp", "  - lora", "  - loraship", "quantization:"]
    meta += [f"  - {t}" for t in types]
    meta += ["library_name: gguf", "---", ""]
    default = next((f for f in files if f.quant_type == "Q4_K_M"), files[-1])
    ppl = perplexity_table(files)
    rows = ["| file | type | size | perplexity | vs F16 | tensors that fell back |", "|---|---|---|---|---|---|"]
    for f in files:
        p = ppl.get(f.quant_type, {})
        fb = f.fallbacks
        fallback = f"{fb['fallback_tensors']} of {fb['total_tensors']}" if fb else "none (converter output)"
        rows.append(
            f"| `{f.name}` | {f.quant_type} | {_size(f.path)} | {p.get('perplexity', 'n/a')} | "
            f"{_ratio_cell(p)} | {fallback} |"
        )
    if ladder and ladder.get("skipped"):
        quality = f"\nQuality ladder: {ladder['reason']}. Merge base: {merge_base['reason']}.\n"
    else:
        quality = quality_section(ladder, merge_base, eval_text) if ladder else ""
    body = f"""# {name} (GGUF)

`{adapter_source}` (a LoRA adapter) merged into the full-precision `{base_repo or base_model}`,
converted with llama.cpp's own converter and quantized with llama.cpp, by
loraship's `python -m export`.

{chr(10).join(rows)}

Perplexity: on held-out general prose ({eval_text}{_tokens_note(ppl)}) through llama.cpp;
lower is better, and "vs F16" shows what quantization cost, with a 95% interval
from the per-token differences on the same tokens. Where a tensor's row width
is not a multiple of the quantization block, llama.cpp stores it in a nearby
type instead (listed per file in `manifest.json`, key `extra.files`).

Every file was checked before it was published: llama.cpp loads it, its
metadata carries the chat template, the prompt tokens llama.cpp builds for
fixed multi-turn chats equal the training tokenizer's, and a chat stops on the
end-of-turn token. `manifest.json` lists each file's sha256.
{quality}
## Use

llama.cpp:

```bash
llama-cli -m {default.name} -cnv
llama-server -m {default.name} --port 8080
```

Ollama (the `Modelfile` is in this folder):

```bash
ollama create {name.lower()} -f Modelfile
ollama run {name.lower()}
```

LM Studio: open `{default.name}` (the chat template is in its metadata).

loraship's CPU server (chat UI + OpenAI-compatible API):

```bash
MODEL={default.name} python -m serve
```
"""
    if lora_file:
        body += f"""
The adapter alone, as a LoRA GGUF for the base model's GGUF: `{lora_file}`
(`llama-cli -m BASE.gguf --lora {lora_file}`).
"""
    return "\n".join(meta) + body


def quality_section(ladder: dict, merge_base: dict | None, eval_text: str) -> str:
    """The card's quality ladder and merge-base choice (export/ladder_report.py writes both)."""
    from export.ladder_report import quality_markdown

    return quality_markdown(ladder, merge_base, eval_text)


def ollama_modelfile(gguf_name: str, stop_tokens: list[str]) -> str:
    """A Modelfile for ``ollama create``; Ollama takes the chat template from the GGUF's metadata."""
    lines = [
        "# ollama create NAME -f Modelfile",
        "# The chat template comes from the GGUF's metadata (tokenizer.chat_template).",
        f"FROM ./{gguf_name}",
    ]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens if token]
    return "\n".join(lines) + "\n"


def export_manifest(
    folder: Path, files: list[GGUFFile], extra_files: list[str], *,
    inputs: dict[str, Any], settings: dict[str, Any], extra: dict[str, Any],
) -> dict[str, Any]:
    """The folder's manifest: every file with sha256, each GGUF with its type, fallbacks and perplexity."""
    names = [f.name for f in files] + list(extra_files)
    manifest = build_manifest(
        kind="gguf", stage="export", folder=folder, files=names, inputs=inputs, settings=settings,
        libraries=LIBRARIES,
        extra={
            **extra,
            "perplexity": perplexity_table(files),
            "files": {
                f.name: {
                    "quant_type": f.quant_type,
                    "fallbacks": f.fallbacks or None,
                    "verification": f.verification,
                    "perplexity": round(f.perplexity, 4) if f.perplexity is not None else None,
                }
                for f in files
            },
        },
    )
    types = {f.name: f.quant_type for f in files}
    for entry in manifest["files"]:
        if entry["name"] in types:
            entry["quant_type"] = types[entry["name"]]
    return manifest


def push_export(folder: Path, names: list[str], repo_id: str, token: str | None) -> str:
    """Push exactly ``names`` from ``folder`` (not whatever else the folder holds)."""
    with tempfile.TemporaryDirectory(prefix=".tmp-push-", dir=folder) as staging:
        for name in names:
            src, dst = folder / name, Path(staging) / name
            try:
                os.link(src, dst)  # no copy of multi-gigabyte files
            except OSError:
                shutil.copy2(src, dst)
        return push_folder(staging, repo_id, token=token, commit_message="Upload GGUF export with loraship")
