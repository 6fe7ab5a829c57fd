"""The main job rehearsed end to end, as the README's `docker run` goes: the train image's entrypoint `all` with
EXPORT=1 (train -> adapter pushed -> export -> GGUF pushed), then `python -m serve chat` pulling the GGUF, all
against the stand-in Hub on loopback (HF_ENDPOINT), which serves a random-init base and a FineTome-shaped dataset.

Prints a table (each stage's exit status, seconds and peak memory) and writes JSON with the library versions:

    python bench/rehearsal.py --out bench/results/rehearsal-1b.json          # a CUDA GPU: the 1B shape
    python bench/rehearsal.py --tiny --steps 6                               # CPU smoke test: tiny shape, demo recipe
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, versions  # noqa: E402

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "huggingface-hub",
             "llama-cpp-python", "triton")
TOKEN = "hf_rehearsal_token_for_the_stand_in_hub"
BASE_REPO, DATA_REPO, ADAPTER_REPO = "rehearsal/base", "rehearsal/finetome", "rehearsal/adapter"
TOPICS = ["the water cycle", "compound interest", "photosynthesis", "a binary search", "the French revolution",
          "how vaccines work", "recursion", "supply and demand", "plate tectonics", "a hash table"]


def finetome_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like mlabonne/FineTome-100k: ShareGPT ``conversations`` (from/value), ``source`` and ``score``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        answer = " ".join(f"{topic} step {k}: a short point about it." for k in range(rng.randint(2, 30)))
        rows.append({"conversations": [{"from": "human", "value": f"Explain {topic} simply ({i})."},
                                       {"from": "gpt", "value": answer}],
                     "source": "rehearsal", "score": round(rng.uniform(4, 5), 2)})
    return rows


def seed_hub(workdir: Path, shape: str, rows: int) -> None:
    """The base model and the dataset, uploaded to the stand-in Hub as a user's would be on the real one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi
    from transformers import AutoTokenizer

    from bench.random_llama import SHAPES, build_random_llama
    from loraship.embedded import embedded_hf_folder

    # SmolLM2's tokenizer and chat template (the GPU machine has no embedded GGUF: LORASHIP_TOKENIZER_DIR names a copy),
    # so the embedding has exactly its vocabulary.
    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("LORASHIP_TOKENIZER_DIR") or str(embedded_hf_folder()))
    base = build_random_llama(workdir / "base", {**SHAPES[shape], "vocab_size": len(tokenizer)}, tokenizer)
    data = workdir / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(finetome_rows(rows)), data / "train-00000-of-00001.parquet")
    api = HfApi(token=TOKEN)
    api.create_repo(BASE_REPO, private=True)
    api.upload_folder(folder_path=base, repo_id=BASE_REPO)
    api.create_repo(DATA_REPO, repo_type="dataset", private=True)
    api.upload_folder(folder_path=data, path_in_repo="data", repo_id=DATA_REPO, repo_type="dataset")


#: Runs a command and writes the largest resident set of its processes (KiB) to the file named first.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def run_stage(name: str, command: list[str], env: dict, cwd: Path, log: Path) -> dict:
    """Run one stage as its own process; its exit status, seconds and the peak RSS of its largest process."""
    started = time.perf_counter()
    peak = log.with_suffix(".peak")
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(peak), *command], cwd=cwd, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"--- {name}: rc {rc} ---\n" + "\n".join(line[:200] for line in tail), flush=True)
    return {"stage": name, "rc": rc, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(int(peak.read_text()) / 2**20, 2) if peak.is_file() else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, RECIPE=demo, few rows")
    parser.add_argument("--shape", default="llama-3.2-1b", help="the base's shape (bench/random_llama.py)")
    parser.add_argument("--steps", type=int, default=40, help="MAX_STEPS of the training stage")
    parser.add_argument("--rows", type=int, default=400, help="dataset rows")
    parser.add_argument("--workdir", default=None, help="keep the run's files here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else args.shape

    import pytest

    from tests.fixtures.hub import running_stub_hub

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        # The stand-in Hub on loopback, huggingface_hub pointed at it here and (HF_ENDPOINT) in every stage.
        with running_stub_hub(monkeypatch, workdir):
            # The entrypoint runs `python`: this interpreter's, as the image's PATH gives it its own.
            path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            env = {**os.environ, "PATH": path, "HF_TOKEN": TOKEN, "HF_HOME": str(workdir / "hf-home"), "TQDM_DISABLE": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            seed_hub(workdir, shape, 16 if args.tiny else args.rows)
            run = workdir / "run"
            run.mkdir()
            train_env = {**env, "EXPORT": "1", "BASE_MODEL": BASE_REPO, "DATASET": DATA_REPO, "HUB_REPO": ADAPTER_REPO,
                         "MAX_STEPS": str(args.steps), "EVAL_STEPS": str(args.steps), "SAVE_STEPS": str(args.steps),
                         "LOGGING_STEPS": "5", "MAX_SEQ_LENGTH": "1024", "QUANT_TYPES": "Q4_K_M",
                         # A random-init base never ends a chat by itself: the export checks that llama.cpp stops on
                         # its end-of-turn token instead.
                         "STOP_CHECK": "eos_token"}
            if args.tiny:  # the demo recipe is the one the image runs without a GPU
                train_env.update(RECIPE="demo", MAX_SEQ_LENGTH="256", EVAL_SIZE="4")
            stages = [run_stage("entrypoint all (train + export)", ["sh", str(ROOT / "docker" / "entrypoint.sh"), "all"],
                                train_env, run, workdir / "all.log")]
            serve_env = {**env, "MODEL": f"{ADAPTER_REPO}-GGUF", "MAX_TOKENS": "48"}
            stages.append(run_stage("python -m serve chat", [sys.executable, "-m", "serve", "chat",
                                                             "Explain recursion simply."],
                                    serve_env, run, workdir / "serve.log"))
            stages[-1]["answer"] = (workdir / "serve.log").read_text(errors="replace").strip()[-300:]
        summary = json.loads((run / "outputs/train/train_summary.json").read_text()) \
            if (run / "outputs/train/train_summary.json").is_file() else {}
        manifest_path = run / "outputs/export/manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    extra = manifest.get("extra", {})
    result = {
        "shape": shape, "steps": args.steps, "stages": stages,
        "train": {key: summary.get(key) for key in ("runtime_s", "gpu_peak_memory_gib", "final_train_loss",
                                                     "train_losses", "throughput", "device", "optimizer")},
        "export": {"timings": extra.get("timings"), "memory": extra.get("memory")},
        "versions": versions(LIBRARIES),
    }
    rows = [[s["stage"], s["rc"], s["seconds"], s["peak_rss_gib"]] for s in stages]
    print(markdown_table(["stage", "rc", "seconds", "peak RSS GiB"], rows))
    print(f"train: {result['train']['runtime_s']} s, GPU peak {result['train']['gpu_peak_memory_gib']} GiB, "
          f"pace {result['train']['throughput']}; export timings {result['export']['timings']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(s["rc"] == 0 for s in stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
