"""The demo, top to bottom: train -> export (tuned and base) -> evaluate -> serve.

Every stage runs as its own ``python -m <stage>`` process, configured by
environment variables and talking to the next one only through the folders
it writes, exactly as a user would chain them by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from loraship.atomic import write_json

from demo.baseline import mark_as_baseline, write_null_adapter
from demo.settings import DemoError, DemoSettings

ROOT = Path(__file__).resolve().parent.parent
# Variables the demo sets itself for each stage; a value in the user's
# environment would otherwise send a stage to the wrong folder or model.
WIRED = ("RECIPE", "OUTPUT_DIR", "ADAPTER", "MODEL", "BASE_MODEL", "MODEL_NAME", "QUANT_TYPES", "QUANT",
         "TASKS", "LIMIT", "UPDATE_CARD")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def stage_env(**wired: str | None) -> dict[str, str]:
    """The user's environment, minus the wired variables, plus this stage's wiring."""
    env = dict(os.environ)
    for name in WIRED:
        env.pop(name, None)
    env.update({k: v for k, v in wired.items() if v is not None})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_stage(name: str, args: list[str], env: dict[str, str]) -> float:
    """Run ``python -m <args>`` in the repository; its output streams through. Returns seconds taken."""
    say(f"{name}: python -m {' '.join(args)}")
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", *args], cwd=ROOT, env=env)
    seconds = time.monotonic() - started
    if code != 0:
        raise DemoError(
            f"the {name} step failed (exit {code}) after {seconds:.0f} s; its messages are above",
            exit_code=1 if code == 1 else 2,
        )
    say(f"{name}: done in {seconds:.0f} s")
    return seconds


def gguf_in(folder: Path, quant: str) -> Path:
    found = sorted(folder.glob(f"*-{quant}.gguf"))
    if len(found) != 1:
        raise DemoError(f"expected one *-{quant}.gguf in {folder}, found {[p.name for p in found]}", exit_code=1)
    return found[0]


def goal_lines(report: dict, settings: DemoSettings) -> tuple[list[str], dict]:
    """Whether the tune met the demo's goals, as printable lines and as data."""
    base, tuned = (m["metrics"] for m in report["models"])
    identity = tuned.get("identity_share")
    rise = None
    if base.get("perplexity") and tuned.get("perplexity"):
        rise = tuned["perplexity"] / base["perplexity"] - 1
    goals = {
        "identity_share": identity,
        "identity_goal": settings.demo_identity_goal,
        "identity_met": identity is not None and identity >= settings.demo_identity_goal,
        "base_identity_share": base.get("identity_share"),
        "perplexity_rise": rise,
        "perplexity_goal": settings.demo_perplexity_goal,
        "perplexity_met": rise is not None and rise <= settings.demo_perplexity_goal,
    }
    mark = {True: "met", False: "NOT met"}
    lines = []
    if identity is not None:
        lines.append(
            f"goal: >= {100 * settings.demo_identity_goal:.0f}% of held-out identity questions answered as "
            f"Quokka: {100 * identity:.1f}% (base {100 * (base.get('identity_share') or 0):.1f}%): "
            f"{mark[goals['identity_met']]}"
        )
    if rise is not None:
        lines.append(
            f"goal: perplexity on held-out text rises <= {100 * settings.demo_perplexity_goal:.0f}%: "
            f"{100 * rise:+.1f}% ({base['perplexity']:.2f} -> {tuned['perplexity']:.2f}): {mark[goals['perplexity_met']]}"
        )
    return lines, goals


def run_demo(settings: DemoSettings) -> dict:
    """Train, export, evaluate; return the summary (also written to DEMO_DIR/summary.json)."""
    started = time.monotonic()
    out = settings.demo_dir.resolve()
    train_dir, export_dir = out / "train", out / "export"
    null_adapter, base_dir, evals_dir = out / "base-adapter", out / "base-export", out / "evals"
    # A fresh run every time: train would otherwise resume a finished run and
    # the timings would not mean what they say.
    for folder in (train_dir, export_dir, null_adapter, base_dir, evals_dir):
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    quant = settings.demo_quant
    seconds: dict[str, float] = {}

    # BASE_MODEL, when the user sets it, replaces the recipe's embedded model in train and export alike.
    user_base = os.environ.get("BASE_MODEL")
    seconds["train"] = run_stage("train", ["train"], stage_env(
        RECIPE="demo", OUTPUT_DIR=str(train_dir), BASE_MODEL=user_base))
    seconds["export"] = run_stage("export (tuned)", ["export"], stage_env(
        ADAPTER=str(train_dir), OUTPUT_DIR=str(export_dir), QUANT_TYPES=f"F16,{quant}", MODEL_NAME="quokka",
        BASE_MODEL=user_base))

    say("base: the trained adapter with its LoRA B matrices zeroed (merges to the base itself)")
    write_null_adapter(train_dir / "adapter", null_adapter)
    seconds["export_base"] = run_stage("export (base)", ["export"], stage_env(
        ADAPTER=str(null_adapter), OUTPUT_DIR=str(base_dir), QUANT_TYPES=f"F16,{quant}", MODEL_NAME="base",
        BASE_MODEL=user_base))
    mark_as_baseline(base_dir)

    tuned_gguf, base_gguf = gguf_in(export_dir, quant), gguf_in(base_dir, quant)
    seconds["evals"] = run_stage("evaluate base vs tuned", ["evals"], stage_env(
        MODEL=str(tuned_gguf), BASE_MODEL=str(base_gguf), OUTPUT_DIR=str(evals_dir),
        TASKS="identity,general,perplexity", UPDATE_CARD="true",
        LIMIT=str(settings.demo_eval_limit) if settings.demo_eval_limit else None))

    report = json.loads((evals_dir / "report.json").read_text(encoding="utf-8"))
    lines, goals = goal_lines(report, settings)
    seconds["total"] = time.monotonic() - started
    summary = {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "goals": goals,
        "tuned_gguf": str(tuned_gguf),
        "base_gguf": str(base_gguf),
        "report": str(evals_dir / "report.md"),
        "metrics": {m["label"]: m["metrics"] for m in report["models"]},
    }
    write_json(out / "summary.json", summary)
    print()
    for line in lines:
        say(line)
    say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    say(f"report: {evals_dir / 'report.md'} (chart: {evals_dir / 'comparison.png'}); model card: {export_dir / 'README.md'}")
    return summary


def serve(settings: DemoSettings, gguf: str) -> int:
    """Chat with the tuned model until Ctrl-C; returns serve's exit status."""
    host = os.environ.get("HOST", "127.0.0.1")
    port = os.environ.get("PORT", "7860")
    say(f"serving {Path(gguf).name}: open http://{host}:{port} (Ctrl-C stops)")
    child = subprocess.Popen([sys.executable, "-m", "serve"], cwd=ROOT, env=stage_env(MODEL=gguf))
    try:
        return child.wait()
    except KeyboardInterrupt:
        # The terminal sent the interrupt to the whole group: let serve close cleanly.
        try:
            return child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.terminate()
            return child.wait()
