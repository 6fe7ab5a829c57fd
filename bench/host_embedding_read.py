"""The token embedding's lookup three ways, on the 8B's table: on the GPU, from pinned host memory, by copy.

Session 19-20 measured the ``host_embedding`` lever (train/host_embedding.py) end to end: +2-5% at 2x1024, but
-6% to +3% at real lengths, and 4% behind the same MLP budget with the table left on the GPU (session 20).
This times the lookup alone, so the next A/B knows what the reads cost. For a batch of token ids
(random, from the whole vocabulary) and a 128,256 x 4,096 bf16 table:

- ``gpu lookup``: ``torch.nn.functional.embedding`` with the table on the GPU (what the default does);
- ``host kernel``: train/host_embedding.py's Triton kernel reading the rows from the pinned table over the bus,
  with ``VALUES_PER_PROGRAM`` values per program (the lever) and with a whole row per program;
- ``cpu gather + copy``: the rows gathered on the CPU into a pinned buffer, then copied to the GPU in one
  transfer (ids already on the CPU, as the collator has them); the time is the CPU's gather plus the copy.

Each result must equal the GPU lookup bit for bit. Milliseconds are the median of ``--reps`` timed calls
(CUDA events around each; the CPU gather by the wall clock), after three untimed ones. Prints a table and
writes JSON (``--out``). Needs a CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Llama-3-8B's token embedding: rows (vocabulary) x width (hidden size).
TABLE = (128_256, 4_096)
#: Tokens per lookup: a 2x1024 micro-batch, a folded real-length one (session 20: 1,933-7,244, median ~3,400),
#: and a long folded one.
TOKENS = (2048, 3500, 8192)


def time_gpu(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, timed call by call with events."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_copy(gather, copy, reps: int) -> tuple[float, float]:
    """Median milliseconds of the CPU's ``gather`` (wall clock) and of the GPU's ``copy`` (events)."""
    for _ in range(3):
        gather()
    cpu = []
    for _ in range(reps):
        began = time.perf_counter()
        gather()
        cpu.append((time.perf_counter() - began) * 1e3)
    return statistics.median(cpu), time_gpu(copy, reps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50, help="timed calls of each way")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated batch sizes, in tokens")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)

    import torch

    from train import host_embedding

    if not host_embedding.available():
        parser.error("needs a CUDA GPU and Triton (train/host_embedding.py's kernel): run it on the device")

    torch.manual_seed(0)
    rows_n, width = TABLE
    on_gpu = torch.randn(TABLE, dtype=torch.bfloat16, device="cuda")
    pinned = on_gpu.cpu().pin_memory()
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids_cpu = torch.randint(0, rows_n, (tokens,))
        ids = ids_cpu.cuda()
        expected = torch.nn.functional.embedding(ids, on_gpu)
        staging = torch.empty((tokens, width), dtype=torch.bfloat16).pin_memory()
        landed = torch.empty((tokens, width), dtype=torch.bfloat16, device="cuda")

        def gather():
            torch.index_select(pinned, 0, ids_cpu, out=staging)

        def copy():
            landed.copy_(staging, non_blocking=True)

        moved = tokens * width * 2
        ways = {
            "gpu lookup": lambda: torch.nn.functional.embedding(ids, on_gpu),
            f"host kernel, {host_embedding.VALUES_PER_PROGRAM} values a program":
                lambda: host_embedding.gather_rows(pinned, ids),
            f"host kernel, {width} values a program": lambda: host_embedding.gather_rows(pinned, ids, values=width),
        }
        for way, fn in ways.items():
            ms = time_gpu(fn, args.reps)
            rows.append({"tokens": tokens, "way": way, "ms": round(ms, 4), "gb_s": round(moved / ms / 1e6, 1),
                         "equal": bool(torch.equal(fn(), expected))})
        cpu_ms, copy_ms = time_copy(gather, copy, args.reps)
        gather()
        copy()
        torch.cuda.synchronize()
        rows.append({"tokens": tokens, "way": "cpu gather + copy", "ms": round(cpu_ms + copy_ms, 4),
                     "cpu_gather_ms": round(cpu_ms, 4), "copy_ms": round(copy_ms, 4),
                     "gb_s": round(moved / (cpu_ms + copy_ms) / 1e6, 1), "equal": bool(torch.equal(landed, expected))})

    print("| tokens | way | ms | GB/s | equal |")
    print("|---|---|---|---|---|")
    for row in rows:
        detail = f" (gather {row['cpu_gather_ms']} + copy {row['copy_ms']})" if "copy_ms" in row else ""
        print(f"| {row['tokens']} | {row['way']} | {row['ms']}{detail} | {row['gb_s']} | {row['equal']} |")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "table": list(TABLE),
              "reps": args.reps, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(row["equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
