"""The run's record that goes to the Hub with the adapter, so it outlives the rented machine.

The adapter's commit also holds ``logs/``: the TensorBoard event files (OUTPUT_DIR/runs), loss.png and
train_summary.json. Like the adapter's own files, the pushed copies name no local path (loraship/public.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraship.atomic import TMP_PREFIX, write_json
from loraship.public import without_local_paths

#: Where the pushed logs go in the adapter repo; the TensorBoard folder in OUTPUT_DIR (and under logs/).
LOGS_DIR = "logs"
TENSORBOARD_DIR = "runs"


def copy_tensorboard_events(source: Path, target: Path) -> list[Path]:
    """Every event file under ``source`` into ``target`` (same layout), its text summaries without local paths.

    transformers writes the training arguments and the model config as JSON text (output_dir among them);
    a text that is not JSON is left out, as nothing says what it holds. Scalars are copied as they are.
    """
    import json

    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    written = []
    for path in sorted(source.rglob("events.out.tfevents.*")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            writer = RecordWriter(fh)
            for record in RawEventFileLoader(str(path)).Load():
                event = Event.FromString(record)
                kept = []
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "text":
                        try:
                            texts = [json.dumps(without_local_paths(json.loads(text)), indent=2).encode()
                                     for text in value.tensor.string_val]
                        except ValueError:
                            continue
                        del value.tensor.string_val[:]
                        value.tensor.string_val.extend(texts)
                    kept.append(value)
                if event.HasField("summary"):
                    del event.summary.value[:]
                    event.summary.value.extend(kept)
                writer.write(event.SerializeToString())
        written.append(out)
    return written


def stage_for_hub(folder: Path, adapter_dir: Path, output_dir: Path, summary: dict[str, Any]) -> None:
    """What the Hub commit holds, in ``folder``: the adapter's files (hard links) and ``logs/``."""
    for path in sorted(adapter_dir.rglob("*")):
        if path.is_file():
            _link_or_copy(path, folder / path.relative_to(adapter_dir))
    logs = folder / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    if (output_dir / TENSORBOARD_DIR).is_dir():
        copy_tensorboard_events(output_dir / TENSORBOARD_DIR, logs / TENSORBOARD_DIR)
    if (output_dir / "loss.png").is_file():
        shutil.copyfile(output_dir / "loss.png", logs / "loss.png")
    write_json(logs / "train_summary.json", without_local_paths(summary))


def push_adapter_and_logs(adapter_dir: Path, output_dir: Path, summary: dict[str, Any], repo: str, *,
                          token: str | None, private: bool) -> str:
    """One Hub commit: the adapter folder at the repo's root, the run's logs under ``logs/``; the commit URL.

    ``logs/`` mirrors this run (older runs' event files there are deleted); ``summary`` is the one about to be
    written, without the commit it is pushed in.
    """
    from loraship.hub import push_folder

    # A .tmp- folder in OUTPUT_DIR: hard links work (same filesystem), and a killed run's is cleaned up on restart.
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}hub-", dir=output_dir) as stage:
        stage_for_hub(Path(stage), adapter_dir, output_dir, summary)
        return push_folder(stage, repo, token=token, private=private, delete_patterns=[f"{LOGS_DIR}/*"])


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
