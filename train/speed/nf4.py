"""NF4 dequantization in one Triton kernel, with bitsandbytes' arithmetic (its two kernels' values, bit for bit).

``torch.ops.loraship.dequantize_nf4`` is a custom op, so torch.compile and CUDA graphs take it as one kernel.
CUDA and Triton only; :func:`supports` says which weights it handles (NF4, 64-value blocks, a nested absmax of
256-value blocks, packed as bitsandbytes' ``Linear4bit`` packs it). docs/performance.md says why.
"""


import functools

#: Packed bytes each Triton program reads (two 4-bit values each).
BYTES_PER_PROGRAM = 2048


def available() -> bool:
    """Whether the kernel can run here: Triton installed and a CUDA GPU."""
    import importlib.util

    import torch

    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def handles(weight, quant_state) -> bool:
    """Whether the kernel reads this bitsandbytes weight's format: NF4 in bytes (two values each), 64-value blocks
    whose absmax is itself quantized to 8 bits in blocks of 256, and a multiple of one program's values."""
    import torch

    state2 = getattr(quant_state, "state2", None)
    return (getattr(quant_state, "quant_type", None) == "nf4" and quant_state.blocksize == 64
            and state2 is not None and state2.blocksize == 256 and weight.dim() == 2 and weight.shape[1] == 1
            and weight.dtype == torch.uint8 and quant_state.absmax.dtype == torch.uint8
            and state2.absmax.dtype == torch.float32 and quant_state.code.dtype == torch.float32
            and quant_state.shape.numel() % (2 * BYTES_PER_PROGRAM) == 0)


def supports(weight, quant_state) -> bool:
    """Whether :func:`dequantize` takes this bitsandbytes weight and quant state: a format it :func:`handles`, on a GPU."""
    return weight.is_cuda and handles(weight, quant_state)


def dequantize(weight, quant_state):
    """The weight bitsandbytes' ``dequantize_4bit`` returns, from one kernel (see :func:`supports`)."""
    import torch

    if not torch.compiler.is_compiling():  # a compiled caller registers it before compiling (Dynamo cannot)
        register()
    state, nested = quant_state, quant_state.state2
    out = torch.ops.loraship.dequantize_nf4(weight, state.absmax, nested.code, nested.absmax, state.offset.reshape(1),
                                            state.code, state.shape.numel(), state.dtype)
    return out.view(state.shape)


@functools.cache
def register():
    """Define ``torch.ops.loraship.dequantize_nf4`` (once)."""
    import torch
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def kernel(packed, absmax_q, code2, absmax2, offset, code, out, BYTES: tl.constexpr):
        rows: tl.constexpr = BYTES // 32  # 32 packed bytes = one 64-value block
        program = tl.program_id(0)
        block = program * rows + tl.arange(0, rows)
        # The block's absmax: bitsandbytes' dequantize_blockwise (code2[q] * absmax2), then "+= offset".
        q = tl.load(absmax_q + block).to(tl.int32)
        scale = tl.load(code2 + q) * tl.load(absmax2 + block // 256)
        scale = scale + tl.load(offset)
        byte = tl.load(packed + block[:, None] * 32 + tl.arange(0, 32)[None, :]).to(tl.int32)
        high = tl.load(code + (byte >> 4)) * scale[:, None]  # the first value of the pair
        low = tl.load(code + (byte & 15)) * scale[:, None]
        values = tl.reshape(tl.join(high, low), (rows, 64))
        tl.store(out + block[:, None] * 64 + tl.arange(0, 64)[None, :], values.to(out.dtype.element_ty))

    @triton_op("loraship::dequantize_nf4", mutates_args=())
    def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor,
                       offset: torch.Tensor, code: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
        grid = (numel // 2 // BYTES_PER_PROGRAM,)
        wrap_triton(kernel)[grid](packed, absmax_q, code2, absmax2, offset, code, out, BYTES=BYTES_PER_PROGRAM,
                                  enable_fp_fusion=False)
        return out
