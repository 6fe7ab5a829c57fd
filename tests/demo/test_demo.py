"""`python -m demo` end to end, shortened for CI: the tiny Llama stands in for SmolLM2, two steps of training.

The full demo (the embedded model, the whole recipe, the 90% / 15% goals) is
measured outside CI; see docs/benchmarks.md. This test pins the wiring: every
stage runs as a process, each artifact lands where the next stage reads it,
and the report, the summary and the model card come out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraship.manifest import read_manifest, verify_files

from demo.run import goal_lines
from demo.settings import DemoSettings

ROOT = Path(__file__).resolve().parents[2]


def _demo(env_extra, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "BASE_MODEL", "OUTPUT_DIR", "RECIPE")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_demo_settings_stop_it_before_any_stage(tmp_path):
    out = _demo({"DEMO_DIR": str(tmp_path / "d"), "DEMO_SERVE": "maybe", "DEMO_QUANT": "Q9"}, timeout=60)
    assert out.returncode == 2
    assert "error: DEMO_SERVE='maybe'" in out.stderr and "error: DEMO_QUANT='Q9'" in out.stderr
    assert not (tmp_path / "d").exists()


def test_goals_compare_tuned_with_base():
    report = {"models": [
        {"label": "base", "metrics": {"identity_share": 0.0, "perplexity": 10.0}},
        {"label": "tuned", "metrics": {"identity_share": 0.95, "perplexity": 11.4}},
    ]}
    lines, goals = goal_lines(report, DemoSettings())
    assert goals["identity_met"] and goals["perplexity_met"]
    assert goals["perplexity_rise"] == pytest.approx(0.14)
    assert lines[0].endswith("95.0% (base 0.0%): met")
    worse = {"models": [report["models"][0], {"label": "tuned", "metrics": {"identity_share": 0.5, "perplexity": 12.0}}]}
    lines, goals = goal_lines(worse, DemoSettings())
    assert not goals["identity_met"] and not goals["perplexity_met"]
    assert all(line.endswith("NOT met") for line in lines)


@pytest.mark.slow
def test_short_demo_trains_exports_evaluates_and_reports(tiny_llama_dir, tmp_path):
    demo_dir = tmp_path / "demo"
    out = _demo({
        "DEMO_DIR": str(demo_dir), "DEMO_SERVE": "0", "DEMO_EVAL_LIMIT": "2",
        "BASE_MODEL": str(tiny_llama_dir),  # train and export both use it instead of the embedded model
        "MAX_STEPS": "2", "WARMUP_STEPS": "0", "EVAL_STEPS": "2", "SAVE_STEPS": "2", "MAX_SAMPLES": "32",
        "STOP_CHECK": "eos_token",  # a random-init model never ends a reply by itself
        "MAX_NEW_TOKENS": "8", "N_THREADS": "2",
    }, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # The table and the goal lines are printed.
    assert "| metric | base | tuned | change |" in out.stdout
    assert "goal: >= 90% of held-out identity questions" in out.stdout

    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(summary["seconds"]) == {"train", "export", "export_base", "evals", "total"}
    assert Path(summary["tuned_gguf"]).name == "quokka-Q4_K_M.gguf"
    assert Path(summary["base_gguf"]).name == "base-Q4_K_M.gguf"
    for label in ("base", "tuned"):
        metrics = summary["metrics"][label]
        assert metrics["identity_n"] == 2 and metrics["general_n"] == 2 and metrics["perplexity"] > 1

    # The base is the tune's adapter with a zero update, exported by the same stage.
    assert read_manifest(demo_dir / "base-adapter")["stage"] == "demo"
    assert read_manifest(demo_dir / "base-export")["stage"] == "export"
    assert sorted(p.name for p in (demo_dir / "evals").iterdir()) == [
        "comparison.png", "manifest.json", "report.json", "report.md"]

    # The tuned export's card carries the table, and the folder still verifies.
    export_dir = demo_dir / "export"
    card = (export_dir / "README.md").read_text()
    assert "## Evaluation" in card and "| metric | base | tuned | change |" in card
    assert verify_files(export_dir) == []
