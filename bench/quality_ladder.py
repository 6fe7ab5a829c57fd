"""The quality ladder of real exports: each merge base at F16, Q8_0 and Q4_K_M, judged on the fine-tune's own
held-out rows and on general text, and the base MERGE_BASE=auto keeps.

Claim measured: the rule in export/merge_base.py (the shipped file must pass every check; then the lower
held-out NLL at the shipped type; near-ties by KL) picks the base a user would want, and each file's cost
shows on the texts the user cares about.

Per adapter (``--adapter DIR``, or trained here with ``--train KEY=VALUE ...``):

1. ``python -m export`` with every default (MERGE_BASE=auto, QUANT_TYPES=Q4_K_M): the rule's choice, or the
   error and OUTPUT_DIR/incomplete/report.json when no base passes;
2. per merge base, ``MERGE_BASE=<base> QUANT_TYPES=Q4_K_M,Q8_0 STOP_CHECK=eos_token`` with the ladder's
   limits lifted, so every file is made and scored; then the export's own natural stop check
   (export.verify.verify_gguf, STOP_PROMPTS=3) on each file;
3. ``--identity``: the held-out Quokka identity questions on each base's Q4_K_M (the demo's goal).

Usage: ``python bench/quality_ladder.py --tag NAME [--adapter DIR | --train KEY=VALUE ...] [--base MODEL]
[--identity] [--workdir DIR] [--reuse]``; prints the table and writes ``bench/results/quality_ladder-NAME.json``.
``--reuse`` keeps each export of WORKDIR/NAME that finished (its manifest.json is there), so a run cut off
goes on where it stopped; ``seconds`` then leaves out each reused export (``reused`` names them), and the
default export's own ``seconds`` is its manifest's ``total_s``.
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

TYPES = ("F16", "Q8_0", "Q4_K_M")
LIFTED = {"LADDER_MAX_NLL_RISE": "100", "LADDER_MAX_KL_RISE": "100", "LADDER_MAX_QUANT_NLL_RISE": "100",
          "LADDER_MAX_QUANT_KL_RISE": "100"}


def stage(args: list[str], env: dict[str, str], check: bool = True) -> tuple[int, float]:
    """Run ``python -m <args>`` from the repository (its output streams through): exit status and seconds."""
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    code = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full, check=check).returncode
    return code, time.monotonic() - started


def finished(out: Path) -> bool:
    return (out / "manifest.json").is_file()


def default_export(adapter: Path, out: Path, base: dict, reuse: bool) -> dict:
    """The export as a user runs it: the manifest's merge-base record, or the failure's report."""
    if reuse and finished(out):
        code, seconds = 0, json.loads((out / "manifest.json").read_text(encoding="utf-8"))["extra"]["timings"]["total_s"]
    else:
        shutil.rmtree(out, ignore_errors=True)
        code, seconds = stage(["export"], {"ADAPTER": str(adapter), "OUTPUT_DIR": str(out), **base}, check=False)
    if code == 0:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return {"exit": 0, "seconds": round(seconds, 1), "merge_base": manifest["extra"]["merge_base"],
                "timings": manifest["extra"]["timings"]}
    report = out / "incomplete" / "report.json"
    return {"exit": code, "seconds": round(seconds, 1),
            "report": json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None}


def base_rows(adapter: Path, base: str, out: Path, keyword_rows: list[dict] | None, keyword: str,
              base_model: dict, reuse: bool) -> dict:
    """One merge base at every type: its ladder rungs, each file's natural stop check, and its identity share."""
    from export.verify import VerifyError, load_tokenizer, verify_gguf

    if not (reuse and finished(out)):
        shutil.rmtree(out, ignore_errors=True)
        stage(["export"], {"ADAPTER": str(adapter), "OUTPUT_DIR": str(out), "MERGE_BASE": base,
                           "QUANT_TYPES": "Q4_K_M,Q8_0", "STOP_CHECK": "eos_token", **LIFTED, **base_model})
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rungs = {r["rung"]: r for r in manifest["extra"]["ladder"]["rungs"]}
    tokenizer = load_tokenizer(adapter / "adapter" if (adapter / "adapter").is_dir() else adapter)
    found = {"merged": rungs["merged"], "rungs": {}, "stop": {}}
    for quant in TYPES:
        gguf = next(out.glob(f"*-{quant}.gguf"))
        found["rungs"][quant] = rungs[quant]
        try:
            checked = verify_gguf(gguf, tokenizer, stop_check="natural", stop_prompts=3)
            found["stop"][quant] = {"passed": True, "longest_reply_tokens": checked.longest_reply_tokens}
        except VerifyError as err:
            found["stop"][quant] = {"passed": False, "error": str(err)}
    if keyword_rows is not None:
        from evals.generate import gguf_answers
        from evals.identity import keyword_share, prompt_of

        answers = gguf_answers(next(out.glob("*-Q4_K_M.gguf")), [prompt_of(r) for r in keyword_rows],
                               max_new_tokens=48)
        found["identity_q4_k_m"] = {"share": keyword_share(answers, keyword), "questions": len(keyword_rows)}
    return found


def table_rows(name: str, by_base: dict, choice: str) -> list[list[str]]:
    rows = []
    for base, found in by_base.items():
        for quant in TYPES:
            r, stop = found["rungs"][quant], found["stop"][quant]
            rows.append([name, base + (" (kept)" if base == choice else ""), quant, f"{r['heldout']['nll']:.4f}",
                         f"{r['general']['nll']:.4f}", f"{r['heldout']['kl']:.5f}", f"{r['general']['kl']:.5f}",
                         "stops" if stop["passed"] else "**loops**"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", required=True, help="suffix of the result file, e.g. demo, short-run, long-run")
    parser.add_argument("--adapter", type=Path, help="train OUTPUT_DIR (default: train one with --train)")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="settings for python -m train")
    parser.add_argument("--base", help="BASE_MODEL for the exports (default: what the adapter's manifest names)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-ladder")
    parser.add_argument("--identity", action="store_true", help="ask the held-out Quokka identity questions")
    parser.add_argument("--heldout", type=Path, default=ROOT / "data" / "quokka" / "heldout.jsonl")
    parser.add_argument("--keyword", default="Quokka")
    parser.add_argument("--reuse", action="store_true", help="keep each export of WORKDIR/TAG that finished")
    args = parser.parse_args()

    work = args.workdir / args.tag
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    adapter = args.adapter
    if adapter is None:
        adapter = work / "train"
        shutil.rmtree(adapter, ignore_errors=True)
        env = dict(item.split("=", 1) for item in args.train)
        _, seconds["train_s"] = stage(["train"], {**env, "OUTPUT_DIR": str(adapter)})
    train_manifest = json.loads((adapter / "adapter" / "manifest.json").read_text(encoding="utf-8"))

    base_model = {"BASE_MODEL": args.base} if args.base else {}
    reused = [f"export-{name}" for name in ("default", "original", "nf4")
              if args.reuse and finished(work / f"export-{name}")]
    t = time.monotonic()
    auto = default_export(adapter, work / "export-default", base_model, args.reuse)
    if "export-default" not in reused:
        seconds["default_export_s"] = time.monotonic() - t
    keyword_rows = None
    if args.identity:
        from evals.identity import load_heldout

        keyword_rows = [r for r in load_heldout(args.heldout) if r["kind"] == "identity"]
    bases = ["original", "nf4"] if train_manifest["inputs"].get("load_in_4bit") else ["original"]
    by_base = {}
    for base in bases:
        t = time.monotonic()
        by_base[base] = base_rows(adapter, base, work / f"export-{base}", keyword_rows, args.keyword, base_model,
                                   args.reuse)
        seconds[f"{base}_s" if f"export-{base}" not in reused else f"{base}_checks_s"] = time.monotonic() - t

    choice = auto["merge_base"]["chosen"] if auto["exit"] == 0 else None
    from bench.common import markdown_table

    print()
    print(markdown_table(["adapter", "base", "type", "held-out NLL", "general NLL", "held-out KL", "general KL",
                          "stop check"], table_rows(args.tag, by_base, choice)))
    print()
    if auto["exit"] == 0:
        print(f"default export: {auto['merge_base']['reason']} ({auto['seconds']:.0f} s)")
    else:
        print(f"default export: exit {auto['exit']} (no base passed); report: {auto['report'] and 'kept'}")
    for base, found in by_base.items():
        if "identity_q4_k_m" in found:
            share = found["identity_q4_k_m"]
            print(f"{base} Q4_K_M: {100 * share['share']:.1f}% of {share['questions']} identity questions say "
                  f"{args.keyword!r}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "adapter": str(adapter),
        "train": {"settings": train_manifest.get("settings"), "global_step": train_manifest["extra"]["global_step"],
                  "heldout_rows": train_manifest["extra"].get("heldout_rows")},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "reused": reused,
        "default_export": auto,
        "by_base": by_base,
    }
    from loraship.atomic import write_json

    target = ROOT / "bench" / "results" / f"quality_ladder-{args.tag}.json"
    write_json(target, result)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
