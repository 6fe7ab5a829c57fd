"""What `python -m demo` reads from the environment (or a `.env` file).

Only what the demo itself decides lives here. Every other variable passes
through to the stages unchanged (``MAX_STEPS=5 make demo`` shortens training,
``PORT=8000`` moves the chat), except the paths the demo wires between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraship.envsettings import load_settings
from loraship.errors import UserError

ENV_FILES = (".env",)


class DemoError(UserError):
    """A stage of the demo failed; its own output, printed above, says why."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, protected_namespaces=())

    demo_dir: Path = Field(
        default=Path("outputs/demo"),
        description="Folder for everything the demo makes (train/, export/, base-export/, evals/); replaced on each run.",
    )
    demo_serve: bool = Field(default=True, description="Serve the tuned model in the chat UI after the report (0: stop after the report).")
    demo_quant: Literal["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K"] = Field(
        default="Q4_K_M",
        description="GGUF type compared (base and tuned alike) and served.",
    )
    demo_eval_limit: int | None = Field(
        default=None, ge=1, le=100000, description="Evaluate at most this many held-out rows per task (unset: all)."
    )
    demo_identity_goal: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Goal: share of held-out identity questions the tuned model answers as Quokka."
    )
    demo_perplexity_goal: float = Field(
        default=0.15, ge=0.0, le=10.0, description="Goal: largest allowed relative rise in held-out perplexity over the base."
    )


def load_demo_settings(**overrides) -> DemoSettings:
    """Read and validate every setting at once (a SettingsError lists all problems)."""
    return load_settings(DemoSettings, ENV_FILES, **overrides)
