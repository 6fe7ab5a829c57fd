"""Training speed on one GPU: ``python -m train``'s path against the plain transformers + peft + bitsandbytes stack.

Long because it holds both stacks, both timing methods and the child-process mode that keeps each run apart.

Every configuration loads the same random-init base 4-bit (NF4, double quant, bf16 compute) and trains a LoRA of
r8 on q,k,v,o (dropout 0.05, LR 2e-3 constant) over the same rows:

- ``plain``: the seeds' stack by hand: ``prepare_model_for_kbit_training`` (gradient checkpointing), LoRA,
  bf16 autocast, torch AdamW, the model's own loss;
- ``loraship``: what ``python -m train`` plans on this machine and runs (``model.plan_for``,
  ``model.load_for_training``, ``run.build_trainer``); ``--set KEY=VALUE`` changes a train setting;
- ``-real``: rows of long-tailed lengths, BATCH_SIZE 2 x GRAD_ACCUM 4; without it, 2 x 1024 tokens a step.

Per configuration: tokens/s (the median over the timed steps, each CUDA-synchronized; at real lengths their tokens
over their time), peak GPU memory over the run and after the warm-up, and the logged losses. Prints a table and
writes JSON (``--out``).

    python bench/train_throughput.py --shapes llama-3-8b --configs plain,loraship --isolate --out speed.json
    python bench/train_throughput.py --shapes llama-3-8b --configs plain-real,loraship-real --isolate \\
        --warmup 40 --timed 40 --recorded-real --out speed-real.json
    python bench/train_throughput.py --configs loraship --set TORCH_COMPILE=layers --workdir /tmp/bases
    python bench/train_throughput.py --tiny          # CPU smoke test: a tiny Llama, float32, no bitsandbytes
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

from bench.common import markdown_table, median_loss_gap, versions  # noqa: E402
from bench.random_llama import SHAPES, build_llama_on_device  # noqa: E402

#: The workload both stacks train.
BATCH = 2
REAL_GRAD_ACCUM = 4
LORA_R = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_DROPOUT = 0.05
LEARNING_RATE = 2e-3
SEQ = 1024
REAL_MAX = 2048
#: LOGGING_STEPS of loraship's runs: a loss every step; with ``--pipelined`` python -m train's default.
LOGGING_STEPS = 1
PIPELINED_LOGGING_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Config:
    stack: str  # "plain" | "loraship"
    rows: str  # "fixed": the same BATCH x SEQ tokens every step; "real": long-tailed lengths

    @property
    def grad_accum(self) -> int:
        return REAL_GRAD_ACCUM if self.rows == "real" else 1


CONFIGS = {"plain": Config("plain", "fixed"), "loraship": Config("loraship", "fixed"),
           "plain-real": Config("plain", "real"), "loraship-real": Config("loraship", "real")}


@dataclasses.dataclass(frozen=True)
class Options:
    """How the configurations are measured (the command line's flags)."""

    device: str = "cuda"
    warmup: int = 2
    timed: int = 8
    #: No synchronization inside the run but at the warm-up's end and the last step's: each step's time is then
    #: its phase's mean, as a real run goes with the CPU queueing ahead of the GPU; loraship logs every
    #: :data:`PIPELINED_LOGGING_STEPS` steps.
    pipelined: bool = False
    #: At real lengths the timed steps repeat the warm-up's first rows, so every packed length they run has
    #: recorded its CUDA graphs: a long run's steady state.
    recorded_real: bool = False
    tiny: bool = False
    #: Train settings changed for loraship's runs (``--set``), by environment variable name.
    settings: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def seq(self) -> int:
        return 64 if self.tiny else SEQ

    @property
    def logging_steps(self) -> int:
        return PIPELINED_LOGGING_STEPS if self.pipelined else LOGGING_STEPS

    def flags(self) -> list[str]:
        """These options as command-line flags (what ``--isolate`` gives each process it starts)."""
        flags = ["--warmup", str(self.warmup), "--timed", str(self.timed)]
        for name in ("pipelined", "recorded_real", "tiny"):
            if getattr(self, name):
                flags.append("--" + name.replace("_", "-"))
        for key, value in self.settings.items():
            flags += ["--set", f"{key}={value}"]
        return flags


# --------------------------------------------------------------------------
# The rows: the same for both stacks
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


def rows_for(config: Config, steps: int, vocab: int, options: Options) -> list[dict]:
    """The rows of ``steps`` optimizer steps; with ``options.recorded_real`` the timed steps at real lengths repeat
    the first warm-up steps' rows."""
    if config.rows == "real":
        per_step = BATCH * config.grad_accum
        if options.recorded_real:
            warmup = real_rows((steps - options.timed) * per_step, vocab)
            return warmup + warmup[:options.timed * per_step]
        return real_rows(steps * per_step, vocab)
    return fixed_rows(BATCH * config.grad_accum, options.seq, vocab)  # the same batch every step: learnable


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


def stub_tokenizer():
    """A three-token tokenizer: the trainer needs a processing class with a pad id, nothing else."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# --------------------------------------------------------------------------
# Clocks and memory
# --------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def waits(options: Options, steps: int):
    """When a step clock waits for the GPU before reading the time (called with the steps done): at every step, or
    with ``--pipelined`` only at the run's start, the warm-up's end and the last step."""
    if not options.pipelined:
        return lambda done: sync(options.device)
    phase_ends = {0, options.warmup, steps}
    return lambda done: sync(options.device) if done in phase_ends else None


def phase_means(times: list[float], warmup: int) -> list[float]:
    """``--pipelined``: each step's time is its phase's mean (the warm-up, the timed steps): only their ends waited
    for the GPU, so only the phases' totals are the GPU's."""
    phases = [times[:warmup], times[warmup:]]
    return [sum(phase) / len(phase) for phase in phases for _ in phase]


def reset_peak(device: str):
    """Reset the peak-memory counter now; returns its reader (GiB, None on a CPU)."""
    import torch

    if device != "cuda":
        return lambda: None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    return lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2)


def peaks(warmup_peak, steady_peak) -> dict:
    """The whole run's peak and the peak after warm-up (a compiled model's first steps include compiling)."""
    if steady_peak is None:
        return {"train_peak_gib": None, "steady_peak_gib": None}
    return {"train_peak_gib": max(warmup_peak or 0.0, steady_peak), "steady_peak_gib": steady_peak}


def peak_memory_callback(device: str, warmup: int):
    """A Trainer callback that reads the peak GPU memory of the warm-up, then of the steps after it."""
    from transformers import TrainerCallback

    class PeakMemory(TrainerCallback):
        def __init__(self):
            self.warmup_peak, self.read = None, lambda: None

        def on_train_begin(self, args, state, control, **kwargs):
            self.read = reset_peak(device)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.warmup_peak, self.read = self.read(), reset_peak(device)

    return PeakMemory()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LlamaModuleState:
    """liger-kernel replaces names in transformers' Llama module (RoPE, RMSNorm, MLP classes; loraship with
    TORCH_COMPILE=off); put them back after each configuration, so the next one loads the stock model."""

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


def run_plain(config: Config, base: Path, rows: list[dict], steps: int, options: Options) -> dict:
    """The seeds' stack by hand (what a notebook or the seeds' scripts do)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device, warmup = options.device, options.warmup
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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=LORA_DROPOUT,
                                             target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)
    per_step = BATCH * config.grad_accum
    step_rows = [[rows[(s * per_step + m * BATCH) % len(rows):][:BATCH] for m in range(config.grad_accum)]
                 for s in range(steps)]
    batches = [[padded(micro, 0, device) for micro in step] for step in step_rows]
    # Counted on the CPU from the rows: reading them off the GPU tensors would make the CPU wait every step.
    # The loss is a mean over the optimizer step's label tokens, as transformers' Trainer computes it.
    step_items = [sum(sum(label != -100 for label in r["labels"][1:]) for micro in step for r in micro)
                  for step in step_rows]
    step_tokens = [sum(len(r["input_ids"]) for micro in step for r in micro) for step in step_rows]
    wait = waits(options, steps)
    train_peak = reset_peak(device)
    steady_peak, first_peak = train_peak, None
    times, losses = [], []
    for step in range(steps):
        if step == warmup:
            first_peak, steady_peak = train_peak(), reset_peak(device)
        if step == 0 or not options.pipelined:  # pipelined: each step's time runs from the last one's end
            wait(step)
            start = time.perf_counter()
        total = 0.0
        for batch in batches[step]:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch, num_items_in_batch=step_items[step]).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total if options.pipelined else float(total))  # pipelined: read after the last step
        wait(step + 1)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    del model, optimizer, batches
    result = {"times": times, "tokens": step_tokens, "losses": [float(loss) for loss in losses], "levers": [],
              **peaks(first_peak, steady_peak())}
    if options.pipelined:
        # The Trainer logs the mean loss of the steps since its last log line: the same windows here.
        result.update(times=phase_means(times, warmup), step_losses=result["losses"],
                      losses=window_means(result["losses"], PIPELINED_LOGGING_STEPS))
    return result


def window_means(values: list[float], size: int) -> list[float]:
    """The mean of each ``size`` consecutive values (what the Trainer logs every ``size`` steps); a last,
    shorter window is left out, as the Trainer logs only on multiples of LOGGING_STEPS."""
    return [sum(values[i:i + size]) / size for i in range(0, len(values) - size + 1, size)]


def workload_settings(config: Config, base: Path, workdir: Path, steps: int, options: Options) -> dict:
    """The train settings that make loraship's run the plain stack's workload, timed without interruption."""
    return {"base_model": str(base), "output_dir": str(workdir), "batch_size": BATCH, "grad_accum": config.grad_accum,
            "max_seq_length": REAL_MAX if config.rows == "real" else options.seq, "lora_r": LORA_R,
            "lora_alpha": 2 * LORA_R, "lora_dropout": LORA_DROPOUT, "lora_target_modules": list(TARGETS),
            "gradient_checkpointing": True, "learning_rate": LEARNING_RATE, "lr_scheduler": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "max_steps": steps,
            "logging_steps": options.logging_steps, "save_steps": 10_000, "eval_fraction": 0.0, "seed": 0}


def train_settings(values: dict):
    """TrainSettings of ``values`` and the defaults alone: nothing from the environment or a .env file, so that a
    run is what its JSON says. Raises pydantic's ValidationError."""
    from train.settings import TrainSettings

    class GivenSettings(TrainSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **environment_and_files):
            return (init_settings,)

    return GivenSettings(**values)


def cuda_levers_on_a_cpu(settings):
    """``--tiny``: the levers the settings get on a CUDA GPU (inductor compiles for a CPU too), less liger-kernel's
    Triton kernels, so the CPU runs loraship's GPU path."""
    from train import speed

    supported, speed.compile_supported = speed.compile_supported, lambda: True
    try:
        levers, _ = speed.plan(settings, cuda=True)
    finally:
        speed.compile_supported = supported
    return dataclasses.replace(levers, liger_kernels=())


def run_loraship(config: Config, base: Path, rows: list[dict], steps: int, workdir: Path, options: Options,
                 callbacks: tuple = ()) -> dict:
    """``python -m train``'s own functions on the plan for this machine; ``callbacks`` join the Trainer's after the
    step clock (bench/diagnostics/ uses them)."""
    from transformers import set_seed

    from train import data, model, run
    from train.throughput import StepClock

    cuda = options.device == "cuda"
    settings = train_settings({**workload_settings(config, base, workdir, steps, options),
                               **{key.lower(): value for key, value in options.settings.items()}})
    plan = model.plan_for(settings, cuda=cuda)
    if not cuda:
        plan = dataclasses.replace(plan, levers=cuda_levers_on_a_cpu(settings))
    # Seeds torch as the plain stack does before adding its LoRA: loading the base draws no random numbers, so
    # both adapters start alike.
    set_seed(settings.seed)
    peft_model = model.load_for_training(str(base), plan, settings, echo=print)
    examples = [data.Example(r["input_ids"], r["labels"], f"row {i}") for i, r in enumerate(rows)]
    clock, memory = StepClock(wait=waits(options, steps)), peak_memory_callback(options.device, options.warmup)
    trainer = run.build_trainer(settings, plan, peft_model, stub_tokenizer(), examples, [], workdir / "checkpoints",
                                print, callbacks=[clock, memory, *callbacks])
    # Rows in their given order, so each optimizer step holds the same rows as the plain stack's.
    trainer.args.train_sampling_strategy = "sequential"
    micro_losses = keep_micro_batch_losses(trainer) if options.pipelined else None
    trainer.train()
    times = [seconds for _, seconds, _ in clock.steps]
    rows_per_micro_batch, micro_batches_per_step = run.micro_batching(settings, plan)
    result = {"times": phase_means(times, options.warmup) if options.pipelined else times,
              "tokens": [tokens for _, _, tokens in clock.steps],
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "levers": plan.levers.names(), "micro_batching": [rows_per_micro_batch, micro_batches_per_step],
              **({"step_losses": step_sums(micro_losses, micro_batches_per_step)} if micro_losses else {}),
              **peaks(memory.warmup_peak, memory.read())}
    trainer.accelerator.free_memory()
    del trainer, peft_model
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


# --------------------------------------------------------------------------
# Measure, tabulate
# --------------------------------------------------------------------------


def config_name(key: str, options: Options) -> str:
    config = CONFIGS[key]
    changed = [f"{name}={value}" for name, value in options.settings.items()] if config.stack == "loraship" else []
    return ", ".join([config.stack, *changed, *(["real lengths"] if config.rows == "real" else [])])


def measure(shape: str, key: str, base: Path, options: Options) -> dict:
    import torch

    config = CONFIGS[key]
    cuda = options.device == "cuda"
    steps = options.warmup + options.timed
    rows = rows_for(config, steps, SHAPES[shape]["vocab_size"], options)
    free_memory()
    leftover = 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        # What earlier configurations of this process left allocated: not this one's, so not in its peak.
        leftover = round(torch.cuda.memory_allocated() / 2**30, 2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, LlamaModuleState():
        if config.stack == "plain":
            raw = run_plain(config, base, rows, steps, options)
        else:
            raw = run_loraship(config, base, rows, steps, Path(tmp), options)
        free_memory()
    # What the allocator held, not only what tensors used: a CUDA graph's replays allocate nothing, so
    # max_memory_allocated misses the memory pool its recording reserved; max_memory_reserved does not.
    reserved = round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None
    wall = time.perf_counter() - started
    times, tokens = raw["times"][options.warmup:], raw["tokens"][options.warmup:]
    if config.rows == "real":
        tok_s = sum(tokens) / sum(times)
    else:
        tok_s = statistics.median(t / s for t, s in zip(tokens, times))
    fixed = config.rows == "fixed"
    return {
        "shape": shape, "config": key, "name": config_name(key, options), "stack": config.stack,
        "train_settings": options.settings if config.stack == "loraship" else {}, "levers": raw["levers"],
        "rows": config.rows, "batch": BATCH, "grad_accum": config.grad_accum, "seq": options.seq if fixed else None,
        "lora_r": LORA_R, "targets": list(TARGETS), "lora_dropout": LORA_DROPOUT, "gradient_checkpointing": True,
        "micro_batching": raw.get("micro_batching"),
        "tokens_per_s": round(tok_s, 1), "step_s": [round(t, 4) for t in raw["times"]], "tokens_per_step": raw["tokens"],
        "timed_tokens": sum(tokens),
        "train_peak_gib": None if raw["train_peak_gib"] is None else round(raw["train_peak_gib"] - leftover, 2),
        "steady_peak_gib": None if raw["steady_peak_gib"] is None else round(raw["steady_peak_gib"] - leftover, 2),
        "leftover_gib": leftover, "train_peak_raw_gib": raw["train_peak_gib"], "reserved_peak_gib": reserved,
        "loss_first": round(raw["losses"][0], 4), "loss_last": round(raw["losses"][-1], 4), "losses": raw["losses"],
        "steps": steps, "warmup": options.warmup, "wall_s": round(wall, 1), "pid": os.getpid(),
        "pipelined": options.pipelined, **({"step_losses": raw["step_losses"]} if raw.get("step_losses") else {}),
    }


def table(results: list[dict]) -> str:
    """The results as a markdown table, each against the plain stack's run of its shape and rows."""
    plain = {(r["shape"], r["rows"]): r for r in results if r["stack"] == "plain"}
    lines = []
    for r in results:
        p = plain.get((r["shape"], r["rows"]))
        speed = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}" if p else "-"
        mem = f"{r['train_peak_gib'] / p['train_peak_gib']:.2f}" if p and r["train_peak_gib"] and p["train_peak_gib"] else "-"
        steady = r.get("steady_peak_gib")
        steady_ratio = f"{steady / p['steady_peak_gib']:.2f}" if p and steady and p.get("steady_peak_gib") else "-"
        loss = f"{(r['loss_last'] - p['loss_last']) / p['loss_last']:+.2%}" if p else "-"
        gap = median_loss_gap(r["losses"], p["losses"]) if p else float("nan")
        batch = f"{r['batch']}x{r['seq']}" if r["rows"] == "fixed" else f"{r['batch']} rows"
        batch += f" x{r['grad_accum']} acc" if r["grad_accum"] > 1 else ""
        lines.append([r["shape"], r["name"], batch, f"{r['tokens_per_s']:,.0f}", speed, r["train_peak_gib"], mem,
                      steady, steady_ratio, f"{r['loss_first']:.3f} → {r['loss_last']:.3f}", loss,
                      "-" if math.isnan(gap) else f"{gap:+.2%}"])
    return markdown_table(["shape", "config", "batch", "tok/s", "× plain", "train peak GiB", "× plain",
                           "after warm-up GiB", "× plain", "loss first → last", "last vs plain",
                           "median step vs plain"], lines)


def measure_in_child(shape: str, key: str, workdir: Path, options: Options) -> dict:
    """:func:`measure` of one configuration in a fresh process of this script (``--isolate``); its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        command = [sys.executable, str(Path(__file__).resolve()), *options.flags(), "--shapes", shape, "--configs",
                   key, "--workdir", str(workdir), "--out", str(out)]
        done = subprocess.run(command)
        results = json.loads(out.read_text())["results"] if out.is_file() else []
    if not results:
        raise RuntimeError(f"the process measuring {shape}:{key} ended with exit code {done.returncode} and no result")
    return results[0]


def parse_settings(items: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``--set KEY=VALUE`` items: train settings, none of those the bench sets to match the plain stack."""
    fixed = {name.upper() for name in workload_settings(CONFIGS["loraship"], Path(), Path(), 1, Options())}
    settings = {}
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip().upper()
        if not equals or not key:
            parser.error(f"--set {item}: give KEY=VALUE, a train setting (e.g. TORCH_COMPILE=layers)")
        if key in fixed:
            parser.error(f"--set {key}: the bench sets it, the same for both stacks (it sets {', '.join(sorted(fixed))})")
        settings[key] = value
    from pydantic import ValidationError

    from loraship.envsettings import format_validation_error
    from train.settings import TrainSettings

    unknown = [key for key in settings if key.lower() not in TrainSettings.model_fields]
    if unknown:
        parser.error(f"--set {unknown[0]}: not a train setting (python -m train --help lists them)")
    try:
        train_settings({key.lower(): value for key, value in settings.items()})
    except ValidationError as err:
        parser.error("--set " + "; ".join(format_validation_error(TrainSettings, err)))
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama-3-8b", help="comma-separated: llama-3-8b, llama-3.2-1b")
    parser.add_argument("--configs", default="plain,loraship",
                        help=f"comma-separated, of {', '.join(CONFIGS)}; SHAPE:CONFIG limits one to a shape")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train setting for loraship's runs (repeatable), e.g. TORCH_COMPILE=layers")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before the timed ones")
    parser.add_argument("--timed", type=int, default=8, help="optimizer steps timed")
    parser.add_argument("--workdir", default=None,
                        help="where the random-init bases are saved, and found again (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: a tiny Llama, float32, no bitsandbytes, loraship with the levers of CUDA "
                        "less liger-kernel")
    parser.add_argument("--pipelined", action="store_true",
                        help="time the steps as a real run goes: synchronize only at the end of warm-up and of the run "
                        f"(step times are means), loraship logs every {PIPELINED_LOGGING_STEPS} steps (train's default), "
                        "the plain loop reads its losses at the end")
    parser.add_argument("--recorded-real", action="store_true",
                        help="real lengths: the timed steps repeat the first warm-up steps' rows, so their packed "
                        "lengths' CUDA graphs are recorded (a long run's steady state); needs --timed <= --warmup")
    parser.add_argument("--isolate", action="store_true",
                        help="measure each configuration in a process of its own (nothing one leaves behind, "
                        "a patched module, a compiled graph, an allocator's cache, reaches the next)")
    args = parser.parse_args(argv)
    if args.recorded_real and args.timed > args.warmup:
        parser.error(f"--recorded-real repeats warm-up rows: --timed ({args.timed}) must not exceed --warmup "
                     f"({args.warmup})")
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    wanted = []
    for item in args.configs.split(","):
        only, _, key = item.rpartition(":")
        if key not in CONFIGS:
            parser.error(f"unknown config {key!r}: give some of {', '.join(CONFIGS)}")
        if only and only not in SHAPES:
            parser.error(f"unknown shape {only!r} in {item!r}")
        wanted.append((only or None, key))
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}: give llama-3-8b or llama-3.2-1b")
    settings = parse_settings(args.set, parser)

    import torch

    options = Options(device="cuda" if torch.cuda.is_available() and not args.tiny else "cpu", warmup=args.warmup,
                      timed=args.timed, pipelined=args.pipelined, recorded_real=args.recorded_real,
                      tiny=args.tiny, settings=settings)
    if args.workdir:
        return run_configs(options, wanted, shapes, Path(args.workdir), args.out, args.isolate)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:  # no --workdir: nothing left behind
        return run_configs(options, wanted, shapes, Path(tmp), args.out, args.isolate)


def run_configs(options: Options, wanted: list[tuple[str | None, str]], shapes: list[str], workdir: Path,
                out: str | None, isolate: bool) -> int:
    """Build each shape's base in ``workdir``, measure the configurations ``wanted``, print and write the report."""
    import torch

    from loraship.atomic import write_json

    cuda = options.device == "cuda"
    report = {"machine": {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                          "versions": versions()},
              "settings": {"warmup": options.warmup, "timed": options.timed, "seq": options.seq,
                           "learning_rate": LEARNING_RATE, "pipelined": options.pipelined,
                           "recorded_real": options.recorded_real,
                           "logging_steps": options.logging_steps, "train_settings": options.settings,
                           "real_lengths_first_40": real_lengths(40)},
              "results": [], "base_build_s": {}}
    print(json.dumps(report["machine"]), flush=True)
    results = report["results"]
    for shape in shapes:
        keys = [key for only, key in wanted if only in (None, shape)]
        if not keys:
            continue
        started = time.perf_counter()
        base = build_llama_on_device(workdir / shape, shape, options.device)
        report["base_build_s"][shape] = round(time.perf_counter() - started, 1)
        print(f"{shape}: base built in {report['base_build_s'][shape]} s", flush=True)
        for key in keys:
            try:
                result = measure_in_child(shape, key, workdir, options) if isolate else measure(shape, key, base, options)
            except Exception as err:  # one failing configuration must not lose the others' numbers
                import traceback

                traceback.print_exc()
                result = {"shape": shape, "config": key, "error": f"{type(err).__name__}: {err}"[:2000]}
                free_memory()
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "step_s", "tokens_per_step")}),
                  flush=True)
            if out:
                write_json(out, report)
    print(table([r for r in results if "error" not in r]))
    for r in results:
        if "error" in r:
            print(f"FAILED {r['shape']} {r['config']}: {r['error'][:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
