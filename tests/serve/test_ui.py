"""The chat UI's answer function, in process: long conversations are trimmed and the person is told."""

import asyncio

import pytest

from loraship.embedded import embedded_gguf_path
from serve.app import build_app
from serve.settings import load_serve_settings

N_CTX = 512


@pytest.fixture(scope="module")
def respond():
    import gradio as gr

    app = build_app(load_serve_settings(n_ctx=N_CTX, n_threads=1, max_tokens=16, temperature=0), embedded_gguf_path())
    assert isinstance(app.state.chat_ui, gr.ChatInterface)
    assert any(getattr(route, "path", None) == "" for route in app.routes)  # mounted at "/"
    return app.state.chat_ui.fn


def collect(fn, *args) -> list[str]:
    async def run():
        return [update async for update in fn(*args)]

    return asyncio.run(run())


def test_a_conversation_beyond_n_ctx_is_answered_and_the_person_told(respond, monkeypatch):
    import gradio as gr

    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    history = []
    for i in range(25):
        history += [{"role": "user", "content": f"Tell me fact {i} about the sea."}, {"role": "assistant", "content": "The sea is large and deep. " * 3}]
    updates = collect(respond, "Which city is the capital of France?", history, "", 0.0, 16)
    assert updates and updates[-1].strip()
    assert len(warnings) == 1 and "N_CTX=512" in warnings[0] and "oldest" in warnings[0]


def test_a_single_message_beyond_n_ctx_gets_a_sentence_not_a_stack_trace(respond):
    updates = collect(respond, "word " * 3000, [], "", 0.0, 16)
    assert updates == [updates[-1]] and "N_CTX=512" in updates[-1] and "too long" in updates[-1]


def test_an_empty_message_is_not_sent(respond):
    assert collect(respond, "   ", [], "", 0.0, 16) == ["Type a message first."]
