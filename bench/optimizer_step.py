"""What one optimizer step over a LoRA adapter costs, by optimizer: clip + step + zero_grad, as the Trainer runs them.

The adapter is a LoRA's parameters for a model shape (default: Llama-3-8B, r8 on q,k,v,o: 256 tensors,
6.8 M weights) with random gradients. Each optimizer comes from transformers' own factory
(``Trainer.get_optimizer_cls_and_kwargs``), as the Trainer builds it for ``optim=NAME``. Per optimizer:
the median wall time of ``--steps`` CUDA-synchronized steps after ``--warmup``, and the optimizer state's
GPU memory. The cost is mostly kernel launches (one or more per tensor), so it shows on the wall clock
of a step whose GPU work is short, such as a compiled 2 x 1024 step.

    python bench/optimizer_step.py --out bench/results/optimizer_step.json
    python bench/optimizer_step.py --device cpu --optimizers adamw_torch,adamw_torch_fused   # smoke test

Prints a table and writes JSON (``--out``).
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

#: (hidden, kv width, layers) of the shapes bench/train_throughput.py measures.
SHAPES = {"llama-3-8b": (4096, 1024, 32), "llama-3.2-1b": (2048, 512, 16), "tiny": (64, 32, 2)}
OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused")


def lora_shapes(shape: str, r: int) -> list[tuple[int, int]]:
    """The (rows, columns) of every LoRA A and B matrix on q, k, v, o of ``shape``."""
    hidden, kv, layers = SHAPES[shape]
    per_layer = []
    for out_features in (hidden, kv, kv, hidden):  # q, k, v, o (all take the hidden size in)
        per_layer += [(r, hidden), (out_features, r)]
    return per_layer * layers


def measure(name: str, shape: str, r: int, device: str, warmup: int, steps: int) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(rows, cols, device=device) * 0.01) for rows, cols in lora_shapes(shape, r)]
    args = TrainingArguments(output_dir="/tmp/optimizer-step", optim=name, learning_rate=2e-4, weight_decay=0.0,
                             report_to=[], use_cpu=device == "cpu")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = cls(params, **kwargs)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    times = []
    for step in range(warmup + steps):
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        sync()
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - started)
    state_mib = (torch.cuda.memory_allocated() - before) / 2**20 if device == "cuda" else None
    return {"optimizer": name, "class": f"{cls.__module__}.{cls.__name__}", "tensors": len(params),
            "weights": sum(p.numel() for p in params), "step_ms": round(1000 * statistics.median(times[warmup:]), 3),
            "step_ms_all": [round(1000 * t, 3) for t in times], "state_mib": None if state_mib is None else round(state_mib, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in args.optimizers.split(","):
        try:
            results.append(measure(name, args.shape, args.r, device, args.warmup, args.steps))
        except Exception as exc:  # noqa: BLE001 - a bench reports what failed and goes on
            results.append({"optimizer": name, "error": f"{type(exc).__name__}: {exc}"})
    print(f"| optimizer ({args.shape}, r{args.r}, {device}) | tensors | weights | clip + step + zero_grad ms | state MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['optimizer']} | failed: {r['error'][:120]} | | | |")
        else:
            print(f"| {r['optimizer']} | {r['tensors']} | {r['weights']:,} | {r['step_ms']} | {r['state_mib']} |")
    if args.out:
        info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        Path(args.out).write_text(json.dumps({"machine": info, "shape": args.shape, "r": args.r, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
