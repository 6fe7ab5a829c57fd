"""A killed export leaves nothing at a final path, and the rerun completes.

``python -m export`` runs as a real process group (its converter and
quantizer children included) and is SIGKILLed at seeded random moments of an
uninterrupted run's duration: while merging, converting, quantizing or
verifying. Whatever the moment, OUTPUT_DIR may hold only ``.tmp-*`` scratch
entries (or, killed while exiting after its last rename, a complete export
that matches its manifest); then one more run into the same folder must
finish, clean the scratch up and leave files that match their manifest.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraship.manifest import MANIFEST_NAME, verify_files
from tests.fixtures.adapters import make_train_output
from tests.fixtures.export_runs import final_files

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def export_command(adapter: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("HUB_REPO", "HF_TOKEN", "BASE_MODEL")}
    env.update({
        "ADAPTER": str(adapter), "OUTPUT_DIR": str(out), "QUANT_TYPES": "Q4_K_M",
        "STOP_CHECK": "eos_token", "EVAL_CTX": "64", "THREADS": "1", "HF_HUB_OFFLINE": "1",
    })
    return [sys.executable, "-m", "export"], env


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    from export.converter import ConverterError, locate_converter

    try:
        locate_converter()
    except ConverterError as err:
        pytest.skip(f"llama.cpp converter not installed: {err}")
    return make_train_output(tiny_llama_dir, tmp_path_factory.mktemp("train-out"), base_name=str(tiny_llama_dir))


def test_sigkill_at_random_moments_leaves_no_final_file_and_a_rerun_completes(adapter, tmp_path):
    command, env = export_command(adapter, tmp_path / "reference")
    started = time.monotonic()
    reference = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    duration = time.monotonic() - started
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    command, env = export_command(adapter, out)
    rng = random.Random(7)
    for fraction in sorted(rng.uniform(0.15, 0.95) for _ in range(3)):
        process = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        finished_first = process.poll() is not None
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished between the poll and the kill
            finished_first = True
        process.wait(timeout=60)
        if finished_first:
            break  # a run that beat the kill is a complete export, not a torn one
        left = final_files(out)
        if MANIFEST_NAME in left:  # killed after its last rename, while exiting: a complete export
            assert verify_files(out) == [], f"killed at {fraction:.0%} of a run"
            break
        assert left == [], f"killed at {fraction:.0%} of a run"

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert verify_files(out) == []
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")] == []
