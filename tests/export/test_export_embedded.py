"""The export on the embedded SmolLM2-135M-Instruct: a real chat model, so the natural stop is checked."""

from __future__ import annotations

import pytest

from loraship.manifest import read_manifest, verify_files
from tests.fixtures.export_runs import final_files, run_export_cli
from tests.fixtures.adapters import make_train_output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_export(embedded_base_dir, converter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded-export")
    # A small random adapter: observable in the weights, too small to break the model's chat.
    train = make_train_output(embedded_base_dir, root / "train", base_name="embedded", scale=0.002, r=4)
    out = root / "export"
    result = run_export_cli({"ADAPTER": str(train), "OUTPUT_DIR": str(out)})
    assert result.exit_code == 0, result.stderr
    return out


def test_embedded_adapter_exports_to_verified_f16_and_q4_k_m(embedded_export):
    names = final_files(embedded_export)
    assert names == sorted([
        "SmolLM2-135M-Instruct-lora-F16.gguf", "SmolLM2-135M-Instruct-lora-Q4_K_M.gguf",
        "Modelfile", "README.md", "manifest.json",
    ])
    manifest = read_manifest(embedded_export)
    assert verify_files(embedded_export, manifest) == []
    assert manifest["inputs"]["base_model"] == "embedded"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (embedded_export / "README.md").read_text()


def test_the_merged_model_still_stops_by_itself(embedded_export):
    for name, facts in read_manifest(embedded_export)["extra"]["files"].items():
        verification = facts["verification"]
        assert verification["stop_check"] == "natural", name
        assert verification["finish_reason"] == "stop", name
        assert verification["reply"].strip(), name
        assert verification["parity_conversations"] == 2


def test_q4_k_m_answers_and_stops_through_llama_cpp(embedded_export):
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_export / "SmolLM2-135M-Instruct-lora-Q4_K_M.gguf"), n_ctx=512,
                n_threads=2, verbose=False)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "Say hello in one short sentence."}],
                                        max_tokens=96, temperature=0.0)
    llm.close()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"].strip()


def test_q4_k_m_perplexity_relative_to_f16_and_fallbacks_are_reported(embedded_export):
    manifest = read_manifest(embedded_export)
    ppl = manifest["extra"]["perplexity"]
    # Quantization costs a little, not everything: a broken file would be off by orders of magnitude.
    assert 0.95 < ppl["Q4_K_M"]["relative_to_f16"] < 1.5
    assert 1 < ppl["F16"]["perplexity"] < 100
    fallbacks = manifest["extra"]["files"]["SmolLM2-135M-Instruct-lora-Q4_K_M.gguf"]["fallbacks"]
    # SmolLM2's 576-wide rows do not fit 256-value k-quant blocks.
    assert fallbacks["fallback_tensors"] > 100
    assert fallbacks["total_tensors"] == 272
