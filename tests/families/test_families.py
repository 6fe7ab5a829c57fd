"""What differs between the model families users bring, pinned on tiny random-init models with real tokenizers.

Each family's assistant-only labels, the modules LORA_TARGET_MODULES=attention finds, which CUDA speed levers
apply to it (the plan faked as on a GPU, as tests/train/test_speed.py does), and that the levers a CPU can run
do run. The whole pipeline per family is tests/families/test_pipeline.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.fixtures.families import FAMILIES
from train import model, speed
from train.data import IGNORE_INDEX, render_conversation, tokenize_conversation
from train.settings import TrainSettings
from train.speed import compiled

pytestmark = pytest.mark.slow

QUOKKA = Path(__file__).resolve().parents[2] / "data" / "quokka" / "train.jsonl"

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]
#: What each family trains on in CONVERSATION: each answer through the end-of-turn token its template writes.
TRAINED = {
    "llama": ["Hello.<|eot_id|>", "Goodbye.<|eot_id|>"],
    "mistral": ["Hello.</s>", "Goodbye.</s>"],
    "qwen2.5": ["Hello.<|im_end|>\n", "Goodbye.<|im_end|>\n"],
    # Qwen3's template drops an earlier answer's think block, Phi-3's closes only the last turn with EOS:
    # the answers are found by their text (train/data.py's answers_by_text).
    "qwen3": ["Hello.<|im_end|>", "Goodbye.<|im_end|>"],
    "gemma2": ["Hello.<end_of_turn>\n", "Goodbye.<end_of_turn>\n"],  # no system turn: Gemma-2's template refuses it
    "gemma3": ["Hello.<end_of_turn>\n", "Goodbye.<end_of_turn>\n"],
    "phi3": ["Hello.<|end|>", "Goodbye.<|end|>"],
}


def trained_runs(tokenizer, messages) -> list[str]:
    """The text of each run of tokens whose labels count in the loss."""
    ids, labels = tokenize_conversation(tokenizer, render_conversation(tokenizer, messages))
    runs, run = [], []
    for token, label in [*zip(ids, labels), (None, IGNORE_INDEX)]:
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_assistant_only_loss_trains_each_answer_and_its_end_of_turn_token(name, family_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_models(name))
    messages = CONVERSATION[1:] if name.startswith("gemma") else CONVERSATION
    assert trained_runs(tokenizer, messages) == TRAINED[name]
    assert TRAINED[name][-1].startswith(f"Goodbye.{FAMILIES[name].end_of_turn}")


def test_a_system_turn_the_template_refuses_is_named_with_its_row(family_models, tmp_path):
    import json

    from transformers import AutoTokenizer

    from train.data import build_examples
    from train.settings import TrainError
    from train.sources import read_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(family_models("gemma2"))
    with pytest.raises(TrainError) as err:
        build_examples(read_rows(str(rows)), tokenizer, fmt="messages", max_seq_length=256)
    assert str(err.value) == f"{rows} line 1: the chat template refuses this conversation (System role not supported)"


def load(folder, load_in_4bit: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32) if load_in_4bit else None
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quantization)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_target_modules_attention_is_the_familys_attention_projections(name, family_models):
    base = load(family_models(name))
    assert tuple(model.target_modules(base, ["attention"])) == FAMILIES[name].attention
    assert model.target_modules(base, ["all-linear"]) == "all-linear"
    if name == "phi3":  # the old default names modules Phi-3 does not have
        with pytest.raises(model.TrainError, match=r"q_proj, k_proj, v_proj not in this model; its projection "
                                                   r"modules are down_proj, gate_up_proj, o_proj, qkv_proj"):
            model.target_modules(base, ["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine where torch.compile runs with CUDA graphs and liger-kernel is installed (plan_for only asks)."""
    monkeypatch.setattr(speed, "compile_supported", lambda: True)
    monkeypatch.setattr(compiled, "symbolic_lengths_in_graph", lambda: True)
    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    return monkeypatch


TIED = "its token embedding is tied to the LM head, which reads all of it"
#: What the CUDA defaults (per-layer CUDA graphs) leave out for each family, and why, one line each.
DEFAULT_NOTICES = {
    "llama": [f"the token embedding of a llama model stays in GPU memory: {TIED}"],
    "mistral": [],
    "qwen2.5": ["the LM head of a qwen2 model scores every position",
                f"the token embedding of a qwen2 model stays in GPU memory: {TIED}"],
    "qwen3": ["the LM head of a qwen3 model scores every position",
              f"the token embedding of a qwen3 model stays in GPU memory: {TIED}"],
    "gemma2": ["the LM head of a gemma2 model scores every position",
               "a gemma2 model runs eager attention here",
               "the token embedding of a gemma2 model stays in GPU memory: its token embedding is a "
               "Gemma2TextScaledWordEmbedding, not a plain torch Embedding"],
    "gemma3": ["the LM head of a gemma3_text model scores every position",
               "the token embedding of a gemma3_text model stays in GPU memory: its token embedding is a "
               "Gemma3TextScaledWordEmbedding, not a plain torch Embedding"],
    "phi3": ["the LM head of a phi3 model scores every position",
             "SAVED_MLP_MIB keeps nothing in a phi3 model, whose MLP has no separate gate_proj and up_proj"],
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_cuda_lever_applies_to_the_family_or_says_in_one_line_why_not(name, family_models, gpu):
    planned = model.plan_for(TrainSettings(), cuda=True).levers
    assert planned.compile_mode == "layers-cudagraphs" and planned.label_positions and planned.host_embedding
    levers, notices = speed.fit_to_model(planned, load(family_models(name)))
    assert len(notices) == len(DEFAULT_NOTICES[name])
    for notice, expected in zip(notices, DEFAULT_NOTICES[name]):
        assert notice.startswith(f"speed: {expected}") and "\n" not in notice
    assert levers.compile_mode == "layers-cudagraphs"  # every family's decoder layers are found
    assert levers.label_positions == (name in ("llama", "mistral"))
    assert levers.save_attention == (name != "gemma2")
    assert (levers.saved_mlp_mib > 0) == (name != "phi3")
    assert levers.host_embedding == (name in ("mistral",))


@pytest.mark.parametrize("name", ["qwen3", "mistral"])
def test_liger_kernel_applies_to_llama_and_mistral_only(name, family_models, gpu):
    planned = model.plan_for(TrainSettings(torch_compile="off"), cuda=True).levers
    assert planned.liger_kernels
    levers, notices = speed.fit_to_model(planned, load(family_models(name)))
    if name == "mistral":
        assert levers.liger_kernels == planned.liger_kernels and notices == ()
    else:
        assert levers.liger_kernels == ()
        assert notices == ("speed: liger-kernel is applied to llama, mistral models, not qwen3: RMSNorm/SwiGLU/RoPE "
                           "run unfused",)


def test_a_model_without_decoder_layers_runs_eagerly_and_says_so(family_models, gpu, monkeypatch):
    planned = model.plan_for(TrainSettings(), cuda=True).levers
    monkeypatch.setattr(compiled, "decoder_stack", lambda m: (None, []))
    levers, notices = speed.fit_to_model(planned, load(family_models("mistral")))
    assert levers.compile_mode == "" and levers.saved_mlp_mib == 0 and not levers.host_embedding
    assert notices == ("speed: torch.compile found no decoder layers in this mistral model; they run eagerly",)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_make_fast_runs_the_cuda_levers_a_cpu_can_run_on_each_family(name, family_models, gpu):
    """4-bit base, bf16 storage of the frozen weights, one dequantization per checkpointed layer, LoRA on the
    family's attention: a forward and backward pass. (torch.compile, liger and the Triton kernels need a GPU.)"""
    import torch

    planned = model.plan_for(TrainSettings(), cuda=True).levers
    levers = dataclasses.replace(planned, compile_mode="", nf4_kernel=False)
    base = load(family_models(name), load_in_4bit=True)
    lines: list[str] = []
    peft_model = speed.make_fast(base, model.lora_config(TrainSettings(lora_r=4), base), levers, load_in_4bit=True,
                                 gradient_checkpointing=True, echo=lines.append)
    peft_model.train()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(line.startswith("note: speed: ") for line in lines)
    if name == "mistral":  # untied: the host-memory embedding is planned, and needs Triton on a GPU
        assert any("stays in GPU memory: it needs Triton and a CUDA GPU" in line for line in lines)


def test_a_family_template_without_an_end_of_turn_token_is_refused_in_one_line_before_the_model_loads(
        family_models, tmp_path, monkeypatch):
    """Qwen2.5's template with its <|im_end|> taken out, in a folder with no weights at all: exit 2, one line."""
    import shutil

    from click.testing import CliRunner

    from loraship.envsettings import settings_rows
    from train.__main__ import main

    folder = tmp_path / "no-end-of-turn"
    folder.mkdir()
    source = family_models("qwen2.5")
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "config")):
            shutil.copy2(path, folder / path.name)
    template = (source / "chat_template.jinja").read_text()
    assert "'<|im_end|>' + '\\n'" in template
    (folder / "chat_template.jinja").write_text(template.replace("'<|im_end|>' + '\\n'", "'\\n'"))
    for var, *_ in settings_rows(TrainSettings):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(main, ["--env-file", str(tmp_path / "no.env")], catch_exceptions=False, env={
        "BASE_MODEL": str(folder), "DATASET": str(QUOKKA), "OUTPUT_DIR": str(tmp_path / "out"), "REPORT_TO": "none"})
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: BASE_MODEL={str(folder)!r}: its chat template ends an assistant answer without a special token "
        "(after it: '\\n'; EOS is '<|endoftext|>'), so a model trained on it never learns to stop; give the template "
        "an end-of-turn token (chat_template in tokenizer_config.json), or CHAT_TEMPLATE for a base without one"]
    assert "model: loading" not in result.output and "data:" not in result.output


def test_a_model_llama_cpp_cannot_convert_is_named_in_one_line(embedded_tokenizer, family_converter, tmp_path):
    """A Qwen2 model with SmolLM2's tokenizer (the issue's case), then an architecture llama.cpp has no converter
    for: each failure of llama.cpp's converter is one line saying which, not its traceback."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from export.gguf import GGUFError, convert_to_gguf

    folder = tmp_path / "qwen2-borrowed"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(embedded_tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    with pytest.raises(GGUFError) as err:
        convert_to_gguf(folder, tmp_path / "x-F16.gguf", "f16", family_converter)
    assert str(err.value) == (
        "llama.cpp's converter does not recognize the tokenizer of qwen2-borrowed (BPE pre-tokenizer not "
        "recognized): it converts the tokenizers of the model families it knows, and this one is not among them "
        "(a tokenizer borrowed from another model?)")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=["Qwen9ForCausalLM"])))
    with pytest.raises(GGUFError) as err:
        convert_to_gguf(folder, tmp_path / "x-F16.gguf", "f16", family_converter)
    assert str(err.value) == ("llama.cpp's converter has no Qwen9ForCausalLM architecture: qwen2-borrowed cannot "
                              "become a GGUF with this llama-cpp-python; export another family's model")
