"""NF4 dequantization: bitsandbytes' two kernels against train/nf4.py's one, on an 8B's weight shapes.

For each projection of a Llama-3-8B layer, a random bf16 weight is quantized by bitsandbytes (NF4, 64-value
blocks, double quantization, as ``load_in_4bit`` does), then dequantized both ways (loraship's also inside
torch.compile): the values must be equal bit for bit. Each way is captured in a CUDA graph of ``--calls`` dequantizations (as the per-layer
graphs run them) and timed over ``--replays`` replays. "per step" scales to a 2x1024 training step of the
defaults: each of the 32 layers dequantizes each weight twice (forward, then recompute and backward).
Prints a table and writes JSON (``--out``). Needs CUDA, bitsandbytes and Triton.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Llama-3-8B's projections: name -> (out, in).
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
LAYERS = 32


def time_graph(fn, calls: int, replays: int) -> float:
    """Milliseconds per call of ``fn`` captured ``calls`` times in one CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def microbench_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the GPU microbenches: CUDA-graph calls and replays, and the JSON to write."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls captured in each CUDA graph")
    parser.add_argument("--replays", type=int, default=20, help="replays of each graph timed")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    return parser


def main(argv=None) -> int:
    parser = microbench_parser(__doc__)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (bitsandbytes and Triton): run it on the device")

    import bitsandbytes.functional as bnbf

    from train import nf4

    torch.manual_seed(0)
    nf4.register()
    compiled = torch.compile(nf4.dequantize, fullgraph=True)  # as inside a compiled layer: the op, no graph break
    rows = []
    for name, shape in SHAPES.items():
        weight = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4",
                                           quant_storage=torch.uint8)
        assert nf4.supports(packed, state), name
        theirs, ours = bnbf.dequantize_4bit(packed, state), nf4.dequantize(packed, state)
        equal = bool(torch.equal(theirs, ours)) and bool(torch.equal(theirs, compiled(packed, state)))
        bnb_ms = time_graph(lambda: bnbf.dequantize_4bit(packed, state), args.calls, args.replays)
        ours_ms = time_graph(lambda: nf4.dequantize(packed, state), args.calls, args.replays)
        moved = weight.numel() * (2 + 0.5)  # bf16 written, 4-bit read
        rows.append({"weight": name, "shape": list(shape), "equal": equal, "bitsandbytes_ms": round(bnb_ms, 4),
                     "loraship_ms": round(ours_ms, 4), "speedup": round(bnb_ms / ours_ms, 3),
                     "bitsandbytes_tb_s": round(moved / bnb_ms / 1e9, 2), "loraship_tb_s": round(moved / ours_ms / 1e9, 2)})
    step = {key: round(sum(row[key] for row in rows) * 2 * LAYERS, 2) for key in ("bitsandbytes_ms", "loraship_ms")}

    print("| weight | shape | equal | bitsandbytes ms | TB/s | loraship ms | TB/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['weight']} | {row['shape'][0]}x{row['shape'][1]} | {row['equal']} | {row['bitsandbytes_ms']:.4f} | "
              f"{row['bitsandbytes_tb_s']} | {row['loraship_ms']:.4f} | {row['loraship_tb_s']} | {row['speedup']:.2f}x |")
    print(f"| per 2x1024 step (32 layers, 2 each) | | | {step['bitsandbytes_ms']} | | {step['loraship_ms']} | | "
          f"{step['bitsandbytes_ms'] / step['loraship_ms']:.2f}x |")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "calls": args.calls,
              "replays": args.replays, "weights": rows, "per_step_ms": step}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(row["equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
