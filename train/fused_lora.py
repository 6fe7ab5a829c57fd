"""One autograd step per 4-bit LoRA layer: the frozen NF4 matmul and the adapter together.

peft's LoRA layer on a bitsandbytes 4-bit base runs, per call, a defensive clone of the base
output, the dropout (in float32 when the residual stream is float32), the adapter's two linear
layers, a scaling multiply and an add, each recorded by autograd; with gradient checkpointing
the forward runs twice. On a GPU at 2 x 1024 tokens that is mostly time spent launching small
kernels (bench/train_profile.py). :class:`LoraOn4bit` does the same arithmetic as one autograd
node with a hand-written backward:

    y = W x + s * B (A drop(x))       W: frozen NF4 weight (dequantized in compute dtype)

    dB = s * dy^T h,  h = A drop(x)      dA = (s * dy B)^T drop(x)
    dx = dy W + drop'( (s * dy B) A )

in the base's compute dtype (bf16 on CUDA), which is also what peft computes under autocast;
like peft, the frozen and the adapter paths are added in the input's dtype (float32 when the
residual stream is), so a young adapter's small update is not rounded away in a bf16 sum.
The output is returned in the input's dtype, like bitsandbytes' own layer. Only the plain LoRA
case is fused (one active adapter, no DoRA or other variant, not merged, adapters enabled);
anything else falls through to peft's own forward.
"""

from __future__ import annotations


def _lora_on_4bit():
    import torch

    class LoraOn4bit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base_layer, scaling: float, dropout: float):
            compute = base_layer.compute_dtype or x.dtype
            xc = x.to(compute)
            base = base_layer(xc)  # bitsandbytes' 4-bit matmul (no autograd inside a Function's forward)
            a, b = lora_a.to(compute), lora_b.to(compute)
            if dropout > 0.0:  # on the input as it comes (peft drops before autocast casts), then cast
                xd, mask = torch.native_dropout(x, dropout, True)
                xd = xd.to(compute)
            else:
                xd, mask = xc, None
            h = xd @ a.t()
            lora = (h @ b.t()).mul_(scaling)
            ctx.save_for_backward(xd, h, lora_a, lora_b, mask)
            ctx.base_layer, ctx.scaling, ctx.dropout, ctx.x_dtype = base_layer, scaling, dropout, x.dtype
            # The sum in the input's dtype, as peft adds its adapter to bitsandbytes' upcast output: in bf16 a
            # young adapter's small update would round away against the frozen output.
            return base.to(x.dtype) + lora.to(x.dtype)

        @staticmethod
        def backward(ctx, dy):
            import bitsandbytes.functional as bnbf

            xd, h, lora_a, lora_b, mask = ctx.saved_tensors
            compute = xd.dtype
            s = ctx.scaling
            dy2 = dy.reshape(-1, dy.shape[-1]).to(compute)
            xd2, h2 = xd.reshape(-1, xd.shape[-1]), h.reshape(-1, h.shape[-1])
            a, b = lora_a.to(compute), lora_b.to(compute)
            dh = torch.mm(dy2, b).mul_(s)  # (N, r)
            grad_b = torch.mm(dy2.t(), h2).mul_(s) if ctx.needs_input_grad[2] else None
            grad_a = torch.mm(dh.t(), xd2) if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                dxd = torch.mm(dh, a).to(ctx.x_dtype)
                if mask is not None:
                    dxd = torch.ops.aten.native_dropout_backward(dxd, mask.reshape(dxd.shape), 1.0 / (1.0 - ctx.dropout))
                weight = ctx.base_layer.weight
                w = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(compute)  # (out, in)
                # Each path in compute dtype, their sum in the input's dtype (as autograd sums peft's two).
                grad_x = (torch.mm(dy2, w).to(ctx.x_dtype) + dxd).view(*dy.shape[:-1], w.shape[1])
            return (grad_x, None if grad_a is None else grad_a.to(lora_a.dtype),
                    None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None)

    return LoraOn4bit


_FUNCTION = None


def lora_on_4bit(x, lora_a, lora_b, base_layer, scaling: float, dropout: float):
    """``base_layer(x) + scaling * lora_b(lora_a(dropout(x)))`` as one autograd node (see the module docstring)."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _lora_on_4bit()
    return _FUNCTION.apply(x, lora_a, lora_b, base_layer, float(scaling), float(dropout))


def _fused_forward(self, x, *args, **kwargs):
    """Replaces a peft 4-bit LoRA layer's ``forward``; peft's own handles every case but the plain one."""
    import torch

    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A
            or name in self.lora_variant or getattr(self, "lora_bias", {}).get(name, False)):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    return lora_on_4bit(x, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                        self.scaling[name], p)


def fuse_lora_layers(model) -> int:
    """Give every peft LoRA layer on a bitsandbytes 4-bit base the fused forward; returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support: nothing is 4-bit
        return 0
    from train.speed import replace_forward

    return replace_forward(model, Linear4bit, _fused_forward)
