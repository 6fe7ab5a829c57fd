"""Random-init Llama-shaped models for benchmarks: no weights can be downloaded here, so the benches use the real
shapes with random weights.

:func:`build_random_llama` draws them from a seeded CPU generator (float32 normal, std 0.02, cast to bf16; norms
1.0) and writes them tensor by tensor, so the whole model is never in memory and the same seed gives the same bytes
on this CPU machine and on the GPU machine (:func:`weights_fingerprint` checks that): the export and quality benches'
bases. :func:`build_llama_on_device` lets torch initialize the model on the device it measures, fast on a GPU: the
training speed benches' bases.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B: 1.24 B parameters, tied embeddings.
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
    # Llama-3-8B: 8.03 B parameters.
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
    ),
    # For CPU smoke tests of the benches.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    ),
}
#: The training benches' context length: no row of theirs is longer.
TRAINING_POSITIONS = 4096


def build_random_llama(folder: Path, shape: str | dict, tokenizer, seed: int = 0) -> Path:
    """Write a bf16 safetensors Llama of ``shape`` (a SHAPES name or a config dict) with ``tokenizer`` into ``folder``.

    One tensor is in memory at a time.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.safetensors_stream import SafetensorsStreamWriter

    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16",
                         **(SHAPES[shape] if isinstance(shape, str) else shape))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
    params = [(n, list(p.shape)) for n, p in model.named_parameters() if n not in skip]
    folder.mkdir(parents=True)
    writer = SafetensorsStreamWriter(folder / "model.safetensors", [(n, "BF16", s) for n, s in params],
                                     metadata={"format": "pt"})
    gen = torch.Generator().manual_seed(seed)
    for name, tensor_shape in params:
        if name.endswith("norm.weight"):
            tensor = torch.ones(tensor_shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(tensor_shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.write(name, tensor)
    writer.close()
    config.architectures = ["LlamaForCausalLM"]  # llama.cpp's converter picks its model class from this
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_llama_on_device(folder: Path, shape: str, device: str) -> Path:
    """torch's own random init of ``shape`` (seed 0) on ``device``, saved as safetensors in ``folder`` (bf16 on CUDA,
    float32 on a CPU); a folder that already holds a model is kept as it is."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         **{**SHAPES[shape], "max_position_embeddings": TRAINING_POSITIONS})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def weights_fingerprint(folder: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file metadata)."""
    from export.safetensors_stream import read_safetensors_header

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        header, start = read_safetensors_header(path)
        with open(path, "rb") as fh:
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                fh.seek(start + begin)
                digest.update(f"{name}|{entry['dtype']}|{entry['shape']}|".encode())
                remaining = end - begin
                while remaining:
                    chunk = fh.read(min(remaining, 1 << 24))
                    digest.update(chunk)
                    remaining -= len(chunk)
    return digest.hexdigest()
