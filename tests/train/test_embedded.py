"""BASE_MODEL=embedded: the embedded GGUF becomes a plain Hugging Face folder that trains like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loraship.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME, embedded_hf_folder
from train.model import hub_id_of, plan_for, resolve_model_path
from train.settings import TrainSettings


@pytest.mark.slow
def test_embedded_hf_folder_is_a_float32_llama_with_the_chat_template():
    from transformers import AutoTokenizer

    folder = embedded_hf_folder()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>" in tokenizer.chat_template
    assert embedded_hf_folder() == folder  # built once, then reused from the cache
    assert resolve_model_path("embedded") == str(folder)


def test_two_processes_starting_together_build_the_embedded_folder_once(tmp_path):
    # The build itself is stood in for by one that takes a second and counts its calls.
    code = """
import sys, time
from pathlib import Path
import loraship.embedded as embedded
from loraship.atomic import atomic_path

def build(folder):
    with open(sys.argv[1], "a") as calls:
        calls.write("built\\n")
    time.sleep(1)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")

embedded._build_hf_folder = build
print(embedded.embedded_hf_folder())
"""
    env = {**os.environ, "LORASHIP_CACHE": str(tmp_path / "cache")}
    calls = tmp_path / "calls.txt"
    starts = [subprocess.Popen([sys.executable, "-c", code, str(calls)], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    handed = [start.communicate(timeout=120)[0].strip() for start in starts]
    assert [start.returncode for start in starts] == [0, 0]
    folder = tmp_path / "cache" / "embedded"
    assert handed == [str(folder / EMBEDDED_NAME)] * 2 and calls.read_text() == "built\n"
    assert [p.name for p in folder.iterdir() if p.suffix != ".lock"] == [EMBEDDED_NAME]  # no half-built copy left


def test_embedded_is_the_default_without_a_gpu_and_cards_cite_its_hub_id():
    settings = TrainSettings()
    assert plan_for(settings, cuda=False).base_model_resolved == "embedded"
    assert plan_for(settings, cuda=True).base_model_resolved == "meta-llama/Llama-3.2-1B-Instruct"
    assert hub_id_of("embedded") == EMBEDDED_HUB_ID


def test_four_bit_and_optimizer_defaults_follow_the_device():
    cpu, gpu = plan_for(TrainSettings(), cuda=False), plan_for(TrainSettings(), cuda=True)
    assert (cpu.load_in_4bit, cpu.optimizer, cpu.compute_dtype) == (False, "adamw_torch", "float32")
    assert any("LOAD_IN_4BIT=auto" in notice for notice in cpu.notices)
    assert (gpu.load_in_4bit, gpu.optimizer, gpu.compute_dtype) == (True, "adamw_torch_fused", "bfloat16")
    forced = plan_for(TrainSettings(load_in_4bit="true"), cuda=False)
    assert (forced.load_in_4bit, forced.compute_dtype) == (True, "float32")
