"""`python -m evals` as a user runs it: settings errors, and whole runs on HF folders and GGUFs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_evals(env_extra, tmp_path, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "BASE_MODEL", "TASKS", "LIMIT")}
    env.update({"OUTPUT_DIR": str(tmp_path / "evals"), **env_extra})
    return subprocess.run([sys.executable, "-m", "evals"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_setting():
    out = subprocess.run([sys.executable, "-m", "evals", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for var in ("MODEL", "BASE_MODEL", "TASKS", "JUDGE_URL", "JUDGE_API_KEY", "OUTPUT_DIR"):
        assert f"  {var}  [" in out.stdout


def test_every_bad_setting_is_reported_at_once(tmp_path):
    out = run_evals({"TASKS": "identity,bogus", "LIMIT": "0", "JUDGE_API_KEY": "sk-secret-value"}, tmp_path)
    assert out.returncode == 2
    assert "error: TASKS=" in out.stderr and "bogus" in out.stderr
    assert "error: LIMIT='0'" in out.stderr
    assert "sk-secret-value" not in out.stderr + out.stdout


def test_tasks_that_need_inputs_say_which(tmp_path):
    out = run_evals({"TASKS": "gsm8k,judge"}, tmp_path)
    assert out.returncode == 2
    assert "GSM8K_FILE" in out.stderr and "JUDGE_URL" in out.stderr


def test_a_missing_model_fails_before_anything_loads(tmp_path):
    out = run_evals({"MODEL": str(tmp_path / "nope.gguf")}, tmp_path)
    assert out.returncode == 2
    assert "not found" in out.stderr
    assert not (tmp_path / "evals").exists()


@pytest.mark.slow
def test_compares_two_hf_folders_and_writes_the_report(tiny_llama_dir, tmp_path):
    out = run_evals({"MODEL": str(tiny_llama_dir), "BASE_MODEL": str(tiny_llama_dir), "LIMIT": "2",
                     "MAX_NEW_TOKENS": "4", "N_THREADS": "2"}, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "evals"
    assert sorted(p.name for p in folder.iterdir()) == ["comparison.png", "manifest.json", "report.json", "report.md"]
    report = json.loads((folder / "report.json").read_text())
    base, tuned = report["models"]
    assert (base["label"], tuned["label"], tuned["backend"]) == ("base", "tuned", "transformers")
    # The same weights on both sides give the same numbers.
    assert base["metrics"] == tuned["metrics"]
    assert tuned["metrics"]["identity_n"] == 2 and tuned["metrics"]["general_n"] == 2
    assert tuned["metrics"]["perplexity_tokens"] > 0
    assert "| metric | base | tuned | change |" in out.stdout
