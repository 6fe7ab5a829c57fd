"""Random-init Llama-shaped models for benchmarks, identical on every machine.

No weights can be downloaded here, so benchmarks use the real configs with
random weights. The weights come from a seeded CPU generator (float32 normal,
std 0.02, cast to bf16; norms 1.0) and are written tensor by tensor, so the
whole model is never in memory and the same seed gives the same bytes on this
CPU machine and on the GPU machine (``weights_fingerprint`` checks that).
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
}


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
