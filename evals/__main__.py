"""`python -m evals`: evaluate a GGUF or Hugging Face model, optionally against a base, and write a report."""

from __future__ import annotations

import click

from loraship.cli import report_errors
from loraship.envsettings import settings_help

from evals.settings import EvalSettings, load_eval_settings


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    # click rewraps every paragraph not opened by \b; keep the table as written.
    epilog="\b\n" + settings_help(EvalSettings).replace("\n\n", "\n\n\b\n"),
)
@report_errors
def main() -> None:
    """Evaluate MODEL (and BASE_MODEL, if set) on the held-out Quokka questions, perplexity,
    GSM8K and an LLM judge; write report.md, report.json and comparison.png to OUTPUT_DIR,
    print the table, and add it to MODEL's model card.

    \b
    Examples:
      MODEL=outputs/export BASE_MODEL=embedded python -m evals
      MODEL=outputs/export/model-Q4_K_M.gguf TASKS=perplexity python -m evals
      TASKS=judge JUDGE_URL=http://127.0.0.1:8080/v1 python -m evals
    """
    settings = load_eval_settings()
    from evals import report
    from evals.run import run

    result = run(settings)
    click.echo(report.markdown_table(result["models"], result["keyword"]))
    click.echo(f"\nreport: {result['output_dir']}/report.md")
    if result.get("card"):
        click.echo(f"model card updated: {result['card']}")


if __name__ == "__main__":
    main()
