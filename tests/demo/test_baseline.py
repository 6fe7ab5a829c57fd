"""The base model enters the comparison as an adapter whose update is exactly zero."""

import json

import pytest

from demo.baseline import write_null_adapter


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama_dir, tmp_path_factory):
    """A LoRA adapter on the tiny Llama with non-zero B matrices (as after training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("run") / "adapter"
    peft_model.save_pretrained(folder)
    (folder.parent / "manifest.json").write_text(json.dumps({"inputs": {"base_model": str(tiny_llama_dir)}}))
    return folder


def _logits(tiny_llama_dir, adapter=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        return model.eval()(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits


def test_null_adapter_gives_the_base_model_exactly(tiny_llama_dir, trained_adapter, tmp_path):
    import torch

    null = write_null_adapter(trained_adapter, tmp_path / "null")
    base = _logits(tiny_llama_dir)
    assert not torch.equal(_logits(tiny_llama_dir, trained_adapter), base)  # the tune does change the model
    assert torch.equal(_logits(tiny_llama_dir, null), base)


def test_null_adapter_keeps_config_and_says_what_it_is(trained_adapter, tmp_path):
    null = write_null_adapter(trained_adapter, tmp_path / "null")
    assert (null / "adapter_config.json").read_text() == (trained_adapter / "adapter_config.json").read_text()
    manifest = json.loads((null / "manifest.json").read_text())
    assert manifest["stage"] == "demo" and "zeroed" in manifest["extra"]["null_adapter"]
    assert manifest["inputs"]["base_model"]  # export finds the base the tune was made from
    assert {f["name"] for f in manifest["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
