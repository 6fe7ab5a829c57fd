"""What the export folder carries besides the GGUFs: manifest, model card, Ollama Modelfile; the Hub push."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraship.embedded import EMBEDDED, EMBEDDED_HUB_ID
from loraship.hub import looks_like_repo_id, push_folder
from loraship.manifest import build_manifest

EMBEDDED_REPO = EMBEDDED_HUB_ID
LIBRARIES = ("torch", "transformers", "peft", "safetensors", "llama-cpp-python", "gguf", "huggingface-hub")
#: The quant types a `-hf REPO:TAG` or `hf.co/REPO:TAG` selector can name, longest first (Q4_K_M before Q4_K).
_TAGS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q3_K_M", "Q8_0", "Q6_K", "Q5_0", "Q4_0", "Q2_K", "BF16", "F16",
         "F32")


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


@dataclass
class HubPush:
    """Where the export goes on the Hub and which of its files go there."""

    repo: str
    private: bool
    files: list[str]
    merged_repo: str | None = None


def pushed_types(quant_types: list[str], push_f16: bool) -> list[str]:
    """The GGUF types uploaded: every type QUANT_TYPES asks for; F16 (always written) only when asked for."""
    return list(dict.fromkeys(["F16"] if push_f16 else []) | dict.fromkeys(quant_types))


def gguf_file_name(name: str, quant_type: str) -> str:
    """``NAME-TYPE.gguf``: the type last, as llama.cpp's ``-hf REPO:TYPE`` and the Hub's ``hf.co/REPO:TYPE`` find it."""
    return f"{name}-{quant_type}.gguf"


def lora_file_name(name: str) -> str:
    """The adapter's GGUF carries no type in its name, so no ``:TYPE`` selector can pick it instead of a model."""
    return f"{name}-LoRA.gguf"


def selector_problems(ggufs: list[str], tags: dict[str, str]) -> list[str]:
    """Tags that would not select their own file among the uploaded ``ggufs`` (``tags``: type -> file name).

    llama.cpp takes the first file (in the repo's order) whose name holds the tag followed by ``.`` or ``-``;
    the Hub reads a file's type from the last type name in it. A MODEL_NAME holding a type name can fool both.
    """
    import re

    problems = []
    for tag, wanted in tags.items():
        first = next((g for g in sorted(ggufs) if re.search(re.escape(tag) + r"[.-]", g, re.IGNORECASE)), None)
        labelled = [g for g in ggufs if _last_type(g) == tag]
        if first != wanted or labelled != [wanted]:
            problems.append(f"`:{tag}` would not select {wanted} among {', '.join(sorted(ggufs))}")
    return problems


def _last_type(file_name: str) -> str | None:
    import re

    found = re.findall("(" + "|".join(_TAGS) + ")", file_name.upper())
    return found[-1] if found else None


def files_to_push(quant_types: list[str], push_f16: bool, files: list[GGUFFile], extra_files: list[str]) -> list[str]:
    """The export's files that go to HUB_REPO: the GGUFs of :func:`pushed_types`, and every other file."""
    wanted = set(pushed_types(quant_types, push_f16))
    return [f.name for f in files if f.quant_type in wanted] + list(extra_files)


def adapter_reference(given: str, folder: Path) -> str:
    """How a pushed card names the adapter: its Hub repo (given, or the one train pushed it to), else its name."""
    from loraship.manifest import read_manifest
    from loraship.public import public_name

    if looks_like_repo_id(given):
        return given
    manifest = read_manifest(folder) or {}
    return str((manifest.get("settings") or {}).get("HUB_REPO") or public_name(given))


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


def default_file(files: list[GGUFFile], names: list[str] | None = None) -> GGUFFile:
    """The file the card's commands and the Modelfile use: Q4_K_M, else the first quantized one (of ``names``)."""
    candidates = [f for f in files if names is None or f.name in names] or files
    return next((f for f in candidates if f.quant_type == "Q4_K_M"), None) or \
        next((f for f in candidates if f.quant_type not in ("F16", "BF16")), candidates[-1])


def model_card(
    name: str, base_model: str, adapter_source: str, files: list[GGUFFile], *,
    eval_text: str, lora_file: str | None = None, ladder: dict | None = None, merge_base: dict | None = None,
    hub: HubPush | None = None, ollama_files: bool = False,
) -> str:
    """README.md with Hub metadata and how to run the files (with ``hub``: fetched by name from that repo)."""
    from loraship.public import public_name

    base_repo = hub_base_model(base_model)
    base_model = public_name(base_model)
    types = [f.quant_type for f in files if hub is None or f.name in hub.files]
    meta = ["---"]
    if base_repo:
        meta.append(f"base_model: {base_repo}")
    meta += ["tags:", "  - gguf", "  - llama.cpp", "  - lora", "  - loraship", "quantization:"]
    meta += [f"  - {t}" for t in types]
    meta += ["library_name: gguf", "---", ""]
    default = default_file(files, hub.files if hub else None)
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
{pushed_note(files, hub)}
Perplexity: on held-out general prose ({eval_text}{_tokens_note(ppl)}) through llama.cpp;
lower is better, and "vs F16" shows what quantization cost, with a 95% interval
from the per-token differences on the same tokens. Where a tensor's row width
is not a multiple of the quantization block, llama.cpp stores it in a nearby
type instead (listed per file in `manifest.json`, key `extra.files`).

Every file was checked before it was published: llama.cpp loads it, its
metadata carries the chat template, the prompt tokens llama.cpp builds for
fixed multi-turn chats equal the training tokenizer's, and a chat stops on the
end-of-turn token. `manifest.json` lists each file's sha256.
{quality}{use_this_model(hub, default, name, ollama_files) if hub else ""}
## Run {'a downloaded file' if hub else 'the files'}

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
The adapter alone, as a LoRA GGUF (F16) for the base model's GGUF: `{lora_file}`
(`llama-cli -m BASE.gguf --lora {lora_file}`).
"""
    return "\n".join(meta) + body


def pushed_note(files: list[GGUFFile], hub: HubPush | None) -> str:
    """Which of the table's files are in the repo (the card lists what was pushed)."""
    if hub is None:
        return ""
    kept = [f.name for f in files if f.name not in hub.files]
    note = f"\nIn this repo: {', '.join(f'`{n}`' for n in hub.files)} and `manifest.json`."
    if kept:
        note += (f" Made and measured but not uploaded: {', '.join(f'`{n}`' for n in kept)} (the F16 file is the "
                 "source of every quantization and the perplexity reference; PUSH_F16=true uploads it).")
    if hub.merged_repo:
        note += f" The merged model for transformers: [`{hub.merged_repo}`](https://huggingface.co/{hub.merged_repo})."
    return note + "\n"


def use_this_model(hub: HubPush, default: GGUFFile, name: str, ollama_files: bool) -> str:
    """Commands that fetch the default file from the repo by its type tag (file names end in ``-TYPE.gguf``)."""
    tag = default.quant_type
    others = [f"`:{_last_type(n)}`" for n in hub.files if n.endswith(".gguf") and n != default.name and _last_type(n)]
    serve = f"MODEL={hub.repo} make serve" if tag == "Q4_K_M" else \
        f"MODEL={hub.repo} MODEL_FILE={default.name} make serve"
    ollama = ("this repo's `template`, `params` and `system` files give it the chat format training used and its "
              "stop tokens" if ollama_files else "it reads the chat template from the GGUF")
    private = ("\nThis repo is private: llama.cpp, Python and loraship read your token from `HF_TOKEN`; Ollama needs "
               "its SSH key (`~/.ollama/id_ed25519.pub`) added to your Hugging Face account.\n" if hub.private else "")
    return f"""
## Use this model

Each command fetches `{default.name}` from this repo (`:{tag}` selects it{'; other types here: ' +
', '.join(others) if others else ''}).
{private}
llama.cpp:

```bash
llama-cli -hf {hub.repo}:{tag}
llama-server -hf {hub.repo}:{tag} --port 8080
```

Ollama ({ollama}):

```bash
ollama run hf.co/{hub.repo}:{tag}
```

loraship's server (chat UI + OpenAI-compatible API), from a loraship checkout:

```bash
{serve}
```

Python (llama-cpp-python):

```python
from llama_cpp import Llama

llm = Llama.from_pretrained(repo_id="{hub.repo}", filename="{default.name}")
print(llm.create_chat_completion(messages=[{{"role": "user", "content": "Hello"}}])["choices"][0]["message"]["content"])
```
"""


def quality_section(ladder: dict, merge_base: dict | None, eval_text: str) -> str:
    """The card's quality ladder and merge-base choice (export/ladder_report.py writes both)."""
    from export.ladder_report import quality_markdown

    return quality_markdown(ladder, merge_base, eval_text)


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
    pushed = (extra.get("hub") or {}).get("files")
    for entry in manifest["files"]:
        if entry["name"] in types:
            entry["quant_type"] = types[entry["name"]]
        if pushed is not None:
            entry["pushed"] = entry["name"] in pushed
    return manifest


def push_export(folder: Path, names: list[str], repo_id: str, token: str | None, *, private: bool = True,
                message: str = "Upload GGUF export with loraship") -> str:
    """Push exactly ``names`` from ``folder`` (not whatever else the folder holds), as one commit."""
    with tempfile.TemporaryDirectory(prefix=".tmp-push-", dir=folder) as staging:
        for name in names:
            src, dst = folder / name, Path(staging) / name
            try:
                os.link(src, dst)  # no copy of multi-gigabyte files
            except OSError:
                shutil.copy2(src, dst)
        return push_folder(staging, repo_id, token=token, private=private, commit_message=message)
