"""On a CUDA GPU: train/speed/nf4.py's one-kernel NF4 dequantization gives bitsandbytes' values bit for bit.

Runs on the device machine (Triton and bitsandbytes' CUDA kernels); skipped without CUDA. Why it exists:
docs/performance.md.
"""

from __future__ import annotations

import pytest

from train.speed import frozen

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def quantized(shape, seed=0, scale=0.02):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(seed)
    weight = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * scale
    return bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8)


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (512, 2048), (64, 64)])
def test_the_kernel_gives_bitsandbytes_values_bit_for_bit(shape):
    import bitsandbytes.functional as bnbf

    from train.speed import nf4

    packed, state = quantized(shape)
    if not nf4.supports(packed, state):  # too small for one program: bitsandbytes' own path is used
        assert shape == (64, 64)
        return
    assert torch.equal(nf4.dequantize(packed, state), bnbf.dequantize_4bit(packed, state))


def test_the_kernel_inside_torch_compile_gives_the_same_values():
    import bitsandbytes.functional as bnbf

    from train.speed import nf4

    packed, state = quantized((1024, 4096), seed=1, scale=3.0)  # large weights: other absmax codes
    nf4.register()
    compiled = torch.compile(nf4.dequantize, fullgraph=True)
    assert torch.equal(compiled(packed, state), bnbf.dequantize_4bit(packed, state))


def test_a_4bit_layer_trains_identically_with_the_kernel():
    import bitsandbytes as bnb


    def step(kernel):
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(2048, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True).cuda()
        frozen.dequantize_once(layer, kernel=kernel)
        x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        out.float().square().sum().backward()
        return out, x.grad

    (out, grad), (out_kernel, grad_kernel) = step(False), step(True)
    assert torch.equal(out, out_kernel) and torch.equal(grad, grad_kernel)
