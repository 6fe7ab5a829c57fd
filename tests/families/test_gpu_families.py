"""On a CUDA GPU: each family's tiny random-init model through ``python -m train`` with the CUDA defaults.

4-bit NF4 base, per-layer CUDA graphs and every lever the plan takes (train/speed/), fitted to the family: the
run must finish its steps with finite losses, and say in its ``note: speed:`` lines what it left out for the
family. Skipped without CUDA. On the device machine without the sdist, carry the extracted vocab folder and
name it in LORASHIP_FAMILY_VOCABS (tests/fixtures/families.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.families import FAMILIES

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
QUOKKA = REPO / "data" / "quokka" / "train.jsonl"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_trains_with_the_cuda_defaults(name, family_models, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "BASE_MODEL": str(family_models(name)), "DATASET": str(QUOKKA), "OUTPUT_DIR": str(out),
        "MAX_SAMPLES": "64", "EVAL_SIZE": "8", "MAX_STEPS": "6", "EVAL_STEPS": "3", "SAVE_STEPS": "3",
        "BATCH_SIZE": "4", "GRAD_ACCUM": "1", "MAX_SEQ_LENGTH": "256", "LOGGING_STEPS": "1", "REPORT_TO": "none",
        "LORA_R": "8", "LORA_ALPHA": "16", "SEED": "0",
    }
    for var in ("LOAD_IN_4BIT", "TORCH_COMPILE", "OPTIMIZER", "LORA_TARGET_MODULES", "RECIPE"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, "-m", "train", "--env-file", str(tmp_path / "no.env")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: speed:")]
    print(f"\n{name}: exit {result.returncode}\n" + "\n".join(notes))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["load_in_4bit"] is True and summary["global_step"] == 6
    assert all(math.isfinite(loss) for _, loss in summary["train_losses"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert tuple(sorted(config["target_modules"])) == FAMILIES[name].attention
