"""What float8 matmuls would give the frozen base's projections: speed and error against bf16, 8B shapes.

Not a lever of loraship: a measurement of the one way left to cut the GPU's own work of a training step
(docs/benchmarks.md, "Training speed (GPU)"). For each projection of a Llama-3-8B layer at 2x1024 tokens:
the forward matmul (``x @ W.T``) and the backward pass's input gradient (``dy @ W``) in bf16 (cuBLAS, as
the training step runs them) and in float8 e4m3 with a scale per row of each operand
(``torch._scaled_mm``, Hopper's float8 tensor cores), each timed in a CUDA graph of ``--calls`` calls;
"quantize" times turning the bf16 operands into float8 with their scales (one compiled kernel each).
Error: the relative Frobenius distance of each result to a float32 matmul of the same bf16 operands.
Prints a table and writes JSON (``--out``). Needs a GPU of compute capability 8.9+.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.nf4_dequant import LAYERS, SHAPES, microbench_parser, time_graph  # noqa: E402

TOKENS = 2048


def main(argv=None) -> int:
    parser = microbench_parser(__doc__)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        parser.error("needs a CUDA GPU of compute capability 8.9+ (float8 tensor cores): run it on the device")

    fp8 = torch.float8_e4m3fn
    top = torch.finfo(fp8).max

    @torch.compile(dynamic=False)
    def rowwise(t):
        """``t`` in float8 with one float32 scale per row (``t ~ q * scale``)."""
        scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / top
        return (t.float() / scale).to(fp8), scale

    def error(result, reference):
        return float((result.float() - reference).norm() / reference.norm())

    torch.manual_seed(0)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        w = torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda") * 0.02
        x = torch.randn(TOKENS, in_features, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(TOKENS, out_features, dtype=torch.bfloat16, device="cuda") * 1e-3
        xq, xs = rowwise(x)
        wq, ws = rowwise(w)  # scales per output feature: the forward's
        wtq, wts = rowwise(w.t().contiguous())  # per input feature: the backward's
        dyq, dys = rowwise(dy)

        def forward_fp8():
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)

        def backward_fp8():
            return torch._scaled_mm(dyq, wtq.t(), scale_a=dys, scale_b=wts.t(), out_dtype=torch.bfloat16)

        row = {"weight": name, "shape": [out_features, in_features],
               "bf16_forward_ms": time_graph(lambda: x @ w.t(), args.calls, args.replays),
               "fp8_forward_ms": time_graph(forward_fp8, args.calls, args.replays),
               "bf16_backward_ms": time_graph(lambda: dy @ w, args.calls, args.replays),
               "fp8_backward_ms": time_graph(backward_fp8, args.calls, args.replays),
               "quantize_ms": time_graph(lambda: (rowwise(x), rowwise(w), rowwise(w.t()), rowwise(dy)),
                                         args.calls, args.replays),
               "bf16_forward_error": error(x @ w.t(), x.float() @ w.float().t()),
               "fp8_forward_error": error(forward_fp8(), x.float() @ w.float().t()),
               "bf16_backward_error": error(dy @ w, dy.float() @ w.float()),
               "fp8_backward_error": error(backward_fp8(), dy.float() @ w.float())}
        rows.append({key: round(value, 5) if isinstance(value, float) else value for key, value in row.items()})

    def per_step(kind):  # forward and recompute, then the input gradient, in each of the 32 layers
        return round(sum(2 * row[f"{kind}_forward_ms"] + row[f"{kind}_backward_ms"] for row in rows) * LAYERS, 2)

    step = {"bf16_ms": per_step("bf16"), "fp8_ms": per_step("fp8"),
            "quantize_ms": round(sum(row["quantize_ms"] for row in rows) * LAYERS, 2)}
    print("| weight | bf16 fwd ms | fp8 fwd ms | bf16 bwd ms | fp8 bwd ms | quantize ms | bf16 err fwd/bwd | fp8 err fwd/bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['weight']} {row['shape'][0]}x{row['shape'][1]} | {row['bf16_forward_ms']:.4f} | "
              f"{row['fp8_forward_ms']:.4f} | {row['bf16_backward_ms']:.4f} | {row['fp8_backward_ms']:.4f} | "
              f"{row['quantize_ms']:.4f} | {row['bf16_forward_error']:.2e} / {row['bf16_backward_error']:.2e} | "
              f"{row['fp8_forward_error']:.2e} / {row['fp8_backward_error']:.2e} |")
    print(f"per 2x1024 step (32 layers; forward twice, backward once): bf16 {step['bf16_ms']} ms, float8 "
          f"{step['fp8_ms']} ms ({step['bf16_ms'] / step['fp8_ms']:.2f}x), quantizing every operand once "
          f"{step['quantize_ms']} ms")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": TOKENS,
              "calls": args.calls, "replays": args.replays, "weights": rows, "per_step": step}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
