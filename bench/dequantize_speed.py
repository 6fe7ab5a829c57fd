"""How fast is an NF4 weight dequantized: bitsandbytes' kernels against train/dequantize.py compiled by inductor?

For each weight shape of Llama-3-8B's decoder layer (bf16 weights, random, NF4 with nested absmax as
``load_base_model`` quantizes them), times ``bitsandbytes.functional.dequantize_4bit`` and
``torch.compile(dequantize_nf4)`` (CUDA events, median of ``--repeats`` after warm-up), reports the memory
bandwidth each reaches (4-bit codes and absmax read, bf16 written), and counts the elements where the two
disagree (bf16 values; 0 is bitsandbytes' result exactly).

    python bench/dequantize_speed.py --out bench/results/dequantize_speed.json
    python bench/dequantize_speed.py --device cpu --repeats 3     # CPU smoke test (eager torch, bnb's CPU path)

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

#: (name, out features, in features) of one Llama-3-8B decoder layer's linear layers.
SHAPES = (("q_proj / o_proj", 4096, 4096), ("k_proj / v_proj", 1024, 4096), ("gate_proj / up_proj", 14336, 4096),
          ("down_proj", 4096, 14336))
TINY = (("tiny", 256, 128),)


def timed(fn, repeats: int, device: str) -> float:
    """The median seconds of ``fn()`` over ``repeats`` calls, after three warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(name: str, rows: int, cols: int, device: str, repeats: int) -> dict:
    import torch
    from bitsandbytes import functional as bnbf
    from bitsandbytes.nn import Params4bit

    from train.dequantize import dequantize_nf4

    torch.manual_seed(0)
    dense = torch.randn(rows, cols, dtype=torch.bfloat16, device=device) * 0.02
    codes, state = bnbf.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    weight = Params4bit(codes, requires_grad=False, quant_state=state, bnb_quantized=True, quant_type="nf4")
    ours = torch.compile(dequantize_nf4) if device == "cuda" else dequantize_nf4
    reference, result = bnbf.dequantize_4bit(codes, state), ours(weight)
    moved = codes.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4 + rows * cols * 2
    bnb_s = timed(lambda: bnbf.dequantize_4bit(codes, state), repeats, device)
    ours_s = timed(lambda: ours(weight), repeats, device)
    return {"weight": name, "shape": [rows, cols], "bnb_ms": round(bnb_s * 1e3, 4), "torch_ms": round(ours_s * 1e3, 4),
            "bnb_gb_s": round(moved / bnb_s / 1e9, 1), "torch_gb_s": round(moved / ours_s / 1e9, 1),
            "speedup": round(bnb_s / ours_s, 2), "differing_elements": int((reference != result).sum()),
            "elements": rows * cols,
            "max_abs_difference": float((reference.float() - result.float()).abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES if device == "cuda" else TINY
    results = [measure(name, rows, cols, device, args.repeats) for name, rows, cols in shapes]
    lines = ["| weight | shape | bitsandbytes ms | GB/s | torch (compiled) ms | GB/s | speed-up | elements differing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['weight']} | {r['shape'][0]}×{r['shape'][1]} | {r['bnb_ms']:.3f} | {r['bnb_gb_s']:,.0f} "
                     f"| {r['torch_ms']:.3f} | {r['torch_gb_s']:,.0f} | {r['speedup']:.2f}× "
                     f"| {r['differing_elements']:,} of {r['elements']:,} |")
    print("\n".join(lines))
    if args.out:
        device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                              "repeats": args.repeats, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
