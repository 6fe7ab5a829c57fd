"""Where a training step makes the CPU wait for the GPU: torch's sync debug mode over a few steps.

Each wait (an ``.item()``, a boolean-mask index, a copy to the CPU) stalls the CPU until the GPU has
finished everything queued; the GPU then idles until the CPU has queued the next work. Runs one
configuration of ``bench/train_throughput.py`` (default: today's defaults, 1B shape, 2 x 1024 tokens),
and for ``--steps`` optimizer steps after ``--warmup`` turns on ``torch.cuda.set_sync_debug_mode("warn")``,
recording the Python stack of each synchronizing call (the frames of loraship, trl, transformers and
peft). Prints the stacks with their count per step, and writes them as JSON (``--out``). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.train_throughput as tt  # noqa: E402

#: Path fragments of the frames a stack keeps: the code that asked for the value, not torch's own.
KEEP = ("/train/", "/bench/", "/trl/", "/transformers/", "/peft/", "/accelerate/")


def short_stack(frames) -> tuple[str, ...]:
    kept = [f"{frame.filename.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{frame.lineno} {frame.name}"
            for frame in frames if any(part in frame.filename for part in KEEP) and "sync_points" not in frame.filename]
    return tuple(kept[-6:])


def sync_points(shape: str, key: str, base: Path, warmup: int, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    config = tt.CONFIGS[key]
    rows = tt.rows_for(config, warmup + steps, tt.SHAPES[shape]["vocab_size"], tt.SEQ)
    stacks: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            stacks[short_stack(traceback.extract_stack()[:-1])] += 1

    class Watch(TrainerCallback):
        def __init__(self):
            self.step = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if warmup <= self.step < warmup + steps:
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.set_sync_debug_mode("default")
            self.step += 1

    shown = warnings.showwarning
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp, tt.LlamaModuleState():
            warnings.simplefilter("always")
            warnings.showwarning = record
            tt.run_loraship(config, base, rows, warmup + steps, "cuda", Path(tmp), callbacks=(Watch(),))
    finally:
        warnings.showwarning = shown
    return {"shape": shape, "config": key, "steps": steps,
            "per_step": sum(stacks.values()) / steps,
            "stacks": [{"per_step": count / steps, "stack": list(stack)} for stack, count in stacks.most_common()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=list(tt.SHAPES))
    parser.add_argument("--configs", default="defaults", help=f"comma-separated, of: {', '.join(tt.CONFIGS)}")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=None,
                        help="the runs' LOGGING_STEPS (default: the bench's 1, a log line every step)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--symbolic-graph-lengths", action="store_true",
                        help="as bench/train_throughput.py: the defaults torch 2.13 plans, on an older torch")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.symbolic_graph_lengths:
        tt.plan_symbolic_graph_lengths()
    if args.logging_steps:
        tt.LOGGING_STEPS = args.logging_steps
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sync-points-"))
    base = tt.build_base(args.shape, workdir / args.shape, "cuda")
    results = []
    for key in args.configs.split(","):
        result = sync_points(args.shape, key, base, args.warmup, args.steps)
        results.append(result)
        print(f"\n## {args.shape} {key}: {result['per_step']:g} synchronizing calls per step")
        print("| per step | stack (innermost last) |\n|---|---|")
        for entry in result["stacks"]:
            print(f"| {entry['per_step']:g} | {' <br> '.join(entry['stack']) or '(no Python frame kept)'} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"logging_steps": tt.LOGGING_STEPS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
