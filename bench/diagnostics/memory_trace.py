"""What is alive on the GPU at loraship's training memory peak, and which line of code allocated it.

Runs a configuration of bench/train_throughput.py (default ``loraship``, the 8B shape), records every CUDA
allocation with its Python stack from the warm-up's end to the run's, replays the trace to the moment the allocated
total peaked and groups what was alive then by the innermost Python line that allocated it. For inductor's generated
code that line is the buffer's own ``empty_strided_cuda((shape...), ...)``, so the shape shows without the file.
Allocations made before the recording (the weights) are not in it: the peak is what the steps added on top.

``--replay FILE`` does the replay alone, on a trace saved before: a JSON list of events or a snapshot holding
``device_traces``, in the format of ``torch.cuda.memory._snapshot()`` (a pickle of one, as
``torch.cuda.memory._dump_snapshot`` writes it, is read too). Prints the groups and writes them as JSON (``--out``).

    python bench/diagnostics/memory_trace.py --configs loraship --out peak.json            # CUDA
    python bench/diagnostics/memory_trace.py --replay snapshot.pickle --top 30
"""

from __future__ import annotations

import argparse
import json
import linecache
import pickle
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def where(frames: list[dict]) -> tuple[str, str]:
    """The innermost frame outside torch's own allocator wrappers, and its source line."""
    for frame in frames:
        name = frame.get("filename", "?")
        if "/torch/cuda/" in name or "/torch/_ops.py" in name:
            continue
        line = frame.get("line", 0)
        return f"{name}:{line} {frame.get('name', '?')}", linecache.getline(name, line).strip()
    return "?", ""


def live_at_peak(trace: list[dict], top: int = 15) -> dict:
    """Replay ``trace`` (``alloc`` / ``free_completed`` events): the peak above the trace's start, and what made it."""
    current = peak = 0
    peak_at = -1
    sizes = {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            sizes[event["addr"]] = event["size"]
            current += event["size"]
            if current > peak:
                peak, peak_at = current, index
        elif event["action"] == "free_completed" and event["addr"] in sizes:
            current -= sizes.pop(event["addr"])
    live: dict[int, dict] = {}
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: dict[str, dict] = defaultdict(lambda: {"bytes": 0, "count": 0, "sizes": defaultdict(int), "source": ""})
    for event in live.values():
        place, source = where(event.get("frames", []))
        group = groups[place]
        group["bytes"] += event["size"]
        group["count"] += 1
        group["sizes"][event["size"]] += 1
        group["source"] = source
    ranked = sorted(groups.items(), key=lambda item: -item[1]["bytes"])[:top]
    return {
        "peak_gib": round(peak / 2**30, 3),
        "events": len(trace),
        "live_at_peak": [
            {"where": place, "source": group["source"], "gib": round(group["bytes"] / 2**30, 3), "count": group["count"],
             "sizes_mib": {round(size / 2**20, 2): n for size, n in sorted(group["sizes"].items(), reverse=True)[:4]}}
            for place, group in ranked
        ],
    }


def read_trace(path: Path, device: int = 0) -> list[dict]:
    """The events of a saved trace: a list of them, or a snapshot's ``device_traces`` for ``device``."""
    if path.suffix in (".pickle", ".pkl"):
        with open(path, "rb") as fh:
            loaded = pickle.load(fh)  # a snapshot the user saved: trusted as their own file
    else:
        loaded = json.loads(path.read_text())
    if isinstance(loaded, dict):
        traces = loaded.get("device_traces") or [[]]
        return traces[device]
    return loaded


def record(shape: str, key: str, base: Path, options, top: int) -> dict:
    """Train ``key`` of bench/train_throughput.py with the recording on after the warm-up; what was alive at its peak."""
    import torch
    from transformers import TrainerCallback

    import bench.train_throughput as tt
    from bench.random_llama import SHAPES

    config = tt.CONFIGS[key]
    steps = options.warmup + options.timed
    rows = tt.rows_for(config, steps, SHAPES[shape]["vocab_size"], options)
    found = {}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if options.warmup == 0:
                torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == options.warmup:
                torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")

        def on_train_end(self, args, state, control, **kwargs):
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            traces = snapshot.get("device_traces") or [[]]
            found.update(live_at_peak(traces[torch.cuda.current_device()], top))

    with tempfile.TemporaryDirectory() as tmp, tt.LlamaModuleState():
        raw = tt.run_loraship(config, base, rows, steps, Path(tmp), options, callbacks=(Recorder(),))
    return {"shape": shape, "config": key, "train_settings": options.settings, "levers": raw["levers"],
            "steady_peak_gib": raw["steady_peak_gib"], **found}


def print_groups(summary: dict) -> None:
    from bench.common import markdown_table

    print(f"peak {summary['peak_gib']} GiB above the recording's start, over {summary['events']} events")
    print(markdown_table(["GiB", "count", "sizes (MiB: count)", "where", "source"],
                         [[g["gib"], g["count"], g["sizes_mib"], g["where"], f"`{g['source']}`"]
                          for g in summary["live_at_peak"]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replay", type=Path, help="replay this saved trace instead of training")
    parser.add_argument("--shape", default="llama-3-8b", choices=["llama-3-8b", "llama-3.2-1b"])
    parser.add_argument("--configs", default="loraship", help="comma-separated: loraship, loraship-real")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train setting (repeatable), as bench/train_throughput.py takes it")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps recorded")
    parser.add_argument("--top", type=int, default=15, help="groups listed")
    parser.add_argument("--workdir", default=None, help="where the random-init base is saved, and found again")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.replay:
        summary = live_at_peak(read_trace(args.replay), args.top)
        print_groups(summary)
        results = [summary]
    else:
        import bench.train_throughput as tt
        from bench.random_llama import build_llama_on_device

        keys = args.configs.split(",")
        if any(key not in ("loraship", "loraship-real") for key in keys):
            parser.error(f"--configs {args.configs}: give loraship and/or loraship-real")
        settings = tt.parse_settings(args.set, parser)
        import torch

        if not torch.cuda.is_available():
            parser.error("recording needs a CUDA GPU: run it on the device (or --replay a saved trace)")
        options = tt.Options(device="cuda", warmup=args.warmup, timed=args.steps, settings=settings)
        with tempfile.TemporaryDirectory(prefix="memory-trace-") as tmp:
            base = build_llama_on_device(Path(args.workdir or tmp) / args.shape, args.shape, "cuda")
            results = [record(args.shape, key, base, options, args.top) for key in keys]
        for result in results:
            print(f"\n## {args.shape} {result['config']}: steady peak {result['steady_peak_gib']} GiB")
            print_groups(result)
    if args.out:
        from loraship.atomic import write_json

        write_json(args.out, {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
