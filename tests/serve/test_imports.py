"""serve/ stays slim: neither torch nor transformers (nor peft, trl, bitsandbytes), even indirectly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")

# Import every serve module, then build the whole app (llama-cpp-python's server,
# the real model, the Gradio UI) and a terminal-chat model, as `python -m serve` does.
SCRIPT = """
import json, sys
import serve, serve.__main__, serve.app, serve.bundle, serve.chat, serve.deploy, serve.model, serve.settings
from loraship.embedded import embedded_gguf_path
from serve.app import build_app
from serve.model import load_llama, token_counter
from serve.settings import load_serve_settings

settings = load_serve_settings(n_ctx=512, n_threads=1)
build_app(settings, embedded_gguf_path())
token_counter(load_llama(embedded_gguf_path(), 512, 1))
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""


@pytest.mark.slow
def test_serve_never_imports_training_libraries():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert {"llama_cpp", "gradio", "fastapi"} <= loaded  # the check saw the real thing
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
