"""Shared test setup: offline Hub, quiet threads, and the fixture plugins.

Each fixture module under tests/fixtures/ is owned by what it serves:
``models`` (the embedded tokenizer and a tiny random-init Llama),
``families`` (a tiny random-init model of each family users bring, with its real tokenizer),
``hub`` (a stand-in Hugging Face Hub server on loopback).
"""

import os

# Nothing in the tests may reach the real Hub; a test that needs a Hub points
# HF_ENDPOINT at the stand-in server instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Under `make test` (pytest-xdist, a test process per core) each process and what it starts computes on one
# thread: two processes each spinning a thread per core would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

import pytest  # noqa: E402

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.families", "tests.fixtures.hub"]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
