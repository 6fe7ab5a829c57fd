"""``python -m train``: QLoRA supervised fine-tuning, configured entirely by environment variables.

Settings come from the environment, then ./.env, then the recipe named by RECIPE
(recipes/<name>.env), then the defaults. Every invalid setting is reported at
once (exit status 2) before any model or dataset is loaded. SIGTERM saves a checkpoint
at the step reached and exits with status 75: rerun with the same OUTPUT_DIR to continue.
"""

from __future__ import annotations

import sys

import click

from loraship.cli import report_errors
from loraship.envsettings import settings_help
from train.settings import TrainSettings, load_train_settings, recipe_names

def _verbatim(text: str) -> str:
    """Mark every paragraph for click to print as written (it rewraps otherwise)."""
    return "\n\n".join("\b\n" + para for para in text.split("\n\n"))


EPILOG = _verbatim(
    settings_help(TrainSettings)
    + "\n\nRecipes (RECIPE=<name>, from recipes/<name>.env): " + ", ".join(recipe_names())
    + "\n\nExamples:\n  RECIPE=demo MAX_STEPS=5 python -m train\n"
    "  RECIPE=llama32-1b-finetome HF_TOKEN=... python -m train --dry-run"
)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--dry-run", is_flag=True, help="Validate settings, load and report the data, then stop (no model is loaded).")
@click.option("--env-file", default=".env", show_default=True, type=click.Path(dir_okay=False),
              help="Optional .env file (variables in the environment still win).")
@report_errors
def main(dry_run: bool, env_file: str) -> None:
    """Fine-tune a chat model with (Q)LoRA and write OUTPUT_DIR/adapter/."""
    settings = load_train_settings(env_file)
    from train import launch

    processes = launch.processes_wanted(settings.num_gpus, launch.cuda_device_count())
    if processes > 1 and not dry_run and not launch.under_launcher():
        sys.exit(_run_under_torchrun(settings, processes, sys.argv[1:]))
    from train.checkpoints import Preempted
    from train.run import train

    try:
        train(settings, dry_run=dry_run, echo=click.echo)
    except Preempted as stop:
        if str(stop):
            click.echo(str(stop), err=True)
        sys.exit(stop.exit_code)


def _run_under_torchrun(settings, processes: int, argv: list[str]) -> int:
    """This command again, once per GPU; Hub checkpoints are fetched first so every process sees them."""
    from pathlib import Path

    from train import launch
    from train.checkpoints import PREEMPTED_EXIT, preempted_message
    from train.run import fetch_hub_checkpoints

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    fetch_hub_checkpoints(settings, token, click.echo)
    code, got_sigterm = launch.relaunch(processes, argv, click.echo)
    if got_sigterm:
        click.echo(preempted_message(Path(settings.output_dir), settings.hub_repo), err=True)
        return PREEMPTED_EXIT
    return code


if __name__ == "__main__":
    main(prog_name="python -m train")
