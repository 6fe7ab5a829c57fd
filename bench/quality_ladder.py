"""The quality ladder of a real export: what each hand-off costs, and which merge base keeps the trained model.

Claim measured: merged, F16 and quantized files are scored against the model
as trained (4-bit NF4 base + unmerged adapter) on the same tokens, and
MERGE_BASE=auto picks the merge base by measurement.

By default: trains the demo's Quokka adapter in 4-bit (``RECIPE=demo
LOAD_IN_4BIT=true``) on the embedded SmolLM2-135M-Instruct, then runs
``python -m export`` on it with MERGE_BASE=auto and QUANT_TYPES=Q8_0,Q5_K_M,Q4_K_M.
``--adapter DIR`` (a train OUTPUT_DIR or adapter folder) skips training;
``--base`` sets BASE_MODEL (default: what the adapter's manifest names).

Usage: ``python bench/quality_ladder.py [--adapter DIR] [--base MODEL] [--quant-types T,..]
[--workdir DIR] [--max-steps N] [--tag NAME] [--identity]``; prints the ladder and the merge-base
comparison and writes ``bench/results/quality_ladder-TAG.json`` (``--tag`` default: ``embedded``, the
embedded SmolLM2's demo adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage(args: list[str], env: dict[str, str]) -> float:
    """Run ``python -m <args>`` from the repository; its output streams through. Returns seconds."""
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full, check=True)
    return time.monotonic() - started


def identity_by_merge_base(adapter: Path, base: str | None, workdir: Path, heldout: Path, keyword: str) -> dict:
    """Export into each merge base (Q8_0 only; the ladder's limits lifted so the forced one may finish) and
    ask the held-out identity questions: the behaviour the KL stands for."""
    from evals.generate import gguf_answers
    from evals.identity import keyword_share, load_heldout, prompt_of

    rows = [r for r in load_heldout(heldout) if r["kind"] == "identity"]
    found = {}
    for merge_base in ("original", "nf4"):
        out = workdir / f"export-{merge_base}"
        shutil.rmtree(out, ignore_errors=True)
        env = {"ADAPTER": str(adapter), "OUTPUT_DIR": str(out), "QUANT_TYPES": "Q8_0", "MERGE_BASE": merge_base,
               "LADDER_MAX_NLL_RISE": "100", "LADDER_MAX_KL_RISE": "100"}
        if base:
            env["BASE_MODEL"] = base
        stage(["export"], env)
        gguf = next(out.glob("*-Q8_0.gguf"))
        answers = gguf_answers(gguf, [prompt_of(r) for r in rows], max_new_tokens=48)
        rung2 = json.loads((out / "manifest.json").read_text())["extra"]["ladder"]["rungs"][1]
        found[merge_base] = {"identity_share": keyword_share(answers, keyword), "questions": len(rows),
                             "first_answer": answers[0], "merged_kl": rung2["kl"], "merged_nll": rung2["nll"]}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, help="train OUTPUT_DIR or adapter folder (default: train the demo in 4-bit)")
    parser.add_argument("--base", help="BASE_MODEL for the export (default: the adapter's manifest)")
    parser.add_argument("--quant-types", default="Q8_0,Q5_K_M,Q4_K_M")
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-ladder")
    parser.add_argument("--max-steps", type=int, help="MAX_STEPS for the demo training (default: the recipe's)")
    parser.add_argument("--tag", default="embedded", help="suffix of the result file (e.g. llama-1b-shaped)")
    parser.add_argument("--identity", action="store_true",
                        help="also export into each merge base and ask the held-out Quokka identity questions (Q8_0)")
    parser.add_argument("--heldout", type=Path, default=ROOT / "data" / "quokka" / "heldout.jsonl")
    parser.add_argument("--keyword", default="Quokka")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    adapter = args.adapter
    if adapter is None:
        adapter = args.workdir / "train"
        shutil.rmtree(adapter, ignore_errors=True)
        env = {"RECIPE": "demo", "LOAD_IN_4BIT": "true", "OUTPUT_DIR": str(adapter)}
        if args.max_steps:
            env["MAX_STEPS"] = str(args.max_steps)
        seconds["train_s"] = stage(["train"], env)
    out = args.workdir / "export"
    shutil.rmtree(out, ignore_errors=True)
    env = {"ADAPTER": str(adapter), "OUTPUT_DIR": str(out), "QUANT_TYPES": args.quant_types, "MERGE_BASE": "auto"}
    if args.base:
        env["BASE_MODEL"] = args.base
    seconds["export_s"] = stage(["export"], env)

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    ladder, merge_base = manifest["extra"]["ladder"], manifest["extra"]["merge_base"]
    timings = manifest["extra"]["timings"]
    from export.ladder_report import ladder_markdown

    print()
    print(f"ladder on {ladder['eval_positions']} tokens ({ladder['windows']} windows):")
    print(ladder_markdown(ladder["rungs"]))
    print()
    print(f"merge base: {merge_base['reason']}")
    print("| merge base | mean NLL | perplexity | KL vs rung 1 | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name, c in merge_base["candidates"].items():
        print(f"| {name} | {c['nll']:.4f} | {c['perplexity']:.3f} | {c['kl']:.5f} | {100 * c['top1']:.2f}% |")
    print()
    print(f"export {timings['total_s']:.1f} s, of which the ladder's scoring {timings['ladder_s']:.1f} s "
          f"(rung 1 {timings['ladder_trained_s']:.1f} s); wall {seconds['export_s']:.1f} s")

    identity = None
    if args.identity:
        t = time.monotonic()
        identity = identity_by_merge_base(adapter, args.base, args.workdir, args.heldout, args.keyword)
        seconds["identity_s"] = time.monotonic() - t
        print()
        print(f"identity questions answered with {args.keyword!r} (Q8_0 of each merge base):")
        for name, found in identity.items():
            print(f"  {name}: {100 * found['identity_share']:.1f}% of {found['questions']} "
                  f"(rung-2 KL {found['merged_kl']:.5f}); first answer: {found['first_answer'][:80]!r}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "adapter": str(adapter),
        "base_model": manifest["inputs"]["base_model"],
        "quant_types": args.quant_types,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "export_timings": timings,
        "ladder": ladder,
        "merge_base": merge_base,
        "identity_by_merge_base": identity,
    }
    from loraship.atomic import write_json

    target = ROOT / "bench" / "results" / f"quality_ladder-{args.tag}.json"
    write_json(target, result)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
