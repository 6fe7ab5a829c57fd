"""A run can be taken away at any moment and continued: SIGTERM, a new machine, SIGKILL mid-save.

The SIGTERM and SIGKILL tests drive ``python -m train`` as a real subprocess on the tiny
random-init Llama (no eval, short rows: each step takes a fraction of a second on a quiet CPU);
the reruns are in-process calls of the same stage, which is what a rerun of the command runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraship.envsettings import settings_rows
from loraship.manifest import verify_files
from train.checkpoints import PREEMPTED_EXIT, last_checkpoint, point_best_checkpoint_here
from train.settings import TrainError, TrainSettings

REPO = Path(__file__).resolve().parents[2]
QUOKKA = REPO / "data" / "quokka" / "train.jsonl"
TOKEN = "hf_preemption_test_token"
FINAL_FILES = ("adapter", "train_summary.json", "loss.png")


def stage_env(model_dir: Path, output_dir: Path, **overrides: str) -> dict[str, str]:
    """The test process's environment (offline or stand-in Hub) with only these train settings."""
    train_vars = {var for var, *_ in settings_rows(TrainSettings)}
    env = {k: v for k, v in os.environ.items() if k not in train_vars}
    env.update(
        PYTHONUNBUFFERED="1", BASE_MODEL=str(model_dir), DATASET=str(QUOKKA), OUTPUT_DIR=str(output_dir),
        MAX_SAMPLES="16", EVAL_FRACTION="0", BEST_BY_EVAL="false", MAX_SEQ_LENGTH="64", BATCH_SIZE="2",
        GRAD_ACCUM="1", LOGGING_STEPS="1", SAVE_STEPS="1000", GRADIENT_CHECKPOINTING="false", LORA_R="4",
        LORA_ALPHA="8", SEED="3", HF_TOKEN=TOKEN,
    )
    env.update(overrides)
    return env


def settings_from(env: dict[str, str], **overrides) -> TrainSettings:
    values = {var.lower(): env[var] for var, *_ in settings_rows(TrainSettings) if var in env}
    values.update(overrides)
    return TrainSettings(**values)


class Stage:
    """``python -m train`` in the background, its output collected line by line."""

    def __init__(self, env: dict[str, str], bootstrap: str | None = None):
        command = [sys.executable, "-c", bootstrap] if bootstrap else [sys.executable, "-m", "train"]
        self.proc = subprocess.Popen(
            [*command, "--env-file", str(REPO / "tests" / "train" / "no-such.env")], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def steps_logged(self) -> int:
        return sum(line.count("{'loss':") for line in self.lines)

    def wait_for_steps(self, n: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while self.steps_logged() < n:
            assert self.proc.poll() is None, "train exited early:\n" + self.output()
            assert time.monotonic() < deadline, f"no {n} steps in {timeout} s:\n" + self.output()
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "".join(self.lines)[-6000:]


def logged_steps(checkpoint: Path) -> list[int]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [e["step"] for e in state["log_history"] if "loss" in e]


def stop_with_sigterm(env: dict[str, str]) -> tuple[int, float, Stage]:
    stage = Stage(env)
    stage.wait_for_steps(2)
    sent = time.monotonic()
    stage.proc.send_signal(signal.SIGTERM)
    code = stage.wait(timeout=90)
    return code, time.monotonic() - sent, stage


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_which_a_rerun_here_or_on_a_new_machine_continues(
    tmp_path, tiny_llama_dir, hub_server
):
    from train.run import train

    out = tmp_path / "out"
    env = stage_env(tiny_llama_dir, out, MAX_STEPS="500", HUB_REPO="me/preempted")
    code, seconds, stage = stop_with_sigterm(env)

    assert code == PREEMPTED_EXIT, stage.output()
    assert seconds < 60
    checkpoint = last_checkpoint(out / "checkpoints")
    assert checkpoint is not None, stage.output()
    step = int(checkpoint.name.split("-")[1])
    # SAVE_STEPS=1000: this checkpoint exists only because of the signal, at the very step reached.
    assert step >= 2 and logged_steps(checkpoint) == list(range(1, step + 1))
    assert f"the last checkpoint is step {step}" in stage.output()
    assert f"Rerun with the same OUTPUT_DIR='{out}'" in stage.output()
    assert not any((out / name).exists() for name in FINAL_FILES)
    # ...and it reached the Hub before the process exited.
    pushed = hub_server.repo_files("me/preempted")
    ckpt = f"checkpoints/checkpoint-{step}"
    assert {f"{ckpt}/trainer_state.json", f"{ckpt}/adapter_model.safetensors", f"{ckpt}/optimizer.pt",
            "checkpoints/run_settings.json"} <= set(pushed)
    assert pushed[f"{ckpt}/adapter_model.safetensors"] == (out / ckpt / "adapter_model.safetensors").read_bytes()

    # Rerun on the same machine: the step count goes on from the checkpoint.
    summary = train(settings_from(env, max_steps=step + 1), echo=lambda _: None)
    assert summary["resumed_from_step"] == step and summary["global_step"] == step + 1
    assert logged_steps(out / "checkpoints" / f"checkpoint-{step + 1}") == list(range(1, step + 2))

    # A new machine (empty OUTPUT_DIR) continues from what the Hub holds.
    shutil.rmtree(out)
    lines: list[str] = []
    summary = train(settings_from(env, max_steps=step + 2), echo=lines.append)
    assert any(f"fetched checkpoints up to step {step + 1} from me/preempted" in line for line in lines)
    assert summary["resumed_from_step"] == step + 1 and summary["global_step"] == step + 2
    assert logged_steps(out / "checkpoints" / f"checkpoint-{step + 2}") == list(range(1, step + 3))
    assert f"checkpoints/checkpoint-{step + 2}/trainer_state.json" in hub_server.repo_files("me/preempted")

    # Continuing these checkpoints with another adapter shape would mix two runs: refused, with the fix.
    with pytest.raises(TrainError, match=r"other settings \(LORA_R 4 -> 16\); use a new OUTPUT_DIR"):
        train(settings_from(env, max_steps=step + 3, lora_r=16), echo=lambda _: None)


# Kills the process (SIGKILL, no cleanup of any kind) at a chosen point of the final save, then
# runs the stage as ``python -m train`` would.
KILLING_TRAIN = """
import os, runpy, signal, sys
point = os.environ["KILL_AT"]
def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "adapter-half-written":
    import train.card
    train.card.model_card = die  # called once the weights are in the adapter's temporary folder
else:
    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(os.fspath(dst)) == point and os.path.basename(os.fspath(src)).startswith(".tmp-"):
            die()
        return real_replace(src, dst)
    os.replace = replace  # killed just before the rename that would publish ``point``
sys.argv[0] = "python -m train"
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_sigkill_during_the_final_save_leaves_no_partial_file_and_a_rerun_completes(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    from train.run import train

    out = tmp_path / "out"
    env = stage_env(tiny_llama_dir, out, MAX_STEPS="2", SAVE_STEPS="2")

    # Killed half-way through writing the adapter folder (after 2 trained steps).
    first = Stage({**env, "KILL_AT": "adapter-half-written"}, bootstrap=KILLING_TRAIN)
    assert first.wait(timeout=240) == -signal.SIGKILL, first.output()
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not any((out / name).exists() for name in FINAL_FILES)
    assert list(out.glob(".tmp-adapter.*")), "the kill should have hit a half-written adapter"

    # The rerun trains nothing (step 2 is the last) and is killed just before publishing the summary.
    second = Stage({**env, "KILL_AT": "train_summary.json"}, bootstrap=KILLING_TRAIN)
    assert second.wait(timeout=240) == -signal.SIGKILL, second.output()
    assert "already reached the last step" in second.output()
    assert not (out / "train_summary.json").exists()
    assert verify_files(out / "adapter") == []  # what is there is whole
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = train(settings_from(env), echo=lambda _: None)
    assert summary["global_step"] == 2 and summary["resumed_from_step"] == 2
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2
    assert not list(out.glob(".tmp-*"))
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    trained = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert final.keys() == trained.keys() and all((final[k] == trained[k]).all() for k in final)


def test_a_checkpoint_cut_short_while_its_state_was_written_is_not_resumed(tmp_path):
    for step, state in ((2, '{"global_step": 2, "log_history": []}'), (4, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-6").mkdir()  # killed before its state was written at all
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_the_best_checkpoint_is_found_after_a_move_to_another_folder(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    state = {"global_step": 4, "best_global_step": 2, "best_model_checkpoint": "/old/machine/checkpoints/checkpoint-2"}
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
    point_best_checkpoint_here(tmp_path / "checkpoint-4")
    moved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert moved["best_model_checkpoint"] == str(tmp_path / "checkpoint-2") and moved["global_step"] == 4
