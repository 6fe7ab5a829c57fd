"""Adapters for the export tests, made here with peft (never with the train stage's code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_model(src: Path, dest: Path, dtype: str | None = None) -> Path:
    """A writable copy of a read-only model fixture, optionally re-saved in ``dtype``."""
    if dtype is None:
        shutil.copytree(src, dest)
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    r: int = 8,
    alpha: int = 16,
    use_rslora: bool = False,
    modules_to_save=None,
    seed: int = 1,
    scale: float = 0.05,
    base_name: str | None = None,
) -> Path:
    """Save a LoRA adapter for ``base_dir`` whose B matrices are random and non-zero.

    peft initialises B to zero (a no-op adapter); random B makes every merge
    observable. ``base_name`` is what adapter_config.json records as the base.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn_like(param) * scale)
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    if base_name is not None:
        cfg_path = out_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


def make_train_output(base_dir: Path, out_dir: Path, base_name: str, **kwargs) -> Path:
    """A folder shaped like the train stage's OUTPUT_DIR: ``adapter/`` with a manifest naming the base."""
    from loraship.manifest import build_manifest, write_manifest

    adapter = make_adapter(base_dir, out_dir / "adapter", base_name=base_name, **kwargs)
    files = [p.name for p in adapter.iterdir() if p.is_file()]
    write_manifest(adapter, build_manifest(kind="adapter", stage="train", folder=adapter, files=files,
                                           inputs={"base_model": base_name}))
    return out_dir


def mark_trained_in_4bit(train_dir: Path) -> Path:
    """Make a train OUTPUT_DIR's adapter manifest say ``load_in_4bit: true`` (QLoRA), as train writes it."""
    path = train_dir / "adapter" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["inputs"]["load_in_4bit"] = True
    path.write_text(json.dumps(manifest))
    return train_dir
