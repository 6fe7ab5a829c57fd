"""End-to-end A/B of the CUDA speed levers: whole ``python -m train`` runs, each with levers left out.

bench/train_throughput.py times a few steps; this asks whether a lever changes what a whole run
learns. Setup: tests/train/test_gpu.py's random-init Llama-3.2-1B shape and repeat-five-words task
(4-bit QLoRA r16 q,k,v,o, BATCH_SIZE=8, LR 2e-3 cosine, 150 steps, eval every 50), the same base and
data for every run; each run is its own process whose plan has the named levers switched off.

Usage (GPU; the SmolLM2 tokenizer folder as in tests/train/test_gpu.py; ``--setup demo`` runs on a CPU)::

    python bench/train_levers_ab.py --tokenizer DIR --out FILE.json [--runs defaults,none,bf16_frozen=False,...]
        [--set LORA_DROPOUT=0 ...] [--inductor fallback_random=True ...] [--logs DIR]
        [--seeds 0,1,2,3,4 --parallel 5]

A run is ``defaults`` (the plan as it is), ``none`` (no lever) or comma-free ``field=value`` pairs
joined by ``+`` that override train.speed.SpeedLevers fields (``packing=False+fold_accumulation=False``).
``--set`` overrides a setting of every run (e.g. ``LORA_DROPOUT=0``); ``--inductor`` sets a
``torch._inductor.config`` value in every run but ``defaults``. Prints one line per run and writes the JSON:
eval losses, every step's train loss, how often torch.compile recompiled and why (TORCH_LOGS=recompiles),
and, for a patched run, how many calls reached a compiled module by training mode, gradients and rows.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Runs ``python -m train`` with ``dataclasses.replace(levers, <overrides>)`` as the plan's levers.
PATCHED_TRAIN = """
import dataclasses, json, os, runpy, train.speed as speed
import torch, torch._inductor.config, bitsandbytes.nn.modules as bnb_modules
for key, value in json.loads(os.environ.get("LORASHIP_AB_INDUCTOR", "{{}}")).items():
    setattr(torch._inductor.config, key, value)
if os.environ.get("LORASHIP_AB_SYMBOLIC_GRAPH_LENGTHS"):  # --symbolic-graph-lengths
    from bench import symbolic_graph_lengths
    print(symbolic_graph_lengths.enable(), flush=True)
if not torch.cuda.is_available():  # no CPU repacking of 4-bit weights for eval: a compiled graph cannot take it
    bnb_modules.has_avx512bf16 = lambda: False
chosen = speed.choose_levers
def choose(**kwargs):
    levers, notices = chosen(**kwargs)
    return ({overrides}), notices
speed.choose_levers = choose
# Count the calls that reach each compiled module, by (training mode, gradients on, rows): which run eagerly.
import atexit, collections
calls = collections.Counter()
wrap = speed.compile_for_training
def counted(module, mode=None, **options):
    wrap(module, mode, **options)
    inner = module._compiled_call_impl
    def call(*args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rows = int(hidden.shape[0]) if hasattr(hidden, "shape") else -1
        key = f"training={{module.training}} grad={{torch.is_grad_enabled()}} rows={{rows}}"
        if module.training and rows != 1 and not calls[key]:  # where an unpacked training batch came from
            import traceback
            print("first call with " + key + ":" + chr(10) + "".join(traceback.format_stack(limit=40)), flush=True)
        calls[key] += 1
        return inner(*args, **kwargs)
    module._compiled_call_impl = call
speed.compile_for_training = counted
atexit.register(lambda: print("compiled-module calls: " + json.dumps(dict(calls)), flush=True))
runpy.run_module("train", run_name="__main__")
"""


def command_for(run: str) -> list[str]:
    if run == "defaults":
        return [sys.executable, "-m", "train"]
    overrides = "speed.SpeedLevers()" if run == "none" else (
        "dataclasses.replace(levers, " + ", ".join(run.split("+")) + ")")
    return [sys.executable, "-c", PATCHED_TRAIN.format(overrides=overrides)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="the SmolLM2 tokenizer folder (the repeat-1b setup)")
    parser.add_argument("--setup", choices=("repeat-1b", "demo"), default="repeat-1b",
                        help="repeat-1b: the GPU setup above; demo: RECIPE=demo (the embedded SmolLM2-135M, the "
                             "quokka data, 40 steps) as 4-bit QLoRA with checkpointing, which runs on a CPU")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", default="defaults,none,bf16_frozen=True")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run, over the fixed ones (repeatable)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="a folder for each run's whole output (RUN-INDEX.log: its log lines and TORCH_LOGS)")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...",
                        help="run each of --runs once per seed (SEED); prints each run's last eval loss per seed and the mean")
    parser.add_argument("--parallel", type=int, default=1,
                        help="processes at once (the 1B runs use ~1.2 GiB of a GPU; run times are then not comparable)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config value (a Python literal) for every patched run (repeatable)")
    parser.add_argument("--symbolic-graph-lengths", action="store_true",
                        help="patched runs: per-layer CUDA graphs with a symbolic packed length even where this torch "
                        "cannot (bench/symbolic_graph_lengths.py)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="levers-ab-"))
    if args.setup == "demo":
        fixed = {"RECIPE": "demo", "LOAD_IN_4BIT": "true", "GRADIENT_CHECKPOINTING": "true"}
    else:
        from tests.train.test_gpu import build_llama_1b_shaped, write_repeat_task

        if args.tokenizer is None:
            parser.error("--tokenizer is needed for the repeat-1b setup")
        base = build_llama_1b_shaped(work / "base", args.tokenizer)
        data = write_repeat_task(work / "repeat.jsonl", rows=1200)
        fixed = {"BASE_MODEL": str(base), "DATASET": str(data), "LOAD_IN_4BIT": "auto", "OPTIMIZER": "auto",
                 "MAX_STEPS": "150", "BATCH_SIZE": "8", "GRAD_ACCUM": "1", "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "5",
                 "LR_SCHEDULER": "cosine", "LORA_R": "16", "LORA_ALPHA": "32", "EVAL_SIZE": "32", "EVAL_STEPS": "50",
                 "SAVE_STEPS": "50", "LOGGING_STEPS": "1", "MAX_SEQ_LENGTH": "128", "GRADIENT_CHECKPOINTING": "true",
                 "SEED": "0"}
    inductor = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.inductor)}
    seeds = args.seeds.split(",") if args.seeds else [None]
    jobs = [(run, seed) for run in args.runs.split(",") for seed in seeds]
    results, running = {}, []
    for index, (run, seed) in enumerate(jobs):
        while len(running) >= args.parallel:
            running = finish_one(running, results, args, inductor)
        out = work / f"run{index}"
        out.mkdir(parents=True)
        env = {key: value for key, value in os.environ.items() if key not in ("RECIPE", "HUB_REPO", "HF_TOKEN")}
        env.update(fixed, OUTPUT_DIR=str(out), TORCH_LOGS="recompiles")
        env.update(item.split("=", 1) for item in args.set)
        if seed is not None:
            env["SEED"] = seed
        env["LORASHIP_AB_INDUCTOR"] = json.dumps(inductor)
        if args.symbolic_graph_lengths:
            env["LORASHIP_AB_SYMBOLIC_GRAPH_LENGTHS"] = "1"
        stdout, stderr = (out / "stdout.txt").open("w"), (out / "stderr.txt").open("w")
        process = subprocess.Popen(command_for(run), cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)
        key = run if seed is None else f"{run} SEED={seed}"
        running.append((key, index, out, process, time.time(), (stdout, stderr)))
    while running:
        running = finish_one(running, results, args, inductor)
    if len(seeds) > 1:
        print(seed_table(results, args.runs.split(","), seeds))


def finish_one(running: list, results: dict, args, inductor: dict) -> list:
    """Wait for the first of the ``running`` jobs to end, record it in ``results`` (and args.out); the rest."""
    while True:
        for job in running:
            if job[3].poll() is not None:
                record(*job, results=results, args=args, inductor=inductor)
                return [other for other in running if other is not job]
        time.sleep(0.5)


def record(key: str, index: int, out: Path, process, started: float, files, *, results: dict, args, inductor: dict):
    for file in files:
        file.close()
    stdout, stderr = (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        (args.logs / f"run{index}.log").write_text(f"$ {key}\n{stdout}\n--- stderr ---\n{stderr}")
    if process.returncode:
        print(f"{key}: rc {process.returncode}\n{stderr[-3000:]}")
        return
    said = [line for line in stdout.splitlines() + stderr.splitlines() if "speed:" in line]
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [loss for _, loss in summary["train_losses"]]
    results[key] = {"levers": said[:1], "wall_s": round(time.time() - started, 1), "runtime_s": summary["runtime_s"],
                    "parallel": args.parallel, "peak_gib": summary["gpu_peak_memory_gib"],
                    "train_loss_first": losses[0] if losses else None,
                    "train_loss_step10": dict(summary["train_losses"]).get(10),
                    "train_loss_last": losses[-1] if losses else None,
                    "eval_losses": summary["eval_losses"], "settings": args.set, "inductor": inductor,
                    "recompiles": stderr.count("Recompiling function"),
                    "compiled_calls": next((json.loads(line.split(": ", 1)[1]) for line in stdout.splitlines()
                                            if line.startswith("compiled-module calls: ")), None),
                    "recompile_reasons": [line.split("[__recompiles]")[-1].strip() for line in stderr.splitlines()
                                          if "[__recompiles]" in line
                                          and line.split("[__recompiles]")[-1].strip().startswith("-")],
                    "train_losses": losses}
    print(f"{key}: eval {[round(loss, 3) for _, loss in summary['eval_losses']]}, runtime {summary['runtime_s']} s, "
          f"peak {summary['gpu_peak_memory_gib']} GiB", flush=True)
    args.out.write_text(json.dumps(results, indent=2))  # after each run: a cut-off call keeps the finished ones


def seed_table(results: dict, runs: list[str], seeds: list[str]) -> str:
    """Each run's last eval loss for every seed, and their mean (a run that failed shows ``-``)."""
    lines = ["| run | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for run in runs:
        last = [results.get(f"{run} SEED={seed}", {}).get("eval_losses") for seed in seeds]
        last = [evals[-1][1] if evals else None for evals in last]
        done = [loss for loss in last if loss is not None]
        mean = f"{sum(done) / len(done):.3f}" if done else "-"
        lines.append(f"| {run} | " + " | ".join("-" if loss is None else f"{loss:.3f}" for loss in last) + f" | {mean} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
