"""Merge a PEFT LoRA adapter into the full-precision base, one tensor at a time.

Each adapted weight becomes ``W + scaling * B @ A`` (``scaling = alpha / r``, or ``alpha / sqrt(r)`` under
rsLoRA); ``modules_to_save`` weights replace the base's. Peak memory stays near the largest single tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from export.safetensors_stream import (
    SafetensorsError, SafetensorsStreamWriter, load_safetensors, read_safetensors_header, read_tensor, tensor_entries,
    torch_dtype,
)
from loraship.errors import UserError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
INDEX_NAME = "model.safetensors.index.json"
#: Files that describe the model and its tokenizer: copied next to the merged weights.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
SENTENCEPIECE_MODEL = "tokenizer.model"
CONFIG_FILES = ("config.json", "generation_config.json")
TIED_INPUT = "model.embed_tokens.weight"
TIED_OUTPUT = "lm_head.weight"


class MergeError(UserError):
    """The adapter cannot be merged into this base (format, shapes, quantized base)."""


_FLOATS = ("F64", "F32", "F16", "BF16")


def _stored_dtype(dtype: str, shape: list[int], matrices_as: str | None) -> str:
    """The safetensors dtype a merged tensor is written in (see ``merge_into_folder``)."""
    return matrices_as if matrices_as and dtype in _FLOATS and len(shape) >= 2 else dtype


# --- the adapter -----------------------------------------------------------


@dataclass
class LoraDelta:
    """One adapted weight: ``delta = scaling * B @ A`` (transposed when ``transpose``)."""

    a: "torch.Tensor"
    b: "torch.Tensor"
    scaling: float
    transpose: bool

    def delta(self) -> "torch.Tensor":
        product = self.b.float() @ self.a.float()
        if self.transpose:
            product = product.T
        return product * self.scaling


@dataclass
class Adapter:
    """What a PEFT LoRA adapter does to base weights, keyed by the base weight name."""

    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replacements: dict[str, "torch.Tensor"] = field(default_factory=dict)

    @property
    def touched(self) -> set[str]:
        return set(self.deltas) | set(self.replacements)


def _pattern_value(patterns: dict, module: str, default):
    # peft matches rank_pattern/alpha_pattern keys against the end of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"ADAPTER={str(adapter_dir)!r}: no {ADAPTER_CONFIG}; point ADAPTER at a PEFT adapter folder") from None
    except json.JSONDecodeError as err:
        raise MergeError(f"ADAPTER={str(adapter_dir)!r}: {ADAPTER_CONFIG} is not valid JSON ({err})") from None


def load_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter folder into base-weight-name -> change."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    where = f"ADAPTER={str(adapter_dir)!r}"
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise MergeError(f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise MergeError(f"{where}: DoRA adapters are not supported; train with use_dora=False")
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise MergeError(f"{where}: no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    try:
        tensors = load_safetensors(weights_path)
    except SafetensorsError as err:
        raise MergeError(f"{where}: {ADAPTER_WEIGHTS} is unreadable: {err}") from None
    use_rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    alpha_default = config.get("lora_alpha", 8)
    pairs: dict[str, dict[str, "torch.Tensor"]] = {}
    adapter = Adapter(config=config)
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", name) or re.match(
            r"(.+)\.(lora_embedding_A|lora_embedding_B)$", name
        )
        if match:
            module, part = match.groups()
            pairs.setdefault(module, {})[part] = tensor
        elif name.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in name:
            raise MergeError(f"{where}: DoRA weights found; only plain LoRA adapters are supported")
        elif ".lora_" in name:
            raise MergeError(f"{where}: unsupported adapter tensor {key}")
        else:
            # modules_to_save (e.g. a retrained lm_head) are stored as full weights.
            adapter.replacements[name] = tensor
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise MergeError(f"{where}: {module} has only half of its LoRA pair")
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, alpha_default)
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        # Embedding deltas are stored (dim, vocab) and always transposed; fan_in_fan_out
        # layers (GPT-2 style Conv1D) keep their weight as (in, out).
        adapter.deltas[f"{module}.weight"] = LoraDelta(a=a, b=b, scaling=scaling, transpose=embedding or fan_in_fan_out)
    if not adapter.deltas and not adapter.replacements:
        raise MergeError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return adapter


# --- the base --------------------------------------------------------------


def base_shards(base_dir: Path) -> list[Path]:
    """The base's safetensors files, in index order."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [base_dir / name for name in dict.fromkeys(weight_map.values())]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(base_dir.glob("*.safetensors"))
    if found:
        return found
    raise MergeError(
        f"BASE_MODEL={str(base_dir)!r}: no safetensors weights (model.safetensors or {INDEX_NAME}); "
        "save the base with safe_serialization=True"
    )


def read_base_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not path.is_file():
        raise MergeError(f"BASE_MODEL={str(base_dir)!r}: no config.json; not a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _tied(config: dict) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def base_weight_shapes(base_dir: Path) -> dict[str, tuple[list[int], str]]:
    """Every base weight's shape and safetensors dtype, from the headers alone."""
    shapes = {}
    for shard in base_shards(base_dir):
        header, _ = read_safetensors_header(shard)
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = (entry["shape"], entry["dtype"])
    return shapes


def check_compatible(adapter: Adapter, base_dir: Path, label: str | None = None) -> list[str]:
    """Problems that mean this adapter was not trained on this base (empty when it fits).

    ``label`` is how the base was named (BASE_MODEL's value) for the messages.
    """
    config = read_base_config(base_dir)
    where = f"BASE_MODEL={label or str(base_dir)!r}"
    problems = []
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        problems.append(
            f"{where}: a {method} checkpoint; merge into the full-precision base "
            "(the model the quantized one was made from)"
        )
        return problems
    shapes = base_weight_shapes(base_dir)
    if _tied(config) and TIED_OUTPUT not in shapes and TIED_INPUT in shapes:
        shapes[TIED_OUTPUT] = shapes[TIED_INPUT]
    for name, change in sorted(adapter.deltas.items()):
        if name not in shapes:
            problems.append(f"{where}: has no weight {name} that the adapter changes")
            break
        shape = list(shapes[name][0])
        rows, cols = change.b.shape[0], change.a.shape[1]
        want = [cols, rows] if change.transpose else [rows, cols]
        if shape != want:
            problems.append(
                f"{where}: does not match the adapter ({name} is {shape} in the base, "
                f"the adapter expects {want})"
            )
            break
    for name, tensor in sorted(adapter.replacements.items()):
        if name in shapes and list(shapes[name][0]) != list(tensor.shape):
            problems.append(
                f"{where}: does not match the adapter ({name} is {list(shapes[name][0])} "
                f"in the base, {list(tensor.shape)} in the adapter)"
            )
            break
    return problems


# --- the merge -------------------------------------------------------------


def merge_adapter_shard(tensors: dict[str, "torch.Tensor"], adapter: Adapter) -> dict[str, "torch.Tensor"]:
    """A shard's tensors with the adapter applied (pure: the input is not modified).

    The sum is taken in fp32 and rounded once to the shard's dtype.
    """
    merged = {}
    for name, tensor in tensors.items():
        merged[name] = merge_tensor(name, tensor, adapter)
    return merged


@dataclass(frozen=True)
class NF4Spec:
    """How bitsandbytes stored one weight in 4 bits (read from the loaded model's quant_state)."""

    blocksize: int
    quant_type: str = "nf4"
    double_quant: bool = True


def nf4_round_trip(weight: "torch.Tensor", spec: NF4Spec) -> "torch.Tensor":
    """``weight`` quantized and dequantized the way bitsandbytes did it when training loaded the base (fp32 out).

    The weights a QLoRA adapter was trained against: merging into these
    instead of the original full-precision weights gives the model training saw.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.float().contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
    )
    return bnbf.dequantize_4bit(packed, state).float()


def merge_tensor(name: str, tensor: "torch.Tensor", adapter: Adapter, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """``name``'s merged value in ``dtype`` (default: the base tensor's), rounded once from float32.

    A tensor the adapter does not touch comes back as it is: the writer converts it a slice at a time.
    """
    dtype = dtype or tensor.dtype
    if name in adapter.replacements:
        return adapter.replacements[name].to(dtype).clone()
    change = adapter.deltas.get(name)
    if change is None:
        return tensor
    return (tensor.float() + change.delta()).to(dtype)


def merge_into_folder(
    base_dir: str | os.PathLike,
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
    nf4: dict[str, NF4Spec] | None = None,
    matrices_as: str | None = None,
) -> Path:
    """Write base + adapter as a Hugging Face folder at ``out_dir`` (which must not exist), tensor by tensor.

    ``matrices_as="F16"`` writes floating-point matrices in the F16 GGUF's own type, so the converter
    need not upcast each to float32 (vectors keep their dtype). ``nf4`` (weight name -> how bitsandbytes
    stored it) merges into those weights' NF4 round trip: what a QLoRA adapter was trained against.
    Tied embeddings the adapter changes are written untied: training never tied one's LoRA to the other.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_base_config(base_dir)
    shards = base_shards(base_dir)
    shapes = base_weight_shapes(base_dir)
    tied = _tied(config) and TIED_OUTPUT not in shapes
    untie = tied and bool({TIED_INPUT, TIED_OUTPUT} & adapter.touched)
    out_dir.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for shard in shards:
        header, data_start = read_safetensors_header(shard)
        entries = tensor_entries(header)
        stored = {k: _stored_dtype(v["dtype"], v["shape"], matrices_as) for k, v in entries}
        specs = [(k, stored[k], v["shape"]) for k, v in entries]
        if untie and TIED_INPUT in header:
            entry = header[TIED_INPUT]
            specs.append((TIED_OUTPUT, stored[TIED_INPUT], entry["shape"]))
            stored[TIED_OUTPUT] = stored[TIED_INPUT]
        writer = SafetensorsStreamWriter(out_dir / shard.name, specs, metadata={"format": "pt"})
        try:
            with open(shard, "rb") as fh:
                for name, entry in entries:
                    tensor = read_tensor(fh, entry, data_start)
                    spec = nf4.get(name) if nf4 else None
                    base = nf4_round_trip(tensor, spec) if spec else tensor
                    writer.write(name, merge_tensor(name, base, adapter, torch_dtype(stored[name])))
                    weight_map[name] = shard.name
                    if progress:
                        progress(1)
                    if untie and name == TIED_INPUT:
                        tied_input = tensor
                    del tensor
                if untie and TIED_INPUT in header:
                    writer.write(TIED_OUTPUT, merge_tensor(TIED_OUTPUT, tied_input, adapter, torch_dtype(stored[TIED_OUTPUT])))
                    weight_map[TIED_OUTPUT] = shard.name
                    del tied_input
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if len(shards) > 1 or (base_dir / INDEX_NAME).is_file():
        index = json.loads((base_dir / INDEX_NAME).read_text(encoding="utf-8")) if (base_dir / INDEX_NAME).is_file() else {}
        index["weight_map"] = weight_map
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if untie:
        if "text_config" in config and "tie_word_embeddings" in config["text_config"]:
            config["text_config"]["tie_word_embeddings"] = False
        config["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    copy_model_files(base_dir, out_dir, tokenizer_dir)
    return out_dir


def copy_model_files(base_dir: Path, out_dir: Path, tokenizer_dir: str | os.PathLike | None) -> None:
    """generation config and tokenizer (the training-time one when the adapter carries it)."""
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    source = Path(tokenizer_dir) if tokenizer_dir and has_tokenizer(Path(tokenizer_dir)) else base_dir
    if not has_tokenizer(source):
        raise MergeError(f"BASE_MODEL={str(base_dir)!r}: no tokenizer files (tokenizer.json / tokenizer.model)")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
    # transformers 5 saves no sentencepiece model with a trained tokenizer; llama.cpp's converter reads the base's
    # for sentencepiece families (Gemma and Phi-3 need it; Llama-2 and Mistral tokenize differently without it).
    if not (out_dir / SENTENCEPIECE_MODEL).is_file() and (base_dir / SENTENCEPIECE_MODEL).is_file():
        shutil.copy2(base_dir / SENTENCEPIECE_MODEL, out_dir / SENTENCEPIECE_MODEL)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    )


def count_tensors(base_dir: Path) -> int:
    return len(base_weight_shapes(base_dir))
