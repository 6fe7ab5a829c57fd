"""Calibrated Q4_K_M: an importance matrix from the fine-tune's own training rows, against plain Q4_K_M.

Claim measured: whether llama.cpp's importance-weighted quantization, calibrated on what the adapter was
trained on, brings Q4_K_M closer to the model as trained (KL) and lowers its held-out NLL.

The matrix is llama.cpp's: per weight matrix, the mean over tokens of each input column's squared
activation (what tools/imatrix collects), here collected with forward hooks on the model as trained
(base as training loaded it + adapter) over the train split's rows, and handed to
``llama_model_quantize`` through its ``imatrix`` parameter. Each F16 file comes from
``bench/quality_ladder.py --tag TAG`` (``WORKDIR/TAG/export-BASE``); both Q4_K_M files are scored on the
export's ladder (the train run's held-out rows and export/heldout.txt, against rung 1) and given the
export's natural stop check.

Usage: ``python bench/imatrix_q4.py --tag TAG --adapter TRAIN_OUTPUT_DIR [--workdir DIR] [--rows N]``;
writes ``bench/results/imatrix_q4-TAG.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: transformers' Llama module names -> the tensor names llama.cpp's converter gives them.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
LAYER = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")


def training_rows(train_dir: Path, limit: int) -> list[list[int]]:
    """The train split's token ids, rebuilt as train built them (the run's settings, seed and tokenizer)."""
    from train import data, model
    from train.settings import TrainSettings

    record = json.loads((train_dir / "run_settings.json").read_text(encoding="utf-8"))
    settings = TrainSettings(**{k.lower(): v for k, v in record.items()
                                if k.lower() in TrainSettings.model_fields and v is not None})
    tokenizer = model.load_tokenizer(model.resolve_model_path(settings.base_model), chat_template=settings.chat_template)
    train, _, _ = data.prepare_data(settings, tokenizer)
    return [e.input_ids for e in train[:limit]]


def importance_matrix(trained, rows: list[list[int]]) -> dict:
    """``{gguf tensor name: mean squared input activation per column}`` over every token of ``rows``."""
    import numpy as np
    import torch

    sums: dict[str, "np.ndarray"] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in trained.named_modules():
        match = LAYER.search(name)
        if not match:
            continue
        gguf = f"blk.{match.group(1)}.{GGUF_NAMES[match.group(2)]}.weight"

        def collect(_module, args, gguf=gguf):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[gguf] = sums.get(gguf, 0) + (x * x).sum(0).numpy()
            counts[gguf] = counts.get(gguf, 0) + x.shape[0]

        hooks.append(module.register_forward_pre_hook(collect))
    with torch.inference_mode():
        for row in rows:
            trained(torch.tensor([row]))
    for hook in hooks:
        hook.remove()
    return {name: (sums[name] / counts[name]).astype("float32") for name in sums}


def quantize_with_imatrix(src: Path, dst: Path, imatrix: dict, threads: int) -> None:
    import ctypes

    import llama_cpp
    import numpy as np

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    kept = []
    for i, (name, values) in enumerate(imatrix.items()):
        buffer = np.ascontiguousarray(values, dtype=np.float32)
        kept.append(buffer)
        entries[i].name = name.encode()
        entries[i].data = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = buffer.size
    entries[len(imatrix)].name = None  # the list ends at a null name
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} with the importance matrix")


def judge(path: Path, parent, tokenizer, eval_sets, references) -> dict:
    """The export's ladder rung for ``path`` (both texts) and its natural stop check."""
    from export.ladder import score_gguf
    from export.verify import VerifyError, verify_gguf

    score = score_gguf("Q4_K_M", path, parent, eval_sets, references, n_ctx=256, threads=2, quantized=True)
    try:
        verify_gguf(path, tokenizer, stop_check="natural", stop_prompts=3, threads=2)
        stops = True
    except VerifyError:
        stops = False
    return {**score.to_json(), "stops": stops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--adapter", type=Path, required=True, help="train OUTPUT_DIR")
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-ladder")
    parser.add_argument("--rows", type=int, default=256, help="most training rows to calibrate on")
    args = parser.parse_args()

    from export.gguf import quantize_gguf
    from export.ladder import build_eval_set, build_heldout_eval_set, score_hf, trained_model
    from export.settings import DEFAULT_EVAL_TEXT
    from export.verify import load_tokenizer, read_eval_texts
    from loraship.embedded import embedded_hf_folder
    from loraship.heldout import read_heldout_rows

    adapter = args.adapter / "adapter"
    manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
    base = manifest["inputs"]["base_model"]
    base_dir = embedded_hf_folder() if base in ("embedded", "HuggingFaceTB/SmolLM2-135M-Instruct") else Path(base)
    tokenizer = load_tokenizer(adapter)
    eval_sets = {"heldout": build_heldout_eval_set(read_heldout_rows(adapter), len(tokenizer), 1024),
                 "general": build_eval_set(tokenizer, read_eval_texts(DEFAULT_EVAL_TEXT), 256, 1024)}
    t = time.monotonic()
    rows = training_rows(args.adapter, args.rows)
    trained, _ = trained_model(base_dir, adapter, bool(manifest["inputs"].get("load_in_4bit")))
    _, references = score_hf("adapter", "as trained", None, trained, eval_sets, None)
    imatrix = importance_matrix(trained, rows)
    seconds = {"imatrix_s": round(time.monotonic() - t, 1)}
    del trained

    found = {}
    for folder in sorted((args.workdir / args.tag).glob("export-*")):
        merge_base = folder.name.removeprefix("export-")
        f16 = next(folder.glob("*-F16.gguf"), None)
        if f16 is None or merge_base == "default":
            continue
        plain, calibrated = folder / "bench-plain-Q4_K_M.gguf", folder / "bench-imatrix-Q4_K_M.gguf"
        quantize_gguf(f16, plain, "Q4_K_M", threads=2)
        quantize_with_imatrix(f16, calibrated, imatrix, threads=2)
        found[merge_base] = {"plain": judge(plain, "F16", tokenizer, eval_sets, references),
                             "imatrix": judge(calibrated, "F16", tokenizer, eval_sets, references)}
        plain.unlink()
        calibrated.unlink()

    print("| merge base | Q4_K_M | held-out NLL | held-out KL | general NLL | general KL | stop check |")
    print("|---|---|---|---|---|---|---|")
    for merge_base, pair in found.items():
        for kind, r in pair.items():
            print(f"| {merge_base} | {kind} | {r['heldout']['nll']:.4f} | {r['heldout']['kl']:.5f} | "
                  f"{r['general']['nll']:.4f} | {r['general']['kl']:.5f} | {'stops' if r['stops'] else 'loops'} |")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "adapter": str(args.adapter),
        "calibration": {"rows": len(rows), "tokens": sum(len(r) for r in rows), "tensors": len(imatrix)},
        "seconds": seconds,
        "by_base": found,
    }
    from loraship.atomic import write_json

    target = ROOT / "bench" / "results" / f"imatrix_q4-{args.tag}.json"
    write_json(target, result)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
