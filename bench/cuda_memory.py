"""What is alive on the GPU at a run's memory peak, and which line of code allocated it.

``start()`` records every CUDA allocation (with its Python stack) from now on; ``summary()`` stops
recording, replays the trace to the moment the allocated total peaked and groups what was alive
then by the innermost Python line that allocated it. For inductor-generated code that line is the
buffer's own ``empty_strided_cuda((shape...), ...)``, so the shape shows without the generated file.

Used by ``bench/train_throughput.py --memory-trace``. Needs CUDA for the recording; the replay is
plain Python (``live_at_peak``) and is tested on a synthetic trace.
"""

from __future__ import annotations

import linecache
from collections import defaultdict


def start(max_entries: int = 500_000) -> None:
    import torch

    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def summary(top: int = 15) -> dict:
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    traces = snapshot.get("device_traces") or [[]]
    return live_at_peak(traces[torch.cuda.current_device()], top)


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
    """Replay ``trace`` (``alloc`` / ``free_completed`` events): the peak above the trace's start, and what made it.

    Allocations made before recording began are not in the trace, so the peak is what the recorded
    stretch added on top of them (activations, workspaces; not the weights loaded before).
    """
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
