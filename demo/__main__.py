"""`python -m demo` (= `make demo`): the whole pipeline offline on a CPU, ending in a chat with "Quokka"."""

from __future__ import annotations

import sys

import click

from loraship.cli import report_errors
from loraship.envsettings import settings_help

from demo.settings import DemoSettings, load_demo_settings


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    # click rewraps every paragraph not opened by \b; keep the table as written.
    epilog="\b\n" + settings_help(DemoSettings).replace("\n\n", "\n\n\b\n"),
)
@report_errors
def main() -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct to answer as "Quokka" (plain LoRA on CPU,
    RECIPE=demo), export the tune and the base to F16 and Q4_K_M GGUFs, compare them on
    held-out questions and held-out text, print the table, then chat with the tuned model.

    \b
    Examples:
      make demo                      # all of it, then the chat UI on http://127.0.0.1:7860
      DEMO_SERVE=0 make demo         # stop after the report
      MAX_STEPS=5 DEMO_SERVE=0 python -m demo   # a quick look (stage settings pass through)
    """
    settings = load_demo_settings()
    from demo.run import run_demo, serve

    summary = run_demo(settings)
    if settings.demo_serve:
        sys.exit(serve(settings, summary["tuned_gguf"]))


if __name__ == "__main__":
    main()
