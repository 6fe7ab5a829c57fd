"""Where one QLoRA optimizer step spends its time: torch.profiler over loraship's training path.

Runs one configuration of ``bench/train_throughput.py`` (default: today's defaults on the 8B shape,
2 x 1024 tokens, r8 q,k,v,o), profiles ``--active`` optimizer steps after the warm-up, and prints:

- wall time per step against the GPU's busy time (the sum of kernel durations): a step whose GPU is
  busy for much less than its wall time is bound by the CPU launching kernels, not by the GPU;
- kernel launches per step;
- the operators with the most CPU time, and the kernels with the most GPU time.

Writes the same as JSON (``--out``). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.train_throughput as tt  # noqa: E402


def profile(shape: str, key: str, base: Path, warmup: int, active: int, top: int, device: str = "cuda") -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule
    from transformers import TrainerCallback

    config = tt.CONFIGS[key]
    steps = warmup + active
    rows = tt.rows_for(config, steps, tt.SHAPES[shape]["vocab_size"], 64 if device == "cpu" else tt.SEQ)
    prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                         schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1))

    class Step(TrainerCallback):
        def __init__(self):
            self.walls, self.last = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            prof.start()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                tt.sync(device)
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            tt.sync(device)
            now = time.perf_counter()
            self.walls.append(now - self.last)
            self.last = now
            prof.step()

    step = Step()
    try:
        with tempfile.TemporaryDirectory() as tmp, tt.LlamaModuleState():
            raw = tt.run_loraship(config, base, rows, steps, device, Path(tmp), callbacks=(step,))
    finally:
        prof.stop()
    events = prof.key_averages()
    # Device-side events, less annotations (the profiler's step range, record_function ranges): kernels and copies.
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not e.name.startswith("ProfilerStep")
               and not getattr(e, "is_user_annotation", False)]
    busy_us = covered_us([(e.time_range.start, e.time_range.end) for e in kernels]) / active
    walls = step.walls[warmup:warmup + active]
    wall_us = 1e6 * sum(walls) / len(walls)
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {
        "shape": shape, "config": key, "steps": steps, "active": active,
        "wall_ms_per_step": round(wall_us / 1000, 1), "gpu_busy_ms_per_step": round(busy_us / 1000, 1),
        "gpu_busy_fraction": round(busy_us / wall_us, 3), "kernels_per_step": len(kernels) // active,
        "tokens_per_step": raw["tokens"][-1], "train_peak_gib": raw["train_peak_gib"],
        "top_cpu": [{"name": e.key, "calls_per_step": e.count // active, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / active, 1)} for e in by_cpu],
        "top_gpu": [{"name": e.key[:100], "calls_per_step": e.count // active, "self_gpu_ms_per_step": round(e.self_device_time_total / 1000 / active, 1)} for e in by_gpu],
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
    parser.add_argument("--shape", default="llama-3-8b", choices=list(tt.SHAPES))
    parser.add_argument("--configs", default="defaults", help=f"comma-separated, of: {', '.join(tt.CONFIGS)}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--active", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    parser.add_argument("--symbolic-graph-lengths", action="store_true",
                        help="as bench/train_throughput.py: the defaults torch 2.13 plans, on an older torch")
    args = parser.parse_args(argv)
    import torch

    if args.symbolic_graph_lengths:
        tt.plan_symbolic_graph_lengths()

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.shape = "tiny"
        for key, config in list(tt.CONFIGS.items()):
            tt.CONFIGS[key] = tt.dataclasses.replace(config, levers=tt.dataclasses.replace(config.levers, liger_kernels=()))
    if args.workdir:
        return profile_configs(args, device, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="train-profile-") as tmp:  # no --workdir: nothing left behind
        return profile_configs(args, device, Path(tmp))


def profile_configs(args, device: str, workdir: Path) -> int:
    """Build the shape's base in ``workdir``, profile each configuration of ``args.configs``, print and write them."""
    base = tt.build_base(args.shape, workdir / args.shape, device)
    results = []
    for key in args.configs.split(","):
        result = profile(args.shape, key, base, args.warmup, args.active, args.top, device)
        results.append(result)
        print(f"\n## {args.shape} {key}: wall {result['wall_ms_per_step']} ms/step, GPU busy {result['gpu_busy_ms_per_step']} ms "
              f"({result['gpu_busy_fraction']:.0%}), {result['kernels_per_step']} kernels/step, "
              f"{result['tokens_per_step']} tokens/step, peak {result['train_peak_gib']} GiB")
        print("| op (CPU) | calls/step | self CPU ms/step |\n|---|---|---|")
        for e in result["top_cpu"]:
            print(f"| {e['name']} | {e['calls_per_step']} | {e['self_cpu_ms_per_step']} |")
        print("| kernel/op (GPU) | calls/step | self GPU ms/step |\n|---|---|---|")
        for e in result["top_gpu"]:
            print(f"| {e['name']} | {e['calls_per_step']} | {e['self_gpu_ms_per_step']} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"versions": tt.versions(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
