"""The project's text is for users: short settings descriptions, and no development diary in any file."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_CLASSES = ["train.settings:TrainSettings", "export.settings:ExportSettings", "serve.settings:ServeSettings",
                    "evals.settings:EvalSettings", "demo.settings:DemoSettings"]
MAX_DESCRIPTION = 240

#: A development step named in text or in a file name: a session or call number, "sNN call", "-sNN" in a name.
HISTORY = re.compile(
    r"\bsession[ _-]?\d+\b"
    r"|\bcall[ _-]?\d+\b"
    r"|\bs\d{1,2}[ _-]?call(?:[ _-]?\d+)?\b"
    r"|(?<=[-_(/])s\d{1,2}(?=[-_)./ ,:]|$)",
    re.IGNORECASE | re.MULTILINE,
)
BINARY_SUFFIXES = {".gguf", ".png", ".jpg", ".parquet", ".safetensors", ".whl", ".gz", ".zip", ".bin"}


def project_files(root: Path) -> list[Path]:
    """Tracked files and untracked ones git does not ignore (a file just added counts too)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    return [root / name for name in sorted(set(listed.split("\0"))) if name and (root / name).is_file()]


def history_references(root: Path) -> list[str]:
    """``path:line: text`` for every development-step reference under ``root`` (in file names too)."""
    found = []
    for path in project_files(root):
        relative = path.relative_to(root).as_posix()
        if HISTORY.search(relative):
            found.append(f"{relative}: (file name)")
        if path.suffix in BINARY_SUFFIXES:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{relative}:{number}: {line.strip()[:120]}")
    return found


def test_no_file_of_the_project_names_a_development_step():
    found = history_references(ROOT)
    assert not found, "history belongs in git log, not in the project:\n" + "\n".join(found[:40])


@pytest.mark.parametrize("text", ["as measured in sess" "ion 12", "(Sess" "ion 3, ca" "ll 2)", "s14 c" "all 3",
                                  "train_throughput-s22c" "all1.json", "defaults-s" "21-real"])
def test_the_history_scan_finds_a_planted_reference(tmp_path, text):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "notes.md").write_text(f"A result.\n{text}\n", encoding="utf-8")
    assert history_references(tmp_path) == [f"notes.md:2: {text}"]


@pytest.mark.parametrize("text", ["scope=\"session\"", "a session's time", "one call per step", "ms1 s2", "11 s"])
def test_the_history_scan_leaves_ordinary_words_alone(tmp_path, text):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "notes.md").write_text(text, encoding="utf-8")
    assert history_references(tmp_path) == []


@pytest.mark.parametrize("path", SETTINGS_CLASSES)
def test_every_setting_is_described_in_at_most_240_characters(path):
    module, name = path.split(":")
    settings = getattr(importlib.import_module(module), name)
    too_long = {field: len(info.description or "") for field, info in settings.model_fields.items()
                if len(info.description or "") > MAX_DESCRIPTION}
    assert not too_long, f"{name}: descriptions over {MAX_DESCRIPTION} characters (numbers belong in docs): {too_long}"
