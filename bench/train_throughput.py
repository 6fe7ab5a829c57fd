"""Is loraship's training path faster than the plain HF + PEFT + bitsandbytes stack? Same GPU, same batches.

For each model shape, random-init bf16 weights are saved once to local disk; every configuration
then loads them 4-bit (NF4, double quant, bf16 compute) itself and trains on the same rows:

- ``plain``: the seeds' stack, by hand: ``prepare_model_for_kbit_training`` (gradient checkpointing),
  LoRA (r8 q,k,v,o, dropout 0.05), bf16 autocast, torch AdamW, the model's own loss over full logits;
- ``loraship*``: the functions ``python -m train`` runs (``model.plan_for``, ``load_base_model``,
  ``add_lora``, ``run.build_trainer``, trl's SFTTrainer), with the plan's speed levers switched on one
  at a time (train/speed.py);
- ``defaults*``: what ``python -m train`` plans on CUDA with this torch (since session 14: each decoder
  layer compiled with CUDA graphs where :func:`train.speed.symbolic_lengths_in_graph`, torch 2.13 or
  ``--symbolic-graph-lengths``; without graphs before, as since session 11); ``layers*``: per-layer compile
  without graphs (``TORCH_COMPILE=layers``); ``eager*``: liger, no compile (``TORCH_COMPILE=off``);
  ``defaults±dqonce`` / ``±saveattn`` / ``±positions`` / ``±both`` / ``±all``: the defaults with session 15's
  levers on or off; ``defaults+mlpN`` / ``defaults-mlp``: with N MiB of kept MLP outputs, or none (session 17);
  ``defaults-nf4``: bitsandbytes' dequantization instead of train/nf4.py's kernel (session 18);
  ``defaults+host`` / ``defaults-host``: the token embedding in host memory, its GPU memory added to the MLP
  budget, or on the GPU (session 19; a default since session 22); ``defaults+hostread``: the table in host memory
  at a plan's budget without it, so only the reads differ (session 20; the 8B shape; only where the plan leaves the
  table on the GPU); ``defaults-s21``: session 21's defaults (table on the GPU, 1 GiB of MLP outputs);
  each also with ``-real`` (real lengths);
- ``defaults+compile*`` / ``defaults+stack*`` / ``defaults+graphs*``: the eager levers with torch.compile
  on each decoder layer, on the whole decoder stack, or on the stack with CUDA graphs (``compile_mode``);
  ``layers-graphs*``: each decoder layer compiled with CUDA graphs.

Per configuration: tokens/s (median of the timed optimizer steps after warm-up, each CUDA-synchronized, or
with ``--pipelined`` their mean over one synchronization at each end; for the real-length rows, non-padding
tokens over the timed steps' total time), peak GPU memory
(``max_memory_allocated``, reset per configuration) and the loss at the first and the last step.

    python bench/train_throughput.py --shapes llama-3.2-1b,llama-3-8b --configs fixed --out bench/results/x.json
    python bench/train_throughput.py --tiny            # CPU smoke test of every code path (no GPU, no bnb)
    python bench/train_throughput.py --shapes llama-3-8b --configs defaults+stack-noliger --memory-trace --out m.json
                                                       # + what is alive at the GPU memory peak, by source line
    python bench/train_throughput.py --shapes llama-3-8b --configs plain,defaults,defaults+compile --isolate
                                                       # each configuration in a process of its own
    python bench/train_throughput.py --shapes llama-3-8b --configs layers-graphs-real --symbolic-graph-lengths
                                                       # per-layer graphs, packed length symbolic (torch 2.11 too)
    python bench/train_throughput.py --shapes llama-3-8b --configs plain,defaults --isolate --pipelined
                                                       # timed as a real run goes: no sync between steps

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cuda_memory  # noqa: E402
from train.speed import GRAPHS_NEED_TORCH, SpeedLevers, choose_levers, symbolic_lengths_in_graph  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Every lever, bf16_frozen included: what the 2026-11-29 tables measured as "loraship".
ALL = SpeedLevers(bf16_frozen=True, liger_kernels=("rms_norm", "swiglu", "rope"), packing=True, fold_accumulation=True)
#: What ``python -m train`` picks on a CUDA machine with this torch (each decoder layer compiled, no liger; with
#: CUDA graphs where the packed length can be symbolic in them). ``--symbolic-graph-lengths`` re-plans it.
DEFAULTS = choose_levers(cuda=True, no_graphs=None if symbolic_lengths_in_graph() else GRAPHS_NEED_TORCH)[0]
#: Per-layer compile without CUDA graphs (TORCH_COMPILE=layers): the default of sessions 11-13.
LAYERS = choose_levers(cuda=True, compile="layers")[0]
#: The eager levers (TORCH_COMPILE=off: liger-kernel, no torch.compile): the defaults of sessions 3-10, which the
#: ``defaults-*`` and ``defaults+*`` configurations below were built on and measured as.
EAGER = choose_levers(cuda=True, compile="off")[0]
#: The defaults before bf16_storage and fused_lora (what the first 2026-11-29 session-3 call measured as "defaults").
MORNING = dataclasses.replace(EAGER, bf16_storage=False, fused_lora=False)
NONE = SpeedLevers()


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    stack: str  # "plain" | "loraship"
    levers: SpeedLevers = NONE
    rows: str = "fixed"  # "fixed": batch x seq random tokens; "real": long-tailed lengths
    batch: int = 2
    grad_accum: int = 1
    lora_r: int = 8
    targets: tuple[str, ...] = QKVO
    dropout: float = 0.05
    gradient_checkpointing: bool = True
    optimizer: str | None = None  # OPTIMIZER for loraship's path (None: the plan's choice)


#: MiB of Llama-3-8B's token embedding (128,256 x 4,096 bf16): what the host embedding frees on the GPU.
EMBEDDING_8B_MIB = 128_256 * 4_096 * 2 // 2**20


def plan_symbolic_graph_lengths() -> None:
    """``--symbolic-graph-lengths``: give this torch what torch 2.13 does in per-layer graphs
    (bench/symbolic_graph_lengths.py), and make the ``defaults*`` configurations the plan torch 2.13 makes."""
    from bench import symbolic_graph_lengths

    print(symbolic_graph_lengths.enable(), flush=True)
    CONFIGS.update(defaults_configs(choose_levers(cuda=True, no_graphs=None)[0]))


def defaults_configs(levers: SpeedLevers) -> dict[str, Config]:
    """The ``defaults*`` configurations for the plan ``levers``: the goal's three workloads."""
    graphs = ", layers with CUDA graphs" if levers.compile_mode == "layers-cudagraphs" else ""
    return {
        "defaults": Config(f"loraship defaults{graphs}", "loraship", levers),
        "defaults-accum4": Config(f"loraship defaults{graphs}, 2x1024 x 4 accumulation", "loraship", levers,
                                  grad_accum=4),
        "defaults-real": Config(f"loraship defaults{graphs}, real lengths", "loraship", levers, rows="real",
                                grad_accum=4),
        # The defaults with one lever on or off (train/speed.py), at 2 x 1024 and at real lengths; then the two
        # recompute levers together.
        **{f"defaults{sign}{name}{suffix}": Config(f"loraship defaults{graphs}, {field}={value}{label}", "loraship",
                                                     dataclasses.replace(levers, **{field: value}), **extra)
           for name, field in (("dqonce", "dequantize_once"), ("saveattn", "save_attention"),
                               ("positions", "label_positions"), ("nf4", "nf4_kernel"),
                               ("host", "host_embedding"))
           for sign, value in (("+", True), ("-", False)) if getattr(levers, field) != value
           for suffix, label, extra in (("", "", {}), ("-real", ", real lengths", {"rows": "real", "grad_accum": 4}))},
        **{f"defaults{sign}both{suffix}": Config(
            f"loraship defaults{graphs}, dequantize_once={value}, save_attention={value}{label}", "loraship",
            dataclasses.replace(levers, dequantize_once=value, save_attention=value), **extra)
           for sign, value in (("+", True), ("-", False)) if (levers.dequantize_once, levers.save_attention) != (value,) * 2
           for suffix, label, extra in (("", "", {}), ("-real", ", real lengths", {"rows": "real", "grad_accum": 4}))},
        # All three levers of session 15.
        **{f"defaults{sign}all{suffix}": Config(
            f"loraship defaults{graphs}, dequantize_once, save_attention, label_positions={value}{label}", "loraship",
            dataclasses.replace(levers, dequantize_once=value, save_attention=value, label_positions=value), **extra)
           for sign, value in (("+", True), ("-", False))
           if (levers.dequantize_once, levers.save_attention, levers.label_positions) != (value,) * 3
           for suffix, label, extra in (("", "", {}), ("-real", ", real lengths", {"rows": "real", "grad_accum": 4}))},
        # The MLP's gate and up outputs kept within a budget of MiB (session 17; 3584 holds all 32 layers of the
        # 8B at 2 x 1024; 2048, about what the host embedding's budget comes to, session 19), or not kept.
        **{f"defaults{sign}mlp{mib or ''}{suffix}": Config(
            f"loraship defaults{graphs}, saved_mlp_mib={mib}{label}", "loraship",
            dataclasses.replace(levers, saved_mlp_mib=mib), **extra)
           for sign, mib in (("+", 448), ("+", 896), ("+", 1024), ("+", 1344), ("+", 2048), ("+", 3584), ("-", 0)) if mib != levers.saved_mlp_mib
           for suffix, label, extra in (("", "", {}), ("-real", ", real lengths", {"rows": "real", "grad_accum": 4}))},
        # Session 21's defaults (the table on the GPU, 1 GiB of MLP outputs), against which session 22's were measured.
        **{f"defaults-s21{suffix}": Config(
            f"loraship defaults{graphs}, host_embedding=False, saved_mlp_mib=1024 (session 21's){label}", "loraship",
            dataclasses.replace(levers, host_embedding=False, saved_mlp_mib=1024), **extra)
           for suffix, label, extra in (("", "", {}), ("-real", ", real lengths", {"rows": "real", "grad_accum": 4}))
           if levers.saved_mlp_mib},
        # The token embedding in host memory at the defaults' MLP budget: the host reads alone, without the MLP
        # outputs its freed memory buys (the budget less the 8B's table, which model.mlp_budget_mib adds back; for
        # the 8B shape only; session 20).
        **{f"defaults+hostread{suffix}": Config(
            f"loraship defaults{graphs}, host_embedding=True at saved_mlp_mib={levers.saved_mlp_mib} in all{label}",
            "loraship", dataclasses.replace(levers, host_embedding=True,
                                            saved_mlp_mib=levers.saved_mlp_mib - EMBEDDING_8B_MIB), **extra)
           for suffix, label, extra in (("", "", {}), ("-real", ", real lengths", {"rows": "real", "grad_accum": 4}))
           if not levers.host_embedding and levers.saved_mlp_mib > EMBEDDING_8B_MIB},
    }


CONFIGS = {
    # The ladder on 2 x 1024 tokens, r8 q,k,v,o: one lever more per rung.
    "plain": Config("plain", "plain"),
    "loraship-before": Config("loraship-before", "loraship"),
    "+bf16-frozen": Config("+bf16-frozen", "loraship", SpeedLevers(bf16_frozen=True)),
    "+liger": Config("+liger", "loraship", SpeedLevers(bf16_frozen=True, liger_kernels=ALL.liger_kernels)),
    "loraship": Config("loraship (+packing)", "loraship", ALL),
    # What else could pay (not defaults unless measured to).
    "loraship-dropout0": Config("loraship, lora_dropout 0", "loraship", ALL, dropout=0.0),
    "loraship-no-gc": Config("loraship, no checkpointing", "loraship", ALL, gradient_checkpointing=False),
    "loraship-batch4": Config("loraship, batch 4x1024", "loraship", ALL, batch=4),
    # The default optimizer step, BATCH_SIZE=2 x GRAD_ACCUM=4 of 1024 tokens (loraship folds it into one micro-batch).
    "plain-accum4": Config("plain 2x1024, 4 accumulation", "plain", grad_accum=4),
    "loraship-accum4": Config("loraship 2x1024, 4 accumulation (folded 8x1)", "loraship", ALL, grad_accum=4),
    "loraship-accum4-noliger": Config("loraship 2x1024, 4 accumulation (folded), no liger", "loraship",
                                      dataclasses.replace(ALL, liger_kernels=()), grad_accum=4),
    # r16 on every linear layer, batch 4 x 1024.
    "plain-r16": Config("plain r16 all-linear b4", "plain", batch=4, lora_r=16, targets=("all-linear",)),
    "loraship-r16": Config("loraship r16 all-linear b4", "loraship", ALL, batch=4, lora_r=16, targets=("all-linear",)),
    # Long-tailed row lengths, BATCH_SIZE=2 x GRAD_ACCUM=4 per optimizer step.
    "plain-real": Config("plain, real lengths (padded 2 x 4)", "plain", rows="real", grad_accum=4),
    "loraship-real-packed": Config(
        "loraship, real lengths (packed 2 x 4)", "loraship",
        dataclasses.replace(ALL, fold_accumulation=False), rows="real", grad_accum=4),
    "loraship-real": Config("loraship, real lengths (packed, folded 8 x 1)", "loraship", ALL, rows="real", grad_accum=4),
    "loraship-real-norope": Config("loraship, real lengths (folded), liger without RoPE", "loraship",
                                   dataclasses.replace(ALL, liger_kernels=("rms_norm", "swiglu")), rows="real", grad_accum=4),
    "loraship-real-nonorm": Config("loraship, real lengths (folded), liger without RMSNorm", "loraship",
                                   dataclasses.replace(ALL, liger_kernels=("swiglu", "rope")), rows="real", grad_accum=4),
    "loraship-real-noswiglu": Config("loraship, real lengths (folded), liger without SwiGLU", "loraship",
                                     dataclasses.replace(ALL, liger_kernels=("rms_norm", "rope")), rows="real", grad_accum=4),
    "loraship-real-noliger": Config("loraship, real lengths (packed, folded), no liger", "loraship",
                                    dataclasses.replace(ALL, liger_kernels=()), rows="real", grad_accum=4),
    # Today's defaults of python -m train (DEFAULTS), on the goal's three workloads.
    **defaults_configs(DEFAULTS),
    # Per-layer compile without CUDA graphs (TORCH_COMPILE=layers; the default of sessions 11-13).
    "layers": Config("loraship, TORCH_COMPILE=layers", "loraship", LAYERS),
    "layers-real": Config("loraship, TORCH_COMPILE=layers, real lengths", "loraship", LAYERS, rows="real",
                          grad_accum=4),
    # The eager levers (TORCH_COMPILE=off), the defaults until session 10.
    "eager": Config("loraship eager (TORCH_COMPILE=off)", "loraship", EAGER),
    "eager-real": Config("loraship eager (TORCH_COMPILE=off), real lengths", "loraship", EAGER, rows="real",
                         grad_accum=4),
    # Each decoder layer compiled with CUDA graphs (TORCH_COMPILE=layers-cudagraphs); at real lengths, packed
    # rows bucketed.
    "layers-graphs": Config("loraship defaults, layers with CUDA graphs", "loraship",
                            dataclasses.replace(LAYERS, compile_mode="layers-cudagraphs")),
    "layers-graphs-real": Config("loraship defaults, layers with CUDA graphs, real lengths (bucketed)", "loraship",
                                 dataclasses.replace(LAYERS, compile_mode="layers-cudagraphs"), rows="real",
                                 grad_accum=4),
    # One lever left out of today's defaults at a time.
    "defaults-nofused": Config("loraship defaults without fused_lora", "loraship",
                               dataclasses.replace(EAGER, fused_lora=False)),
    "defaults-nostorage": Config("loraship defaults without bf16_storage", "loraship",
                                 dataclasses.replace(EAGER, bf16_storage=False)),
    "defaults+fused": Config("loraship defaults + fused_lora", "loraship", dataclasses.replace(EAGER, fused_lora=True)),
    "defaults-noliger": Config("loraship defaults without liger", "loraship",
                               dataclasses.replace(EAGER, liger_kernels=())),
    "defaults-accum4-noliger": Config("loraship defaults without liger, 2x1024 x 4 accumulation", "loraship",
                                      dataclasses.replace(EAGER, liger_kernels=()), grad_accum=4),
    "morning": Config("loraship defaults before bf16_storage + fused_lora", "loraship", MORNING),
    "morning-accum4": Config("loraship defaults before bf16_storage + fused_lora, 2x1024 x 4 accumulation", "loraship",
                             MORNING, grad_accum=4),
    # torch.compile on each decoder layer (train/speed.py compile_mode), on today's defaults.
    "defaults+compile": Config("loraship defaults + compile", "loraship", dataclasses.replace(EAGER, compile_mode="layers")),
    "defaults+compile-noliger": Config("loraship defaults + compile, no liger", "loraship",
                                       dataclasses.replace(EAGER, compile_mode="layers", liger_kernels=())),
    "defaults+compile-real-noliger": Config("loraship defaults + compile, no liger, real lengths", "loraship",
                                            dataclasses.replace(EAGER, compile_mode="layers", liger_kernels=()),
                                            rows="real", grad_accum=4),
    "defaults+graphs": Config("loraship defaults + compile with CUDA graphs", "loraship",
                              dataclasses.replace(EAGER, compile_mode="stack-cudagraphs")),
    "defaults+graphs-noliger": Config("loraship defaults + compile with CUDA graphs, no liger", "loraship",
                                      dataclasses.replace(EAGER, compile_mode="stack-cudagraphs", liger_kernels=())),
    # CUDA graphs at real lengths: packed rows padded to a few lengths (data.bucket_length), one graph each.
    "defaults+graphs-real-noliger": Config(
        "loraship defaults + compile with CUDA graphs, no liger, real lengths (bucketed)", "loraship",
        dataclasses.replace(EAGER, compile_mode="stack-cudagraphs", liger_kernels=()), rows="real", grad_accum=4),
    # Session 7, call 2, before OPTIMIZER=auto meant the fused AdamW on CUDA (now the same as defaults+graphs-noliger).
    "defaults+graphs-noliger-fusedadam": Config(
        "loraship defaults + compile with CUDA graphs, no liger, fused torch AdamW", "loraship",
        dataclasses.replace(EAGER, compile_mode="stack-cudagraphs", liger_kernels=()), optimizer="adamw_torch_fused"),
    # The defaults with the optimizer OPTIMIZER=auto meant on CUDA before the fused AdamW.
    "defaults-adam8bit": Config("loraship defaults, adamw_8bit", "loraship", EAGER, optimizer="adamw_8bit"),
    # What TORCH_COMPILE=stack plans on CUDA (TORCH_COMPILE=true until session 10): the compiled stack, liger off.
    "torch_compile": Config("loraship, TORCH_COMPILE=stack", "loraship", choose_levers(cuda=True, compile="stack")[0]),
    "defaults+stack": Config("loraship defaults + compiled decoder stack", "loraship",
                             dataclasses.replace(EAGER, compile_mode="stack")),
    "defaults+stack-noliger": Config("loraship defaults + compiled decoder stack, no liger", "loraship",
                                     dataclasses.replace(EAGER, compile_mode="stack", liger_kernels=())),
    "defaults+stack-accum4-noliger": Config(
        "loraship defaults + compiled decoder stack, no liger, 2x1024 x 4 accumulation", "loraship",
        dataclasses.replace(EAGER, compile_mode="stack", liger_kernels=()), grad_accum=4),
    "defaults+stack-real-noliger": Config("loraship defaults + compiled decoder stack, no liger, real lengths", "loraship",
                                          dataclasses.replace(EAGER, compile_mode="stack", liger_kernels=()),
                                          rows="real", grad_accum=4),
    "defaults+compile-accum4": Config("loraship defaults + compile, 2x1024 x 4 accumulation", "loraship",
                                      dataclasses.replace(EAGER, compile_mode="layers"), grad_accum=4),
    "defaults+compile-real": Config("loraship defaults + compile, real lengths", "loraship",
                                    dataclasses.replace(EAGER, compile_mode="layers"), rows="real", grad_accum=4),
}
GROUPS = {
    "ladder": ["plain", "loraship-before", "+bf16-frozen", "+liger", "loraship"],
    "extras": ["loraship-dropout0", "loraship-no-gc", "loraship-batch4"],
    "r16": ["plain-r16", "loraship-r16"],
    "real": ["plain-real", "loraship-real-packed", "loraship-real"],
    "accum": ["plain-accum4", "loraship-accum4"],
    "today": ["plain", "defaults", "plain-accum4", "defaults-accum4", "plain-real", "defaults-real"],
    "fused": ["plain", "defaults", "defaults-nofused", "defaults-nostorage", "morning", "plain-accum4", "defaults-accum4",
              "morning-accum4", "plain-real", "defaults-real"],
    "compile": ["plain", "defaults", "defaults+compile", "defaults+compile-noliger", "defaults+graphs",
                "defaults+graphs-noliger"],
    "stack": ["plain", "defaults+compile-noliger", "defaults+stack-noliger", "defaults+graphs-noliger"],
    # Where the compiled stack's memory goes (run with --memory-trace).
    "stack-memory": ["plain", "defaults+stack-noliger"],
    "stack-goals": ["plain", "defaults+stack-noliger", "plain-accum4", "defaults+stack-accum4-noliger", "plain-real",
                    "defaults+stack-real-noliger"],
}
SEQ = 1024
#: LOGGING_STEPS of loraship's runs: a log line (the loss, read back from the GPU) every step.
LOGGING_STEPS = 1
REAL_MAX = 2048
#: ``--memory-trace``: record CUDA allocations after warm-up and report what is alive at the peak (bench/cuda_memory.py).
MEMORY_TRACE = False
#: ``--phases``: also synchronize before and after the optimizer step, and record where each step's wall
#: time went (``phase_s``: logging and data before the step, forward + backward + clipping, the optimizer
#: step, the rest). The extra synchronizations cost a little speed, so tok/s with it is not comparable.
PHASES = False
#: ``--pipelined``: time the steps as a real run goes, the CPU free to queue the next step while the GPU works:
#: synchronize only at the end of warm-up and at the end of the run (each step's time is then the timed
#: steps' mean), loraship's path logs every :data:`PIPELINED_LOGGING_STEPS` steps (``python -m train``'s
#: default) and the plain loop keeps its losses on the GPU until the end.
PIPELINED = False
#: ``--recorded-real``: the timed steps of a real-length configuration take the rows of the first warm-up steps
#: again, so every packed length they run has had its CUDA graphs recorded (a long run's steady state; without it
#: some 9 s of 40 timed steps' 27-34 s on the 8B were recordings, session 22).
RECORDED_REAL = False
#: LOGGING_STEPS with ``--pipelined``: the default of ``python -m train`` (train/settings.py).
PIPELINED_LOGGING_STEPS = 10
LEARNING_RATE = 2e-3


# --------------------------------------------------------------------------
# Data: the same rows for every stack
# --------------------------------------------------------------------------


def fixed_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``seq`` tokens drawn from 64 ids: learnable, so the loss moves within a few steps."""
    rng = random.Random(seed)
    alphabet = rng.sample(range(3, vocab), 64)
    rows = []
    for _ in range(n):
        ids = [rng.choice(alphabet) for _ in range(seq)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def real_lengths(n: int, seed: int = 0) -> list[int]:
    """Long-tailed like FineTome's: most rows a few hundred tokens, a tail to ~2k (lognormal, median ~330)."""
    rng = random.Random(seed)
    return [max(32, min(REAL_MAX, int(rng.lognormvariate(5.8, 0.75)))) for _ in range(n)]


def real_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of long-tailed lengths; the first quarter of each (the prompt) is outside the loss."""
    rng = random.Random(seed)
    alphabet = rng.sample(range(3, vocab), 64)
    rows = []
    for length in real_lengths(n, seed):
        ids = [rng.choice(alphabet) for _ in range(length)]
        prompt = length // 4
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def rows_for(config: Config, steps: int, vocab: int, seq: int, timed: int = 0) -> list[dict]:
    """The rows of ``steps`` optimizer steps; with :data:`RECORDED_REAL`, the last ``timed`` steps of real lengths
    repeat the first ``timed`` steps' rows (the warm-up's)."""
    if config.rows == "real":
        per_step = config.batch * config.grad_accum
        if RECORDED_REAL:
            warmup = real_rows((steps - timed) * per_step, vocab)
            return warmup + warmup[:timed * per_step]
        return real_rows(steps * per_step, vocab)
    # Fixed rows: the same batch every step (identical batches for every stack, and learnable).
    return fixed_rows(config.batch * config.grad_accum, seq, vocab)


def padded(rows: list[dict], pad_id: int, device) -> dict:
    """The plain stack's batch: right-padded to the longest row, with an attention mask."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def build_base(shape: str, folder: Path, device: str) -> Path:
    """Random-init bf16 weights of ``shape``, saved once (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    free_memory()
    return folder


def stub_tokenizer():
    """A two-token tokenizer: the trainer needs a processing class with a pad id, nothing else."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LlamaModuleState:
    """liger-kernel replaces names in transformers' Llama module (RoPE, RMSNorm, MLP classes); put them back
    after each configuration so that the next one (the plain stack included) loads the stock model."""

    NAMES = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")

    def __enter__(self):
        from transformers.models.llama import modeling_llama

        self.module = modeling_llama
        self.saved = {name: getattr(modeling_llama, name) for name in self.NAMES}
        self.forward = modeling_llama.LlamaForCausalLM.forward
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)
        self.module.LlamaForCausalLM.forward = self.forward
        return False


# --------------------------------------------------------------------------
# The two stacks
# --------------------------------------------------------------------------


def run_plain(config: Config, base: Path, rows: list[dict], steps: int, device: str, warmup: int = 0) -> dict:
    """The seeds' stack by hand (what a notebook or the seeds' scripts do)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = {"dtype": dtype}
    if cuda:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    model.config.use_cache = False
    if cuda:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    targets = "all-linear" if config.targets == ("all-linear",) else list(config.targets)
    model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=config.dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)
    per_step = config.batch * config.grad_accum
    step_rows = [[rows[(s * per_step + m * config.batch) % len(rows):][: config.batch]
                  for m in range(config.grad_accum)] for s in range(steps)]
    batches = [[padded(micro, 0, device) for micro in step] for step in step_rows]
    # Counted on the CPU from the rows: reading them off the GPU tensors would make the CPU wait every step.
    # The loss is a mean over the optimizer step's label tokens, as transformers' Trainer computes it.
    step_items = [sum(sum(label != -100 for label in r["labels"][1:]) for micro in step for r in micro)
                  for step in step_rows]
    step_tokens = [sum(len(r["input_ids"]) for micro in step for r in micro) for step in step_rows]
    train_peak = reset_peak(device)
    steady_peak, first_peak = train_peak, None
    times, losses = [], []
    clock = PipelinedClock(device, warmup, steps) if PIPELINED else None
    for step in range(steps):
        if step == warmup:
            first_peak, steady_peak = train_peak(), reset_peak(device)
            if MEMORY_TRACE and cuda:
                cuda_memory.start()
        if clock is None:
            sync(device)
            start = time.perf_counter()
        else:
            clock.begin()
        micro = batches[step]
        items = step_items[step]
        total = 0.0
        for batch in micro:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch, num_items_in_batch=items).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if clock is None:
            losses.append(float(total))
            sync(device)
            times.append(time.perf_counter() - start)
        else:
            losses.append(total)  # a GPU tensor, read after the last step
            clock.end()
    memory = cuda_memory.summary() if MEMORY_TRACE and cuda else None
    del model, optimizer, batches
    result = {"times": times, "tokens": step_tokens, "losses": [float(loss) for loss in losses],
              **peaks(first_peak, steady_peak()), "memory_at_peak": memory}
    if clock is not None:
        # The Trainer logs the mean loss of the steps since its last log line: the same windows here.
        result.update(times=clock.times, step_losses=result["losses"],
                      losses=window_means(result["losses"], PIPELINED_LOGGING_STEPS))
    return result


def window_means(values: list[float], size: int) -> list[float]:
    """The mean of each ``size`` consecutive values (what the Trainer logs every ``size`` steps); a last,
    shorter window is left out, as the Trainer logs only on multiples of LOGGING_STEPS."""
    return [sum(values[i:i + size]) / size for i in range(0, len(values) - size + 1, size)]


class PipelinedClock:
    """``--pipelined``: the time of the warm-up steps and of the timed steps, synchronizing only at the end
    of each; every step of a phase gets the phase's mean."""

    def __init__(self, device: str, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.done, self.start, self.times = 0, None, []

    def begin(self) -> None:
        if self.start is None:
            sync(self.device)
            self.start = time.perf_counter()

    def end(self) -> None:
        self.done += 1
        if self.done in (self.warmup, self.steps):
            sync(self.device)
            now = time.perf_counter()
            n = self.done - len(self.times)
            self.times += [(now - self.start) / n] * n
            self.start = now


def peaks(warmup_peak, steady_peak) -> dict:
    """The whole run's peak and the peak after warm-up (a compiled stack's first steps include compiling)."""
    if steady_peak is None:
        return {"train_peak_gib": None, "steady_peak_gib": None}
    return {"train_peak_gib": max(warmup_peak or 0.0, steady_peak), "steady_peak_gib": steady_peak}


def run_loraship(config: Config, base: Path, rows: list[dict], steps: int, device: str, workdir: Path,
                 warmup: int = 0, callbacks: tuple = ()) -> dict:
    """``python -m train``'s own functions, the plan's levers set by ``config``; ``callbacks`` join the Trainer's
    after the step clock (the profiler's stepper, the sync watch: bench/train_profile.py, bench/sync_points.py)."""
    import torch
    from transformers import set_seed

    from train import data, model, run
    from train.settings import TrainSettings

    cuda = device == "cuda"
    settings = TrainSettings(
        _env_file=None, base_model=str(base), output_dir=str(workdir), batch_size=config.batch,
        grad_accum=config.grad_accum, max_seq_length=REAL_MAX if config.rows == "real" else SEQ,
        lora_r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=config.dropout,
        lora_target_modules=list(config.targets), gradient_checkpointing=config.gradient_checkpointing,
        learning_rate=LEARNING_RATE, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=steps, logging_steps=PIPELINED_LOGGING_STEPS if PIPELINED else LOGGING_STEPS,
        save_steps=10_000, eval_fraction=0.0, seed=0,
        **({"optimizer": config.optimizer} if config.optimizer else {}),
    )
    plan = dataclasses.replace(model.plan_for(settings, cuda=cuda), levers=config.levers)
    set_seed(settings.seed)
    base_model = model.load_base_model(str(base), plan, gradient_checkpointing=config.gradient_checkpointing, echo=print)
    torch.manual_seed(0)
    peft_model = model.add_lora(base_model, settings, config.levers)
    examples = [data.Example(r["input_ids"], r["labels"], f"row {i}") for i, r in enumerate(rows)]
    clock = StepClock(device, warmup)
    trainer = run.build_trainer(settings, plan, peft_model, stub_tokenizer(), examples, [], workdir / "checkpoints",
                                print, callbacks=[clock, *callbacks])
    # Rows in their given order, so each optimizer step holds the same rows as the plain stack's.
    trainer.args.train_sampling_strategy = "sequential"
    micro_losses = keep_micro_batch_losses(trainer) if PIPELINED else None
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    rows_per_micro_batch, micro_batches_per_step = run.micro_batching(settings, plan)
    result = {"times": clock.times, "tokens": clock.tokens(trainer), "losses": losses, "phase_s": clock.phases,
              **({"step_losses": step_sums(micro_losses, micro_batches_per_step)} if micro_losses else {}),
              "micro_batching": [rows_per_micro_batch, micro_batches_per_step],
              **peaks(clock.warmup_peak, clock.train_peak()), "memory_at_peak": clock.memory}
    trainer.accelerator.free_memory()
    del trainer, peft_model, base_model
    return result


def keep_micro_batch_losses(trainer) -> list:
    """Keep each micro-batch's loss, as the Trainer's ``training_step`` returns it, on the GPU (read after the run:
    no synchronization per step), so a pipelined run's per-step losses can be compared with another run's."""
    kept, step = [], trainer.training_step

    def training_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        kept.append(loss.detach().clone())
        return loss

    trainer.training_step = training_step
    return kept


def step_sums(micro_losses: list, per_step: int) -> list[float]:
    """The optimizer steps' losses from their micro-batches' (:func:`keep_micro_batch_losses`): the Trainer's
    logged loss is their sum over a step's ``per_step`` accumulated micro-batches."""
    import torch

    values = torch.stack(micro_losses).float().tolist()
    return [sum(values[i:i + per_step]) for i in range(0, len(values), per_step)]


class StepClock:
    """Wall time between consecutive optimizer steps (CUDA-synchronized), and tokens seen at each."""

    def __new__(cls, device, warmup: int = 0):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.device, self.times, self.seen, self.last = device, [], [], None
                self.train_peak = lambda: None
                self.warmup_peak = self.memory = None
                self.phases, self.marks = [], {}

            def mark(self, name):
                if PHASES:
                    sync(self.device)
                    self.marks[name] = time.perf_counter()

            def on_train_begin(self, args, state, control, **kwargs):
                self.train_peak = reset_peak(self.device)
                self.pipelined = PipelinedClock(self.device, warmup, state.max_steps)
                if PIPELINED:
                    self.times = self.pipelined.times  # the same list, filled at each phase's end

            def on_step_begin(self, args, state, control, **kwargs):
                if PIPELINED:
                    self.pipelined.begin()
                    return
                if self.last is None:
                    sync(self.device)
                    self.last = time.perf_counter()
                self.mark("begin")

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.mark("pre_optimizer")

            def on_optimizer_step(self, args, state, control, **kwargs):
                self.mark("optimizer")

            def on_step_end(self, args, state, control, **kwargs):
                self.seen.append(int(state.num_input_tokens_seen))
                if PIPELINED:
                    self.pipelined.end()
                    if len(self.seen) == warmup:
                        self.warmup_peak, self.train_peak = self.train_peak(), reset_peak(self.device)
                    return
                sync(self.device)
                now = time.perf_counter()
                if PHASES and len(self.marks) == 3:
                    m = self.marks
                    self.phases.append({"before_step": round(m["begin"] - self.last, 4),
                                        "forward_backward_clip": round(m["pre_optimizer"] - m["begin"], 4),
                                        "optimizer": round(m["optimizer"] - m["pre_optimizer"], 4),
                                        "after_optimizer": round(now - m["optimizer"], 4)})
                    self.marks = {}
                self.times.append(now - self.last)
                self.last = now
                if len(self.times) == warmup:  # the peak so far includes compiling; measure the steady state apart
                    self.warmup_peak, self.train_peak = self.train_peak(), reset_peak(self.device)
                    if MEMORY_TRACE and self.device == "cuda":
                        cuda_memory.start()

            def on_train_end(self, args, state, control, **kwargs):
                if MEMORY_TRACE and self.device == "cuda":
                    self.memory = cuda_memory.summary()

            def tokens(self, trainer):
                return [b - a for a, b in zip([0, *self.seen[:-1]], self.seen)]

        return _Clock()


def reset_peak(device: str):
    """Reset the peak-memory counter now (model loaded, training about to start); returns its reader (GiB)."""
    import torch

    if device != "cuda":
        return lambda: None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    return lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------
# Measure, tabulate
# --------------------------------------------------------------------------


def measure(shape: str, key: str, base: Path, warmup: int, timed: int, device: str, seq: int) -> dict:
    import torch

    config = CONFIGS[key]
    steps = warmup + timed
    rows = rows_for(config, steps, SHAPES[shape]["vocab_size"], seq, timed)
    free_memory()
    leftover = 0.0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        # What earlier configurations of this process left allocated: not this one's, so not in its peak.
        leftover = round(torch.cuda.memory_allocated() / 2**30, 2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, LlamaModuleState():
        if config.stack == "plain":
            raw = run_plain(config, base, rows, steps, device, warmup)
        else:
            raw = run_loraship(config, base, rows, steps, device, Path(tmp), warmup)
        free_memory()
    # What the allocator held, not only what tensors used: a CUDA graph's replays allocate nothing, so
    # max_memory_allocated misses the memory pool its recording reserved; max_memory_reserved does not.
    reserved = round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None
    wall = time.perf_counter() - started
    times, tokens = raw["times"][warmup:], raw["tokens"][warmup:]
    if config.rows == "real":
        tok_s = sum(tokens) / sum(times)
    else:
        tok_s = statistics.median(t / s for t, s in zip(tokens, times))
    return {
        "shape": shape, "config": key, "name": config.name, "stack": config.stack, "levers": config.levers.names(),
        "rows": config.rows, "batch": config.batch, "grad_accum": config.grad_accum, "seq": seq if config.rows == "fixed" else None,
        "lora_r": config.lora_r, "targets": list(config.targets), "lora_dropout": config.dropout,
        "gradient_checkpointing": config.gradient_checkpointing, "micro_batching": raw.get("micro_batching"),
        "tokens_per_s": round(tok_s, 1), "step_s": [round(t, 4) for t in raw["times"]], "tokens_per_step": raw["tokens"],
        "timed_tokens": sum(tokens),
        "train_peak_gib": None if raw["train_peak_gib"] is None else round(raw["train_peak_gib"] - leftover, 2),
        "steady_peak_gib": None if raw["steady_peak_gib"] is None else round(raw["steady_peak_gib"] - leftover, 2),
        "leftover_gib": leftover, "train_peak_raw_gib": raw["train_peak_gib"], "reserved_peak_gib": reserved,

        "loss_first": round(raw["losses"][0], 4), "loss_last": round(raw["losses"][-1], 4), "losses": raw["losses"],
        "steps": steps, "warmup": warmup, "wall_s": round(wall, 1), "memory_at_peak": raw.get("memory_at_peak"),
        "pid": os.getpid(), "pipelined": PIPELINED,
        **({"step_losses": raw["step_losses"]} if raw.get("step_losses") else {}),
        **({"phase_s": raw["phase_s"], "phase_median_s": phase_medians(raw["phase_s"][warmup:])} if raw.get("phase_s") else {}),
    }


def phase_medians(phases: list[dict]) -> dict:
    """The median of each phase over the timed steps (``--phases``)."""
    return {name: round(statistics.median(p[name] for p in phases), 4) for name in phases[0]} if phases else {}


#: Steps where the plain stack's loss is below this (nats) are left out of :func:`median_loss_gap`.
MEMORIZED_LOSS = 1.0


def median_loss_gap(losses: list[float], plain_losses: list[float]) -> float:
    """The median over the steps both ran of ``(loss - plain) / plain``: parity that one loss spike, in
    either run, does not decide (at the bench's constant learning rate a spike can come at any step).

    Steps where the plain stack's loss is under :data:`MEMORIZED_LOSS` are left out: by step ~20 the
    2x1024 runs have learnt their few rows by heart (loss ~0.007), and a relative gap between two such
    losses is rounding, not parity (session 10: +3.13% that way for a run within 0.1% before it).
    """
    gaps = [(mine - theirs) / theirs for mine, theirs in zip(losses, plain_losses) if theirs >= MEMORIZED_LOSS]
    return statistics.median(gaps) if gaps else float("nan")


def table(results: list[dict]) -> str:
    lines = ["| shape | config | batch | tok/s | × plain | train peak GiB | × plain | after warm-up GiB | × plain "
             "| loss first → last | last vs plain | median step vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = {}
    for r in results:
        if r["stack"] == "plain":
            plain[(r["shape"], r["rows"], r["lora_r"], r["grad_accum"])] = r
    for r in results:
        p = plain.get((r["shape"], r["rows"], r["lora_r"], r["grad_accum"]))
        speed = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}" if p else "-"
        mem = f"{r['train_peak_gib'] / p['train_peak_gib']:.2f}" if p and r["train_peak_gib"] and p["train_peak_gib"] else "-"
        steady = r.get("steady_peak_gib")
        steady_ratio = f"{steady / p['steady_peak_gib']:.2f}" if p and steady and p.get("steady_peak_gib") else "-"
        loss = f"{(r['loss_last'] - p['loss_last']) / p['loss_last']:+.2%}" if p else "-"
        gap = median_loss_gap(r["losses"], p["losses"]) if p else float("nan")
        gap = "-" if math.isnan(gap) else f"{gap:+.2%}"
        batch = f"{r['batch']}x{r['seq']}" if r["rows"] == "fixed" else f"{r['batch']} rows"
        batch += f" x{r['grad_accum']} acc" if r["grad_accum"] > 1 else ""
        lines.append(f"| {r['shape']} | {r['name']} | {batch} | {r['tokens_per_s']:,.0f} | {speed} | {r['train_peak_gib']} | {mem} "
                     f"| {steady} | {steady_ratio} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | {loss} | {gap} |")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel", "triton", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def measure_in_child(shape: str, key: str, workdir: Path, argv: list[str]) -> dict:
    """:func:`measure` of one configuration in a fresh process of this script (``--isolate``); its result."""
    keep, skip = [], False
    for arg in argv:  # this run's flags, less what the child is given apart
        if skip:
            skip = False
        elif arg in ("--configs", "--shapes", "--out", "--workdir"):
            skip = True
        elif arg != "--isolate" and not arg.startswith(("--configs=", "--shapes=", "--out=", "--workdir=")):
            keep.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        command = [sys.executable, str(Path(__file__).resolve()), *keep, "--shapes", shape, "--configs", key,
                   "--workdir", str(workdir), "--out", str(out)]
        done = subprocess.run(command)
        results = json.loads(out.read_text())["results"] if out.is_file() else []
    if not results:
        raise RuntimeError(f"the process measuring {shape}:{key} ended with exit code {done.returncode} and no result")
    return results[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--configs", default="ladder,r16,real",
                        help=f"comma-separated groups ({', '.join(GROUPS)}) or configs ({', '.join(CONFIGS)}); "
                        "SHAPE:CONFIG limits one to a shape")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where the random-init bases are saved (default: a temp dir)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny shape, float32, no bitsandbytes")
    parser.add_argument("--memory-trace", action="store_true",
                        help="CUDA: record allocations after warm-up; the JSON gets what is alive at the peak, by source line")
    parser.add_argument("--phases", action="store_true",
                        help="loraship's path: time each step's forward+backward, optimizer step and the rest apart "
                        "(extra synchronizations: tok/s not comparable)")
    parser.add_argument("--pipelined", action="store_true",
                        help="time the steps as a real run goes: synchronize only at the end of warm-up and of the run "
                        f"(step times are means), loraship logs every {PIPELINED_LOGGING_STEPS} steps (train's default), "
                        "the plain loop reads its losses at the end")
    parser.add_argument("--symbolic-graph-lengths", action="store_true",
                        help="per-layer CUDA graphs with a symbolic packed length even where this torch cannot "
                        "(before 2.13: bench/symbolic_graph_lengths.py works around its partitioner)")
    parser.add_argument("--isolate", action="store_true",
                        help="measure each configuration in a process of its own (nothing one leaves behind, "
                        "a patched module, a compiled graph, an allocator's cache, reaches the next)")
    parser.add_argument("--recorded-real", action="store_true",
                        help="real lengths: the timed steps repeat the first warm-up steps' rows, so their packed "
                        "lengths' CUDA graphs are recorded (a long run's steady state); needs --timed <= --warmup")
    args = parser.parse_args(argv)
    global MEMORY_TRACE, PHASES, PIPELINED, RECORDED_REAL
    MEMORY_TRACE = args.memory_trace
    PHASES = args.phases
    PIPELINED = args.pipelined
    RECORDED_REAL = args.recorded_real
    if RECORDED_REAL and args.timed > args.warmup:
        parser.error(f"--recorded-real repeats warm-up rows: --timed ({args.timed}) must not exceed --warmup "
                     f"({args.warmup})")
    if PIPELINED and (PHASES or MEMORY_TRACE):
        parser.error("--pipelined times whole phases of the run: it cannot time inside a step (--phases) "
                     "or record allocations from the warm-up's end (--memory-trace)")

    import torch

    if args.symbolic_graph_lengths:
        plan_symbolic_graph_lengths()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    seq = 64 if args.tiny else SEQ
    wanted = []
    for item in args.configs.split(","):
        only, _, item = item.rpartition(":")
        for key in GROUPS.get(item, [item]):
            if key not in CONFIGS:
                parser.error(f"unknown config {key!r}")
            wanted.append((only or None, key))
    if device == "cpu":
        # No Triton on a CPU: the fused kernels are a GPU-only lever.
        for key, config in list(CONFIGS.items()):
            CONFIGS[key] = dataclasses.replace(config, levers=dataclasses.replace(config.levers, liger_kernels=()))
    if args.workdir:
        return run_configs(args, argv, wanted, shapes, device, seq, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:  # no --workdir: nothing left behind
        return run_configs(args, argv, wanted, shapes, device, seq, Path(tmp))


def run_configs(args, argv, wanted, shapes, device, seq, workdir: Path) -> int:
    """Build each shape's base in ``workdir``, measure the configurations ``wanted`` and print and write the report."""
    import torch

    report = {"machine": {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                          "versions": versions()},
              "settings": {"warmup": args.warmup, "timed": args.timed, "seq": seq, "learning_rate": LEARNING_RATE,
                           "pipelined": PIPELINED, "recorded_real": RECORDED_REAL,
                           "logging_steps": PIPELINED_LOGGING_STEPS if PIPELINED else LOGGING_STEPS,
                           "real_lengths_first_40": real_lengths(40)},
              "results": [], "base_build_s": {}}
    print(json.dumps(report["machine"]), flush=True)
    results = report["results"]
    for shape in shapes:
        keys = [key for only, key in wanted if only in (None, shape)]
        if not keys:
            continue
        started = time.perf_counter()
        base = build_base(shape, workdir / shape, device)
        report["base_build_s"][shape] = round(time.perf_counter() - started, 1)
        print(f"{shape}: base built in {report['base_build_s'][shape]} s", flush=True)
        for key in keys:
            try:
                if args.isolate:
                    result = measure_in_child(shape, key, workdir, argv if argv is not None else sys.argv[1:])
                else:
                    result = measure(shape, key, base, args.warmup, args.timed, device, seq)
            except Exception as err:  # one failing configuration must not lose the others' numbers
                import traceback

                traceback.print_exc()
                result = {"shape": shape, "config": key, "error": f"{type(err).__name__}: {err}"[:2000]}
                free_memory()
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "step_s", "tokens_per_step")}),
                  flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=1))
    print(table([r for r in results if "error" not in r]))
    for r in results:
        if "error" in r:
            print(f"FAILED {r['shape']} {r['config']}: {r['error'][:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
