"""The base model as an adapter that changes nothing, so export builds it the same way as the tune.

A fair comparison needs the base and the tuned model converted and
quantized by the same code to the same GGUF type. The export stage takes an
adapter, so the base is given to it as the trained adapter with every LoRA
``B`` matrix set to zero: its update ``B @ A`` is exactly zero, and the merged
weights are the base's own, bit for bit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loraship.manifest import build_manifest, read_manifest, write_manifest

WEIGHTS = "adapter_model.safetensors"
#: The manifest key (under ``extra``) that marks an export as the demo's untuned baseline;
#: ``python -m serve`` never picks such an export by itself.
BASELINE_KEY = "baseline"


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name or name.endswith(".lora_B.weight") or ".lora_embedding_B" in name


def write_null_adapter(adapter_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy ``adapter_dir`` to ``target`` with every LoRA B matrix zeroed; return ``target``."""
    from safetensors.torch import load_file, save_file

    from loraship.atomic import atomic_path

    adapter_dir, target = Path(adapter_dir), Path(target)
    tensors = load_file(adapter_dir / WEIGHTS)
    zeroed = [name for name in tensors if is_lora_b(name)]
    if not zeroed:
        raise ValueError(f"{adapter_dir / WEIGHTS} holds no LoRA B matrices")
    for name in zeroed:
        tensors[name] = tensors[name].new_zeros(tensors[name].shape)
    source_manifest = read_manifest(adapter_dir) or read_manifest(adapter_dir.parent) or {}
    with atomic_path(target) as tmp:
        shutil.copytree(adapter_dir, tmp, ignore=shutil.ignore_patterns(WEIGHTS, "manifest.json", "README.md", "checkpoint-*"))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "README.md").write_text(
            "# Base model as a null adapter\n\n"
            f"The adapter from `{adapter_dir}` with every LoRA B matrix set to zero: merged, it gives the base "
            "model unchanged. `python -m demo` exports it like the tune, so base and tune are compared as "
            "GGUFs made by the same code.\n",
            encoding="utf-8",
        )
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        write_manifest(tmp, build_manifest(
            kind="adapter", stage="demo", folder=tmp, files=files,
            inputs={**source_manifest.get("inputs", {}), "adapter": str(adapter_dir)},
            libraries=("safetensors", "torch"),
            extra={"null_adapter": f"{len(zeroed)} LoRA B matrices zeroed: merging gives the base model unchanged"},
        ))
    return target


def mark_as_baseline(export_dir: str | os.PathLike) -> Path:
    """Mark the export in ``export_dir`` as a comparison baseline in its manifest; return the manifest path.

    The baseline is written after the tune, so it is the newest export: unmarked,
    ``make serve`` and ``python -m serve chat`` would pick it instead of the tune.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if manifest is None:
        raise ValueError(f"{export_dir} has no manifest.json to mark")
    manifest.setdefault("extra", {})[BASELINE_KEY] = (
        "the untuned base model, exported by `python -m demo` only to compare the tune against"
    )
    return write_manifest(export_dir, manifest)
