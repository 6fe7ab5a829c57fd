"""`python -m serve` serves the chat UI and the API; `chat [PROMPT]` chats in the terminal;
`deploy` puts the server on a Hugging Face Space; `bundle DIR` writes the files its image is built from."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loraship.cli import report_errors
from loraship.envsettings import settings_help
from serve.settings import DeploySettings, ServeSettings, load_deploy_settings, load_serve_settings


def _table(cls) -> str:
    """A settings table that click prints as written (\\b before each paragraph)."""
    return "\b\n" + settings_help(cls).replace("\n\n", "\n\n\b\n")


HELP = f"""Serve a GGUF on the CPU: a chat UI for people and an OpenAI-compatible API
(/v1/chat/completions, /v1/models, /health) for programs, on one port.

{_table(ServeSettings)}
"""


def _resolve(settings: ServeSettings):
    from serve.model import resolve_model_path

    return resolve_model_path(settings.model, settings.model_file, settings.token())


@click.group(invoke_without_command=True, help=HELP)
@click.pass_context
@report_errors
def main(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from serve.app import serve_forever

    settings = load_serve_settings()
    serve_forever(settings, _resolve(settings))


@main.command()
@click.argument("prompt", required=False)
@report_errors
def chat(prompt: str | None) -> None:
    """Chat in the terminal; with PROMPT, print one answer on stdout and exit."""
    from serve.chat import ContextOverflow, build_messages, trim_to_context
    from serve.model import ServeError, check_system_prompt, load_llama, stream_chat, token_counter

    if prompt is not None and not prompt.strip():
        raise ServeError("PROMPT is empty: give a question, or no argument for an interactive chat")
    settings = load_serve_settings()
    path = _resolve(settings)
    llama = load_llama(path, settings.n_ctx, settings.threads())
    check_system_prompt(llama, settings.system_prompt)
    count = token_counter(llama)
    history: list[dict] = []

    def answer(text: str) -> str:
        messages = build_messages(settings.system_prompt, history, text)
        try:
            trimmed = trim_to_context(messages, count, settings.n_ctx, settings.max_tokens)
        except ContextOverflow as err:
            raise ServeError(str(err)) from None
        notice = trimmed.notice(settings.n_ctx)
        if notice:
            click.echo(f"[{notice}]", err=True)
        pieces = []
        for piece in stream_chat(llama, trimmed.messages, settings.max_tokens, settings.temperature):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return "".join(pieces)

    if prompt is not None:
        answer(prompt)
        return
    click.echo(f"chatting with {path.name} (Ctrl-D to quit)", err=True)
    while True:
        try:
            text = input("> ")
        except EOFError:
            click.echo("", err=True)
            return
        if not text.strip():
            continue
        try:
            reply = answer(text)
        except Exception as err:  # noqa: BLE001 - keep the conversation alive
            click.echo(f"error: {err}", err=True)
            continue
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply}])


@main.command(epilog=_table(DeploySettings))
@report_errors
def deploy() -> None:
    """Create or update the Hugging Face Space that serves MODEL (Docker, CPU); print its URL.

    One commit uploads the files whose hashes differ from the Space's (none when
    nothing changed); MODEL becomes a Space variable, and HF_TOKEN a Space secret
    when MODEL is private.
    """
    from serve.deploy import deploy_space

    click.echo(deploy_space(load_deploy_settings()))


@main.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@report_errors
def bundle(directory: Path) -> None:
    """Write the files the serve image is built from (what the Space holds) into DIR, a new or empty folder."""
    from serve.bundle import write_bundle

    for name in write_bundle(directory):
        click.echo(name)


if __name__ == "__main__":
    main()
