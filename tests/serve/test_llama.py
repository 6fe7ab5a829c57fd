"""The embedded GGUF in real llama.cpp: its own chat template, its stop token, our token counts."""

import pytest

from loraship.embedded import embedded_gguf_path
from serve.chat import build_messages, trim_to_context
from serve.model import load_llama, stream_chat, token_counter

N_CTX = 512


@pytest.fixture(scope="module")
def llama():
    model = load_llama(embedded_gguf_path(), N_CTX, 1)
    yield model
    model.close()


def test_the_gguf_template_is_used_as_is(llama):
    # not a built-in format that merely resembles it
    assert llama.chat_format == "chat_template.default"
    assert "<|im_start|>" in llama.metadata["tokenizer.chat_template"]


def test_answers_stop_at_the_end_of_turn_token(llama):
    reply = llama.create_chat_completion(
        messages=[{"role": "user", "content": "Which city is the capital of France?"}], temperature=0, max_tokens=200
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].strip()  # what it says depends on the build's SIMD kernels; that it ends does not
    assert "<|im_end|>" not in choice["message"]["content"]
    assert reply["usage"]["completion_tokens"] < 200


def test_token_count_matches_what_llama_cpp_python_feeds_the_model(llama):
    count = token_counter(llama)
    messages = build_messages("Answer in one word.", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}], "Capital of Italy?")
    reply = llama.create_chat_completion(messages=messages, temperature=0, max_tokens=1)
    assert count(messages) == reply["usage"]["prompt_tokens"]


def test_a_long_conversation_is_trimmed_to_fit_and_still_answered(llama):
    count = token_counter(llama)
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"Tell me fact number {i} about the sea."}, {"role": "assistant", "content": "The sea is large and deep. " * 3}]
    messages = build_messages(None, history, "Which city is the capital of France?")
    assert count(messages) > N_CTX
    trimmed = trim_to_context(messages, count, N_CTX, max_tokens=64)
    assert trimmed.dropped_turns > 0 and "N_CTX=512" in trimmed.notice(N_CTX)
    assert trimmed.prompt_tokens <= N_CTX - 64
    assert trimmed.messages[-1]["content"] == "Which city is the capital of France?"
    answer = "".join(stream_chat(llama, trimmed.messages, max_tokens=64, temperature=0))
    assert answer.strip()
