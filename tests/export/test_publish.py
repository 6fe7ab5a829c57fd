"""What an export pushes, and under which names (fast: no export runs here; test_zz_hub.py runs one)."""

from __future__ import annotations

import json
import re

import pytest

from export.inputs import ExportError, check_hub_names, resolve_adapter
from export.merged_folder import shard_groups
from export.publish import GGUFFile, files_to_push, gguf_file_name, lora_file_name, pushed_types, push_export
from export.settings import QUANT_TYPES, QUANTIZED_TYPES, ExportSettings
from tests.fixtures.export_runs import final_files, run_export_cli
from tests.fixtures.gguf_selectors import hub_ollama_picks, llama_cpp_pick


def test_every_requested_type_is_uploaded_and_f16_only_when_asked(tmp_path):
    files = [GGUFFile(tmp_path / f"m-{t}.gguf", t) for t in ("F16", "BF16", "Q4_K_M", "Q8_0")]
    assert pushed_types(["Q4_K_M", "Q8_0"], push_f16=False) == ["Q4_K_M", "Q8_0"]
    assert pushed_types(["Q4_K_M"], push_f16=True) == ["F16", "Q4_K_M"]
    assert pushed_types(["F16", "Q4_K_M"], push_f16=False) == ["F16", "Q4_K_M"]  # listed: asked for
    assert files_to_push(["BF16", "Q4_K_M", "Q8_0"], False, files, ["README.md"]) == [
        "m-BF16.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md"]


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct-lora", "tiny-quokka", "Llama-3.2-1B-Instruct-lora"])
@pytest.mark.parametrize("sixteen", ["F16", "BF16"])
def test_each_uploaded_file_is_what_its_type_selector_finds(name, sixteen):
    tags = {t: gguf_file_name(name, t) for t in QUANT_TYPES if t in (sixteen, *QUANTIZED_TYPES)}
    repo = sorted([*tags.values(), lora_file_name(name), "README.md", "Modelfile", "manifest.json"])
    for tag, file_name in tags.items():
        assert llama_cpp_pick(repo, tag) == file_name, tag
        assert llama_cpp_pick(repo, tag.lower()) == file_name, tag
        assert hub_ollama_picks(repo, tag) == [file_name], tag


def test_f16_and_bf16_are_not_uploaded_together(tmp_path, monkeypatch):
    # llama.cpp looks for 'F16.' or 'F16-' anywhere in a name: '-hf REPO:F16' would fetch the BF16 file.
    assert llama_cpp_pick(["m-BF16.gguf", "m-F16.gguf"], "F16") == "m-BF16.gguf"
    monkeypatch.chdir(tmp_path)
    settings = ExportSettings(adapter="me/adapter", hub_repo="me/gguf", quant_types=["BF16", "Q4_K_M"], push_f16=True)
    with pytest.raises(ExportError, match=r"^PUSH_F16=true with BF16 in QUANT_TYPES: "):
        check_hub_names(settings, "tune")
    check_hub_names(settings.model_copy(update={"push_f16": False}), "tune")


def test_a_model_name_that_holds_a_type_name_is_refused_with_hub_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ExportSettings(adapter="me/adapter", hub_repo="me/gguf", quant_types=["Q4_K_M", "Q8_0"])
    repo = [gguf_file_name("tune-Q8_0", t) for t in ("Q4_K_M", "Q8_0")]
    assert llama_cpp_pick(sorted(repo), "Q8_0") == "tune-Q8_0-Q4_K_M.gguf"  # what the check prevents
    with pytest.raises(ExportError, match=r"MODEL_NAME='tune-Q8_0': holds a quant type name, so `:Q8_0` would not "
                                          r"select tune-Q8_0-Q8_0.gguf"):
        check_hub_names(settings, "tune-Q8_0")
    check_hub_names(settings, "tune")
    check_hub_names(settings.model_copy(update={"hub_repo": None}), "tune-Q8_0")  # nothing pushed, nothing selected


def test_repos_are_private_unless_hub_private_is_false(hub_server, tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    push_export(tmp_path, ["a.gguf"], "stub-user/private-one", "hf_x")
    push_export(tmp_path, ["a.gguf"], "stub-user/public-one", "hf_x", private=False)
    assert hub_server.is_private("stub-user/private-one") and not hub_server.is_private("stub-user/public-one")
    assert hub_server.commits("stub-user/public-one") == ["initial commit", "Upload GGUF export with loraship"]


def test_an_adapter_trained_on_a_local_base_finds_it_through_the_train_summary(tmp_path):
    base = tmp_path / "bases" / "my-base"
    adapter = tmp_path / "train" / "adapter"
    for folder in (base, adapter):
        folder.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "my-base"}))
    (adapter / "manifest.json").write_text(json.dumps({"inputs": {"base_model": "my-base", "base_model_is_local": True}}))
    assert resolve_adapter(str(tmp_path / "train"), None).base_model == "my-base"  # downloaded: no local record
    (tmp_path / "train" / "train_summary.json").write_text(json.dumps({"base_model": str(base)}))
    source = resolve_adapter(str(tmp_path / "train"), None)
    assert (source.base_model, source.base_is_local) == (str(base), True)


def test_merged_shards_hold_at_most_the_limit_and_a_larger_tensor_alone():
    sizes = [("embed", 700), ("a", 200), ("b", 200), ("c", 150), ("head", 900), ("norm", 10)]
    assert shard_groups(sizes, 500) == [["embed"], ["a", "b"], ["c"], ["head"], ["norm"]]
    assert shard_groups(sizes, 10**9) == [[name for name, _ in sizes]]


@pytest.mark.slow
def test_merged_with_no_room_on_disk_is_refused_before_anything_is_written(export_env, tiny_train_output, converter_dir,
                                                                            tmp_path, monkeypatch, hub_server):
    import export.inputs

    monkeypatch.setattr(export.inputs, "free_disk_bytes", lambda folder: 5 * 2**20)
    out = tmp_path / "out"
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(out), "MERGED": "true",
                             "HUB_REPO": "stub-user/full", "HF_TOKEN": "hf_x", "STOP_CHECK": "eos_token"})
    assert result.exit_code == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(re.escape(f"error: MERGED=true: OUTPUT_DIR='{out}' has 5 MiB free and the export with the "
                                  "merged model needs about ") + r"\d+ MiB \(6 MiB merged model, \d+ MiB GGUFs, \d+ MiB "
                        r"merge scratch for 1 merge base\); free some space, point OUTPUT_DIR elsewhere or set "
                        r"MERGED=false", error), error
    assert final_files(out) == [] and not hub_server.repo_exists("stub-user/full")


@pytest.mark.slow
def test_a_full_disk_while_writing_the_merged_model_leaves_nothing_written_or_pushed(
        export_env, tiny_train_output, converter_dir, tmp_path, monkeypatch, hub_server):
    import errno

    import export.merged_folder

    class FullDisk(export.merged_folder.SafetensorsStreamWriter):
        def write(self, name, tensor):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.merged_folder, "SafetensorsStreamWriter", FullDisk)
    out = tmp_path / "out"
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(out), "MERGED": "true",
                             "LADDER": "false", "HUB_REPO": "stub-user/full", "HF_TOKEN": "hf_x",
                             "STOP_CHECK": "eos_token", "EVAL_CTX": "64"})
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: OUTPUT_DIR='{out}': no space left on the device (No space left on device); free some space or "
        "point OUTPUT_DIR elsewhere (the export needs about 3x the model size)"]
    assert final_files(out) == []
    assert not hub_server.repo_exists("stub-user/full") and not hub_server.repo_exists("stub-user/full-merged")


def test_the_merged_card_names_the_embedded_base_by_hub_id():
    from export.merged_folder import merged_card

    card = merged_card(name="m", base_model="embedded", adapter="me/adapter", dtype="bfloat16", repo="me/m-merged",
                       gguf_repo="me/m", merge_reason="nf4", scored=False, kl_limit=0.02)
    front = card.split("---\n")[1].splitlines()
    assert front[:3] == ["base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "library_name: transformers",
                         "pipeline_tag: text-generation"]
    assert "The LoRA adapter `me/adapter` merged into `HuggingFaceTB/SmolLM2-135M-Instruct` and stored as bfloat16" \
        in card
