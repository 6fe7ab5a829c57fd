"""The Modelfile's TEMPLATE renders a chat as Ollama would, to exactly the text training's chat template renders.

Each golden test takes a real training template (the embedded SmolLM2's, Qwen2.5's, loraship's bundled
Llama-3 and Llama-2 ones, Mistral Nemo's from llama.cpp's collection in the llama-cpp-python sdist),
writes the Modelfile the export writes, reads it back as Ollama does and renders a two-turn chat with
the Go template (tests/fixtures/ollama_template.py). llama.cpp adds the BOS token itself when it
tokenizes, so the Go rendering starts right after the BOS text the Jinja template writes.
"""

from __future__ import annotations

import functools
import tarfile
from pathlib import Path

import pytest

from export.ollama import CHATML, LLAMA2, LLAMA3, MISTRAL, detect_chat_format, go_template, modelfile, render_format
from tests.fixtures.ollama_template import modelfile_parts, ollama_render, render_go_template

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a quokka?"},
    {"role": "assistant", "content": "A small wallaby."},
    {"role": "user", "content": "Where does it live?"},
]
GOLDEN = {
    "smollm2": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is a quokka?<|im_end|>\n"
               "<|im_start|>assistant\nA small wallaby.<|im_end|>\n<|im_start|>user\nWhere does it live?<|im_end|>\n"
               "<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is a quokka?<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nA small wallaby.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhere does "
              "it live?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is a quokka? [/INST] A small wallaby. </s>"
              "<s>[INST] Where does it live? [/INST]",
    "mistral": "<s>[INST]What is a quokka?[/INST]A small wallaby.</s>[INST]You are terse.\n\nWhere does it live?[/INST]",
}


@functools.cache
def sdist_template(name: str) -> str:
    """A chat template from llama.cpp's collection, read from the llama-cpp-python sdist the Makefile downloads."""
    found = sorted((ROOT / ".cache" / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not found:
        pytest.skip("no llama-cpp-python sdist in .cache/sdist")
    with tarfile.open(found[-1]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"/models/templates/{name}"))
        return tar.extractfile(member).read().decode("utf-8")


def training_template(case: str, tokenizer) -> tuple[str, str | None, str | None]:
    """(template, bos, eos) of one template family as training would use it."""
    if case == "smollm2":
        return tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token
    if case == "qwen2.5":
        return sdist_template("Qwen-Qwen2.5-7B-Instruct.jinja"), None, "<|im_end|>"
    if case == "llama3":
        return (ROOT / "train/templates/llama3.jinja").read_text(), "<|begin_of_text|>", "<|end_of_text|>"
    if case == "llama2":
        return (ROOT / "train/templates/llama2.jinja").read_text(), "<s>", "</s>"
    if case == "mistral":
        return sdist_template("mistralai-Mistral-Nemo-Instruct-2407.jinja"), "<s>", "</s>"
    return sdist_template("meta-llama-Llama-3.2-3B-Instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>"


def renderer(tokenizer, template: str, bos: str | None, eos: str | None):
    """Training's rendering: the tokenizer's apply_chat_template with this template and these special tokens."""
    return lambda chat: tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False,
                                                      add_generation_prompt=True, bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("case, family, end_of_turn", [
    ("smollm2", CHATML, "<|im_end|>"), ("qwen2.5", CHATML, "<|im_end|>"), ("llama3", LLAMA3, "<|eot_id|>"),
    ("llama2", LLAMA2, "</s>"), ("mistral", MISTRAL, "</s>"),
])
def test_the_modelfile_template_renders_a_chat_as_training_did(case, family, end_of_turn, embedded_tokenizer):
    template, bos, eos = training_template(case, embedded_tokenizer)
    render = renderer(embedded_tokenizer, template, bos, eos)
    fmt = detect_chat_format(render, bos, eos)
    assert fmt is not None and fmt.family == family
    ollama_template, system, stops = modelfile_parts(modelfile("quokka-Q4_K_M.gguf", "quokka", fmt, [eos]))

    assert ollama_template == fmt.template
    assert render(CHAT) == fmt.leading + ollama_render(ollama_template, CHAT, system)
    if case in GOLDEN:
        assert render(CHAT) == GOLDEN[case]
    # A chat without a system message: Ollama adds the Modelfile's SYSTEM where training's template adds its own.
    assert render(CHAT[1:]) == fmt.leading + ollama_render(ollama_template, CHAT[1:], system)
    assert end_of_turn in stops and eos in stops


def test_the_default_system_prompt_a_template_adds_becomes_ollamas_system(embedded_tokenizer):
    fmt = detect_chat_format(renderer(embedded_tokenizer, *training_template("qwen2.5", embedded_tokenizer)),
                             None, "<|im_end|>")
    assert fmt.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert detect_chat_format(renderer(embedded_tokenizer, *training_template("llama3", embedded_tokenizer)),
                              "<|begin_of_text|>", "<|end_of_text|>").system is None


def test_an_unrecognised_template_leaves_ollama_the_ggufs_own(embedded_tokenizer):
    # Meta's Llama-3.2 template writes today's date into every system turn: no Go template can match it.
    template, bos, eos = training_template("llama3.2-instruct", embedded_tokenizer)
    assert detect_chat_format(renderer(embedded_tokenizer, template, bos, eos), bos, eos) is None
    text = modelfile("x-Q4_K_M.gguf", "x", None, [eos])
    assert "Ollama will read the GGUF's own template" in text
    assert modelfile_parts(text) == (None, None, ["<|eot_id|>"])


@pytest.mark.parametrize("family", [CHATML, LLAMA3, LLAMA2, MISTRAL])
def test_each_go_template_renders_what_its_format_renders(family):
    chats = [CHAT, CHAT[1:], CHAT[:2], CHAT + [{"role": "assistant", "content": "Australia."},
                                               {"role": "user", "content": "Thanks"}]]
    for chat in chats:
        template = go_template(family, "<s>", "</s>")
        leading = "" if family == CHATML else "<s>"
        assert render_format(family, chat, "<s>", "</s>") == leading + ollama_render(template, chat), chat


def test_the_renderer_follows_go_trimming_and_variables():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    template = "x  {{- range $i, $m := .Messages }}\n{{ $i }}:{{ .Role }}={{ $m.Content }} {{- end }}\n{{ len .Messages }}"
    assert render_go_template(template, data) == "x\n0:user=a\n1:assistant=b\n2"
    assert render_go_template('{{ if eq .System "" }}none{{ else if .System }}some{{ end }}', data) == "none"
