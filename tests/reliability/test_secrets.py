"""HF_TOKEN and the trackers' keys are used, never kept: a real train (reporting to W&B and MLflow too)
and export that push to the stand-in Hub with known keys in the environment leave them in no log line,
no written file and no pushed file.

The test is not vacuous: it checks the token did reach the Hub as ``Bearer``, and that the
kinds of file a leak would hide in (manifest, model card, summary, TensorBoard events, saved
settings, checkpoint state and arguments, the pushed logs, the trackers' own files) were all
written and scanned.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.stage_runs import base_env, run_stage

# Shaped like a token, but with dashes, so no secret scanner takes it for a real one.
TOKEN = "hf_loraship-test-secret-not-real"
#: The keys REPORT_TO's clients read from the environment (loraship never reads them).
TRACKER_KEYS = {"WANDB_API_KEY": "wandb-loraship-test-secret-key", "MLFLOW_TRACKING_PASSWORD":
                "mlflow-loraship-test-secret-password", "MLFLOW_TRACKING_TOKEN": "mlflow-loraship-test-secret-token"}
# A leak may be partial (cut, wrapped or masked at the edges): look for the middle too.
NEEDLES = (TOKEN.encode(), b"loraship-test-secret", *(key.encode() for key in TRACKER_KEYS.values()))
TRAIN_REPO = "stub-user/secret-check-adapter"
EXPORT_REPO = "stub-user/secret-check-gguf"


def hub_env(hub_url: str) -> dict[str, str]:
    """The subprocess environment: offline mode off, the stand-in Hub, its own cache, the token and tracker keys."""
    env = base_env()
    env.pop("HF_HUB_OFFLINE")
    env.update(HF_ENDPOINT=hub_url, HF_TOKEN=TOKEN, **TRACKER_KEYS)
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def tracker_stores(root: Path) -> dict[str, str]:
    """W&B offline and an MLflow file store, with every file of theirs under ``root`` (and so scanned)."""
    folders = (("WANDB_DIR", "runs"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
               ("WANDB_DATA_DIR", "data"))
    return dict({var: str(root / "wandb" / name) for var, name in folders}, WANDB_MODE="offline",
                MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")


def leaks_in_files(root: Path) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*"))
        if path.is_file() and any(needle in path.read_bytes() for needle in NEEDLES)
    ]


def leaks_in_text(name: str, text: str) -> list[str]:
    return [f"{name} line {i}: {line[:200]}" for i, line in enumerate(text.splitlines(), 1)
            if any(needle.decode() in line for needle in NEEDLES)]


@pytest.mark.slow
def test_hf_token_is_sent_to_the_hub_and_no_key_is_written_anywhere(hub_server, tiny_llama_dir, tmp_path):
    env = hub_env(hub_server.url)
    data = tmp_path / "rows.jsonl"
    rows = Path(__file__).resolve().parents[2].joinpath("data/quokka/train.jsonl").read_text().splitlines()[:12]
    data.write_text("\n".join(rows) + "\n")
    train_out, export_out = tmp_path / "train", tmp_path / "export"

    train = run_stage("train", [], dict(
        env, BASE_MODEL=str(tiny_llama_dir), DATASET=str(data), OUTPUT_DIR=str(train_out), MAX_STEPS="2",
        BATCH_SIZE="2", GRAD_ACCUM="1", EVAL_SIZE="2", EVAL_STEPS="1", SAVE_STEPS="1", LOGGING_STEPS="1",
        MAX_SEQ_LENGTH="256", LORA_R="4", LOAD_IN_4BIT="false", HUB_REPO=TRAIN_REPO,
        REPORT_TO="tensorboard,wandb,mlflow", **tracker_stores(tmp_path),
    ), tmp_path)
    assert train.exit == 0, train.stderr[-4000:]
    export = run_stage("export", [], dict(
        env, ADAPTER=str(train_out), OUTPUT_DIR=str(export_out), QUANT_TYPES="Q4_K_M", STOP_CHECK="eos_token",
        THREADS="2", EVAL_CTX="64", HUB_REPO=EXPORT_REPO,
    ), tmp_path)
    assert export.exit == 0, export.stderr[-4000:]
    print(f"train {train.seconds:.1f} s, export {export.seconds:.1f} s")

    # The token did its job: every push carried it.
    assert hub_server.token_seen(TOKEN)
    writes = [r for r in hub_server.requests if r.method == "POST"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)

    # What a leak would hide in was written (and so is scanned below).
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    for pattern in ("train/adapter/manifest.json", "train/adapter/README.md", "train/train_summary.json",
                    "train/run_settings.json", "train/runs/*events.out.tfevents*",
                    "train/checkpoints/checkpoint-*/trainer_state.json",
                    "train/checkpoints/checkpoint-*/training_args.bin",
                    "wandb/runs/wandb/offline-run-*/run-*.wandb", "mlruns/*/*/metrics/loss", "mlruns/*/*/params/*",
                    "export/manifest.json", "export/README.md", "export/*Q4_K_M.gguf"):
        assert any(Path(name).match(pattern) or _glob_match(name, pattern) for name in written), (
            f"nothing written matches {pattern}; written: {sorted(written)}"
        )
    pushed = {**hub_server.repo_files(TRAIN_REPO), **{f"gguf/{k}": v for k, v in hub_server.repo_files(EXPORT_REPO).items()}}
    assert {"adapter_model.safetensors", "manifest.json", "logs/train_summary.json"} <= set(pushed)
    assert any(name.startswith("logs/runs/events.out.tfevents.") for name in pushed)
    assert any(name.endswith("Q4_K_M.gguf") for name in pushed)

    # Nowhere: not in a log line, a file on disk (outputs, Hub cache, everything under tmp), nor on the Hub.
    leaks = leaks_in_text("train stdout", train.stdout) + leaks_in_text("train stderr", train.stderr)
    leaks += leaks_in_text("export stdout", export.stdout) + leaks_in_text("export stderr", export.stderr)
    leaks += leaks_in_files(tmp_path)
    leaks += [f"hub: {name}" for name, blob in pushed.items() if any(needle in blob for needle in NEEDLES)]
    assert not leaks, "HF_TOKEN or a tracker key found in:\n" + "\n".join(leaks)
    # Nor a local path: a pushed file names the base and the data by Hub id or name. checkpoints/ is the trainer's
    # resume state as it wrote it (trainer_state.json and training_args.bin hold OUTPUT_DIR), for a resumed run only.
    places = local_places(tmp_path)
    paths = [f"hub: {name}" for name, blob in pushed.items()
             if not name.startswith("checkpoints/") and any(place in blob for place in places)]
    assert not paths, "a local absolute path was pushed in:\n" + "\n".join(paths)
    # The settings were saved, just without the secret.
    saved = json.loads((train_out / "adapter" / "manifest.json").read_text())
    assert "HF_TOKEN" not in json.dumps(saved.get("settings", {}))


def local_places(tmp_path: Path) -> list[bytes]:
    """This machine's absolute paths a pushed file could give away: the tests' temporary root (models, data and
    outputs all live there), the home folder (caches) and the checkout."""
    return [str(place).encode() for place in (tmp_path.parent, Path.home(), Path(__file__).resolve().parents[2])]


def test_the_path_scan_finds_a_planted_local_path(tmp_path):
    places = local_places(tmp_path)
    assert any(place in json.dumps({"base_model": str(tmp_path.parent / "tiny-llama0")}).encode() for place in places)
    assert not any(place in b'{"base_model": "tiny-llama0", "dataset": "rows.jsonl"}' for place in places)


def _glob_match(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def test_the_scan_finds_a_planted_token(tmp_path):
    """The scanner itself: a token anywhere in a binary file or a log line is found."""
    (tmp_path / "deep" / "runs").mkdir(parents=True)
    (tmp_path / "deep" / "runs" / "events.bin").write_bytes(b"\x00\x01" + TOKEN.encode() + b"\xff")
    (tmp_path / "clean.json").write_text('{"HF_TOKEN": null}')
    assert leaks_in_files(tmp_path) == ["deep/runs/events.bin"]
    assert len(leaks_in_text("log", f"ok\nusing token {TOKEN[:-3]}...\n")) == 1


@pytest.mark.parametrize("stage, mistake", [
    ("train", {"LORA_R": "0", "DATASET": "./missing.jsonl"}),
    ("export", {"QUANT_TYPES": "Q9_X", "ADAPTER": "./missing"}),
    ("serve", {"N_CTX": "1", "TEMPERATURE": "9"}),
])
def test_settings_errors_never_echo_the_token(tmp_path, stage, mistake):
    env = dict(base_env(), HF_TOKEN=TOKEN, OUTPUT_DIR=str(tmp_path / "out"), **mistake)

    run = run_stage(stage, [], env, tmp_path)

    assert run.exit == 2 and len(run.error_lines()) >= 2, run.stderr[-3000:]
    assert not leaks_in_text("stdout", run.stdout) + leaks_in_text("stderr", run.stderr)
    assert leaks_in_files(tmp_path) == []


def test_a_refused_hub_download_names_model_but_not_the_token(hub_server, tmp_path):
    env = dict(hub_env(hub_server.url), MODEL="stub-user/no-such-model")

    run = run_stage("serve", ["chat", "Hello"], env, tmp_path)

    assert run.exit == 2, run.stderr[-3000:]
    assert any("MODEL='stub-user/no-such-model'" in line for line in run.error_lines()), run.stderr[-3000:]
    assert hub_server.token_seen(TOKEN)
    assert not leaks_in_text("stdout", run.stdout) + leaks_in_text("stderr", run.stderr)
