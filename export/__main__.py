"""``python -m export``: a train stage adapter -> verified GGUF files (settings from the environment)."""

from __future__ import annotations

import click

from export.settings import ExportSettings
from loraship.cli import report_errors
from loraship.envsettings import settings_help

HELP = f"""Merge a LoRA adapter into its full-precision base, convert it to GGUF with
llama.cpp's own converter, quantize, verify every file and write it to OUTPUT_DIR
with a manifest, a model card and an Ollama Modelfile (pushed when HUB_REPO is set).

\b
{settings_help(ExportSettings).replace(chr(10) * 2, chr(10) * 2 + chr(8) + chr(10))}
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--env-file", "env_files", multiple=True, type=click.Path(dir_okay=False),
              help="Read settings from this .env file too (the environment wins). Default: ./.env")
@report_errors
def main(env_files: tuple[str, ...]) -> None:
    from loraship.envsettings import load_settings

    settings = load_settings(ExportSettings, env_files or (".env",))
    from export.run import run_export

    out = run_export(settings)
    click.echo(str(out))


if __name__ == "__main__":
    main(prog_name="python -m export")
