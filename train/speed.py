"""What makes a QLoRA step fast on a CUDA GPU; each lever is measured in bench/train_throughput.py.

The plan (``model.plan_for``) decides the levers once, by device; ``python -m train`` applies them
with no flag to find (docs/benchmarks.md, "Training speed (GPU)", has what each one gave):

- ``bf16_frozen`` (measured, NOT a default): the frozen base keeps its norms, embeddings and LM
  head in bf16 instead of peft's float32 upcast. It saves memory (8B: 0.8 GiB) at no speed gain,
  and together with packing it trained worse end to end: ``python -m train`` on the 1B-shaped
  repeat task (150 steps, one H200) reached eval loss 4.33 with it and 3.57-3.73 without it
  (docs/benchmarks.md, "End-to-end A/B"). It stays here for the benchmark, off in the plan.
- ``bf16_storage``: the frozen norms, embeddings and LM head stay bf16 in memory, and the
  embeddings' output is cast to float32, so the residual stream is float32 exactly as after
  peft's upcast: frozen weights that came from bf16 hold no more in float32, and every matmul
  runs in bf16 under autocast either way. Same arithmetic, less memory (8B: 2 GiB of embedding
  and LM head), and no per-call bf16 copy of a float32 LM head. (``bf16_frozen`` differs in
  letting the residual stream itself become bf16: with packing it trained worse end to end,
  bf16_storage with packing did not.)
- ``fused_lora`` (measured, NOT a default): each LoRA layer on a 4-bit base runs as one autograd
  node with a hand-written backward (``train/fused_lora.py``) instead of peft's chain of small
  ops. 8B at 2 x 1024: 5,164 tok/s against 4,069 without it, and it matches peft on the CPU to
  the third decimal of the loss over 40 steps. But on the GPU, together with ``bf16_storage``, the
  end-to-end A/B ended at eval loss 4.135 against 3.615 (bf16_storage alone) and 3.708
  (fused_lora alone), so it stays off (docs/benchmarks.md). A likely cause, found since and fixed:
  the layer added its frozen and adapter outputs in bf16 where peft adds them in float32, which
  rounded a young adapter's update (11% of it in the forward, 26% of its gradient of x on the tiny
  test model). Re-run on a GPU since (session 6, one seed): 4.216, above the eager defaults' three
  seeds (3.52-3.72); one seed does not settle it (the compiled stack's seeds spread 3.09-3.93).
- ``compile_mode``: ``torch.compile`` over the decoder (:data:`COMPILE_MODES`), so the per-op
  Python and launch overhead of peft's and bitsandbytes' small ops goes and the casts and
  element-wise LoRA work fuse (bitsandbytes' 4-bit matmul is a registered custom op, so it stays
  in the graph). liger's kernels do not trace inside a graph, so the plan turns them off with it.

  The default on CUDA (TORCH_COMPILE=auto) is ``layers-cudagraphs`` where torch takes the packed length
  symbolic inside a checkpointed graph (:func:`symbolic_lengths_in_graph`: torch 2.13, the train image's),
  and ``layers`` before that. ``layers``: each decoder layer compiled, the checkpoint around it. 8B r8
  q,k,v,o at 2 x 1024, each configuration in a process of its own on one H200: 7,452 and 6,474 tok/s, 1.56x
  and 1.77x the plain stack of the same call, at 7.01 GiB (0.57x), with a 11-15 s first step (session 12).
  At real lengths 5,430-5,463 tok/s, 4.13-4.28x the plain stack (sessions 12, 14). End to end (1B shape,
  150 steps, LR 1e-3) it learned as well as eager over ten seeds: mean final eval loss 2.300 against 2.308
  (session 11).

  ``layers-cudagraphs``: the same layers replayed as CUDA graphs, each layer's checkpoint inside its graph
  (a recompute outside would replay a graph during the backward pass). Packed rows are padded to a few
  lengths (:func:`replays_graphs`, ``data.bucket_length``); each new length records its graphs (about 3 s on
  the 8B), the length symbolic so nothing compiles again. 2 x 1024: 10,082 tok/s, 2.44x the plain stack of
  the same call (2.37x its second plain run) at 7.13 GiB (0.58x), every step 0.20-0.21 s, after a 17 s
  first step (session 14); 10,107-10,440 and 2.15-2.77x over sessions 11-12. Real lengths: 3.47-3.78x the
  plain stack over 40 timed steps with the recordings in them, 6.4-6.7x after them; over 160 steps 132 s
  against per-layer compile's 140 s, at 12.9 GiB against 10.7 (the graphs' pool). End to end (1B, five
  seeds) the same mean final eval loss as per-layer compile, 2.294, in 25-32% less time (session 14).
  Measured on the device's torch 2.11 through ``bench/symbolic_graph_lengths.py``, which gives it what torch
  2.13 does itself; torch 2.11 alone compiles every new packed length again (session 12). Planned only for
  the case measured, one process with each optimizer step in one micro-batch (:func:`graphs_blocker`).

  ``stack`` (TORCH_COMPILE=stack): the whole decoder stack as one graph, the checkpoints inside it
  with a selective policy (:func:`checkpoint_kwargs`) without which the 4-bit matmuls' outputs were
  saved rather than recomputed. 1.46x the plain stack at 2 x 1024 (session 5), but its compile
  takes minutes on an 8B (139-243 s), which only long runs earn back.

  ``stack-cudagraphs`` (bench only) ran 8,085-9,305 tok/s (sessions 7-8; 2.14-2.28x the plain stack on
  the same host), with the length symbolic from the first step (:func:`mark_packed_length_dynamic`), but one
  compile of the stack took 232-243 s on the 8B (session 9).
- ``dequantize_once``, ``save_attention``, ``label_positions`` (with ``layers-cudagraphs``, where they were
  measured; session 15, 8B r8 q,k,v,o at 2 x 1024, each configuration in its own process on one H200):
  a checkpointed layer's 4-bit weights are dequantized once for its recompute and backward pass together
  (:func:`dequantize_once`; 14 dequantizations per layer and step instead of 20), its attention kernel's
  output is kept rather than recomputed (:func:`save_attention_outputs`; bf16, one hidden vector per token
  and layer, half what its checkpoint keeps anyway), and the LM head gathers the labelled positions the
  collator lists on the CPU instead of indexing with a boolean mask, which made the CPU wait for the GPU
  twice in the forward pass and twice in the backward (train/trainer.py). Per-layer graphs alone ran
  10,102-10,506 tok/s; with the first two 10,532-10,754 (+2.4-4.3%), with all three 10,696-10,702 (+5.9%
  on the machine that measured both), at 7.60 GiB peak against 7.13. Same arithmetic: the CPU tests pin the
  loss and gradients bit for bit (the first two) and to 1e-6 (the third, a sum in another order).
- ``saved_mlp_mib`` (with ``layers-cudagraphs``, 1344 MiB, :data:`SAVED_MLP_MIB`): the last checkpointed layers
  that the budget holds at a micro-batch's token count (:func:`mlp_layers_to_save`) keep their MLP's gate and up
  outputs (:func:`save_mlp_outputs`), so their recompute skips the layer's two largest matmuls. Session 17, 8B r8
  q,k,v,o at 2 x 1024, one H200: 1 GiB (9 layers), +2.8% pipelined and +4.6% timed per step (11,195-11,365
  tok/s), peak 7.60 -> 8.28 GiB (0.67x the plain stack); +6.3% at real lengths. Every layer would be +14% at
  10.8 GiB, past the memory goal. Session 22: 1344 MiB (12 layers) +1.4% over 1 GiB, 8.61 GiB. Same arithmetic:
  the CPU tests pin the loss and gradients bit for bit.
- ``nf4_kernel`` (with ``dequantize_once``, so with ``layers-cudagraphs``): the NF4 weights are dequantized by one
  Triton kernel (train/nf4.py) that also decodes their double-quantized absmax, bitsandbytes' values bit for bit.
  Session 18, 8B r8 q,k,v,o at 2 x 1024, one H200: a step's dequantizing 17.9 -> 9.3 ms; +4.5% and +5.2% pipelined
  (11,828-11,890 tok/s), +3.2% per step; same memory.
- ``host_embedding`` (with ``saved_mlp_mib``, so with ``layers-cudagraphs``): an untied token embedding (the 8B's 1
  GiB) stays in pinned host memory and a Triton kernel reads a batch's rows from it (train/host_embedding.py); the GPU
  memory it frees goes to ``saved_mlp_mib`` (20 of the 8B's 32 layers at 2 x 1024 with 1344 MiB). The reads cost 0.38
  ms for 2,048 tokens and 0.63 ms for 3,500 (45 GB/s; the GPU's own lookup 0.03 ms), and 2 x 1024 with the table in
  host memory at an unchanged budget ran as fast as with it on the GPU (12,019 against 11,985 tok/s). Session 22, 8B
  r8 q,k,v,o at 2 x 1024, one H200: with 1344 MiB, 12,435-12,624 tok/s over three runs on two machines, +4.5% and
  +5.5% over session 21's defaults (1 GiB, table on the GPU: 11,894) on one machine, peak 8.51 GiB (0.69x). At real
  lengths the 40-step A/Bs of sessions 19-22, graph recordings in them, spread from -6.6% to +7.5%; in the steady
  state (session 23, each length's graphs recorded first) 6,392-7,287 tok/s over six runs against session 21's
  6,603 and 6,793: +1.0%, within the spread. A tied embedding (1B, 3B) stays on the GPU. ``SAVED_MLP_MIB=0``
  leaves the table on the GPU too.
- ``liger_kernels``: liger-kernel's fused RMSNorm, SwiGLU and RoPE (Triton; Llama and Mistral
  families). Its fused linear cross-entropy is not used: trl's SFTTrainer already scores the
  LM head in tiles (only the positions that carry a label), without the 128k-vocabulary logits.
- ``packing``: padding-free batches (``data.collate_packed``): a micro-batch's rows become one
  row whose position ids restart at 0 per row, from which transformers builds a block-diagonal
  causal mask, so no token attends across examples and no padding is computed.
- ``fold_accumulation``: with packing, the rows of a whole optimizer step go through in one
  micro-batch when that stays within :data:`FOLD_TOKEN_BUDGET` tokens (the same update: the loss
  is a mean over the step's tokens either way), so short rows stop leaving the GPU idle.

On a CPU all are off: bitsandbytes' float32 path, the existing padded batches, no Triton.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

#: Most tokens one folded micro-batch may hold (rows x MAX_SEQ_LENGTH, the worst case): 16 rows of
#: 1024 tokens; an 8B base with checkpointed layers holds this in well under 24 GB.
FOLD_TOKEN_BUDGET = 16384

#: MiB of the MLP's gate and up outputs a micro-batch keeps rather than compute again (``SpeedLevers.saved_mlp_mib``),
#: with per-layer CUDA graphs: 12 of an 8B's 32 layers at 2 x 1024 tokens, 20 with the GiB its token embedding frees
#: in host memory (``host_embedding``; session 22; 1024 in sessions 17-21).
SAVED_MLP_MIB = 1344

#: Model families liger-kernel patches here (``config.model_type`` -> its function's suffix).
LIGER_FAMILIES = ("llama", "mistral")


#: liger-kernel's fused kernels that the liger lever can swap in.
LIGER_KERNELS = ("rms_norm", "swiglu", "rope")


@dataclass(frozen=True)
class SpeedLevers:
    bf16_frozen: bool = False
    bf16_storage: bool = False
    fused_lora: bool = False
    #: What torch.compile covers, of :data:`COMPILE_MODES` ("" = nothing).
    compile_mode: str = ""
    #: Which of :data:`LIGER_KERNELS` to use (empty: none).
    liger_kernels: tuple[str, ...] = ()
    packing: bool = False
    fold_accumulation: bool = False
    #: Checkpointed 4-bit layers dequantize their weight once for the recompute and the backward pass together
    #: (:func:`dequantize_once`), not once each.
    dequantize_once: bool = False
    #: Checkpoints inside compiled graphs keep each layer's attention output rather than recompute it
    #: (:func:`save_attention_outputs`).
    save_attention: bool = False
    #: The collator lists the positions the LM head scores, computed on the CPU, so the head gathers them
    #: without a boolean mask (train/trainer.py); with packing only.
    label_positions: bool = False
    #: MiB of the MLP's gate and up projections that a micro-batch's checkpointed layers keep for their backward
    #: pass rather than compute again (:func:`mlp_layers_to_save`; per-layer CUDA graphs only; 0: none).
    saved_mlp_mib: int = 0
    #: With ``dequantize_once``: NF4 weights are dequantized by one Triton kernel (train/nf4.py), not bitsandbytes' two.
    nf4_kernel: bool = False
    #: An untied token embedding stays in pinned host memory and the GPU reads a batch's rows from it
    #: (train/host_embedding.py); the GPU memory it frees is added to ``saved_mlp_mib``.
    host_embedding: bool = False

    def names(self) -> list[str]:
        names = [name if on is True else f"{name}={on}" for name, on in vars(self).items()
                 if on and name != "liger_kernels"]
        return names + [f"liger_{kernel}" for kernel in self.liger_kernels]


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def compile_supported() -> bool:
    """Whether torch.compile's GPU backend can run here: Triton installed and a GPU of compute capability 7.0+."""
    import torch

    return (importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (7, 0))


#: Why TORCH_COMPILE=auto plans no CUDA graphs before torch 2.13 (:func:`symbolic_lengths_in_graph`).
GRAPHS_NEED_TORCH = "they need torch 2.13 (the train image's)"


def graphs_blocker(*, symbolic_lengths: bool, batch_size: int, grad_accum: int, max_seq_length: int,
                   processes: int) -> str | None:
    """Why TORCH_COMPILE=auto should not plan per-layer CUDA graphs for this run, or None where it should.

    They were measured (docs/benchmarks.md, "Session 14") on one GPU with each optimizer step in one folded
    micro-batch. Not planned where a step takes several micro-batches (their gradients would accumulate over
    outputs of graph replays, which torch warns a later replay can overwrite) or several processes (DDP), both
    unmeasured; ``TORCH_COMPILE=layers-cudagraphs`` still asks for them there.
    """
    if not symbolic_lengths:
        return GRAPHS_NEED_TORCH
    folded = micro_batching(batch_size, grad_accum, max_seq_length, SpeedLevers(packing=True, fold_accumulation=True))
    if folded[1] > 1:
        return (f"not planned when an optimizer step takes several micro-batches (BATCH_SIZE x GRAD_ACCUM x "
                f"MAX_SEQ_LENGTH = {batch_size * grad_accum * max_seq_length} tokens, over {FOLD_TOKEN_BUDGET}): "
                "unmeasured with gradient accumulation")
    if processes > 1:
        return f"not planned for {processes} processes: unmeasured with DDP"
    return None


def choose_levers(*, cuda: bool, compile: str = "auto", can_compile: bool = True,
                  no_graphs: str | None = GRAPHS_NEED_TORCH,
                  saved_mlp_mib: int = SAVED_MLP_MIB) -> tuple[SpeedLevers, tuple[str, ...]]:
    """The levers for this machine (``compile``: the TORCH_COMPILE setting; ``can_compile``: :func:`compile_supported`;
    ``no_graphs``: why this run gets no CUDA graphs, :func:`graphs_blocker`, or None where it does;
    ``saved_mlp_mib``: the SAVED_MLP_MIB setting, used with per-layer graphs only), and the notices that say what
    was left off and why.

    TORCH_COMPILE=auto compiles each decoder layer, with CUDA graphs (``layers-cudagraphs``) where nothing
    blocks them (torch 2.13, the train image's, and a run :func:`graphs_blocker` clears), and without
    (``layers``) otherwise: before torch 2.13 every new packed length would compile again.
    """
    if not cuda:
        notices = ["speed: fused GPU kernels and padding-free packing are CUDA-only; off on CPU"]
        if compile not in ("auto", "off"):
            notices.append(f"TORCH_COMPILE={compile}: torch.compile of the decoder is CUDA-only; off on CPU")
        return SpeedLevers(), tuple(notices)
    notices = []
    mode = compile
    if compile == "auto":
        mode = ("layers" if no_graphs else "layers-cudagraphs") if can_compile else "off"
        if not can_compile:
            notices.append("speed: torch.compile needs Triton and a GPU of compute capability 7.0+; "
                           "the decoder layers run eagerly")
    elif compile != "off" and not can_compile:
        raise ValueError(f"TORCH_COMPILE={compile}: torch.compile cannot run here (it needs Triton and a GPU of "
                         "compute capability 7.0+); set TORCH_COMPILE=off")
    if mode != "off":  # liger's kernels do not trace inside a graph; inductor fuses that work itself
        if mode == "stack":
            notice = ("speed: TORCH_COMPILE=stack: the decoder stack compiles during the first steps (minutes for an "
                      "8B); liger-kernel off")
        elif mode == "layers-cudagraphs":
            notice = ("speed: torch.compile with CUDA graphs on each decoder layer (the first steps compile them: "
                      "about 15 s on an 8B; each new packed length records its graphs, about 3 s); "
                      "TORCH_COMPILE=layers compiles without graphs (less memory), off runs eagerly")
            if no_graphs == GRAPHS_NEED_TORCH:
                notice += ("; with this torch every new packed length compiles again (about 10 s on an 8B): "
                           "torch 2.13 takes the length symbolic")
            elif no_graphs:
                notice += f"; measured only on one GPU with each optimizer step in one micro-batch ({no_graphs})"
        else:
            notice = ("speed: torch.compile on each decoder layer (the first step compiles them: 11-13 s on an 8B); "
                      "TORCH_COMPILE=off runs them eagerly")
            if compile == "auto":
                notice += f"; CUDA graphs on the layers, faster: {no_graphs}"
        notices.append(notice)
        # The recompute levers and the LM head's label positions were measured with per-layer graphs (session 15).
        graphs = mode == "layers-cudagraphs"
        return SpeedLevers(bf16_storage=True, compile_mode=mode, packing=True, fold_accumulation=True,
                           dequantize_once=graphs, save_attention=graphs, label_positions=graphs,
                           saved_mlp_mib=saved_mlp_mib if graphs else 0, nf4_kernel=graphs,
                           host_embedding=graphs and saved_mlp_mib > 0), tuple(notices)
    liger = liger_installed()
    if not liger:
        notices.append("speed: liger-kernel not installed (pip install 'loraship[gpu]'); "
                       "RMSNorm/SwiGLU/RoPE run unfused")
    kernels = LIGER_KERNELS if liger else ()
    return SpeedLevers(bf16_storage=True, liger_kernels=kernels, packing=True, fold_accumulation=True), tuple(notices)


def micro_batching(batch_size: int, grad_accum: int, max_seq_length: int, levers: SpeedLevers) -> tuple[int, int]:
    """``(rows per micro-batch, accumulation steps)`` for BATCH_SIZE x GRAD_ACCUM rows per optimizer step."""
    rows = batch_size * grad_accum
    if levers.fold_accumulation and levers.packing and grad_accum > 1 and rows * max_seq_length <= FOLD_TOKEN_BUDGET:
        return rows, 1
    return batch_size, grad_accum


def prepare_frozen_base(model, *, gradient_checkpointing: bool, float32_stream: bool = True, compile_mode: str = ""):
    """peft's ``prepare_model_for_kbit_training`` without its float32 upcast of the frozen weights.

    What it keeps: every base parameter frozen, non-reentrant gradient checkpointing on the
    decoder layers (which needs no gradient on the embeddings' output, unlike the reentrant kind),
    and, with ``float32_stream``, a float32 residual stream: the embeddings' output is cast to
    float32, as a float32 embedding table would give it (the ``bf16_storage`` lever). The
    checkpointing takes :func:`checkpoint_kwargs` of ``compile_mode``.
    """
    import torch

    for param in model.parameters():
        param.requires_grad = False
    if float32_stream:
        model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(torch.float32))
    if gradient_checkpointing:
        enable_checkpointing(model, checkpoint_kwargs(compile_mode))
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """Checkpoint ``model``'s decoder layers with ``kwargs`` (transformers 5.23 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def checkpoint_kwargs(compile_mode: str = "", save_attention: bool = False,
                      save_mlp: tuple[int, int] | None = None) -> dict:
    """The keyword arguments for ``torch.utils.checkpoint`` on the decoder layers.

    Non-reentrant always. With the decoder stack compiled (``stack*`` modes), also torch's
    selective checkpointing with a policy that makes bitsandbytes' ops be recomputed. Inside a
    compiled graph, checkpointing tags each op of a layer "prefer recompute" and the partitioner
    then saves only the layer inputs; but on CUDA the 4-bit matmuls that run inside bitsandbytes'
    autograd function lost that tag (measured: 25 of 28 in a 4-layer stack), and the partitioner,
    which never recomputes an untagged custom op, saved their outputs instead: 152 MiB per layer
    of the 8B at 2 x 1024 tokens, 4.7 GiB in all, the compiled stack's whole excess over eager
    (docs/benchmarks.md, "Session 5"). The policy tags the ops itself, at dispatch; every other op
    is left as plain checkpointing leaves it. (A function, not an object: dynamo traces only a
    function or a ``functools.partial`` as ``context_fn``.) ``save_attention``: the policy also keeps
    the attention kernels' outputs (:func:`save_attention_outputs`); ``save_mlp`` (the hidden and
    intermediate sizes): and the MLP's gate and up outputs (:func:`save_mlp_outputs`).
    """
    kwargs: dict = {"use_reentrant": False}
    if checkpoints_in_graph(compile_mode):
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        policy = save_attention_outputs if save_attention else recompute_quantized_matmuls
        if save_mlp is not None:
            policy = functools.partial(save_mlp_outputs, tuple(save_mlp), policy)
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return kwargs


def recompute_quantized_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: bitsandbytes' ops must be recomputed; the rest as plain checkpointing does."""
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(op, "namespace", None) == "bitsandbytes":
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


#: The attention kernels scaled_dot_product_attention dispatches to (aten op names), whose outputs
#: :func:`save_attention_outputs` keeps.
ATTENTION_OPS = frozenset({
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
})


def save_attention_outputs(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: :func:`recompute_quantized_matmuls`, but the attention kernel's outputs are saved.

    A checkpointed layer's backward pass then runs the attention kernel once (its backward) rather than
    twice: the recompute stops short of it. The cost is its output, half the size of the float32 layer
    input a checkpoint keeps anyway (bf16, one hidden vector per token).
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(getattr(op, "overloadpacket", None), "__name__", None) in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return recompute_quantized_matmuls(ctx, op, *args, **kwargs)


def save_mlp_outputs(mlp: tuple[int, int], rest, ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: the outputs of the MLP's gate and up projections are saved (``mlp``: the
    model's hidden and intermediate sizes), every other op goes to the policy ``rest``.

    Those are the matmuls from the hidden size to the intermediate one (the frozen 4-bit weights dequantized
    in autograd's view, :func:`dequantize_once`; a LoRA adapter's own matmuls start from its rank). The
    backward pass of the SwiGLU needs both outputs; kept, the recompute stops short of the two largest
    matmuls of the layer, for two bf16 vectors of the intermediate size per token.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    hidden, intermediate = mlp
    if getattr(getattr(op, "overloadpacket", None), "__name__", None) == "mm" and len(args) >= 2:
        weight = args[1]
        if tuple(getattr(weight, "shape", ())) == (hidden, intermediate):
            return CheckpointPolicy.MUST_SAVE
    return rest(ctx, op, *args, **kwargs)


def mlp_layers_to_save(tokens: int, intermediate_size: int, saved_mlp_mib: int, layers: int) -> int:
    """How many checkpointed layers keep their MLP's gate and up outputs for a micro-batch of ``tokens``.

    As many as ``saved_mlp_mib`` holds at two bf16 vectors of ``intermediate_size`` per token and layer, and
    no more than ``layers``: 2 x 1024 tokens of an 8B (intermediate 14,336) take 112 MiB a layer, so
    896 MiB keeps 8 layers, and a folded micro-batch of 16,384 tokens (896 MiB a layer) keeps one.
    """
    per_layer = tokens * intermediate_size * 2 * 2
    if per_layer <= 0:
        return 0
    return min(layers, (saved_mlp_mib * 2**20) // per_layer)


def dequantize_once(model, kernel: bool = False) -> int:
    """Make each bitsandbytes 4-bit layer of ``model`` dequantize its weight once per checkpointed layer and step.

    bitsandbytes' own layer dequantizes the weight inside its 4-bit matmul (a custom op) and again
    in its backward pass; with checkpointing the recompute runs the matmul again, so a step
    dequantizes most weights three times (session 8's profile: 25 ms of a 189 ms step). Here a
    training call (grad enabled, training mode) runs the same arithmetic in plain ops, the
    dequantized weight an ordinary input of ``F.linear``: the checkpoint drops it after the forward
    pass, the recompute makes it again, and the backward pass uses that one. Only for checkpointed
    layers: without a checkpoint, autograd would keep every layer's dequantized weight until the
    backward pass (16 GB on an 8B). Evaluation and generation keep bitsandbytes' own path (its fast
    kernel for short inputs). ``kernel`` (CUDA, Triton): the NF4 weights train/nf4.py handles are dequantized by
    its one kernel, the same values as bitsandbytes' two. Returns how many layers it changed.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is 4-bit
        return 0
    if kernel:
        from train import nf4

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

    from train import nf4

    compute = self.compute_dtype or x.dtype
    state = self.weight.quant_state
    dequantize = nf4.dequantize if kernel and nf4.supports(self.weight, state) else bnbf.dequantize_4bit
    weight = dequantize(self.weight, state).to(compute)
    bias = None if self.bias is None else self.bias.to(compute)
    return torch.nn.functional.linear(x.to(compute), weight, bias).to(x.dtype)


def _linear4bit_dequantize_once_nf4(self, x):
    """:func:`_linear4bit_dequantize_once` with train/nf4.py's kernel."""
    return _linear4bit_dequantize_once(self, x, kernel=True)


def checkpoints_in_graph(compile_mode: str) -> bool:
    """Whether the checkpointing of the decoder layers runs inside the compiled graphs (the stack modes, and the
    per-layer graphs of ``layers-cudagraphs``, where a recompute outside a graph would replay a CUDA graph
    during the backward pass and overwrite the outputs it is about to use)."""
    return compile_mode.startswith("stack") or compile_mode == "layers-cudagraphs"


def trainer_sets_checkpointing(compile_mode: str) -> bool:
    """Whether the Trainer may turn checkpointing on again from its arguments (it does when it starts).

    Not with any compile mode: a compiled stack's selective policy is a function, which the Trainer's
    arguments cannot carry (they are written out as JSON), and compiled layers checkpoint themselves
    (:func:`compile_for_training`), so transformers' own checkpointing must stay off on them. The model
    keeps the checkpointing it was given (``load_base_model`` and :func:`compile_model` set it).
    """
    return not compile_mode


def apply_liger_kernels(model, kernels: tuple[str, ...] = LIGER_KERNELS) -> str | None:
    """Swap in liger-kernel's fused ``kernels`` (of :data:`LIGER_KERNELS`); a notice when the family is not covered."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LIGER_FAMILIES:
        return f"speed: liger-kernel not applied to model type {model_type!r} (covered: {', '.join(LIGER_FAMILIES)})"
    import liger_kernel.transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}")
    # The loss stays trl's tiled LM head (see the module docstring), so liger's own loss kernels stay off.
    patch(**{kernel: kernel in kernels for kernel in LIGER_KERNELS}, cross_entropy=False,
          fused_linear_cross_entropy=False, model=model)
    return None


#: What ``compile_mode`` may be: what is compiled, and how.
COMPILE_MODES = {
    "layers": "torch.compile on each decoder layer (one graph shared by the layers; checkpointing around each)",
    "stack": "torch.compile on the whole decoder stack (one graph; checkpointing inside it)",
    "stack-cudagraphs": "the whole decoder stack compiled with CUDA graphs (mode='reduce-overhead')",
    "layers-cudagraphs": "each decoder layer compiled with CUDA graphs (mode='reduce-overhead'; checkpoint inside)",
}


def replays_graphs(levers: SpeedLevers) -> bool:
    """Whether training steps replay CUDA graphs, so packed rows must come in a few lengths (``data.bucket_length``)."""
    return levers.packing and levers.compile_mode.endswith("cudagraphs")


def decoder_stack(model):
    """The module holding the decoder layers (``LlamaModel`` under a peft model), and the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    stack = next((module for module in model.modules()
                  if any(child is layers[0] for child in getattr(module, "layers", ()))), None) if layers else None
    return stack, layers


def compile_model(model, mode: str, save_attention: bool = False, saved_mlp_mib: int = 0) -> int:
    """``torch.compile`` ``model``'s decoder (one of :data:`COMPILE_MODES`) in place; how many layers it covers.

    ``layers`` (the CUDA default before torch 2.13): each decoder layer compiled for training steps (they share one code
    path, so one graph); the compiled call checkpoints the layer itself, around its graph, so a
    recomputed layer replays the same graph (and, with the RNG state the checkpoint restores, the
    same dropout mask). ``layers-cudagraphs``: the same with CUDA graphs, the checkpoint inside each
    layer's graph. ``stack``: the whole decoder stack as one graph, the checkpoints inside it, so a
    step pays Python's overhead once rather than per layer. Stack modes set the model's
    checkpointing again with :func:`checkpoint_kwargs` (``save_attention``: its policy keeps the
    attention outputs, where the checkpoints are inside the graphs). ``saved_mlp_mib`` (``layers-cudagraphs``):
    each training call's last :func:`mlp_layers_to_save` layers run a second graph of the layer, whose policy
    keeps the MLP's gate and up outputs too (:func:`save_mlp_outputs`): the last layers, because the backward
    pass reaches them first, so what they keep is freed before any layer computes its MLP again.
    (Graphs of N layers each, ``stack-N``, were measured in session 5 while looking for the stack's
    memory, which they did not change, and were taken out: docs/benchmarks.md.)
    """
    import torch

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r}: one of {', '.join(COMPILE_MODES)}")
    # One graph serves all layers; room for the few variants a run meets (train/eval, new lengths).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    stack, layers = decoder_stack(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode.endswith("cudagraphs"):
        quiet_expected_graph_warnings()
    if mode.startswith("layers"):
        # The compiled call checkpoints the layer itself rather than leave it to transformers, whose wrapper
        # moved from around the layer's __call__ (5.17, measured) to inside its forward (5.23), which would
        # put the checkpoint inside the graph without the policy of checkpoint_kwargs.
        checkpointed = is_checkpointing(base)
        graphs = mode == "layers-cudagraphs"
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        mlp = (config.hidden_size, getattr(config, "intermediate_size", 0))
        keep_mlp = checkpointed and graphs and saved_mlp_mib > 0 and mlp[1] and mlp[1] != mlp[0]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = False
            keeps = None
            if keep_mlp:
                from_end = len(layers) - index

                def keeps(tokens, from_end=from_end):
                    return from_end <= mlp_layers_to_save(tokens, mlp[1], saved_mlp_mib, len(layers))
            compile_for_training(layer, mode="reduce-overhead" if graphs else None,
                                 checkpoint=checkpoint_kwargs(mode, save_attention) if checkpointed else None,
                                 checkpoint_in_graph=graphs,
                                 keeping=(checkpoint_kwargs(mode, save_attention, save_mlp=mlp), keeps) if keeps else None)
        return len(layers)
    if stack is None:
        raise ValueError("compile_mode: no decoder stack found in this model")
    # Non-reentrant checkpointing needs no gradient on the embeddings' output; the hook that asks for it
    # (transformers adds it with any checkpointing) breaks the graph there. transformers keeps only the
    # last hook it added, so it goes before checkpointing is set again (with the policy that recomputes
    # the 4-bit matmuls too: checkpoint_kwargs), and again after.
    def drop_input_grad_hook():
        if hasattr(base, "disable_input_require_grads") and getattr(base, "_require_grads_hooks", None):
            base.disable_input_require_grads()

    drop_input_grad_hook()
    if is_checkpointing(base):
        enable_checkpointing(base, checkpoint_kwargs(mode, save_attention))
        drop_input_grad_hook()
    compile_for_training(stack, mode="reduce-overhead" if mode == "stack-cudagraphs" else None)
    return len(layers)


def quiet_expected_graph_warnings() -> None:
    """Silence two warnings that CUDA graphs of checkpointed, bucketed layers give by design, not by fault.

    Inductor warns once it has recorded graphs for more than 8 input sizes: packed rows come in a few dozen
    bucketed lengths (``data.bucket_length``), each recorded once. And it warns that it cannot take its
    "fast path" while earlier graphs' outputs still wait for their backward: per-layer graphs always do (the
    next layer runs before the backward of the last), and the steps measured in docs/benchmarks.md ran so.
    """
    import warnings

    import torch._inductor.config as inductor

    if hasattr(inductor.triton, "cudagraph_dynamic_shape_warn_limit"):
        inductor.triton.cudagraph_dynamic_shape_warn_limit = None
    warnings.filterwarnings("ignore", message="Unable to hit fast path of CUDAGraphs")


def compile_for_training(module, mode: str | None = None, checkpoint: dict | None = None,
                         checkpoint_in_graph: bool = False, keeping: tuple | None = None) -> None:
    """``module.compile()`` for training steps only: evaluation runs the module eagerly.

    A run's evaluation (eval mode, no gradients, padded batches) made torch.compile compile the whole
    stack again, twice: in the 1B A/B, 4-5 compiles and 365-476 s against 47-67 s eager
    (docs/benchmarks.md, "Session 6"). Here a call that builds no graph for a backward pass runs the
    module eagerly, so a run compiles twice: its first length, then once more with the length symbolic
    when packed rows change it (torch's automatic dynamic shapes). Symbolic sizes from the first step
    (``dynamic=True``) were slower: the CPU demo A/B ran 401 s that way against 255 s this way.
    With CUDA graphs over the stack (``mode='reduce-overhead'``), a packed row's length is symbolic from
    the first call (:func:`mark_packed_length_dynamic`; the stack's inputs only).

    ``checkpoint``: keyword arguments of ``torch.utils.checkpoint`` for the training calls, around the
    compiled module (a recompute replays its graph, with the RNG state the checkpoint restores) or, with
    ``checkpoint_in_graph`` (per-layer CUDA graphs), inside its graph (with CUDA graphs a recompute outside
    would replay a graph during the backward pass and overwrite outputs still in use: session 11). Those
    graphs of one layer take the length symbolic from the second length where :func:`symbolic_lengths_in_graph`,
    and static shapes (a compile per bucketed length) before that. ``keeping``: ``(checkpoint, keeps)``, a
    second graph whose checkpoint (inside it) takes those keyword arguments, for the training calls whose
    token count ``keeps(tokens)`` accepts.
    """
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint as checkpointed

    target = module._call_impl
    if checkpoint is not None and checkpoint_in_graph:
        target = functools.partial(checkpointed, module._call_impl, **checkpoint)
    static = checkpoint_in_graph and not symbolic_lengths_in_graph()
    compiled = torch.compile(target, mode=mode, dynamic=False if static else None)
    keeping_compiled, keeps = None, None
    if keeping is not None and checkpoint_in_graph:
        keeping_checkpoint, keeps = keeping
        keeping_compiled = torch.compile(functools.partial(checkpointed, module._call_impl, **keeping_checkpoint),
                                         mode=mode, dynamic=False if static else None)
    mark_dynamic = mode == "reduce-overhead" and not checkpoint_in_graph
    outside = checkpoint if checkpoint is not None and not checkpoint_in_graph else None

    def run_compiled(*args, **kwargs):
        chosen = compiled
        if keeps is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if keeps(hidden.numel() // hidden.shape[-1]):
                chosen = keeping_compiled
        try:
            return chosen(*args, **kwargs)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError) as err:
            raise compile_failed(err, graphs=mode == "reduce-overhead") from err

    def call(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            if mark_dynamic:
                mark_packed_length_dynamic(kwargs)
            if outside is not None:
                return checkpointed(run_compiled, *args, **outside, **kwargs)
            return run_compiled(*args, **kwargs)
        return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call  # what nn.Module.compile sets; __call__ runs it in place of forward


def symbolic_lengths_in_graph() -> bool:
    """Whether this torch compiles a graph with a checkpoint inside it for a symbolic packed length.

    torch 2.11's partitioner leaves the length (a SymInt input) out of the backward graph's inputs when
    the layer's checkpoint is inside the graph, and inductor fails with "Node add_N was invalid, but is
    output": on the 8B (session 11) and on the tiny CPU model with torch 2.11 (session 12, with or
    without the selective policy). torch 2.13 (the train image's, CI's) compiles the same graph, and
    tests/train/test_compile.py pins that after the second packed length no length compiles again. 2.12 is
    untried.
    """
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13)


def compile_failed(err: Exception, graphs: bool = False) -> Exception:
    """A compiler failure in a training step as the user's error: what failed, and the setting that avoids it."""
    from train.settings import TrainError

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith("backend=")), type(err).__name__)
    instead = ("set TORCH_COMPILE=layers to compile without CUDA graphs, or TORCH_COMPILE=off to train without it"
               if graphs else "set TORCH_COMPILE=off to train without it")
    return TrainError(f"torch.compile failed on the decoder ({type(err).__name__}: {detail}); {instead}")


def mark_packed_length_dynamic(kwargs: dict) -> None:
    """With CUDA graphs: a packed row's length is symbolic from the first step, so the stack compiles once.

    Without it torch compiles for the first length, then again with the length symbolic when a second
    one comes: on the 8B at real lengths that was 174 s and then 303 s before the first fast step
    (docs/benchmarks.md, "Session 8"). Under CUDA graphs each (bucketed) length still records a graph of
    its own. Rows of one length (a batch of several rows) keep their static shape. On the GPU (session 9)
    the 8B stack then compiled once, in 232-243 s, with no recompile. CUDA graphs are a bench
    configuration (``stack-cudagraphs``), not in the plan.
    """
    import torch

    for name in ("input_ids", "position_ids"):
        tensor = kwargs.get(name)
        if tensor is not None and tensor.dim() == 2 and tensor.shape[0] == 1:
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
