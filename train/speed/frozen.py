"""The frozen 4-bit base made cheap to train through: bf16 storage, one dequantization per layer, liger's kernels.

Each keeps the arithmetic of peft's and bitsandbytes' own path (the CPU tests pin it); docs/performance.md says why.
"""

from __future__ import annotations

import importlib.util

from train.speed.compiled import checkpoint_kwargs, enable_checkpointing

#: Model families liger-kernel patches here (``config.model_type`` -> its function's suffix).
LIGER_FAMILIES = ("llama", "mistral")
#: liger-kernel's fused kernels that the liger lever can swap in.
LIGER_KERNELS = ("rms_norm", "swiglu", "rope")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def prepare_frozen_base(model, *, gradient_checkpointing: bool, compile_mode: str = ""):
    """peft's ``prepare_model_for_kbit_training`` without its float32 upcast of the frozen weights (``bf16_storage``).

    The base stays frozen and checkpointed (non-reentrant, :func:`checkpoint_kwargs` of ``compile_mode``); the
    embeddings' output is cast to float32, so the residual stream is float32 exactly as after peft's upcast.
    """
    import torch

    for param in model.parameters():
        param.requires_grad = False
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(torch.float32))
    if gradient_checkpointing:
        enable_checkpointing(model, checkpoint_kwargs(compile_mode))
    return model


def dequantize_once(model, kernel: bool = False) -> int:
    """Make each bitsandbytes 4-bit layer of ``model`` dequantize its weight once per checkpointed layer and step,
    not three times (forward, recompute, backward); how many layers it changed.

    Training calls run the same arithmetic in plain ops, the dequantized weight an ordinary input of ``F.linear``
    that the checkpoint drops; checkpointed layers only (otherwise autograd keeps every dequantized weight).
    Evaluation keeps bitsandbytes' path. ``kernel``: train/speed/nf4.py's one kernel where it applies.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is 4-bit
        return 0
    if kernel:
        from train.speed import nf4

        kernel = nf4.available()
        if kernel:
            nf4.register()  # before any compile: Dynamo cannot define an op
    return replace_forward(model, Linear4bit, _linear4bit_dequantize_once_nf4 if kernel else _linear4bit_dequantize_once)


def replace_forward(model, module_type: type, forward) -> int:
    """Give each ``module_type`` module of ``model`` ``forward`` (a function of the module and its input) in place
    of its class's; how many it changed."""
    import types

    modules = [module for module in model.modules() if isinstance(module, module_type)]
    for module in modules:
        module.forward = types.MethodType(forward, module)
    return len(modules)


def _linear4bit_dequantize_once(self, x, kernel: bool = False):
    """A bitsandbytes ``Linear4bit.forward`` whose training calls dequantize in autograd's view (:func:`dequantize_once`)."""
    import torch

    if not (self.training and torch.is_grad_enabled()) or getattr(self.weight, "quant_state", None) is None:
        return type(self).forward(self, x)  # bitsandbytes' own (it also recovers a quant state kept on the module)
    import bitsandbytes.functional as bnbf

    from train.speed import nf4

    compute = self.compute_dtype or x.dtype
    state = self.weight.quant_state
    dequantize = nf4.dequantize if kernel and nf4.supports(self.weight, state) else bnbf.dequantize_4bit
    weight = dequantize(self.weight, state).to(compute)
    bias = None if self.bias is None else self.bias.to(compute)
    return torch.nn.functional.linear(x.to(compute), weight, bias).to(x.dtype)


def _linear4bit_dequantize_once_nf4(self, x):
    """:func:`_linear4bit_dequantize_once` with train/speed/nf4.py's kernel."""
    return _linear4bit_dequantize_once(self, x, kernel=True)


def apply_liger_kernels(model, kernels: tuple[str, ...] = LIGER_KERNELS) -> str | None:
    """Swap in liger-kernel's fused ``kernels`` (of :data:`LIGER_KERNELS`); a notice when the family is not covered."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LIGER_FAMILIES:
        return f"speed: liger-kernel not applied to model type {model_type!r} (covered: {', '.join(LIGER_FAMILIES)})"
    import liger_kernel.transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}")
    # The loss stays trl's tiled LM head, so liger's own loss kernels stay off.
    patch(**{kernel: kernel in kernels for kernel in LIGER_KERNELS}, cross_entropy=False,
          fused_linear_cross_entropy=False, model=model)
    return None
