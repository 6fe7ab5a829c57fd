"""Inputs the bad-input cases name in braces, each built once per test session.

``{tiny_adapter}``: a LoRA adapter for the tiny Llama, written byte by byte (a
safetensors file of zero ``q_proj`` LoRA pairs and an adapter_config.json): a
well-formed adapter whose shapes fit only its own base. ``{truncated_gguf}``:
the embedded GGUF cut off inside its tensor data. ``{evil_gguf}``: the embedded
GGUF with a chat template that reaches for Python internals and, if it were
ever executed, would create ``EVIL_MARKER`` in the working folder.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.bad_input_cases import EVIL_TEMPLATE
from tests.fixtures.models import TINY_CONFIG
from tests.fixtures.stage_runs import ROOT, base_env


def write_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A float32 safetensors file of zeros with the given ``name: shape`` tensors."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


def write_lora_adapter(folder: Path, base_name: str, hidden: int, layers: int, rank: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = [rank, hidden]
        tensors[f"{prefix}.lora_B.weight"] = [hidden, rank]
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj"], "base_model_name_or_path": base_name, "fan_in_fan_out": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def repo() -> str:
    return str(ROOT)


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> str:
    folder = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    write_lora_adapter(folder, tiny_model, TINY_CONFIG["hidden_size"], TINY_CONFIG["num_hidden_layers"])
    return str(folder)


@pytest.fixture(scope="session")
def embedded_gguf() -> str:
    from loraship.embedded import embedded_gguf_path

    return str(embedded_gguf_path())


@pytest.fixture(scope="session")
def truncated_gguf(tmp_path_factory, embedded_gguf) -> str:
    target = tmp_path_factory.mktemp("truncated") / "model-Q4_K_M.gguf"
    with open(embedded_gguf, "rb") as src:
        target.write_bytes(src.read(8 << 20))  # the header and the first tensors, not the rest
    return str(target)


@pytest.fixture(scope="session")
def evil_gguf(tmp_path_factory, embedded_gguf) -> str:
    """The embedded GGUF, tensors untouched, with EVIL_TEMPLATE as tokenizer.chat_template."""
    target = tmp_path_factory.mktemp("evil") / "evil-template.gguf"
    # gguf's own metadata rewriter copies every tensor and replaces only the template.
    result = subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", embedded_gguf, str(target),
         "--chat-template", EVIL_TEMPLATE, "--force"],
        capture_output=True, text=True, env=base_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from gguf import GGUFReader

    field = GGUFReader(target).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == EVIL_TEMPLATE
    return str(target)


@pytest.fixture
def case_dir(tmp_path) -> Path:
    folder = tmp_path / "case"
    folder.mkdir()
    return folder

