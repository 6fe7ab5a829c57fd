"""The whole export on the tiny random-init Llama: adapter -> verified F16 + Q4_K_M GGUFs.

One export (module scope) is inspected by several tests. Random-init weights
never choose EOS by themselves, so this run uses STOP_CHECK=eos_token (EOS ids
in the GGUF match the tokenizer, llama.cpp stops on them); the natural stop is
pinned on the embedded model in test_export_embedded.py.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from loraship.manifest import read_manifest, sha256_file, verify_files
from tests.fixtures.export_runs import final_files, run_export_cli

pytestmark = pytest.mark.slow
NAME = "tiny-quokka"


@pytest.fixture(scope="module")
def tiny_export(tiny_train_output, converter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-export") / "export"
    result = run_export_cli({
        "ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(out), "QUANT_TYPES": "Q4_K_M",
        "STOP_CHECK": "eos_token", "MODEL_NAME": NAME, "EXPORT_LORA_GGUF": "true", "EVAL_CTX": "64",
    })
    assert result.exit_code == 0, result.stderr
    return out


def test_adapter_becomes_f16_and_q4_k_m_gguf_with_card_modelfile_and_manifest(tiny_export):
    assert final_files(tiny_export) == sorted([
        f"{NAME}-F16.gguf", f"{NAME}-Q4_K_M.gguf", f"{NAME}-LoRA.gguf", "Modelfile", "README.md", "manifest.json",
    ])
    for gguf in tiny_export.glob("*.gguf"):
        assert gguf.read_bytes()[:4] == b"GGUF"


def test_manifest_sha256_matches_every_file(tiny_export):
    manifest = read_manifest(tiny_export)
    assert verify_files(tiny_export, manifest) == []
    listed = {entry["name"]: entry for entry in manifest["files"]}
    assert set(listed) == set(final_files(tiny_export)) - {"manifest.json"}
    q4 = listed[f"{NAME}-Q4_K_M.gguf"]
    assert q4["quant_type"] == "Q4_K_M"
    assert q4["sha256"] == sha256_file(tiny_export / q4["name"])
    assert q4["size"] == (tiny_export / q4["name"]).stat().st_size
    assert manifest["kind"] == "gguf" and manifest["stage"] == "export"
    assert manifest["inputs"]["adapter"].endswith("train")
    assert "HF_TOKEN" not in json.dumps(manifest)


def gguf_py_tensor_types(path, converter_dir) -> dict[str, str]:
    """The file's tensor types as llama.cpp's own gguf-py reads them (the independent reference)."""
    from export.converter import gguf_py_command

    code = ("import json, sys; from gguf import GGUFReader; "
            "print(json.dumps({t.name: t.tensor_type.name for t in GGUFReader(sys.argv[1]).tensors}))")
    result = subprocess.run(gguf_py_command(converter_dir, code, str(path)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_quantization_fallbacks_are_reported_per_file(tiny_export, converter_dir):
    manifest = read_manifest(tiny_export)
    report = manifest["extra"]["files"][f"{NAME}-Q4_K_M.gguf"]["fallbacks"]
    types = gguf_py_tensor_types(tiny_export / f"{NAME}-Q4_K_M.gguf", converter_dir)
    # Rows of 64 or 128 values fit no 256-wide k-quant block: every weight matrix falls back,
    # and the file holds each named tensor in the type llama.cpp said it fell back to.
    listed = report["fallback_tensor_list"]
    assert report["fallback_tensors"] == len(listed) >= 2 * 7
    for name, change in listed.items():
        assert types[name].lower() == change.split("->")[1].lower(), name
    assert report["total_tensors"] == len(types)
    assert sum(report["fallbacks"].values()) == report["fallback_tensors"]
    card = (tiny_export / "README.md").read_text()
    assert f"| {report['fallback_tensors']} of {report['total_tensors']} |" in card


def test_gguf_answers_through_llama_cpp_and_stops_on_eos(tiny_export, embedded_tokenizer):
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_export / f"{NAME}-Q4_K_M.gguf"), n_ctx=256, n_threads=2, verbose=False)
    messages = [{"role": "user", "content": "Hello"}]
    free = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0.0)
    assert free["usage"]["completion_tokens"] > 0
    forced = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0.0,
                                        logit_bias={embedded_tokenizer.eos_token_id: 1000.0})
    assert forced["choices"][0]["finish_reason"] == "stop"
    llm.close()
    verification = read_manifest(tiny_export)["extra"]["files"][f"{NAME}-Q4_K_M.gguf"]["verification"]
    assert verification["stop_check"] == "eos_token"
    assert verification["eos_token_ids"] == [embedded_tokenizer.eos_token_id]
    assert verification["parity_tokens"] > 50


def test_perplexity_of_each_file_is_measured_against_f16(tiny_export):
    ppl = read_manifest(tiny_export)["extra"]["perplexity"]
    assert ppl["F16"]["relative_to_f16"] == 1.0
    assert ppl["Q4_K_M"]["perplexity"] > 1 and ppl["Q4_K_M"]["relative_to_f16"] > 0
    assert f"{ppl['Q4_K_M']['relative_to_f16']:.4f}x" in (tiny_export / "README.md").read_text()


def test_perplexity_says_how_many_tokens_and_how_sure_the_ratio_is(tiny_export):
    # EVAL_TOKENS (default 256) caps the shipped held-out text (over 500 tokens); both files score the same tokens.
    ppl = read_manifest(tiny_export)["extra"]["perplexity"]
    assert ppl["F16"]["tokens"] == ppl["Q4_K_M"]["tokens"] == 256
    low, high = ppl["Q4_K_M"]["relative_to_f16_95"]
    assert low <= ppl["Q4_K_M"]["relative_to_f16"] <= high
    card = (tiny_export / "README.md").read_text()
    assert "256 predicted tokens" in card
    assert f"{ppl['Q4_K_M']['relative_to_f16']:.4f}x ({low:.4f}-{high:.4f})" in card


def test_checks_and_perplexity_load_each_gguf_once(tiny_export, embedded_tokenizer, monkeypatch):
    import llama_cpp

    from export.settings import DEFAULT_EVAL_TEXT
    from export.verify import check_gguf, read_eval_texts

    loads = []
    real_init = llama_cpp.Llama.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(kwargs.get("model_path"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "__init__", counting_init)
    verification, nll = check_gguf(tiny_export / f"{NAME}-Q4_K_M.gguf", embedded_tokenizer,
                                   read_eval_texts(DEFAULT_EVAL_TEXT), eval_ctx=64, eval_tokens=100,
                                   stop_check="eos_token", threads=2, stop_prompts=2)
    assert len(loads) == 1
    assert verification.finish_reason == "stop" and verification.parity_tokens > 50
    assert len(nll) == 100 and (nll > 0).all()


def test_model_card_and_modelfile_point_at_the_q4_k_m_file(tiny_export):
    card = (tiny_export / "README.md").read_text()
    meta = card.split("---")[1]
    assert "  - gguf" in meta and "  - Q4_K_M" in meta and "  - F16" in meta
    assert "ollama create" in card and "python -m serve" in card and "llama-cli" in card
    modelfile = (tiny_export / "Modelfile").read_text()
    assert f"FROM ./{NAME}-Q4_K_M.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_the_header_reader_reads_the_tensor_types_gguf_py_reads(tiny_export, converter_dir):
    from export.gguf import read_tensor_types
    from loraship.embedded import embedded_gguf_path

    paths = [tiny_export / f"{NAME}-F16.gguf", tiny_export / f"{NAME}-Q4_K_M.gguf", embedded_gguf_path()]
    for path in paths:
        assert read_tensor_types(path) == gguf_py_tensor_types(path, converter_dir), path.name
    assert {"F16", "F32"} <= set(read_tensor_types(paths[0]).values())
    assert "Q4_1" in set(read_tensor_types(paths[2]).values())


def test_a_truncated_gguf_is_named_as_unreadable(tiny_export, tmp_path):
    from export.gguf import GGUFError, read_tensor_types

    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tiny_export / f"{NAME}-Q4_K_M.gguf").read_bytes()[:2000])
    with pytest.raises(GGUFError, match="cut.gguf is not a readable GGUF file"):
        read_tensor_types(cut)


def test_lora_gguf_is_an_adapter_file(tiny_export, converter_dir):
    from export.converter import gguf_py_command

    code = "import sys; from gguf import GGUFReader; r = GGUFReader(sys.argv[1]); print(r.fields['general.type'].contents())"
    result = subprocess.run(gguf_py_command(converter_dir, code, str(tiny_export / f"{NAME}-LoRA.gguf")),
                            capture_output=True, text=True)
    assert result.stdout.strip() == "adapter", result.stderr


def test_template_parity_fails_loudly_on_a_mismatched_template(tiny_export, embedded_tokenizer_dir, tmp_path):
    from export.verify import VerifyError, load_tokenizer, verify_gguf

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in embedded_tokenizer_dir.iterdir():
        (tok_dir / f.name).write_bytes(f.read_bytes())
    tokenizer = load_tokenizer(tok_dir)
    # Training saw no injected system prompt; the GGUF's template injects SmolLM's.
    tokenizer.chat_template = tokenizer.chat_template.replace("You are a helpful AI assistant named SmolLM", "You are Quokka")
    with pytest.raises(VerifyError, match=r"parity failed on conversation 1: first difference at token \d+"):
        verify_gguf(tiny_export / f"{NAME}-F16.gguf", tokenizer, stop_check="eos_token")
    # The unmodified tokenizer passes.
    assert verify_gguf(tiny_export / f"{NAME}-F16.gguf", load_tokenizer(tok_dir), stop_check="eos_token").parity_tokens


def test_full_disk_mid_export_leaves_nothing_at_final_paths(export_env, tiny_train_output, converter_dir, tmp_path,
                                                            monkeypatch):
    import export.gguf

    out = tmp_path / "out"
    written = []

    def disk_full(src, dst, quant_type, threads=0):
        written.append(src)
        raise OSError(errno.ENOSPC, "No space left on device")

    # The F16 GGUF is complete when quantizing starts: the failure must not promote it.
    monkeypatch.setattr(export.gguf, "quantize_gguf", disk_full)
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(out), "STOP_CHECK": "eos_token"})
    assert written and written[0].name.endswith("-F16.gguf")
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: OUTPUT_DIR='{out}': no space left on the device (No space left on device); "
        "free some space or point OUTPUT_DIR elsewhere (the export needs about 3x the model size)"
    ]
    assert list(out.iterdir()) == []


def test_full_disk_while_merging(export_env, tiny_train_output, converter_dir, tmp_path, monkeypatch):
    import export.safetensors_stream

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.safetensors_stream.SafetensorsStreamWriter, "write", disk_full)
    out = tmp_path / "out"
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(out), "STOP_CHECK": "eos_token"})
    assert result.exit_code == 2 and "OUTPUT_DIR=" in result.stderr
    assert list(out.iterdir()) == []


def test_export_runs_as_a_module():
    # --help is instant and lists every setting from the settings class.
    result = subprocess.run([sys.executable, "-m", "export", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for var in ("ADAPTER", "BASE_MODEL", "QUANT_TYPES", "OUTPUT_DIR", "HUB_REPO", "HF_TOKEN", "EXPORT_LORA_GGUF"):
        assert var in result.stdout
