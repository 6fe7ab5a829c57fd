"""A 4-bit NF4 weight dequantized in plain torch ops, which torch.compile fuses into one kernel.

bitsandbytes dequantizes with a CUDA kernel of its own, opaque to torch.compile: two launches per weight
(the nested 8-bit absmax first, then the 4-bit codes) that the session-15 profile put at 18.6 ms of an
8B step (448 calls at 2 x 1024 tokens, about 40% of the H200's memory bandwidth). The same arithmetic
in torch ops (unpack two codes per byte, look each up in the 16-value NF4 table, scale by its block's
absmax) sits inside each compiled decoder layer's graph, where inductor writes it as one kernel.

The result is bitsandbytes' own, value for value (tests/train/test_dequantize.py pins it against
``bitsandbytes.functional.dequantize_4bit``): ``bf16(float32(code) * float32(absmax))``, the absmax
itself ``code2[q] * absmax2[block] + offset`` when nested (double quantization).
"""

from __future__ import annotations


def supports(weight) -> bool:
    """Whether :func:`dequantize_nf4` handles ``weight`` (a bitsandbytes ``Params4bit``): NF4, packed as
    ``Linear4bit`` keeps it (one column of bytes, not transposed)."""
    state = getattr(weight, "quant_state", None)
    return (state is not None and state.quant_type == "nf4" and weight.dim() == 2 and weight.shape[1] == 1
            and weight.shape[0] > 1 and (not state.nested or state.state2.absmax.dim() == 1))


def dequantize_nf4(weight):
    """``weight`` (a bitsandbytes NF4 ``Params4bit``, :func:`supports`) as a dense tensor of its quant state's
    dtype and shape, computed in torch ops."""
    import torch

    state = weight.quant_state
    count = 1
    for size in state.shape:
        count *= size
    absmax = state.absmax
    if state.nested:
        inner = state.state2
        blocks = torch.arange(absmax.numel(), device=absmax.device) // inner.blocksize
        absmax = inner.code[absmax.long()] * inner.absmax[blocks] + state.offset
    packed = weight.reshape(-1)
    # Two codes per byte, the first in the high half.
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[:count]
    scale = absmax.float()[torch.arange(count, device=packed.device) // state.blocksize]
    values = state.code.to(packed.device, torch.float32)[codes.long()] * scale
    return values.to(state.dtype).reshape(state.shape)
