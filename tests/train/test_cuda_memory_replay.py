"""bench/diagnostics/memory_trace.py's replay: the peak of a recorded allocation trace and what was alive at it.

The recording needs CUDA; the replay does not, and runs here on hand-written traces in the format of
``torch.cuda.memory._snapshot()``, through the script's ``--replay``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def alloc(addr, mib, filename="gen.py", line=1, name="call"):
    return {"action": "alloc", "addr": addr, "size": mib * MIB,
            "frames": [{"filename": "/x/torch/cuda/memory.py", "line": 9, "name": "wrapper"},
                       {"filename": filename, "line": line, "name": name}]}


def free(addr):
    return {"action": "free_completed", "addr": addr, "size": 0, "frames": []}


def replay(tmp_path: Path, trace) -> dict:
    saved, out = tmp_path / "trace.json", tmp_path / "summary.json"
    saved.write_text(json.dumps(trace))
    done = subprocess.run([sys.executable, "bench/diagnostics/memory_trace.py", "--replay", str(saved), "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (summary,) = json.loads(out.read_text())["results"]
    return summary


def test_the_peak_is_the_largest_total_alive_at_one_moment(tmp_path):
    trace = [alloc(1, 100), alloc(2, 50), free(1), alloc(3, 120), free(2), free(3), alloc(4, 30)]
    assert replay(tmp_path, trace)["peak_gib"] == round(170 * MIB / 2**30, 3)  # 50 + 120, not 100 + 50 + 120


def test_what_was_alive_at_the_peak_is_grouped_by_the_line_that_allocated_it(tmp_path):
    trace = [alloc(1, 64, "layer.py", 7), alloc(2, 64, "layer.py", 7), alloc(3, 8, "mlp.py", 3), free(3),
             alloc(4, 16, "mlp.py", 3), free(1), free(2), free(4)]
    groups = replay(tmp_path, {"device_traces": [trace]})["live_at_peak"]  # a snapshot, as torch saves it
    assert [(g["where"], g["count"]) for g in groups] == [("layer.py:7 call", 2), ("mlp.py:3 call", 1)]
    assert groups[0]["sizes_mib"] == {"64.0": 2} and groups[1]["gib"] == round(16 * MIB / 2**30, 3)


def test_frees_of_allocations_made_before_the_recording_are_ignored(tmp_path):
    summary = replay(tmp_path, [free(99), alloc(1, 10), free(98)])
    assert summary["peak_gib"] == round(10 * MIB / 2**30, 3) and summary["live_at_peak"][0]["count"] == 1
