"""Turning a conversation into the messages a model sees, within its context.

Pure functions: the UI and the terminal chat both build their request here,
and tests pin the behaviour without a model (token counts come in as a
function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

Message = dict[str, str]
CountTokens = Callable[[list[Message]], int]


class ContextOverflow(ValueError):
    """Even the newest message alone does not fit the context window."""


@dataclass
class Trimmed:
    messages: list[Message]
    dropped_turns: int
    prompt_tokens: int

    def notice(self, n_ctx: int) -> str | None:
        """What to tell the person when older turns had to go."""
        if not self.dropped_turns:
            return None
        turns = "turn" if self.dropped_turns == 1 else "turns"
        return (
            f"The conversation outgrew the model's context window (N_CTX={n_ctx} tokens): "
            f"the oldest {self.dropped_turns} {turns} were left out of what the model sees."
        )


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or Gradio's / OpenAI's list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return str(getattr(content, "text", "") or "")


def history_to_messages(history: Iterable[Any]) -> list[Message]:
    """Gradio's messages-form history as plain role/content pairs (files and empty turns left out)."""
    messages = []
    for item in history or []:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        if role not in ("user", "assistant"):
            continue
        text = content_text(content)
        if not text.strip():
            continue
        if messages and messages[-1]["role"] == role:
            # Gradio may split one answer over several bubbles: the model wrote it as one.
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def build_messages(system_prompt: str | None, history: list[Message], user_message: str) -> list[Message]:
    """System prompt (if any), the earlier turns, then the new user message."""
    messages: list[Message] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt})
    messages.extend(history)
    messages.append({"role": "user", "content": user_message})
    return messages


def answer_room(n_ctx: int, max_tokens: int) -> int:
    """Tokens kept free for the answer: what was asked for, but never more than a quarter of the window."""
    return max(1, min(max_tokens, n_ctx // 4))


def trim_to_context(messages: list[Message], count_tokens: CountTokens, n_ctx: int, max_tokens: int) -> Trimmed:
    """Drop the oldest turns until the prompt leaves room for the answer.

    The system message and the newest user message always stay; turns go
    oldest first, a user message together with the answers that followed it,
    so the model never sees an answer without its question.
    """
    budget = n_ctx - answer_room(n_ctx, max_tokens)
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while True:
        candidate = system + rest
        tokens = count_tokens(candidate)
        if tokens <= budget:
            return Trimmed(candidate, dropped, tokens)
        if len(rest) <= 1:
            raise ContextOverflow(
                f"the message is too long: it needs {tokens} tokens with the system prompt, and the "
                f"context window (N_CTX={n_ctx}) leaves {budget} for the prompt; shorten it"
            )
        # Drop one whole turn: the oldest message and everything up to the next user message.
        cut = 1
        while cut < len(rest) - 1 and rest[cut]["role"] != "user":
            cut += 1
        rest = rest[cut:]
        dropped += 1
