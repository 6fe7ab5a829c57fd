"""Train a QLoRA adapter on a random-init Llama-3.2-1B-shaped model (GPU), for the quality ladder.

The base comes from ``bench/random_llama.py`` (seeded CPU generator), so this
machine can rebuild the identical base later and run the export's quality
ladder on the adapter the GPU trained: the fingerprint written next to the
adapter proves the two bases are the same bytes.

Task (synthetic, learnable in a few hundred steps by LoRA on q/k/v/o): "Repeat
after me: w1 … w5" -> "w1 … w5", five words drawn from sixteen. The held-out
eval text is 48 further conversations rendered with the chat template.

Usage (device)::

    python bench/train_1b_synthetic.py --tokenizer DIR --out DIR [--steps 300]

writes ``adapter.tar.gz`` (the adapter folder), ``train_summary.json``,
``run_settings.json``, ``loss.png`` and ``base.json`` (shape, seed, fingerprint) into ``--out``.
``--heldout FILE`` alone writes the held-out eval text (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = "llama-3.2-1b"
SEED = 0
WORDS = "apple river stone cloud amber violet maple tiger copper lemon harbor falcon velvet prism cedar orbit".split()


def conversations(rows: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        words = " ".join(rng.choice(WORDS) for _ in range(5))
        out.append([{"role": "user", "content": f"Repeat after me: {words}"},
                    {"role": "assistant", "content": words}])
    return out


def write_heldout_text(path: Path, tokenizer, rows: int = 48, seed: int = 1) -> Path:
    """Held-out conversations rendered with the chat template, one paragraph each (the export's EVAL_TEXT format)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False).strip() for c in conversations(rows, seed)]
    path.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--heldout", type=Path, help="only write the held-out eval text here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.heldout:
        write_heldout_text(args.heldout, tokenizer)
        return
    from bench.random_llama import build_random_llama, weights_fingerprint

    work = Path(tempfile.mkdtemp(prefix="train1b-"))
    started = time.time()
    base = build_random_llama(work / "base", SHAPE, tokenizer, seed=SEED)
    fingerprint = weights_fingerprint(base)
    build_s = time.time() - started
    data = work / "repeat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for conversation in conversations(1200, seed=0):
            fh.write(json.dumps({"messages": conversation}) + "\n")
    out = work / "out"
    env = {
        **os.environ,
        "BASE_MODEL": str(base), "DATASET": str(data), "OUTPUT_DIR": str(out),
        "LOAD_IN_4BIT": "auto", "OPTIMIZER": "auto", "MAX_STEPS": str(args.steps), "BATCH_SIZE": "8",
        "GRAD_ACCUM": "1", "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "10", "LR_SCHEDULER": "cosine",
        "LORA_R": "16", "LORA_ALPHA": "32", "EVAL_SIZE": "32", "EVAL_STEPS": "50", "SAVE_STEPS": "50",
        "LOGGING_STEPS": "5", "MAX_SEQ_LENGTH": "128", "GRADIENT_CHECKPOINTING": "true", "SEED": "0",
    }
    for var in ("RECIPE", "HUB_REPO", "HF_TOKEN"):
        env.pop(var, None)
    subprocess.run([sys.executable, "-m", "train"], cwd=ROOT, env=env, check=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out / "adapter.tar.gz", "w:gz") as tar:
        tar.add(out / "adapter", arcname="adapter")
    for name in ("train_summary.json", "run_settings.json", "loss.png"):
        (args.out / name).write_bytes((out / name).read_bytes())
    (args.out / "base.json").write_text(json.dumps(
        {"shape": SHAPE, "seed": SEED, "fingerprint": fingerprint, "build_s": round(build_s, 1),
         "train_settings": {k: env[k] for k in ("LOAD_IN_4BIT", "MAX_STEPS", "BATCH_SIZE", "LEARNING_RATE", "LORA_R",
                                                "LORA_ALPHA", "MAX_SEQ_LENGTH")}},
        indent=2))
    print(json.dumps(json.loads((args.out / "base.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
