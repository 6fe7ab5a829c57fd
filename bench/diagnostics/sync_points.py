"""Where loraship's training step makes the CPU wait for the GPU: torch's sync debug mode over a few steps.

Each wait (an ``.item()``, a boolean-mask index, a copy to the CPU) stalls the CPU until the GPU has finished
everything queued; the GPU then idles until the CPU has queued the next work. Runs a configuration of
bench/train_throughput.py (default ``loraship``, the 1B shape) and, for ``--steps`` optimizer steps after
``--warmup``, records the Python stack of each synchronizing call (the frames of loraship, trl, transformers, peft
and accelerate). Prints the stacks with their count per step and writes them as JSON (``--out``). Needs CUDA.

    python bench/diagnostics/sync_points.py --logging-steps 10 --out sync.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bench.train_throughput as tt  # noqa: E402
from bench.common import markdown_table  # noqa: E402
from bench.random_llama import SHAPES, build_llama_on_device  # noqa: E402

#: Path fragments of the frames a stack keeps: the code that asked for the value, not torch's own.
KEEP = ("/train/", "/bench/", "/trl/", "/transformers/", "/peft/", "/accelerate/")


def short_stack(frames) -> tuple[str, ...]:
    kept = [f"{frame.filename.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{frame.lineno} {frame.name}"
            for frame in frames if any(part in frame.filename for part in KEEP) and "sync_points" not in frame.filename]
    return tuple(kept[-6:])


def sync_points(shape: str, key: str, base: Path, options: tt.Options) -> dict:
    import torch
    from transformers import TrainerCallback

    config = tt.CONFIGS[key]
    warmup, steps = options.warmup, options.timed
    rows = tt.rows_for(config, warmup + steps, SHAPES[shape]["vocab_size"], options)
    stacks: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            stacks[short_stack(traceback.extract_stack()[:-1])] += 1

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if warmup <= state.global_step < warmup + steps:
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.set_sync_debug_mode("default")

    shown = warnings.showwarning
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp, tt.LlamaModuleState():
            warnings.simplefilter("always")
            warnings.showwarning = record
            tt.run_loraship(config, base, rows, warmup + steps, Path(tmp), options, callbacks=(Watch(),))
    finally:
        warnings.showwarning = shown
    return {"shape": shape, "config": key, "train_settings": options.settings, "steps": steps,
            "per_step": sum(stacks.values()) / steps,
            "stacks": [{"per_step": count / steps, "stack": list(stack)} for stack, count in stacks.most_common()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "llama-3-8b"])
    parser.add_argument("--configs", default="loraship", help="comma-separated: loraship, loraship-real")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train setting (repeatable), as bench/train_throughput.py takes it")
    parser.add_argument("--logging-steps", type=int, default=tt.LOGGING_STEPS,
                        help="the runs' LOGGING_STEPS (a logged loss is read back from the GPU)")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps watched")
    parser.add_argument("--workdir", default=None, help="where the random-init base is saved, and found again")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    keys = args.configs.split(",")
    if any(key not in ("loraship", "loraship-real") for key in keys):
        parser.error(f"--configs {args.configs}: give loraship and/or loraship-real")
    settings = tt.parse_settings(args.set, parser)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: run it on the device")
    # LOGGING_STEPS is the bench's to set: a loss read back every step unless asked otherwise.
    options = tt.Options(device="cuda", warmup=args.warmup, timed=args.steps, settings={
        **settings, **({"LOGGING_STEPS": str(args.logging_steps)} if args.logging_steps != tt.LOGGING_STEPS else {})})
    with tempfile.TemporaryDirectory(prefix="sync-points-") as tmp:
        base = build_llama_on_device(Path(args.workdir or tmp) / args.shape, args.shape, "cuda")
        results = [sync_points(args.shape, key, base, options) for key in keys]
    for result in results:
        print(f"\n## {args.shape} {result['config']}: {result['per_step']:g} synchronizing calls per step")
        print(markdown_table(["per step", "stack (innermost last)"],
                             [[f"{e['per_step']:g}", " <br> ".join(e["stack"]) or "(no Python frame kept)"]
                              for e in result["stacks"]]))
    if args.out:
        from loraship.atomic import write_json

        write_json(args.out, {"logging_steps": args.logging_steps, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
