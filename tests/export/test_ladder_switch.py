"""LADDER=false and the ladder's memory check.

The quality ladder holds a float32 copy of the merged model; an export on a
machine without that memory must say so before anything heavy runs, and
LADDER=false must export without it: no trained-model load, no scoring, the
merge base chosen without measuring (the NF4 round trip for a 4-bit adapter).
"""

from __future__ import annotations


import pytest

from export.merge_base import unmeasured_order
from loraship.manifest import read_manifest, verify_files
from tests.fixtures.export_runs import final_files, run_export_cli
from tests.fixtures.adapters import make_adapter, make_train_output, mark_trained_in_4bit

NAME = "switch"
SETTINGS = {"STOP_CHECK": "eos_token", "EVAL_CTX": "64", "LADDER_TOKENS": "128", "MODEL_NAME": NAME}


@pytest.fixture(scope="module")
def qlora_train_output(tiny_llama_dir, tmp_path_factory):
    """A train OUTPUT_DIR for the tiny Llama whose manifest says load_in_4bit=true."""
    train = make_train_output(tiny_llama_dir, tmp_path_factory.mktemp("switch") / "train",
                              base_name=str(tiny_llama_dir))
    return mark_trained_in_4bit(train)


@pytest.fixture(scope="module")
def unladdered_export(qlora_train_output, converter_dir, tmp_path_factory):
    """LADDER=false export; the ladder's model loaders fail if anything calls them."""
    import export.ladder

    def never(*args, **kwargs):
        raise AssertionError("LADDER=false loaded a model for the ladder")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export.ladder, "trained_model", never)
        patch.setattr(export.ladder, "merged_model", never)
        out = tmp_path_factory.mktemp("switch-export") / "export"
        result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out),
                                 "QUANT_TYPES": "Q8_0", "LADDER": "false"})
    assert result.exit_code == 0, result.stderr
    return out


def test_ladder_false_writes_verified_files_without_scoring(unladdered_export):
    manifest = read_manifest(unladdered_export)
    assert verify_files(unladdered_export, manifest) == []
    assert final_files(unladdered_export) == sorted(
        ["Modelfile", "README.md", "manifest.json", f"{NAME}-F16.gguf", f"{NAME}-Q8_0.gguf"])
    files = manifest["extra"]["files"]
    assert all(files[f"{NAME}-{q}.gguf"]["perplexity"] > 1 for q in ("F16", "Q8_0"))
    assert files[f"{NAME}-F16.gguf"]["verification"]["stop_prompts"] == 3
    assert manifest["extra"]["ladder"] == {"skipped": True, "reason": "not measured (LADDER=false)"}
    assert not {"ladder_trained_s", "ladder_s"} & set(manifest["extra"]["timings"])


def test_ladder_false_merges_a_4bit_adapter_into_the_nf4_base_unmeasured(unladdered_export):
    record = read_manifest(unladdered_export)["extra"]["merge_base"]
    assert record == {
        "setting": "auto", "trained_in_4bit": True, "shipped_type": "Q8_0", "chosen": "nf4",
        "rule": "not measured (LADDER=false): nf4 then original, the first whose files pass every check",
        "reason": "nf4 (MERGE_BASE=auto, not measured (LADDER=false))",
        "candidates": {"nf4": {"passed": True, "failure": None, "failed_at": None, "rungs": {},
                               "files": [f"{NAME}-F16.gguf", f"{NAME}-Q8_0.gguf"]}},
    }
    card = (unladdered_export / "README.md").read_text()
    assert "Quality ladder: not measured (LADDER=false). Merge base: nf4 (" in card
    assert "## Quality ladder" not in card


def test_ladder_false_merges_other_adapters_into_the_original_base():
    assert unmeasured_order("auto", None) == unmeasured_order("auto", False) == ["original"]
    assert unmeasured_order("original", True) == ["original"]


def test_nf4_specs_derived_without_loading_merge_like_those_of_the_loaded_4bit_model(tiny_llama_dir, tmp_path):
    from export.ladder import nf4_specs_as_trained, trained_model
    from export.merge import load_adapter, merge_into_folder
    from export.safetensors_stream import load_safetensors

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    model, loaded = trained_model(tiny_llama_dir, adapter_dir, load_in_4bit=True)
    del model
    derived = nf4_specs_as_trained(tiny_llama_dir)
    assert derived == loaded and len(derived) == 14  # 2 layers x q, k, v, o, gate, up, down
    adapter = load_adapter(adapter_dir)
    a = load_safetensors(merge_into_folder(tiny_llama_dir, adapter, tmp_path / "a", nf4=derived) / "model.safetensors")
    b = load_safetensors(merge_into_folder(tiny_llama_dir, adapter, tmp_path / "b", nf4=loaded) / "model.safetensors")
    original = load_safetensors(tiny_llama_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    name = "model.layers.0.mlp.down_proj.weight"  # not adapted: only the round trip changed it
    assert not a[name].equal(original[name])


def test_recorded_quantization_settings_win_over_the_defaults(tiny_llama_dir):
    from export.ladder import nf4_specs_as_trained
    from export.merge import NF4Spec

    specs = nf4_specs_as_trained(tiny_llama_dir, {"blocksize": 32, "double_quant": False})
    assert set(specs.values()) == {NF4Spec(blocksize=32, quant_type="nf4", double_quant=False)}


def test_memory_need_counts_every_parameter_in_float32(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from export.ladder import GIB, ladder_memory_need

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    need = ladder_memory_need(tiny_llama_dir, 1024)
    assert need.parameters == sum(p.numel() for p in model.parameters())
    assert need.model_bytes == 4 * need.parameters
    assert need.logp_bytes == 2 * 1024 * model.config.vocab_size * 4  # rung 1 on both texts
    assert need.total == need.model_bytes + need.logp_bytes + GIB + int(0.1 * need.model_bytes)


def test_too_little_memory_stops_the_export_before_anything_heavy(qlora_train_output, tiny_llama_dir, converter_dir,
                                                                   tmp_path, export_env):
    import export.ladder

    export_env.setattr(export.ladder, "available_memory", lambda: 2**29)
    export_env.setattr(export.ladder, "trained_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "out"
    result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out)})
    assert result.exit_code == 2
    need = export.ladder.ladder_memory_need(tiny_llama_dir, 128)
    assert result.stderr.splitlines() == [
        f"error: LADDER: the quality ladder needs about {need.total / 2**30:.1f} GiB ({need.explain(128)}); "
        "this machine has 0.5 GiB available: set LADDER=false to export without it, "
        "or use a machine with more memory"]
    assert final_files(out) == []


def test_the_memory_check_is_reported_with_the_other_input_problems(tiny_train_output, converter_dir, tmp_path,
                                                                    export_env):
    import export.ladder

    export_env.setattr(export.ladder, "available_memory", lambda: 2**29)
    result = run_export_cli({**SETTINGS, "ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(tmp_path / "o"),
                             "MERGE_BASE": "nf4"})
    assert result.exit_code == 2
    errors = [line.split(":")[1].strip() for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["MERGE_BASE=nf4", "LADDER"]


def test_ladder_false_skips_the_memory_check(tiny_train_output, tiny_llama_dir, converter_dir, tmp_path, export_env):
    import export.ladder
    from export.inputs import check_inputs
    from export.settings import ExportSettings

    export_env.setattr(export.ladder, "available_memory", lambda: 2**29)
    settings = ExportSettings(adapter=str(tiny_train_output), ladder=False, output_dir=tmp_path / "o")
    assert check_inputs(settings, None)[4] == tiny_llama_dir
