"""The bf16-storage base (train/speed/frozen.py) computes what peft's QLoRA computes.

Real components on the CPU: a tiny random-init Llama loaded by transformers in 4-bit NF4 (bitsandbytes' CPU
backend), peft's LoRA layers, bf16 autocast as in training. The reference is what the seeds do:
``prepare_model_for_kbit_training`` (float32 upcast of the frozen norms, embeddings and head).
"""

from __future__ import annotations

import pytest

from tests.fixtures.qlora import close, qlora, step, token_ids
from train.speed import SpeedLevers


def test_bf16_storage_keeps_the_float32_residual_stream_and_the_same_loss(tiny_llama_dir):
    import torch

    ids = token_ids()
    upcast = qlora(tiny_llama_dir, levers=SpeedLevers())
    lean = qlora(tiny_llama_dir, levers=SpeedLevers(bf16_storage=True))
    frozen = {p.dtype for p in lean.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}
    assert lean.get_input_embeddings()(ids).dtype == torch.float32
    (loss0, grads0), (loss1, grads1) = step(upcast, ids), step(lean, ids)
    # Frozen bf16 values hold no more in float32: the same arithmetic, to the bit.
    assert torch.equal(loss1, loss0)
    assert all(torch.equal(grads1[n], grads0[n]) for n in grads0)


@pytest.mark.gpu
def test_on_cuda_bf16_storage_trains_like_peft_qlora(tmp_path, request):
    """The same comparison with bitsandbytes' CUDA kernels (run on the device; skipped in CI)."""
    import os

    import torch
    from transformers import AutoTokenizer

    from tests.fixtures.models import build_tiny_llama

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # The device has no embedded GGUF: tests/train/test_gpu.py's tokenizer folder stands in.
    tokenizer_dir = os.environ.get("LORASHIP_TOKENIZER_DIR") or request.getfixturevalue("embedded_tokenizer_dir")
    tiny_llama_dir = build_tiny_llama(tmp_path / "tiny", AutoTokenizer.from_pretrained(tokenizer_dir))
    ids = token_ids()
    (loss0, grads0) = step(qlora(tiny_llama_dir, levers=SpeedLevers(), device="cuda"), ids, "cuda")
    (loss1, grads1) = step(qlora(tiny_llama_dir, levers=SpeedLevers(bf16_storage=True), device="cuda"), ids, "cuda")
    assert abs(float(loss1 - loss0)) < 1e-3 * float(loss0)
    assert len(grads0) == 16 and all(close(grads1[n], grads0[n], 3e-2) for n in grads0)
