"""The Hugging Face Space card: a Docker Space on port 7860, documenting only real settings."""

import re
from pathlib import Path

from huggingface_hub import SpaceCard

from serve.settings import ServeSettings

SPACE = Path(__file__).resolve().parents[2] / "serve" / "space"


def test_front_matter_declares_a_docker_space_on_port_7860():
    card = SpaceCard.load(SPACE / "README.md")
    assert card.data.sdk == "docker"
    assert card.data.app_port == 7860 == ServeSettings.model_fields["port"].default
    assert card.data.title


def test_every_setting_the_card_names_exists():
    text = (SPACE / "README.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| `")]
    named = {name for line in table for name in re.findall(r"`([A-Z_]+)`", line.split("|")[1])}
    assert named and named <= {name.upper() for name in ServeSettings.model_fields}
