"""What a compiled, checkpointed decoder stack keeps for its backward pass, and what that costs in memory.

torch.compile splits the joint forward+backward graph in two (AOTAutograd's min-cut partitioner):
whatever the backward needs is either saved by the forward or recomputed from what is saved. With
gradient checkpointing inside the graph, the ops of each checkpointed layer are tagged "recompute",
so only the layer inputs should be saved. This script shows what is actually saved, by op, for one
variant per process (the partitioner's choice), and the step's steady peak memory:

    python3 bench/compile_partition.py --variant stack --out /tmp/p.json
    python3 bench/compile_partition.py --variants eager,stack,stack-dropout0 --out /tmp/p.json  # one process each

Variants: ``eager`` (no compile); ``stack`` (train.speed.compile_model's compile_mode=stack, LoRA dropout
0.05: with the selective-checkpoint policy that recomputes bitsandbytes' ops, speed.checkpoint_kwargs);
``stack-dropout0``; ``stack-unselective`` (plain checkpointing inside the compiled stack, as before that
policy); ``stack-nographsafe`` (plain checkpointing, torch._functorch.config.graphsafe_rng_functionalization
off). A random-init Llama with the 8B's widths and ``--layers`` layers, NF4 4-bit, LoRA r8 on q,k,v,o.

Session 5's first run of this script (a version before its first commit, when ``stack`` meant plain
checkpointing and ``stack-sac`` the policy) is bench/results/compile_partition-call2.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("eager", "stack", "stack-dropout0", "stack-unselective", "stack-nographsafe")
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


@contextlib.contextmanager
def partitions():
    """Each graph torch.compile splits while this is open (AOTAutograd's min-cut partitioner): the
    recompute tags of its bitsandbytes 4-bit matmuls, what its forward saves for the backward as
    ``(op, bytes or None)``, weights and inputs left out, and the ops its backward runs (``backward``:
    each call's target, in order). Also used by tests/train/test_compile.py."""
    import torch._functorch.partitioners as partitioners
    import torch._inductor.compile_fx as compile_fx

    graphs: list[dict] = []
    original = partitioners.min_cut_rematerialization_partition

    def spy(joint_module, joint_inputs, **kwargs):
        tags = [node.meta.get("recompute") for node in joint_module.graph.nodes
                if node.op == "call_function" and "gemm_4bit" in str(node.target)]
        forward, backward = original(joint_module, joint_inputs, **kwargs)
        saved = []
        for node in list(forward.graph.nodes)[-1].args[0]:
            if getattr(node, "op", "placeholder") == "placeholder":
                continue
            value = node.meta.get("val")
            try:
                size = int(value.numel()) * value.element_size()
            except Exception:  # not a tensor, or symbolic sizes
                size = None
            saved.append((str(node.target), size))
        graphs.append({"tags": tags, "saved": saved, "backward": [str(node.target) for node in backward.graph.nodes
                                                                  if node.op == "call_function"]})
        return forward, backward

    partitioners.min_cut_rematerialization_partition = compile_fx.min_cut_rematerialization_partition = spy
    try:
        yield graphs
    finally:
        partitioners.min_cut_rematerialization_partition = compile_fx.min_cut_rematerialization_partition = original


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

    from train import speed

    record: dict = {"variant": variant}
    if variant == "stack-nographsafe":
        torch._functorch.config.graphsafe_rng_functionalization = False
    if variant in ("stack-unselective", "stack-nographsafe"):
        speed.checkpoint_kwargs = lambda compile_mode="", save_attention=False: {"use_reentrant": False}
    dropout = 0.0 if variant.endswith("dropout0") else 0.05
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": device})
    model = speed.prepare_frozen_base(model, gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if variant.startswith("stack"):
        speed.compile_model(model, "stack")
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
        record = run_variant(args.variant, base, device, args.seq, args.steps)
        Path(args.out).write_text(json.dumps(record, indent=1))
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
    Path(args.out).write_text(json.dumps({"layers": args.layers, "seq": args.seq, "device": device,
                                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                                          "results": results}, indent=1))
    print("| variant | steady peak GiB | above floor GiB | step s | gemm_4bit tags | saved (count, MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        graphs = r.get("graphs", [])
        tags = collections.Counter()
        saved = collections.Counter()
        for g in graphs:
            tags.update(g["gemm_4bit_tags"])
            for k, v in g["saved"].items():
                saved[k] += v["mib"]
        top = ", ".join(f"{k} {v:.0f}" for k, v in saved.most_common(5))
        print(f"| {r['variant']} | {r.get('steady_peak_gib', '-')} | {r.get('steady_peak_above_floor_gib', '-')} | "
              f"{r.get('step_s', ['-'])[-1]} | {dict(tags)} | {top} |")


if __name__ == "__main__":
    main()
