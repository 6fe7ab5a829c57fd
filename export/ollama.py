"""Ollama's side of the export: a Modelfile whose TEMPLATE renders a chat exactly as training's chat template did.

Ollama formats chats with a Go template, not the GGUF's Jinja one; for formats it does not recognise it
guesses. So for the chat formats loraship trains (ChatML as SmolLM2 and Qwen use it, Llama-3, Llama-2,
Mistral) the export writes the Go template itself, after checking on probe chats that the training
template renders exactly what that format's template renders. A template that matches none keeps the
GGUF's own (the Modelfile says so). tests/export/test_ollama.py renders each Go template with Ollama's
rules and compares it with the Jinja rendering.

Every Go template leaves out the leading BOS text: llama.cpp adds that token when it tokenizes the prompt,
as Ollama's own templates expect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

CHATML, LLAMA3, LLAMA2, MISTRAL = "ChatML", "Llama-3", "Llama-2", "Mistral"

#: The chats a training template is checked on; plain words, so no format's whitespace rules differ on them.
PROBES = (
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Say bye"}],
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
     {"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "Bye"},
     {"role": "user", "content": "Again"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "One"}],
)
_MARK = "\x00system\x00"


@dataclass(frozen=True)
class ChatFormat:
    """A recognised training chat format, as Ollama needs it."""

    family: str
    #: The Ollama (Go) template.
    template: str
    #: Tokens that end an assistant turn (PARAMETER stop).
    stops: tuple[str, ...]
    #: The system prompt the training template adds to a chat that has none (Ollama's SYSTEM), if any.
    system: str | None
    #: What the training template puts before the first turn that llama.cpp adds as a token instead (BOS).
    leading: str


def render_format(family: str, messages: list[dict], bos: str, eos: str) -> str:
    """``messages`` (after the first system message is taken out) as the format renders them, BOS included."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if family == CHATML:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    if family == LLAMA3:
        return bos + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                             for m in messages) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    out = bos if family == MISTRAL else ""
    for i, m in enumerate(turns):
        if family == LLAMA2 and m["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and i == 0 else ""
            out += f"{bos}[INST] {sys_block}{m['content']} [/INST]"
        elif family == LLAMA2 and m["role"] == "assistant":
            out += f" {m['content']} {eos}"
        elif m["role"] == "user":
            sys_block = f"{system}\n\n" if system and i == len(turns) - 1 else ""
            out += f"[INST]{sys_block}{m['content']}[/INST]"
        elif m["role"] == "assistant":
            out += f"{m['content']}{eos}"
    return out


def go_template(family: str, bos: str, eos: str) -> str:
    """The Ollama template of ``family``: what :func:`render_format` renders, without the leading BOS.

    Ollama passes every message (system ones too) in ``.Messages`` and all system text in ``.System``.
    """
    if family == CHATML:
        return ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                "<|im_start|>assistant\n")
    if family == LLAMA3:
        return ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
    if family == LLAMA2:
        # The system text goes inside the first user turn; each later exchange starts with BOS again.
        return ("{{- range $i, $m := .Messages }}\n"
                '{{- if eq $m.Role "user" }}\n'
                "{{- if and $.System (le $i 1) }}[INST] <<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ $m.Content }} [/INST]\n"
                "{{- else }}[INST] {{ $m.Content }} [/INST]\n"
                "{{- end }}\n"
                f'{{{{- else if eq $m.Role "assistant" }}}} {{{{ $m.Content }}}} {eos}{bos}\n'
                "{{- end }}\n"
                "{{- end }}")
    # Mistral: the system text goes inside the last user turn.
    return ("{{- range $i, $m := .Messages }}\n"
            '{{- if eq $m.Role "user" }}[INST]\n'
            "{{- if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }}[/INST]\n"
            f'{{{{- else if eq $m.Role "assistant" }}}}{{{{ $m.Content }}}}{eos}\n'
            "{{- end }}\n"
            "{{- end }}")


def _end_of_turn(family: str, eos: str) -> str:
    return {CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>"}.get(family, eos)


def _default_system(family: str, rendered: str, chat: list[dict], bos: str, eos: str) -> str | None:
    """The system prompt the template added to ``chat`` (which has none) to render ``rendered``, if it did."""
    before, _, after = render_format(family, [{"role": "system", "content": _MARK}, *chat], bos, eos).partition(_MARK)
    if not (rendered.startswith(before) and rendered.endswith(after) and len(rendered) > len(before) + len(after)):
        return None
    system = rendered[len(before):len(rendered) - len(after)]
    return system if render_format(family, [{"role": "system", "content": system}, *chat], bos, eos) == rendered \
        else None


def detect_chat_format(render: Callable[[list[dict]], str], bos: str | None, eos: str | None) -> ChatFormat | None:
    """The format whose rendering of every probe chat equals ``render``'s (training's template), or None."""
    bos, eos = bos or "", eos or ""
    try:
        rendered = [render(chat) for chat in PROBES]
    except Exception:  # noqa: BLE001 - a template that cannot render the probes is simply not recognised
        return None
    for family in (CHATML, LLAMA3, LLAMA2, MISTRAL):
        if family != CHATML and not (bos and eos):
            continue
        system = None
        for chat, text in zip(PROBES, rendered):
            if render_format(family, chat, bos, eos) == text:
                continue
            if chat[0]["role"] == "system" or system is not None:
                break
            system = _default_system(family, text, chat, bos, eos)
            if system is None:
                break
        else:
            if '"""' in (system or ""):
                continue  # the Modelfile could not quote it
            leading = "" if family == CHATML else bos
            return ChatFormat(family, go_template(family, bos, eos), (_end_of_turn(family, eos),), system, leading)
    return None


def chat_format_of(tokenizer) -> ChatFormat | None:
    """The training tokenizer's chat format, if it is one loraship writes an Ollama template for."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return detect_chat_format(
        lambda chat: tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
        tokenizer.bos_token, tokenizer.eos_token)


def stop_tokens(fmt: ChatFormat | None, eos_texts: list[str]) -> list[str]:
    """Every end-of-turn token: the format's, then the GGUF's end-of-generation tokens; none Ollama cannot quote."""
    found = list(fmt.stops) if fmt else []
    return [t for t in dict.fromkeys(found + list(eos_texts)) if t and '"' not in t and "\n" not in t]


def modelfile(gguf_name: str, model_name: str, fmt: ChatFormat | None, eos_texts: list[str]) -> str:
    """The Modelfile for ``ollama create``, next to ``gguf_name``."""
    lines = [f"# ollama create {model_name} -f Modelfile && ollama run {model_name}   (in the folder of the GGUF)"]
    if fmt is None:
        lines += ["# The training chat template is none of the formats loraship writes an Ollama template for",
                  "# (ChatML, Llama-3, Llama-2, Mistral): Ollama will read the GGUF's own template instead.",
                  f"FROM ./{gguf_name}"]
    else:
        lines += [f"# TEMPLATE renders a chat exactly as training's chat template does ({fmt.family}; the export "
                  "checked it)."]
        if fmt.system is not None:
            lines.append("# SYSTEM is the system prompt that template adds to a chat that has none.")
        lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{fmt.template}"""']
        if fmt.system is not None:
            lines.append(f'SYSTEM """{fmt.system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(fmt, eos_texts)]
    return "\n".join(lines) + "\n"


def hub_ollama_files(fmt: ChatFormat | None, eos_texts: list[str]) -> dict[str, str]:
    """The files the Hub's Ollama integration (``ollama run hf.co/OWNER/REPO``) reads from the repo: ``template``
    (Go template), ``params`` (JSON) and ``system``; none for an unrecognised format (the Hub then picks one)."""
    if fmt is None:
        return {}
    files = {"template": fmt.template, "params": json.dumps({"stop": stop_tokens(fmt, eos_texts)}, indent=2) + "\n"}
    if fmt.system is not None:
        files["system"] = fmt.system
    return files
