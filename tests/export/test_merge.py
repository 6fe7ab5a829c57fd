"""The shard-by-shard merge gives what peft gives, without loading the model."""

from __future__ import annotations

import json

import pytest

from export.merge import check_compatible, load_adapter, merge_into_folder
from export.safetensors_stream import read_safetensors_header
from tests.fixtures.adapters import make_adapter


def _state(folder):
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _peft_merged(base_dir, adapter_dir, dtype):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_equals_peft_merge_and_unload_fp32(tiny_llama_dir, tmp_path, use_rslora):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", use_rslora=use_rslora, r=4, alpha=32)
    out = merge_into_folder(tiny_llama_dir, load_adapter(adapter_dir), tmp_path / "merged")
    ours = _state(out)
    reference = _peft_merged(tiny_llama_dir, adapter_dir, "float32").state_dict()
    base = _state(tiny_llama_dir)
    changed = 0
    for name, tensor in ours.items():
        assert (tensor - reference[name]).abs().max().item() <= 1e-6, name
        changed += int(not (tensor == base[name]).all())
    assert changed == 2 * 4  # q, k, v, o in each of the 2 layers


def test_merge_equals_peft_within_bf16_rounding_on_a_sharded_bf16_base(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    model.save_pretrained(base, safe_serialization=True, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tiny_llama_dir / name).read_bytes())
    assert (base / "model.safetensors.index.json").is_file()
    adapter_dir = make_adapter(base, tmp_path / "adapter")
    out = merge_into_folder(base, load_adapter(adapter_dir), tmp_path / "merged")
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == json.loads(
        (base / "model.safetensors.index.json").read_text()
    )["weight_map"].keys()
    ours = _state(out)
    reference = _peft_merged(base, adapter_dir, "bfloat16").state_dict()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        # One bf16 rounding step apart at most (peft adds in bf16, we add in fp32 and round once).
        bound = reference[name].float().abs().max().item() * 2**-7 + 1e-6
        assert (tensor.float() - reference[name].float()).abs().max().item() <= bound, name


def test_matrices_as_f16_round_once_from_float32_and_leave_vectors_alone(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tiny_llama_dir / name).read_bytes())
    adapter_dir = make_adapter(base, tmp_path / "adapter")
    adapter = load_adapter(adapter_dir)
    out = merge_into_folder(base, adapter, tmp_path / "merged", matrices_as="F16")
    ours, original = _state(out), _state(base)
    exact = _peft_merged(base, adapter_dir, "float32").state_dict()  # bf16 weights, merged in float32
    changed = 0
    for name, tensor in ours.items():
        if original[name].dim() < 2:  # norms: the converter keeps them float32, exactly, from the original dtype
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[name]), name
            continue
        assert tensor.dtype == torch.float16, name
        # Rounded once: what float16 makes of the float32 merge (untouched weights: of the bf16 value).
        assert torch.equal(tensor, exact[name].to(torch.float16)), name
        changed += int(not torch.equal(tensor, original[name].to(torch.float16)))
    assert changed == 2 * 4


def test_lora_on_tied_lm_head_unties_and_keeps_the_embedding_lookup(tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", target_modules=("q_proj", "lm_head"))
    out = merge_into_folder(tiny_llama_dir, load_adapter(adapter_dir), tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ours = _state(out)
    base = _state(tiny_llama_dir)
    assert torch.equal(ours["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(ours["lm_head.weight"], base["model.embed_tokens.weight"])
    # The merged model computes what the unmerged adapter computed.
    ids = torch.tensor([[1, 50, 400, 7, 999]])
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base_model, adapter_dir)(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (merged(ids).logits - expected).abs().max().item() < 1e-4


def test_merged_folder_carries_config_and_training_tokenizer(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    tok_cfg = json.loads((adapter_dir / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 1234  # a training-time change the export must keep
    (adapter_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = merge_into_folder(tiny_llama_dir, load_adapter(adapter_dir), tmp_path / "merged", tokenizer_dir=adapter_dir)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1234


def test_mismatched_base_is_reported(tiny_llama_dir, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size = 32
    config.intermediate_size = 64
    other = tmp_path / "other"
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(other)
    problems = check_compatible(load_adapter(adapter_dir), other)
    assert len(problems) == 1 and "does not match the adapter" in problems[0]
    assert check_compatible(load_adapter(adapter_dir), tiny_llama_dir) == []


def test_streamed_writer_produces_valid_safetensors(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    out = merge_into_folder(tiny_llama_dir, load_adapter(adapter_dir), tmp_path / "merged")
    header, start = read_safetensors_header(out / "model.safetensors")
    assert start % 8 == 0
    assert set(_state(out)) == set(_state(tiny_llama_dir))
