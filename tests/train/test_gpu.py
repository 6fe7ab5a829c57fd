"""On a CUDA GPU: real 4-bit QLoRA through ``python -m train`` on a Llama-3.2-1B-shaped model.

The base is random-init (no download): hidden 2048, 16 layers, 32 heads, 8 kv heads,
intermediate 8192, vocab 128256, tied embeddings, saved as a local folder with the SmolLM2
tokenizer (ids fit in the larger vocabulary). The task is synthetic (repeat five words drawn
from sixteen), so the eval loss must fall far below its random-init value in a few dozen steps.
Runs on the device machine; skipped without CUDA (docs/benchmarks.md has the recorded run).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
LLAMA_32_1B_SHAPE = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=2048,
    rope_theta=500000.0, rms_norm_eps=1e-5,
)
WORDS = "apple river stone cloud amber violet maple tiger copper lemon harbor falcon velvet prism cedar orbit".split()


def build_llama_1b_shaped(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **LLAMA_32_1B_SHAPE,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def write_repeat_task(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            words = " ".join(rng.choice(WORDS) for _ in range(5))
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"Repeat after me: {words}"},
                {"role": "assistant", "content": words},
            ]}) + "\n")
    return path


def test_qlora_on_a_llama_32_1b_shaped_model_learns_a_synthetic_task(tmp_path, request):
    tokenizer_dir = os.environ.get("LORASHIP_TOKENIZER_DIR")
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else request.getfixturevalue("embedded_tokenizer_dir")
    started = time.time()
    base = build_llama_1b_shaped(tmp_path / "llama-1b-shaped", tokenizer_dir)
    build_s = time.time() - started
    data = write_repeat_task(tmp_path / "repeat.jsonl", rows=1200)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "BASE_MODEL": str(base), "DATASET": str(data), "OUTPUT_DIR": str(out),
        "LOAD_IN_4BIT": "auto", "OPTIMIZER": "auto", "MAX_STEPS": "150", "BATCH_SIZE": "8", "GRAD_ACCUM": "1",
        "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "5", "LR_SCHEDULER": "cosine", "LORA_R": "16", "LORA_ALPHA": "32",
        "EVAL_SIZE": "32", "EVAL_STEPS": "50", "SAVE_STEPS": "50", "LOGGING_STEPS": "1", "MAX_SEQ_LENGTH": "128",
        "GRADIENT_CHECKPOINTING": "true", "SEED": "0",
    }
    for var in ("RECIPE", "HUB_REPO", "HF_TOKEN"):
        env.pop(var, None)
    command = [sys.executable, "-m", "train"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-4000:], result.stderr[-4000:])
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "train_summary.json").read_text())
    evals = [loss for _, loss in summary["eval_losses"]]
    train_losses = [loss for _, loss in summary["train_losses"]]
    report = {
        "command": "python -m train with " + " ".join(
            f"{k}={env[k]}" for k in ("LOAD_IN_4BIT", "OPTIMIZER", "MAX_STEPS", "BATCH_SIZE", "GRAD_ACCUM", "LEARNING_RATE",
                                      "LORA_R", "LORA_ALPHA", "MAX_SEQ_LENGTH", "EVAL_SIZE", "EVAL_STEPS")),
        "device": summary["device"], "load_in_4bit": summary["load_in_4bit"], "optimizer": summary["optimizer"],
        "compute_dtype": summary["compute_dtype"], "base_build_s": round(build_s, 1), "train_runtime_s": summary["runtime_s"],
        "gpu_peak_memory_gib": summary.get("gpu_peak_memory_gib"), "train_losses": summary["train_losses"],
        "eval_losses": summary["eval_losses"], "best_step": summary["best_step"],
        "tokens": summary["tokens"],
    }
    print(json.dumps(report, indent=2))
    if os.environ.get("LORASHIP_GPU_OUT"):
        target = Path(os.environ["LORASHIP_GPU_OUT"])
        (target / "gpu_qlora_1b.json").write_text(json.dumps(report, indent=2))
        shutil.copy(out / "loss.png", target / "gpu_qlora_1b_loss.png")
        shutil.copy(out / "adapter" / "README.md", target / "gpu_qlora_1b_card.md")

    assert summary["device"].startswith("CUDA")
    assert summary["load_in_4bit"] is True and summary["compute_dtype"] == "bfloat16"
    assert summary["optimizer"] == "adamw_torch_fused"
    assert summary["global_step"] == 150
    # Random init predicts ~uniformly over 128,256 tokens (ln 128256 = 11.76); a first try (60 steps,
    # lr 1e-3) reached eval loss 4.69 and was still falling. Learned means: far below the start, still improving.
    assert train_losses[0] > 10
    assert evals[-1] < 0.45 * train_losses[0] and evals[-1] < evals[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
