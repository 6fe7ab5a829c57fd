"""Peak memory and wall time of the export on a Llama-3.2-1B-shaped model, against the plain path.

Claim measured: the shard-by-shard merge keeps the whole export's peak RSS
near one tensor instead of the whole model, at little extra time.

Three paths, each in its own child process (its process tree sampled every
50 ms through /proc, so the converter and quantizer children count too):

* ``convert_only``: llama.cpp convert (f16) + quantize (Q4_K_M) of the base
  alone: the time the export cannot avoid;
* ``loraship``: ``python -m export`` (merge + convert + quantize + verify; ``--ladder true``
  adds the quality ladder);
* ``plain``: peft ``merge_and_unload`` on the whole model loaded in bf16,
  ``save_pretrained``, then the same convert + quantize.

Model: random-init, hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocab 128256, tied embeddings, bf16 safetensors (2.47 GB);
SmolLM2's tokenizer (the converter pads the vocabulary). Adapter: LoRA r=16 on
q/k/v/o with random non-zero B, in PEFT format.

Usage: ``python bench/export_memory.py [--workdir DIR] [--keep]`` (``make bench-export``); prints a
table and writes ``bench/results/export_memory-1b.json`` (``--ladder true``: ``export_memory-1b-ladder.json``;
``--smoke``: ``export_memory-smoke.json`` in the work folder's parent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.random_llama import SHAPES  # noqa: E402

CONFIG = dict(SHAPES["llama-3.2-1b"])  # copied: --smoke shrinks it
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GIB = 1024**3


# --- inputs ---------------------------------------------------------------


def build_base(folder: Path) -> Path:
    """The random-init bf16 model, written tensor by tensor (never the whole model in memory)."""
    from bench.random_llama import build_random_llama
    from tests.fixtures.models import load_embedded_tokenizer

    return build_random_llama(folder, CONFIG, load_embedded_tokenizer(), seed=0)


def build_adapter(folder: Path, base: Path) -> Path:
    """A PEFT-format LoRA adapter (r=16, q/k/v/o) with random A and B, written directly."""
    import torch
    from safetensors.torch import save_file

    cfg = CONFIG
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    out_features = {"q_proj": cfg["hidden_size"], "k_proj": cfg["num_key_value_heads"] * head_dim,
                    "v_proj": cfg["num_key_value_heads"] * head_dim, "o_proj": cfg["hidden_size"]}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, cfg["hidden_size"], generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features[module], RANK, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": RANK,
        "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True,
    }, indent=2))
    return folder


# --- the paths (each runs in its own child: `--path NAME`) ---------------------


def path_convert_only(work: Path, base: Path, adapter: Path) -> dict:
    from export.converter import locate_converter
    from export.gguf import convert_to_gguf, quantize_gguf

    conv = locate_converter()
    t = time.perf_counter()
    f16 = convert_to_gguf(base, work / "base-F16.gguf", "f16", conv)
    t_convert = time.perf_counter() - t
    quantize_gguf(f16, work / "base-Q4_K_M.gguf", "Q4_K_M")
    return {"convert_s": t_convert, "quantize_s": time.perf_counter() - t - t_convert}


def path_plain(work: Path, base: Path, adapter: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.converter import locate_converter
    from export.gguf import convert_to_gguf, quantize_gguf

    conv = locate_converter()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged = work / "merged"
    model.save_pretrained(merged, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    del model
    t_merge = time.perf_counter() - t
    f16 = convert_to_gguf(merged, work / "plain-F16.gguf", "f16", conv)
    t_convert = time.perf_counter() - t - t_merge
    quantize_gguf(f16, work / "plain-Q4_K_M.gguf", "Q4_K_M")
    return {"merge_s": t_merge, "convert_s": t_convert, "quantize_s": time.perf_counter() - t - t_merge - t_convert}


def path_loraship(work: Path, base: Path, adapter: Path) -> dict:
    env = dict(os.environ, ADAPTER=str(adapter), BASE_MODEL=str(base), OUTPUT_DIR=str(work / "export"),
               QUANT_TYPES="Q4_K_M", STOP_CHECK="eos_token", MODEL_NAME="bench", EVAL_CTX="128")
    subprocess.run([sys.executable, "-m", "export", "--env-file", "/nonexistent/.env"], check=True, env=env,
                   cwd=str(ROOT), stdout=subprocess.DEVNULL)
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    return {**manifest["extra"]["timings"], "memory": manifest["extra"]["memory"]}


PATHS = {"convert_only": path_convert_only, "loraship": path_loraship, "plain": path_plain}


# --- measuring --------------------------------------------------------------


def _tree_memory(root_pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over a process and its descendants, in bytes."""
    rss = anon = 0
    pids = [root_pid]
    try:
        import psutil

        pids += [c.pid for c in psutil.Process(root_pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - the tree changes under us
        pass
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, anon


def measure(name: str, work: Path, base: Path, adapter: Path) -> dict:
    """Run one path in a child process; sample its tree's memory until it exits."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--path", name, "--workdir", str(work), "--base", str(base),
           "--adapter", str(adapter)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = {"rss": 0, "anon": 0}

    def sample() -> None:
        while proc.poll() is None:
            rss, anon = _tree_memory(proc.pid)
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"path {name} failed (exit {proc.returncode})")
    detail = json.loads(out.strip().splitlines()[-1])
    memory = detail.pop("memory", None)
    return {"path": name, "export_manifest_memory_mib": memory, "wall_s": round(wall, 1), "peak_rss_gib": round(peak["rss"] / GIB, 3),
            "peak_anon_rss_gib": round(peak["anon"] / GIB, 3),
            "max_single_process_rss_gib": round(detail.pop("maxrss_kib") / 1024**2, 3),
            "steps_s": {k: round(v, 1) for k, v in detail.items()}}


def child(args) -> None:
    import resource

    detail = PATHS[args.path](Path(args.workdir), Path(args.base), Path(args.adapter))
    maxrss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({**detail, "maxrss_kib": maxrss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-export")
    parser.add_argument("--keep", action="store_true", help="keep the model, adapter and outputs")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer, 256-wide model of the same vocabulary: checks the script, measures nothing")
    parser.add_argument("--ladder", choices=("false", "true"), default="false",
                        help="LADDER for the loraship path (default false: the export proper; true adds the quality "
                        "ladder's float32 scoring)")
    parser.add_argument("--path", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return child(args)

    os.environ["LADDER"] = args.ladder  # the children inherit it
    if args.smoke:
        CONFIG.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
    work = args.workdir
    base, adapter = work / "base", work / "adapter"
    if not (base / "model.safetensors").is_file():
        shutil.rmtree(work, ignore_errors=True)
        print("building the random-init 1B-shaped model and adapter ...", file=sys.stderr)
        build_base(base)
        build_adapter(adapter, base)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    rows = []
    for name in ("convert_only", "loraship", "plain"):
        print(f"measuring {name} ...", file=sys.stderr)
        rows.append(measure(name, work / name, base, adapter))
        shutil.rmtree(work / name, ignore_errors=True)
    by = {r["path"]: r for r in rows}
    reference = by["convert_only"]["steps_s"]["convert_s"] + by["convert_only"]["steps_s"]["quantize_s"]
    ours = by["loraship"]["steps_s"]
    export_memory = by["loraship"]["export_manifest_memory_mib"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
        "model": {**CONFIG, "dtype": "bfloat16", "safetensors_gib": round(model_bytes / GIB, 3)},
        "adapter": {"r": RANK, "targets": list(TARGETS)},
        "rows": rows,
        "goals": {
            "peak_rss_over_model": round(by["loraship"]["peak_rss_gib"] * GIB / model_bytes, 3),
            "peak_anon_rss_over_model": round(by["loraship"]["peak_anon_rss_gib"] * GIB / model_bytes, 3),
            "merge_convert_quantize_over_convert_quantize": round(
                (ours["merge_s"] + ours["convert_s"] + ours["quantize_s"]) / reference, 3),
            "whole_export_over_convert_quantize": round(by["loraship"]["wall_s"] / reference, 3),
        },
        "command": "python bench/export_memory.py" + (" --smoke" if args.smoke else "") + f" --ladder {args.ladder}",
        "ladder": args.ladder,
        "export_manifest_memory_mib": export_memory,
    }
    print(f"\nmodel: {model_bytes / GIB:.2f} GiB bf16 safetensors; {os.cpu_count()} CPUs")
    print(f"{'path':<14}{'wall s':>8}{'peak RSS GiB':>14}{'peak anon GiB':>15}{'max 1-proc GiB':>16}  steps")
    for r in rows:
        steps = ", ".join(f"{k}={v}" for k, v in r["steps_s"].items())
        print(f"{r['path']:<14}{r['wall_s']:>8}{r['peak_rss_gib']:>14}{r['peak_anon_rss_gib']:>15}"
              f"{r['max_single_process_rss_gib']:>16}  {steps}")
    print(json.dumps(result["goals"], indent=2))
    from loraship.atomic import write_json

    if args.smoke:  # checks the script, measures nothing: not a result
        target = work.parent / "export_memory-smoke.json"
    else:
        target = ROOT / "bench" / "results" / f"export_memory-1b{'-ladder' if args.ladder == 'true' else ''}.json"
    write_json(target, result)
    print(f"wrote {target}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
