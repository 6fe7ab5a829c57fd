"""Where loraship's training step spends its time: torch.profiler over a few optimizer steps after the warm-up.

Runs a configuration of bench/train_throughput.py (default ``loraship``, the 8B shape) and prints the wall time per
step against the GPU's busy time (the span its kernels cover: a step whose GPU is busy for much less than its wall
time waits on the CPU launching work), kernel launches per step, and the operators with the most CPU and GPU time.
Writes the same as JSON (``--out``).

    python bench/diagnostics/train_profile.py --configs loraship --out profile.json
    python bench/diagnostics/train_profile.py --tiny --configs loraship      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bench.train_throughput as tt  # noqa: E402
from bench.common import markdown_table, versions  # noqa: E402
from bench.random_llama import SHAPES, build_llama_on_device  # noqa: E402


def profile(shape: str, key: str, base: Path, options: tt.Options, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule
    from transformers import TrainerCallback

    config = tt.CONFIGS[key]
    warmup, active = options.warmup, options.timed
    steps = warmup + active
    rows = tt.rows_for(config, steps, SHAPES[shape]["vocab_size"], options)
    prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                         schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1))

    class Stepper(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            prof.start()

        def on_step_end(self, args, state, control, **kwargs):
            prof.step()

    try:
        with tempfile.TemporaryDirectory() as tmp, tt.LlamaModuleState():
            if config.stack != "loraship":
                raise SystemExit(f"{key}: profiles loraship's configurations only")
            raw = tt.run_loraship(config, base, rows, steps, Path(tmp), options, callbacks=(Stepper(),))
    finally:
        prof.stop()
    events = prof.key_averages()
    # Device-side events, less annotations (the profiler's step range, record_function ranges): kernels and copies.
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not e.name.startswith("ProfilerStep")
               and not getattr(e, "is_user_annotation", False)]
    busy_us = covered_us([(e.time_range.start, e.time_range.end) for e in kernels]) / active
    walls = raw["times"][warmup:warmup + active]
    wall_us = 1e6 * sum(walls) / len(walls)
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {
        "shape": shape, "config": key, "train_settings": options.settings, "levers": raw["levers"], "steps": steps,
        "active": active, "wall_ms_per_step": round(wall_us / 1000, 1), "gpu_busy_ms_per_step": round(busy_us / 1000, 1),
        "gpu_busy_fraction": round(busy_us / wall_us, 3), "kernels_per_step": len(kernels) // active,
        "tokens_per_step": raw["tokens"][-1], "train_peak_gib": raw["train_peak_gib"],
        "top_cpu": [{"name": e.key, "calls_per_step": e.count // active,
                     "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / active, 1)} for e in by_cpu],
        "top_gpu": [{"name": e.key[:100], "calls_per_step": e.count // active,
                     "self_gpu_ms_per_step": round(e.self_device_time_total / 1000 / active, 1)} for e in by_gpu],
    }


def covered_us(intervals: list[tuple[float, float]]) -> float:
    """How long at least one of ``intervals`` was running: kernels on several streams overlap, and are counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=["llama-3-8b", "llama-3.2-1b"])
    parser.add_argument("--configs", default="loraship", help="comma-separated: loraship, loraship-real")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train setting (repeatable), as bench/train_throughput.py takes it")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--active", type=int, default=2, help="optimizer steps profiled")
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--workdir", default=None, help="where the random-init base is saved, and found again")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    args = parser.parse_args(argv)
    keys = args.configs.split(",")
    if any(key not in ("loraship", "loraship-real") for key in keys):
        parser.error(f"--configs {args.configs}: give loraship and/or loraship-real")
    settings = tt.parse_settings(args.set, parser)

    import torch

    options = tt.Options(device="cuda" if torch.cuda.is_available() and not args.tiny else "cpu",
                         warmup=args.warmup, timed=args.active, tiny=args.tiny, settings=settings)
    shape = "tiny" if args.tiny else args.shape
    with tempfile.TemporaryDirectory(prefix="train-profile-") as tmp:  # no --workdir: nothing left behind
        base = build_llama_on_device(Path(args.workdir or tmp) / shape, shape, options.device)
        results = [profile(shape, key, base, options, args.top) for key in keys]
    for result in results:
        print(f"\n## {shape} {result['config']}: wall {result['wall_ms_per_step']} ms/step, GPU busy "
              f"{result['gpu_busy_ms_per_step']} ms ({result['gpu_busy_fraction']:.0%}), {result['kernels_per_step']} "
              f"kernels/step, {result['tokens_per_step']} tokens/step, peak {result['train_peak_gib']} GiB")
        print(markdown_table(["op (CPU)", "calls/step", "self CPU ms/step"],
                             [[e["name"], e["calls_per_step"], e["self_cpu_ms_per_step"]] for e in result["top_cpu"]]))
        print(markdown_table(["kernel/op (GPU)", "calls/step", "self GPU ms/step"],
                             [[e["name"], e["calls_per_step"], e["self_gpu_ms_per_step"]] for e in result["top_gpu"]]))
    if args.out:
        from loraship.atomic import write_json

        write_json(args.out, {"versions": versions(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
