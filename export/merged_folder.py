"""MERGED=true: the merged model as a Hugging Face folder for transformers users, in 16-bit safetensors.

Re-written from the merge's folder one tensor at a time (plain reads, no memory map), so peak memory
stays near the largest tensor whatever the model's size. Files hold at most MERGED_MAX_SHARD_MB each,
as ``save_pretrained`` shards them; a single tensor larger than that gets a file of its own.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from export.safetensors_stream import DTYPES, SafetensorsStreamWriter, read_safetensors_header, read_tensor, tensor_entries

#: Where the merged model goes inside OUTPUT_DIR.
MERGED_DIR = "merged"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16"}
_FLOATS = ("F64", "F32", "F16", "BF16")


def shard_groups(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names, in order, grouped into files of at most ``max_bytes`` (a larger tensor alone)."""
    groups: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_merged_folder(merged_dir: Path, out_dir: Path, *, dtype: str, max_shard_bytes: int) -> list[str]:
    """``out_dir`` (which must not exist): the weights of ``merged_dir`` in ``dtype``, resharded, with its
    config, generation config and tokenizer; returns the weight files' names."""
    from export.merge import TOKENIZER_FILES, base_shards
    from loraship.public import without_local_paths

    target = SAFETENSORS_DTYPE[dtype]
    tensors = []  # (name, source shard, header entry, data start, stored dtype)
    for shard in base_shards(merged_dir):
        header, data_start = read_safetensors_header(shard)
        for name, entry in tensor_entries(header):
            tensors.append((name, shard, entry, data_start, target if entry["dtype"] in _FLOATS else entry["dtype"]))
    by_name = {t[0]: t for t in tensors}
    sizes = [(name, math.prod(entry["shape"]) * DTYPES[stored][1]) for name, _, entry, _, stored in tensors]
    groups = shard_groups(sizes, max_shard_bytes)
    names = shard_names(len(groups))
    out_dir.mkdir(parents=True)
    handles: dict[Path, Any] = {}
    try:
        for file_name, group in zip(names, groups):
            specs = [(name, by_name[name][4], by_name[name][2]["shape"]) for name in group]
            writer = SafetensorsStreamWriter(out_dir / file_name, specs, metadata={"format": "pt"})
            try:
                for name in group:
                    _, shard, entry, data_start, _ = by_name[name]
                    fh = handles.get(shard) or handles.setdefault(shard, open(shard, "rb"))
                    writer.write(name, read_tensor(fh, entry, data_start))
            except BaseException:
                writer.abort()
                raise
            writer.close()
    finally:
        for fh in handles.values():
            fh.close()
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                 "weight_map": {name: file_name for file_name, group in zip(names, groups) for name in group}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = without_local_paths(json.loads((merged_dir / "config.json").read_text(encoding="utf-8")))
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (merged_dir / name).is_file():
            shutil.copy2(merged_dir / name, out_dir / name)
    return names


def merged_card(*, name: str, base_model: str, adapter: str, dtype: str, repo: str | None, gguf_repo: str | None,
                merge_reason: str, scored: bool, kl_limit: float) -> str:
    """README.md of the merged model: Hub metadata, where it came from, how it was checked, how to load it."""
    from export.publish import hub_base_model
    from loraship.public import public_name

    base_repo = hub_base_model(base_model)
    meta = ["---"] + ([f"base_model: {base_repo}"] if base_repo else [])
    meta += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "  - loraship", "  - lora",
             "  - merged", "---", ""]
    if scored:
        checked = ("transformers loads it, and on the quality ladder's held-out tokens its next-token distributions "
                   f"are those of the merged model it was written from: the KL from the model as trained grows by at "
                   f"most {kl_limit:g} nats/token (LADDER_MAX_KL_RISE; the numbers are in `manifest.json`, "
                   "`extra.ladder_rung`).")
    else:
        checked = "transformers loads it (LADDER=false: its logits were not scored)."
    where = repo or "PATH_TO_THIS_FOLDER"
    gguf = f"\nGGUF files of the same model (llama.cpp, Ollama): [`{gguf_repo}`](https://huggingface.co/{gguf_repo}).\n" \
        if gguf_repo else ""
    body = f"""# {name} (merged, {dtype})

The LoRA adapter `{adapter}` merged into `{base_repo or public_name(base_model)}` and stored as {dtype}
safetensors, by loraship's `python -m export`. Merge base: {merge_reason}.

Checked before it was published: {checked}
The tokenizer is the one training used, with its chat template; `manifest.json` lists each
file's sha256.
{gguf}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}", dtype="auto")
chat = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
reply = model.generate(**chat, max_new_tokens=64)[0, chat["input_ids"].shape[1]:]
print(tokenizer.decode(reply, skip_special_tokens=True))
```
"""
    return "\n".join(meta) + body


def export_disk_need(base_dir: Path, quant_types: list[str], candidates: int, merged_dtype: str) -> tuple[int, str]:
    """Bytes the export with MERGED=true holds on disk at its peak, and what they are, from the base's headers.

    Each candidate merge base is built at once (its merged folder, F16 GGUF and first type); quantized files
    are counted at 1 byte per parameter (Q8_0 is 8.5 bits), 16-bit ones at 2.
    """
    from export.merge import base_weight_shapes

    shapes = base_weight_shapes(base_dir).values()
    parameters = sum(math.prod(shape) for shape, _ in shapes)
    stored = sum(math.prod(shape) * DTYPES[dtype][1] for shape, dtype in shapes)
    keeps_base_dtype = "BF16" in quant_types or merged_dtype == "bfloat16"
    scratch = candidates * (stored if keeps_base_dtype else 2 * parameters)
    ggufs = sum(2 * parameters if t in ("F16", "BF16") else parameters for t in {"F16", *quant_types})
    ggufs += (candidates - 1) * 3 * parameters  # every other candidate's F16 and first quantized file
    merged = 2 * parameters
    explained = (f"{amount(merged)} merged model, {amount(ggufs)} GGUFs, {amount(scratch)} merge scratch for "
                 f"{candidates} merge base{'s' if candidates > 1 else ''}")
    return merged + ggufs + scratch, explained


def amount(size: int) -> str:
    """Bytes for a message: GiB, or MiB below one GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
