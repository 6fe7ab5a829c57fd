"""What the ladder's full-precision limits see: honest merges against merges that lose the fine-tune.

Claim measured: on a real QLoRA adapter, LADDER_MAX_NLL_RISE (0.02 nats, on either text) and
LADDER_MAX_KL_RISE (0.02 nats/token, training's own base only) pass the merges that keep the model as
trained and fail the ones that lose it, and the original-base merge is judged by its held-out NLL, not
by the KL that the NF4 rounding it removes puts between it and the trained model.

Each variant is merged as the export merges (export.merge.merge_into_folder, float32) and scored on the
export's two texts against rung 1 (the model as trained: NF4 base + unmerged adapter):
``nf4`` (the honest merge), ``original`` (the base swap MERGE_BASE=auto weighs), ``nf4-drop-one``
(one attention output's delta lost, as a broken merge would), ``nf4-no-adapter`` (the fine-tune lost).

Usage: ``python bench/ladder_limits.py --tag TAG --adapter TRAIN_OUTPUT_DIR``; writes
``bench/results/ladder_limits-TAG.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--adapter", type=Path, required=True, help="train OUTPUT_DIR of a 4-bit run")
    args = parser.parse_args()

    import export.merge
    from export.ladder import (FULL_PRECISION, Limits, LadderError, build_eval_set, build_heldout_eval_set, check_rung,
                               merged_model, score_hf, trained_model)
    from export.settings import DEFAULT_EVAL_TEXT
    from export.verify import load_tokenizer, read_eval_texts
    from loraship.embedded import embedded_hf_folder
    from loraship.heldout import read_heldout_rows

    adapter_dir = args.adapter / "adapter"
    base_dir = embedded_hf_folder()
    tokenizer = load_tokenizer(adapter_dir)
    eval_sets = {"heldout": build_heldout_eval_set(read_heldout_rows(adapter_dir), len(tokenizer), 1024),
                 "general": build_eval_set(tokenizer, read_eval_texts(DEFAULT_EVAL_TEXT), 256, 1024)}
    model, specs = trained_model(base_dir, adapter_dir, load_in_4bit=True)
    rung1, references = score_hf("adapter", "as trained", None, model, eval_sets, None)
    del model
    adapter = export.merge.load_adapter(adapter_dir)
    layers = export.merge.read_base_config(base_dir)["num_hidden_layers"]
    dropped = f"model.layers.{layers // 2}.self_attn.o_proj.weight"
    real = export.merge.merge_tensor
    limits = Limits(0.02, 0.02, "LADDER_MAX_NLL_RISE", "LADDER_MAX_KL_RISE")

    variants = {"nf4": (specs, real), "original": (None, real),
                "nf4-drop-one": (specs, lambda name, t, a, dtype=None: t if name == dropped else real(name, t, a, dtype)),
                "nf4-no-adapter": (specs, lambda name, t, a, dtype=None: t if dtype is None else t.to(dtype))}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nf4, merge_tensor) in variants.items():
            export.merge.merge_tensor = merge_tensor
            try:
                folder = export.merge.merge_into_folder(base_dir, adapter, Path(tmp) / name, tokenizer_dir=adapter_dir,
                                                        nf4=nf4)
            finally:
                export.merge.merge_tensor = real
            score, _ = score_hf(name, name, "adapter", merged_model(folder), eval_sets, references)
            try:
                check_rung(score, rung1, limits, kl_limited=name != "original")
                verdict = "passes"
            except LadderError as err:
                verdict = "fails: " + str(err).split(": ", 2)[-1].split(". Something")[0]
            found[name] = {**score.to_json(), "verdict": verdict,
                           "nll_rise": {t: round(score.texts[t].nll - rung1.texts[t].nll, 5) for t in score.texts}}

    print("| merge | held-out NLL rise | general NLL rise | held-out KL | general KL | the limits |")
    print("|---|---|---|---|---|---|")
    for name, r in found.items():
        print(f"| {name} | {r['nll_rise']['heldout']:+.4f} | {r['nll_rise']['general']:+.4f} | "
              f"{r['heldout']['kl']:.5f} | {r['general']['kl']:.5f} | {r['verdict'][:60]} |")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "adapter": str(args.adapter),
        "dropped_delta": dropped,
        "rung1": rung1.to_json(),
        "variants": found,
    }
    from loraship.atomic import write_json

    target = ROOT / "bench" / "results" / f"ladder_limits-{args.tag}.json"
    write_json(target, result)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
