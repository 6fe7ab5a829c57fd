"""How a conversation becomes the messages the model sees (pure functions, no model)."""

import pytest

from serve.chat import (
    ContextOverflow,
    answer_room,
    build_messages,
    content_text,
    history_to_messages,
    trim_to_context,
)


def words(messages):
    """A stand-in tokenizer: one token per word, plus 4 per message for the template's markers."""
    return sum(len(m["content"].split()) + 4 for m in messages)


def turn(i):
    return [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": f"answer {i} " * 10}]


def test_system_prompt_comes_first_and_new_message_last():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages = build_messages("Be brief.", history, "how are you?")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
    ]


def test_blank_system_prompt_leaves_the_template_default():
    assert build_messages("  ", [], "hi") == [{"role": "user", "content": "hi"}]
    assert build_messages(None, [], "hi") == [{"role": "user", "content": "hi"}]


def test_gradio_messages_history_becomes_plain_role_content():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
        {"role": "assistant", "content": "hello", "options": []},
        {"role": "assistant", "content": "again"},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/x.png"}}]},
        {"role": "user", "content": ""},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello\nagain"},
    ]


def test_content_text_reads_openai_parts():
    assert content_text([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}]) == "ab"
    assert content_text(None) == ""


def test_a_conversation_that_fits_is_untouched():
    messages = build_messages("sys", turn(1), "new")
    trimmed = trim_to_context(messages, words, n_ctx=1000, max_tokens=100)
    assert trimmed.messages == messages
    assert trimmed.dropped_turns == 0
    assert trimmed.notice(1000) is None
    assert trimmed.prompt_tokens == words(messages)


def test_oldest_turns_go_first_keeping_system_and_newest_message():
    history = turn(1) + turn(2) + turn(3)
    messages = build_messages("sys", history, "the newest question")
    # each turn is 2 * (20 + 4) = 48 words; room for the system prompt, one turn and the question
    n_ctx, max_tokens = 120, 30
    trimmed = trim_to_context(messages, words, n_ctx, max_tokens)
    assert trimmed.messages[0] == {"role": "system", "content": "sys"}
    assert trimmed.messages[1:] == turn(3) + [{"role": "user", "content": "the newest question"}]
    assert trimmed.dropped_turns == 2
    assert trimmed.prompt_tokens <= n_ctx - answer_room(n_ctx, max_tokens)
    assert "N_CTX=120" in trimmed.notice(n_ctx) and "oldest 2 turns" in trimmed.notice(n_ctx)


def test_an_answer_is_never_kept_without_its_question():
    messages = build_messages(None, turn(1) + turn(2), "q")
    trimmed = trim_to_context(messages, words, n_ctx=120, max_tokens=30)
    assert trimmed.messages[0]["role"] == "user"
    assert [m["role"] for m in trimmed.messages] in (["user"], ["user", "assistant", "user"])


def test_a_single_message_beyond_the_window_is_refused_with_a_reason():
    messages = build_messages("sys", [], "word " * 500)
    with pytest.raises(ContextOverflow, match="N_CTX=256"):
        trim_to_context(messages, words, n_ctx=256, max_tokens=64)


def test_answer_room_is_at_most_a_quarter_of_the_window():
    assert answer_room(2048, 100) == 100
    assert answer_room(2048, 4000) == 512
