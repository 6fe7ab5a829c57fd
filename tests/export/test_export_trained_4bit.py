"""A new user's first QLoRA export, with every default: 3 steps in 4-bit on a small ShareGPT file of short
answers with system prompts, then ``python -m export``.

The shipped Q4_K_M file must stop by itself, and the manifest must show both merge bases judged at
Q4_K_M on the train run's own held-out rows, and the choice the rule made. The same adapter exported
again with MERGED=true pushes a merged transformers folder to the stand-in Hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraship.manifest import read_manifest, verify_files
from tests.fixtures.export_runs import run_export_cli
from tests.fixtures.hub import running_stub_hub
from tests.fixtures.stage_runs import base_env, run_stage

# One 4-bit train and two two-base exports on 2 cores: over 10 minutes, past the suite's 900 s default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "short_answers_sharegpt.jsonl"
TRAIN = {"BASE_MODEL": "embedded", "LOAD_IN_4BIT": "true", "MAX_STEPS": "3", "EVAL_FRACTION": "0.25",
         "MAX_SEQ_LENGTH": "256", "DATASET": str(FIXTURE)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, converter_dir):
    root = tmp_path_factory.mktemp("trained-4bit")
    run = run_stage("train", [], {**base_env(), **TRAIN, "OUTPUT_DIR": str(root / "train")}, cwd=root, timeout=1800)
    assert run.exit == 0, run.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = run_export_cli({"ADAPTER": str(root / "train"), "OUTPUT_DIR": str(root / "export")})
    assert result.exit_code == 0, result.stderr[-3000:]
    return root


GGUF_REPO, MERGED_REPO, TOKEN = "stub-user/smol-gguf", "stub-user/smol-gguf-merged", "hf_stub_write_token"


@pytest.fixture(scope="module")
def merged_push(exported):
    """(export folder, the merged repo's files as pushed) for MERGED=true with HUB_REPO set, other settings default."""
    with pytest.MonkeyPatch.context() as patch, running_stub_hub(patch, exported) as hub:
        patch.chdir(exported)
        result = run_export_cli({"ADAPTER": str(exported / "train"), "OUTPUT_DIR": str(exported / "export-merged"),
                                 "MERGED": "true", "HUB_REPO": GGUF_REPO, "HF_TOKEN": TOKEN})
        assert result.exit_code == 0, result.stderr[-3000:]
        assert TOKEN not in result.stderr
        yield exported / "export-merged", hub.repo_files(MERGED_REPO)


def test_train_writes_its_eval_split_into_the_adapter(exported):
    from loraship.heldout import read_heldout_rows

    rows = read_heldout_rows(exported / "train" / "adapter")
    manifest = read_manifest(exported / "train" / "adapter")
    assert len(rows) == 11 and manifest["extra"]["heldout_rows"]["rows"] == 11  # 25% of 44
    assert "heldout_rows.jsonl" in {f["name"] for f in manifest["files"]}


def test_the_shipped_q4_k_m_stops_and_both_bases_were_judged_on_the_heldout_rows(exported):
    out = exported / "export"
    manifest = read_manifest(out)
    assert verify_files(out, manifest) == []
    q4 = manifest["extra"]["files"]["SmolLM2-135M-Instruct-lora-Q4_K_M.gguf"]["verification"]
    assert (q4["stop_check"], q4["finish_reason"], q4["stop_prompts"]) == ("natural", "stop", 3)
    record = manifest["extra"]["merge_base"]
    assert (record["setting"], record["trained_in_4bit"], record["shipped_type"]) == ("auto", True, "Q4_K_M")
    assert set(record["candidates"]) == {"original", "nf4"}
    for candidate in record["candidates"].values():
        heldout = candidate["rungs"]["Q4_K_M"]["heldout"]
        assert heldout["tokens"] == 110 and heldout["nll"] > 0 and heldout["kl"] > 0
    chosen = record["candidates"][record["chosen"]]
    assert chosen["passed"] and chosen["files"] == ["SmolLM2-135M-Instruct-lora-F16.gguf",
                                                    "SmolLM2-135M-Instruct-lora-Q4_K_M.gguf"]
    card = (out / "README.md").read_text()
    assert f"Merge base: {record['reason']}. Rule: {record['rule']}." in card


def test_the_merged_4bit_adapter_loads_in_transformers_as_close_to_the_trained_model_as_the_merged_rung(merged_push):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = merged_push
    merged = out / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    assert str(model.dtype) == "torch.float16"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")  # the training tokenizer's chat template came along
    ladder = read_manifest(out)["extra"]["ladder"]
    rungs = {r["rung"]: r for r in ladder["rungs"]}
    assert rungs["merged-float16"]["parent"] == "merged"
    limit = ladder["limits"]["full precision"]["kl_rise"]
    for text in ("heldout", "general"):
        assert rungs["merged-float16"][text]["kl"] - rungs["merged"][text]["kl"] <= limit, text
    weights = list(merged.glob("*.safetensors"))
    assert weights and all(f.stat().st_size <= 5 * 10**9 for f in weights)
    assert read_manifest(merged)["settings"]["MERGED_MAX_SHARD_MB"] == 5000


def test_the_merged_folder_is_pushed_with_a_card_naming_the_embedded_base_by_its_hub_id(merged_push, exported):
    out, pushed = merged_push
    merged = out / "merged"
    assert pushed.keys() == {p.name for p in merged.iterdir()}
    assert all(data == (merged / name).read_bytes() for name, data in pushed.items())
    front = pushed["README.md"].decode().split("---\n")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in front
    assert "library_name: transformers\n" in front and "  - merged\n" in front
    assert read_manifest(merged)["inputs"] == {"adapter": "train",
                                               "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    for name, data in pushed.items():
        assert str(exported).encode() not in data and str(Path.home()).encode() not in data, name
        assert TOKEN.encode() not in data, name
