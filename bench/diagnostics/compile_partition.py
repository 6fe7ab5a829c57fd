"""What a compiled, checkpointed decoder keeps for its backward pass, and what that costs in memory.

torch.compile splits the joint forward+backward graph in two (AOTAutograd's min-cut partitioner): whatever the
backward needs is either saved by the forward or recomputed from what is saved. With gradient checkpointing inside
the graph, the ops of each checkpointed layer are tagged "recompute", so only the layer inputs should be saved.
This shows what each variant's graphs actually save, by op, and a step's steady peak memory, one process each:

    python3 bench/diagnostics/compile_partition.py --variants eager,layers,layers-cudagraphs,stack --out p.json
    python3 bench/diagnostics/compile_partition.py --variant stack --out stack.json      # this process only

Variants: ``eager`` (no compile); ``layers``, ``layers-cudagraphs``, ``stack`` (train.speed.compiled's compile
modes, LoRA dropout 0.05); ``stack-dropout0``; ``stack-unselective`` (plain checkpointing inside the compiled stack,
without checkpoint_kwargs' selective policy that recomputes bitsandbytes' ops); ``stack-nographsafe`` (that, with
torch._functorch.config.graphsafe_rng_functionalization off). A random-init Llama with the 8B's widths and
``--layers`` layers, NF4 4-bit, LoRA r8 on q,k,v,o, 2 rows of ``--seq`` tokens. Needs CUDA (bitsandbytes).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fixtures.partitions import partitions  # noqa: E402  (what the compile tests read, the same spy)

VARIANTS = ("eager", "layers", "layers-cudagraphs", "stack", "stack-dropout0", "stack-unselective",
            "stack-nographsafe")
WIDTHS = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
              vocab_size=32000, tie_word_embeddings=False)


def build(folder: Path, layers: int, device: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-5, **WIDTHS)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def summary(graphs: list[dict]) -> list[dict]:
    """Per graph: how many 4-bit matmuls carry each tag, and what is saved by op (count, MiB)."""
    out = []
    for graph in graphs:
        saved: dict = {}
        for target, size in graph["saved"]:
            entry = saved.setdefault(target.replace("torch.ops.", ""), {"count": 0, "mib": 0.0})
            entry["count"] += 1
            entry["mib"] = round(entry["mib"] + (size or 0) / 2**20, 2)
        out.append({"gemm_4bit_tags": dict(collections.Counter(str(tag) for tag in graph["tags"])), "saved": saved})
    return out


def run_variant(variant: str, base: Path, device: str, seq: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from train.speed import compiled, frozen

    record: dict = {"variant": variant}
    if variant == "stack-nographsafe":
        torch._functorch.config.graphsafe_rng_functionalization = False
    if variant in ("stack-unselective", "stack-nographsafe"):
        compiled.checkpoint_kwargs = lambda *args, **kwargs: {"use_reentrant": False}
    dropout = 0.0 if variant.endswith("dropout0") else 0.05
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": device})
    mode = "" if variant == "eager" else variant if variant.startswith("layers") else "stack"
    model = frozen.prepare_frozen_base(model, gradient_checkpointing=True, compile_mode=mode)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if mode:
        compiled.compile_model(model, mode)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, WIDTHS["vocab_size"], (2, seq), generator=generator).to(device)
    cuda = device == "cuda"
    times, losses = [], []
    with partitions() as graphs:
        for step in range(steps):
            if cuda and step == 2:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                floor = torch.cuda.memory_allocated()
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - start, 3))
            losses.append(round(float(loss), 4))
    record.update(step_s=times, losses=losses, dropout=dropout)
    if graphs:
        record["graphs"] = summary(graphs)
    if cuda:
        record["steady_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        record["steady_peak_above_floor_gib"] = round((torch.cuda.max_memory_allocated() - floor) / 2**30, 3)
    from torch._dynamo.utils import counters

    record["graph_breaks"] = {k: int(v) for k, v in counters["graph_break"].items()}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; one child process each")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--parallel", action="store_true", help="run the child processes at the same time "
                        "(memory stays exact per process; step times do not)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="compile-partition-"))
    base = build(workdir / f"base-{args.layers}", args.layers, device)
    if args.variant:
        from loraship.atomic import write_json

        write_json(args.out, run_variant(args.variant, base, device, args.seq, args.steps))
        return
    names = [v for v in args.variants.split(",") if v]
    children = []
    for name in names:
        out = Path(args.out).with_suffix(f".{name}.json")
        command = [sys.executable, __file__, "--variant", name, "--layers", str(args.layers), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--workdir", str(workdir), "--out", str(out)]
        child = subprocess.Popen(command)
        if not args.parallel:
            child.wait()
        children.append((name, child, out))
    results = []
    for name, child, out in children:
        child.wait()
        results.append(json.loads(out.read_text()) if out.is_file() else {"variant": name, "error": child.returncode})
    from bench.common import markdown_table, versions
    from loraship.atomic import write_json

    write_json(args.out, {"layers": args.layers, "seq": args.seq, "device": device,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "versions": versions(),
                          "results": results})
    rows = []
    for r in results:
        tags, saved = collections.Counter(), collections.Counter()
        for g in r.get("graphs", []):
            tags.update(g["gemm_4bit_tags"])
            for k, v in g["saved"].items():
                saved[k] += v["mib"]
        rows.append([r["variant"], r.get("steady_peak_gib", "-"), r.get("steady_peak_above_floor_gib", "-"),
                     r.get("step_s", ["-"])[-1], dict(tags), ", ".join(f"{k} {v:.0f}" for k, v in saved.most_common(5))])
    print(markdown_table(["variant", "steady peak GiB", "above floor GiB", "step s", "gemm_4bit tags",
                          "saved (count, MiB)"], rows))

if __name__ == "__main__":
    main()
