"""What makes a QLoRA step fast on a CUDA GPU, decided once (:func:`plan`) and applied in one call (:func:`make_fast`).

docs/performance.md says how each lever works and why; docs/benchmarks.md has what they give. On a CPU every
lever is off and training runs peft's and trl's own path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from train.speed import compiled
from train.speed.frozen import LIGER_FAMILIES, LIGER_KERNELS, liger_installed

#: MiB of the MLP's gate and up outputs a micro-batch keeps rather than compute again, with per-layer CUDA graphs
#: (SAVED_MLP_MIB's default; docs/benchmarks.md).
SAVED_MLP_MIB = 1344
#: Model families whose LM head is a plain projection (no logit scale or soft-capping), measured with the
#: collator's label positions (``trainer.score_label_positions``).
PLAIN_HEAD_FAMILIES = ("llama", "mistral")


@dataclass(frozen=True)
class SpeedLevers:
    #: Frozen norms, embeddings and LM head stay bf16 in memory; the residual stream stays float32.
    bf16_storage: bool = False
    #: What torch.compile covers, of ``compiled.COMPILE_MODES`` ("" = nothing).
    compile_mode: str = ""
    #: Which of ``frozen.LIGER_KERNELS`` to use (empty: none).
    liger_kernels: tuple[str, ...] = ()
    #: Padding-free micro-batches (``packing.collate_packed``).
    packing: bool = False
    #: BATCH_SIZE x GRAD_ACCUM rows in one packed micro-batch where they fit (``packing.micro_batching``).
    fold_accumulation: bool = False
    #: Checkpointed 4-bit layers dequantize once per step (``frozen.dequantize_once``).
    dequantize_once: bool = False
    #: Checkpoints inside compiled graphs keep each layer's attention output (``compiled.save_attention_outputs``).
    save_attention: bool = False
    #: The collator lists the positions the LM head scores, so it gathers them by index (``trainer.py``).
    label_positions: bool = False
    #: MiB of MLP gate and up outputs kept for the backward pass (per-layer CUDA graphs only; 0: none).
    saved_mlp_mib: int = 0
    #: With ``dequantize_once``: NF4 weights are dequantized by one Triton kernel (``nf4.py``).
    nf4_kernel: bool = False
    #: An untied token embedding stays in pinned host memory (``host_embedding.py``); what it frees joins
    #: ``saved_mlp_mib``.
    host_embedding: bool = False

    def names(self) -> list[str]:
        names = [name if on is True else f"{name}={on}" for name, on in vars(self).items()
                 if on and name != "liger_kernels"]
        return names + [f"liger_{kernel}" for kernel in self.liger_kernels]


def compile_supported() -> bool:
    """Whether torch.compile's GPU backend can run here: Triton installed and a GPU of compute capability 7.0+."""
    import torch

    return (importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (7, 0))


#: Why TORCH_COMPILE=auto plans no CUDA graphs on a torch that cannot take a symbolic packed length in them
#: (``compiled.symbolic_lengths_in_graph``).
GRAPHS_NEED_TORCH = "they need torch 2.11 (the train image's) or 2.13+"


def plan(settings, *, cuda: bool, processes: int = 1) -> tuple[SpeedLevers, tuple[str, ...]]:
    """The levers TrainSettings mean on this machine (``processes`` train together), and notices of what is off.

    Raises ValueError for a TORCH_COMPILE this machine cannot run.
    """
    can_compile = cuda and settings.torch_compile != "off" and compile_supported()
    no_graphs = graphs_blocker(symbolic_lengths=can_compile and compiled.symbolic_lengths_in_graph(),
                               batch_size=settings.batch_size, grad_accum=settings.grad_accum,
                               max_seq_length=settings.max_seq_length, processes=processes)
    levers, notices = choose_levers(cuda=cuda, compile=settings.torch_compile, can_compile=can_compile,
                                    no_graphs=no_graphs, saved_mlp_mib=settings.saved_mlp_mib)
    if "saved_mlp_mib" in settings.model_fields_set and levers.compile_mode != "layers-cudagraphs":
        notices += (f"SAVED_MLP_MIB={settings.saved_mlp_mib}: unused; it applies with per-layer CUDA graphs "
                    f"(TORCH_COMPILE=layers-cudagraphs, or auto where they run), and this run has none",)
    return levers, notices


def graphs_blocker(*, symbolic_lengths: bool, batch_size: int, grad_accum: int, max_seq_length: int,
                   processes: int) -> str | None:
    """Why TORCH_COMPILE=auto should not plan per-layer CUDA graphs for this run, or None where it should.

    They were measured on one GPU with each optimizer step in one folded micro-batch; accumulation over graph
    replays and DDP are unmeasured, so left out (``TORCH_COMPILE=layers-cudagraphs`` still asks for them).
    """
    from train.speed.packing import FOLD_TOKEN_BUDGET, micro_batching

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
    ``no_graphs``: why this run gets no CUDA graphs, :func:`graphs_blocker`, or None where it does), and notices.

    TORCH_COMPILE=auto compiles each decoder layer, with CUDA graphs where nothing blocks them; 'off' runs eagerly
    with liger-kernel.
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
                           "torch 2.11 and 2.13+ take the length symbolic")
            elif no_graphs:
                notice += f"; measured only on one GPU with each optimizer step in one micro-batch ({no_graphs})"
        else:
            notice = ("speed: torch.compile on each decoder layer (the first step compiles them: 11-13 s on an 8B); "
                      "TORCH_COMPILE=off runs them eagerly")
            if compile == "auto":
                notice += f"; CUDA graphs on the layers, faster: {no_graphs}"
        notices.append(notice)
        # The recompute levers and the LM head's label positions were measured with per-layer graphs.
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


def fit_to_model(levers: SpeedLevers, model) -> tuple[SpeedLevers, tuple[str, ...]]:
    """The planned levers that apply to ``model``, and a one-line notice naming its family for each that does not."""
    import dataclasses

    from train.speed import host_embedding

    config = model.config
    family = getattr(config, "model_type", "unknown")
    off: dict = {}
    notices = []
    if levers.liger_kernels and family not in LIGER_FAMILIES:
        off["liger_kernels"] = ()
        notices.append(f"speed: liger-kernel is applied to {', '.join(LIGER_FAMILIES)} models, not {family}: "
                       "RMSNorm/SwiGLU/RoPE run unfused")
    if levers.label_positions and not plain_head(config):
        off["label_positions"] = False
        notices.append(f"speed: the LM head of a {family} model scores every position (label positions are "
                       f"measured on the plain heads of {', '.join(PLAIN_HEAD_FAMILIES)})")
    if levers.compile_mode and not compiled.decoder_stack(model)[1]:
        off.update(compile_mode="", save_attention=False, saved_mlp_mib=0, host_embedding=False)
        notices.append(f"speed: torch.compile found no decoder layers in this {family} model; they run eagerly")
    elif levers.saved_mlp_mib and not gated_mlp(compiled.decoder_stack(model)[1][0]):
        off.update(saved_mlp_mib=0, host_embedding=False)
        notices.append(f"speed: SAVED_MLP_MIB keeps nothing in a {family} model, whose MLP has no separate "
                       "gate_proj and up_proj; the token embedding stays in GPU memory")
    if levers.save_attention and "save_attention" not in off and getattr(config, "_attn_implementation", "") == "eager":
        off["save_attention"] = False
        notices.append(f"speed: a {family} model runs eager attention here, so no attention kernel output is kept "
                       "for the backward pass")
    why_not = host_embedding.movable(model) if levers.host_embedding and "host_embedding" not in off else None
    if why_not:
        off["host_embedding"] = False
        notices.append(f"speed: the token embedding of a {family} model stays in GPU memory: {why_not}")
    return dataclasses.replace(levers, **off), tuple(notices)


def plain_head(config) -> bool:
    """Whether the LM head is one of :data:`PLAIN_HEAD_FAMILIES`' (and not soft-capped)."""
    return config.model_type in PLAIN_HEAD_FAMILIES and not getattr(config, "final_logit_softcapping", None)


def gated_mlp(layer) -> bool:
    """Whether a decoder layer's MLP has the separate gate and up projections whose outputs SAVED_MLP_MIB keeps."""
    mlp = getattr(layer, "mlp", None)
    return all(hasattr(mlp, name) for name in ("gate_proj", "up_proj"))


def make_fast(model, lora_config, levers: SpeedLevers, *, load_in_4bit: bool, gradient_checkpointing: bool,
              echo: Callable[[str], None] | None = None):
    """The loaded base ``model`` with the levers applied and LoRA (``lora_config``) added: the peft model to train.

    In order: the token embedding to host memory (before any hook goes on it), liger's kernels, the frozen base
    prepared without peft's float32 upcast, one dequantization per checkpointed 4-bit layer, LoRA, torch.compile.
    """
    from peft import get_peft_model

    from train.speed import frozen

    say = echo or (lambda line: None)
    levers, notices = fit_to_model(levers, model)
    for notice in notices:
        say(f"note: {notice}")
    if levers.host_embedding:
        keep_embedding_in_host_memory(model, say)
    if levers.liger_kernels:
        notice = frozen.apply_liger_kernels(model, levers.liger_kernels)
        if notice:
            say(f"note: {notice}")
    if load_in_4bit and levers.bf16_storage:
        model = frozen.prepare_frozen_base(model, gradient_checkpointing=gradient_checkpointing,
                                           compile_mode=levers.compile_mode)
    else:
        prepare_plain(model, load_in_4bit=load_in_4bit, gradient_checkpointing=gradient_checkpointing,
                      compile_mode=levers.compile_mode)
    if load_in_4bit and levers.dequantize_once and gradient_checkpointing:
        frozen.dequantize_once(model, kernel=levers.nf4_kernel)
    peft_model = get_peft_model(model, lora_config)
    if levers.compile_mode:
        compiled.compile_model(peft_model, levers.compile_mode, save_attention=levers.save_attention,
                               saved_mlp_mib=mlp_budget_mib(model, levers))
    return peft_model


def mlp_budget_mib(model, levers: SpeedLevers) -> int:
    """MiB of MLP outputs the compiled layers keep: SAVED_MLP_MIB plus the GPU memory the token embedding left for
    host memory, so the peak stays where SAVED_MLP_MIB alone puts it (0 stays 0)."""
    if not levers.saved_mlp_mib:
        return 0
    from train.speed import host_embedding

    return levers.saved_mlp_mib + host_embedding.held_bytes(model) // 2**20


def prepare_plain(model, *, load_in_4bit: bool, gradient_checkpointing: bool, compile_mode: str = ""):
    """peft's own preparation of a frozen base (its float32 upcast for 4-bit), with the checkpointing asked for."""
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=compiled.checkpoint_kwargs(compile_mode))
    if gradient_checkpointing:
        compiled.enable_checkpointing(model, compiled.checkpoint_kwargs(compile_mode))
    return model


def keep_embedding_in_host_memory(model, echo: Callable[[str], None]) -> int:
    """Move ``model``'s token embedding to pinned host memory where it can go; the bytes of GPU memory freed."""
    from train.speed import host_embedding

    why_not = host_embedding.movable(model) if host_embedding.available() else "it needs Triton and a CUDA GPU"
    if why_not:
        echo(f"note: speed: the token embedding stays in GPU memory: {why_not}")
        return 0
    try:
        freed = host_embedding.move_to_host(model)
    except RuntimeError as err:  # page-locking the table failed (a host short of memory): run with it on the GPU
        echo(f"note: speed: the token embedding stays in GPU memory: pinning it in host memory failed "
             f"({str(err).splitlines()[0]})")
        return 0
    echo(f"note: speed: the token embedding is read from pinned host memory ({freed / 2**20:,.0f} MiB of GPU "
         "memory freed, given to the MLP outputs kept: SAVED_MLP_MIB)")
    return freed


@dataclass(frozen=True)
class TrainerOptions:
    """What the levers change in the Trainer's arguments."""

    rows: int  # per micro-batch
    accumulation: int  # micro-batches per optimizer step
    collator: Any  # None: trl pads each batch to its longest row
    tokens_seen: str  # transformers' include_num_input_tokens_seen
    trainer_checkpointing: bool  # whether the Trainer may set checkpointing again from its arguments


def trainer_options(levers: SpeedLevers, *, batch_size: int, grad_accum: int, max_seq_length: int,
                    gradient_checkpointing: bool) -> TrainerOptions:
    import functools

    from train.speed.packing import collate_packed, micro_batching

    rows, accumulation = micro_batching(batch_size, grad_accum, max_seq_length, levers)
    collator = None
    if levers.packing:  # with CUDA graphs the packed rows are padded to a few lengths
        collator = functools.partial(collate_packed, bucket=replays_graphs(levers), positions=levers.label_positions)
    return TrainerOptions(
        rows=rows, accumulation=accumulation, collator=collator,
        # Packed batches hold no padding (and may hold the pad id as a real token, e.g. eos).
        tokens_seen="all" if levers.packing else "non_padding",
        trainer_checkpointing=gradient_checkpointing and compiled.trainer_sets_checkpointing(levers.compile_mode),
    )


def replays_graphs(levers: SpeedLevers) -> bool:
    """Whether training steps replay CUDA graphs, so packed rows must come in a few lengths."""
    return levers.packing and levers.compile_mode.endswith("cudagraphs")
