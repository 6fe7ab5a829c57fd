"""Each model family through the whole pipeline on a CPU: train -> export -> serve, one tiny run per family.

A few steps of `train` (assistant-only loss, the end-of-turn check), `export` (llama.cpp converts; template
parity, the stop check on EOS for random weights, the quality ladder; Q4_K_M) and a `serve chat` answer through
llama.cpp. The README's family x stage table is these tests: test_trains, test_exports, test_serves.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from serve.model import read_gguf_header
from tests.fixtures.export_runs import run_export_cli, threads
from tests.fixtures.families import FAMILIES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUOKKA = ROOT / "data" / "quokka" / "train.jsonl"
#: The export's name: no family in it (llama.cpp reads Phi-3's from the GGUF's name, and export must put it there).
NAME = "quokka"
#: Export settings that keep a family's export to seconds: the random weights never choose EOS themselves.
EXPORT = {"QUANT_TYPES": "Q4_K_M", "STOP_CHECK": "eos_token", "STOP_PROMPTS": "1", "EVAL_CTX": "32",
          "EVAL_TOKENS": "16", "LADDER_TOKENS": "16"}


def train_settings(base, output_dir):
    from train.settings import TrainSettings

    return TrainSettings(
        base_model=str(base), dataset=str(QUOKKA), output_dir=output_dir, max_samples=8, eval_size=2,
        max_seq_length=128, max_steps=2, eval_steps=2, save_steps=2, batch_size=1, grad_accum=1,
        learning_rate=5e-3, logging_steps=1, gradient_checkpointing=False, lora_r=4, lora_alpha=8,
        report_to=["none"], seed=7,
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, family_models, family_converter, tmp_path_factory):
    """One family's train and export (each stage's outcome kept, so one failing leaves the others' tests to say so)."""
    from train.run import train

    name = request.param
    folder = tmp_path_factory.mktemp(f"pipeline-{name}")
    outcome = {"name": name, "train_dir": folder / "train", "export_dir": folder / "export", "seconds": {}}
    base = family_models(name)
    started = time.perf_counter()
    try:
        outcome["summary"] = train(train_settings(base, outcome["train_dir"]), echo=lambda line: None)
    except Exception as err:  # noqa: BLE001 - reported by test_trains, and the later stages skip
        outcome["train_error"] = err
        return outcome
    outcome["seconds"]["train"] = time.perf_counter() - started
    started = time.perf_counter()
    outcome["export"] = run_export_cli({"ADAPTER": str(outcome["train_dir"]), "OUTPUT_DIR": str(outcome["export_dir"]),
                                        "MODEL_NAME": NAME, "THREADS": threads(), **EXPORT})
    outcome["seconds"]["export"] = time.perf_counter() - started
    return outcome


def test_trains(run):
    if "train_error" in run:
        raise run["train_error"]
    summary = run["summary"]
    family = FAMILIES[run["name"]]
    assert summary["global_step"] == 2 and all(math.isfinite(loss) for _, loss in summary["train_losses"])
    report = json.loads((run["train_dir"] / "data_report.json").read_text())
    assert report["end_of_turn_token"] == family.end_of_turn and report["end_of_turn_checked"] == 8
    assert 0 < report["loss_token_share"] < 1  # assistant-only: the prompts are masked
    config = json.loads((run["train_dir"] / "adapter" / "adapter_config.json").read_text())
    assert tuple(sorted(config["target_modules"])) == family.attention  # LORA_TARGET_MODULES=attention


def exported(run) -> dict:
    if "export" not in run:
        pytest.skip(f"{run['name']} did not train")
    result = run["export"]
    assert result.exit_code == 0, result.stderr
    return json.loads((run["export_dir"] / "manifest.json").read_text())


def test_exports(run):
    manifest = exported(run)
    name = run["name"]
    verification = manifest["extra"]["files"][f"{NAME}-Q4_K_M.gguf"]["verification"]
    assert verification["parity_conversations"] == 2 and verification["parity_tokens"] > 40
    # llama.cpp stops on the template's end-of-turn token (and on EOS: the stop check forced each).
    assert verification["end_of_turn"] == FAMILIES[name].end_of_turn
    assert verification["end_of_turn_id"] in verification["eos_token_ids"] and verification["finish_reason"] == "stop"
    ladder = manifest["extra"]["ladder"]
    assert not ladder.get("skipped") and ladder["rungs"], ladder
    header = read_gguf_header(run["export_dir"] / f"{NAME}-Q4_K_M.gguf")
    assert header.metadata["general.name"] == (f"{NAME} (phi3)" if name == "phi3" else NAME)


def test_serves(run):
    from click.testing import CliRunner

    from serve.__main__ import main

    exported(run)
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["chat", "Hello! Who are you?"], catch_exceptions=False, env={
        "MODEL": str(run["export_dir"]), "MAX_TOKENS": "8", "TEMPERATURE": "0", "N_CTX": "256",
        "N_THREADS": threads(), "SYSTEM_PROMPT": None, "API_KEY": None, "HF_TOKEN": None})
    run["seconds"]["serve"] = time.perf_counter() - started
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1  # random weights: an answer (maybe blank lines)
    if run["name"] == "gemma2":  # its template refuses a system turn: said at the start, in one line
        refused = CliRunner().invoke(main, ["chat", "Hello!"], catch_exceptions=False, env={
            "MODEL": str(run["export_dir"]), "N_CTX": "256", "N_THREADS": threads(), "SYSTEM_PROMPT": "Be brief."})
        assert refused.exit_code == 2 and refused.stdout == ""
        assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
            "error: SYSTEM_PROMPT is set, but the GGUF's chat template refuses a system turn (System role not "
            "supported); unset SYSTEM_PROMPT"]
    print(f"\n{run['name']}: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in run["seconds"].items()))
