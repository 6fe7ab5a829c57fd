"""The README's settings tables are generated from the settings classes, never hand-edited."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_tables_match_the_settings_classes():
    result = subprocess.run(
        [sys.executable, "tools/readme_settings.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_opens_with_the_two_setup_commands():
    head = (ROOT / "README.md").read_text(encoding="utf-8")[:800]
    assert "make demo" in head and "make test" in head


def test_every_settings_table_row_has_four_cells_even_for_a_choice():
    import re

    from loraship.envsettings import settings_markdown
    from train.settings import TrainSettings

    rows = settings_markdown(TrainSettings).splitlines()
    assert any("auto \\| true \\| false" in row for row in rows)  # LOAD_IN_4BIT's choices
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row  # the outer pipes and 3 between 4 cells
