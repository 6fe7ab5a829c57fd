"""The fused 4-bit LoRA layer and the bf16-storage base compute what peft's QLoRA computes.

Real components on the CPU: a tiny random-init Llama loaded by transformers in 4-bit NF4
(bitsandbytes' CPU backend), peft's LoRA layers, bf16 autocast as in training. The reference
is what the seeds do: ``prepare_model_for_kbit_training`` (float32 upcast of the frozen
norms/embeddings/head) and peft's own LoRA forward, with the adapter in bf16 as trl leaves it.
"""

from __future__ import annotations

import pytest

from train import model, speed
from train.fused_lora import fuse_lora_layers, lora_on_4bit
from train.settings import TrainSettings


def load_4bit(folder, device="cpu"):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config,
                                                device_map={"": device})


def qlora(folder, *, levers: speed.SpeedLevers, dropout: float = 0.0, checkpointing: bool = True, device="cpu"):
    """The tiny base in 4-bit with LoRA r4 on q,k,v,o; B made non-zero so the adapter matters."""
    import torch
    from peft import prepare_model_for_kbit_training

    base = load_4bit(folder, device)
    if levers.bf16_storage:
        base = speed.prepare_frozen_base(base, gradient_checkpointing=checkpointing)
    else:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = TrainSettings(base_model=str(folder), lora_r=4, lora_alpha=8, lora_dropout=dropout, seed=0)
    torch.manual_seed(0)
    peft_model = model.add_lora(base, settings, levers)
    generator = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:  # trl's cast of the adapter on a quantized base, and a non-zero B
            if "lora_B" in name:
                param.data = (torch.randn(param.shape, generator=generator) * 0.05).to(param.device)
            param.data = param.data.to(torch.bfloat16)
    peft_model.train()
    return peft_model


def step(peft_model, ids, device="cpu"):
    """One forward + backward under bf16 autocast: the loss and the adapter's gradients by name."""
    import torch

    ids = ids.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.detach().float().cpu(), grads


@pytest.fixture
def ids():
    import torch

    return torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def close(a, b, rel):
    return float((a.detach() - b.detach()).norm() / b.detach().norm()) < rel


def first_lora_layer(peft_model):
    from peft.tuners.lora.bnb import Linear4bit

    return next(m for m in peft_model.modules() if isinstance(m, Linear4bit))


def test_every_4bit_lora_layer_is_fused(tiny_llama_dir):
    peft_model = qlora(tiny_llama_dir, levers=speed.SpeedLevers())
    layers = 4 * peft_model.config.num_hidden_layers  # q, k, v, o per decoder layer
    assert fuse_lora_layers(peft_model) == layers


@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
def test_a_fused_layer_matches_peft_forward_and_backward(tiny_llama_dir, x_dtype):
    import torch

    layer = first_lora_layer(qlora(tiny_llama_dir, levers=speed.SpeedLevers()))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2)).to(getattr(torch, x_dtype))
    results = []
    for fused in (False, True):
        xi = x.clone().requires_grad_(True)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_on_4bit(xi, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer,
                             layer.scaling["default"], 0.0) if fused else type(layer).forward(layer, xi)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results.append((y.float(), xi.grad.float(), layer.lora_A["default"].weight.grad.float(),
                        layer.lora_B["default"].weight.grad.float(), y.dtype))
    (y0, dx0, da0, db0, t0), (y1, dx1, da1, db1, t1) = results
    assert t1 == t0 == x.dtype  # the input's dtype back, like bitsandbytes' layer
    assert close(y1, y0, 1e-2) and close(dx1, dx0, 1e-2)
    assert close(da1, da0, 2e-2) and close(db1, db0, 2e-2)


def test_a_young_adapters_small_update_is_not_rounded_away(tiny_llama_dir):
    """With a float32 residual stream, peft adds the adapter's output to the frozen output in float32;
    a bf16 sum would round a small update (B near zero, early in training) against the large frozen
    output, in the forward and in the gradient of x alike."""
    import torch

    layer = first_lora_layer(qlora(tiny_llama_dir, levers=speed.SpeedLevers(bf16_storage=True)))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    b.data = (torch.randn(b.shape, generator=torch.Generator().manual_seed(4)) * 1e-3).to(b.dtype)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))  # float32 stream
    probe = torch.linspace(-1, 1, layer.out_features)

    def run(forward):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(xi)
        (y.float() * probe).sum().backward()
        return y.detach().float(), xi.grad.float()

    frozen_y, frozen_dx = run(lambda xi: layer.base_layer(xi).float())
    peft_y, peft_dx = run(lambda xi: type(layer).forward(layer, xi))
    fused_y, fused_dx = run(lambda xi: lora_on_4bit(xi, a, b, layer.base_layer, layer.scaling["default"], 0.0))
    assert fused_y.dtype == torch.float32
    assert close(fused_y - frozen_y, peft_y - frozen_y, 1e-3)  # the adapter's update, as peft has it
    assert close(fused_dx - frozen_dx, peft_dx - frozen_dx, 1e-3)


def test_dropout_uses_the_same_mask_forward_and_backward(tiny_llama_dir):
    import torch

    layer = first_lora_layer(qlora(tiny_llama_dir, levers=speed.SpeedLevers()))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s, p = layer.scaling["default"], 0.5
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    torch.manual_seed(7)
    xi = x.clone().requires_grad_(True)
    y = lora_on_4bit(xi, a, b, layer.base_layer, s, p)
    y.float().sum().backward()
    # Replay the generator: the fused layer's only random draw is the dropout mask.
    torch.manual_seed(7)
    _, mask = torch.native_dropout(x, p, True)
    assert 0 < int(mask.sum()) < mask.numel()
    xd = x.float() * mask / (1 - p)
    w = layer.base_layer(x).float()
    expected = w + s * (xd @ a.float().t()) @ b.float().t()
    assert close(y.float(), expected, 1e-2)
    # The gradient of A sees only the kept inputs: dA = s * (1 B)^T xd.
    ones = torch.ones(3, layer.out_features)
    expected_da = (s * ones @ b.float()).t() @ xd
    assert close(a.grad.float(), expected_da, 2e-2)
    # The gradient of x: through the frozen weight everywhere, through the adapter only where kept.
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    expected_dx = ones @ weight + (s * ones @ b.float() @ a.float()) * mask / (1 - p)
    assert close(xi.grad.float(), expected_dx, 2e-2)


def test_anything_but_plain_lora_falls_through_to_peft(tiny_llama_dir):
    import torch

    peft_model = qlora(tiny_llama_dir, levers=speed.SpeedLevers(fused_lora=True))
    layer = first_lora_layer(peft_model)
    x = torch.randn(2, layer.in_features).to(torch.bfloat16)
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_bf16_storage_keeps_the_float32_residual_stream_and_the_same_loss(tiny_llama_dir, ids):
    import torch

    upcast = qlora(tiny_llama_dir, levers=speed.SpeedLevers())
    lean = qlora(tiny_llama_dir, levers=speed.SpeedLevers(bf16_storage=True))
    frozen = {p.dtype for p in lean.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}
    assert lean.get_input_embeddings()(ids).dtype == torch.float32
    (loss0, grads0), (loss1, grads1) = step(upcast, ids), step(lean, ids)
    # Frozen bf16 values hold no more in float32: the same arithmetic, to the bit.
    assert torch.equal(loss1, loss0)
    assert all(torch.equal(grads1[n], grads0[n]) for n in grads0)


def test_bf16_storage_and_fused_lora_train_like_peft_qlora(tiny_llama_dir, ids):
    """bf16 storage + fused LoRA with checkpointing and dropout off: peft's loss and gradients."""
    defaults = speed.SpeedLevers(bf16_storage=True, fused_lora=True)
    (loss0, grads0) = step(qlora(tiny_llama_dir, levers=speed.SpeedLevers()), ids)
    (loss1, grads1) = step(qlora(tiny_llama_dir, levers=defaults), ids)
    assert abs(float(loss1 - loss0)) < 1e-3 * float(loss0)
    assert grads1.keys() == grads0.keys() and len(grads0) == 16
    assert all(close(grads1[n], grads0[n], 3e-2) for n in grads0)


@pytest.mark.gpu
def test_on_cuda_bf16_storage_and_fused_lora_train_like_peft_qlora(tmp_path, ids, request):
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
    defaults = speed.SpeedLevers(bf16_storage=True, fused_lora=True)
    (loss0, grads0) = step(qlora(tiny_llama_dir, levers=speed.SpeedLevers(), device="cuda"), ids, "cuda")
    (loss1, grads1) = step(qlora(tiny_llama_dir, levers=defaults, device="cuda"), ids, "cuda")
    assert abs(float(loss1 - loss0)) < 1e-3 * float(loss0)
    assert len(grads0) == 16 and all(close(grads1[n], grads0[n], 3e-2) for n in grads0)
