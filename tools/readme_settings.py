"""Regenerate the settings tables in README.md from the settings classes.

The tables sit between ``<!-- settings:NAME -->`` and ``<!-- /settings:NAME -->``
markers. ``--check`` exits 1 when the README is out of date (a test runs it),
so the README, ``--help`` and the error messages all come from one place: the
field descriptions in each stage's ``settings.py``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraship.envsettings import settings_markdown  # noqa: E402
README = ROOT / "README.md"
TABLES = {
    "train": "train.settings:TrainSettings",
    "export": "export.settings:ExportSettings",
    "serve": "serve.settings:ServeSettings",
    "deploy": "serve.settings:DeploySettings",
    "evals": "evals.settings:EvalSettings",
    "demo": "demo.settings:DemoSettings",
}


def table(name: str) -> str:
    module, cls = TABLES[name].split(":")
    return settings_markdown(getattr(importlib.import_module(module), cls))


def render(text: str) -> str:
    for name in TABLES:
        pattern = re.compile(rf"(<!-- settings:{name} -->\n)(?:.*?\n)?(<!-- /settings:{name} -->)", re.S)
        text = pattern.sub(lambda m, n=name: m.group(1) + table(n) + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    current = README.read_text(encoding="utf-8")
    fresh = render(current)
    if "--check" in argv:
        if fresh != current:
            print("README.md settings tables are out of date: run `make readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
