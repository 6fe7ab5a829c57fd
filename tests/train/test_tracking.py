"""REPORT_TO: a run reaches the trackers it names, and its record goes to the Hub with the adapter.

One tiny training run (2 steps of the tiny Llama, about 10 s on 2 cores) reports to TensorBoard, W&B
(offline) and MLflow (a local file store) and pushes to the stand-in Hub; the tests below read what each
of them kept. The settings tests need no run: REPORT_TO's mistakes are refused before anything is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraship.envsettings import SettingsError
from loraship.public import without_local_paths
from tests.fixtures.hub import running_stub_hub
from tests.fixtures.train_runs import tiny_settings

REPO = Path(__file__).resolve().parents[2]
HUB_REPO = "me/tracked-adapter"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_llama_dir):
    from train.run import train

    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as env, running_stub_hub(env, root) as hub:
        env.setenv("WANDB_MODE", "offline")
        for var, folder in (("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "wandb-config"),
                            ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
            env.setenv(var, str(root / folder))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps a file store only when asked to
        settings = tiny_settings(tiny_llama_dir, root / "out", report_to=["tensorboard", "wandb", "mlflow"],
                                 hub_repo=HUB_REPO, max_samples=24, eval_size=4, max_steps=2,
                                 # no evaluation, no checkpoint: the record of two logged steps is enough here
                                 best_by_eval=False, eval_steps=100, save_steps=100)
        summary = train(settings, echo=lambda _: None)
        pushed = hub.repo_files(HUB_REPO)
    return SimpleNamespace(root=root, out=root / "out", summary=summary, pushed=pushed, model=tiny_llama_dir)


def train_losses(summary) -> dict[int, float]:
    return {step: loss for step, loss in summary["train_losses"]}


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its record log (leveldb's log format, 32 KiB blocks)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, parts, rows = 7, [], []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        parts.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = Record.FromString(b"".join(parts))
            parts = []
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_loss(tracked):
    (run_file,) = (tracked.root / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {row["train/global_step"]: row["train/loss"] for row in wandb_history(run_file) if "train/loss" in row}
    assert logged == pytest.approx(train_losses(tracked.summary))


@pytest.mark.slow
def test_mlflow_file_store_holds_the_loss_metric(tracked):
    (metric,) = (tracked.root / "mlruns").glob("*/*/metrics/loss")
    logged = {int(step): float(value) for _, value, step in (line.split() for line in metric.read_text().splitlines())}
    assert logged == pytest.approx(train_losses(tracked.summary))


@pytest.mark.slow
def test_the_adapter_repo_holds_the_run_logs_beside_the_adapter(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pushed = tracked.pushed
    assert pushed["adapter_model.safetensors"] == (tracked.out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert pushed["logs/loss.png"] == (tracked.out / "loss.png").read_bytes()
    (events,) = [name for name in pushed if name.startswith("logs/runs/events.out.tfevents.")]
    copy = tracked.root / "pushed-events" / Path(events).name
    copy.parent.mkdir()
    copy.write_bytes(pushed[events])
    accumulator = EventAccumulator(str(copy)).Reload()
    losses = {event.step: event.value for event in accumulator.Scalars("train/loss")}
    assert losses == pytest.approx(train_losses(tracked.summary))
    assert "args/text_summary" in accumulator.Tags()["tensors"]


@pytest.mark.slow
def test_the_pushed_summary_is_the_local_one_without_its_commit_and_local_paths(tracked):
    local = json.loads((tracked.out / "train_summary.json").read_text())
    assert local["hub_commit"] == tracked.summary["hub_commit"]  # written after the push it names
    pushed = json.loads(tracked.pushed["logs/train_summary.json"])
    assert pushed == without_local_paths({key: value for key, value in local.items() if key != "hub_commit"})
    assert pushed["settings"]["OUTPUT_DIR"] == "out" and pushed["settings"]["REPORT_TO"][1] == "wandb"


@pytest.mark.slow
def test_no_pushed_log_holds_a_local_path(tracked):
    local = [str(tracked.root).encode(), str(tracked.model).encode(), str(REPO).encode()]
    logs = {name: data for name, data in tracked.pushed.items() if name.startswith("logs/")}
    assert len(logs) == 3
    assert [name for name, data in logs.items() if any(path in data for path in local)] == []


def test_a_later_push_replaces_the_logs_of_an_earlier_run(hub_server, tmp_path):
    from train.run_logs import push_adapter_and_logs

    hub_server.add_file(HUB_REPO, "logs/runs/events.out.tfevents.1.earlier-run", b"old", private=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    push_adapter_and_logs(tmp_path / "adapter", tmp_path, {"global_step": 2}, HUB_REPO, token="hf_x", private=True)
    assert set(hub_server.repo_files(HUB_REPO)) == {"adapter_config.json", "logs/train_summary.json"}


# --- mistakes in REPORT_TO, refused with the settings -------------------------------------------------


@pytest.fixture
def settings_env(monkeypatch, tmp_path):
    from loraship.envsettings import settings_rows
    from train.settings import TrainSettings

    for var, *_ in settings_rows(TrainSettings):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    return monkeypatch


def refusal(env, value: str) -> str:
    """The one settings problem REPORT_TO=value gives."""
    from train.settings import load_train_settings

    env.setenv("REPORT_TO", value)
    with pytest.raises(SettingsError) as err:
        load_train_settings(REPO / "tests" / "train" / "no-such.env", cuda=False)
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


def test_an_unknown_tracker_is_refused_with_the_choices(settings_env):
    assert refusal(settings_env, "tensorboard,comet") == (
        "REPORT_TO='tensorboard,comet': unknown tracker 'comet'; choose from tensorboard, wandb, mlflow, trackio "
        "(comma-separated), or none")


def test_a_tracker_whose_client_is_missing_names_the_extra_that_installs_it(settings_env):
    settings_env.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    assert refusal(settings_env, "wandb") == (
        "REPORT_TO='wandb': the wandb client is not installed; pip install 'loraship[tracking]', or leave wandb out")


def test_none_with_a_tracker_is_refused(settings_env):
    assert refusal(settings_env, "none,wandb") == (
        "REPORT_TO='none,wandb': none turns every tracker off; give it alone, or list only the trackers")


def test_mlflow_without_a_tracking_uri_is_refused_where_only_its_client_is_installed(settings_env):
    import importlib.metadata

    try:
        importlib.metadata.version("mlflow")
        pytest.skip("the full mlflow package is installed: it keeps runs in ./mlflow.db by itself")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert refusal(settings_env, "mlflow").startswith("REPORT_TO='mlflow': MLFLOW_TRACKING_URI is not set")


def test_the_cli_refuses_a_bad_report_to_with_exit_2_before_loading_anything(settings_env, tmp_path):
    from click.testing import CliRunner

    from train.__main__ import main

    result = CliRunner().invoke(main, ["--env-file", str(tmp_path / "no.env")], env={"REPORT_TO": "tensorbored"})
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: REPORT_TO='tensorbored': unknown tracker 'tensorbored'; choose from tensorboard, wandb, mlflow, "
        "trackio (comma-separated), or none"]
    assert not (tmp_path / "out").exists()


def test_trackers_are_lower_cased_and_given_once(settings_env):
    from train.settings import load_train_settings

    settings_env.setenv("REPORT_TO", "WandB, tensorboard,wandb")
    settings = load_train_settings(REPO / "tests" / "train" / "no-such.env", cuda=False)
    assert settings.report_to == ["wandb", "tensorboard"]
