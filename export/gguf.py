"""HF folder -> GGUF with llama.cpp's converter, then llama.cpp's quantizer.

Both run as child processes: the converter so its vendored gguf-py is the one imported, the quantizer
so its log (naming every tensor that fell back to another type) can be captured and reported.
"""

from __future__ import annotations

import errno
import json
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from export.converter import converter_command, converter_env
from export.settings import QUANTIZED_TYPES
from loraship.errors import UserError


class GGUFError(UserError):
    """The converter or the quantizer refused the model."""


def _raise_if_disk_full(output: str, path: Path) -> None:
    # The child's ENOSPC becomes ours, so the caller reports it as a full disk (naming OUTPUT_DIR).
    if "No space left on device" in output or "Disk quota exceeded" in output:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


#: Families whose tokenization llama.cpp settles by the GGUF's general.name (llama-vocab.cpp): Phi-3's special tokens
#: take the whitespace after them, as its tokenizer.json says, only where the name contains one of these.
FAMILY_IN_NAME = {"phi3": ("phi3", "phi-3")}


def gguf_name(name: str, model_dir: Path) -> str:
    """general.name for the GGUF of ``model_dir``: ``name``, with the family added where llama.cpp reads it there."""
    config = model_dir / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    marks = FAMILY_IN_NAME.get(model_type, ())
    if marks and not any(mark in name.lower() for mark in marks):
        return f"{name} ({marks[0]})"
    return name


def convert_to_gguf(model_dir: Path, out_path: Path, outtype: str, converter_dir: Path) -> Path:
    """Run ``convert_hf_to_gguf.py`` on a merged HF folder; ``outtype`` is ``f16`` or ``bf16``. The GGUF is named
    as its file is (``NAME-F16.gguf``: NAME), not after the merged folder."""
    name = gguf_name(out_path.stem.removesuffix(f"-{outtype.upper()}"), model_dir)
    cmd = converter_command(
        "convert_hf_to_gguf.py", converter_dir, str(model_dir), "--outfile", str(out_path), "--outtype", outtype,
        "--model-name", name,
    )
    result = subprocess.run(cmd, capture_output=True, text=True, env=converter_env())
    if result.returncode != 0 or not out_path.is_file():
        _raise_if_disk_full(result.stderr + result.stdout, out_path)
        raise GGUFError(converter_failure(result.stderr + result.stdout, model_dir))
    return out_path


def converter_failure(output: str, model_dir: Path) -> str:
    """What the converter's failure means: one line for a model llama.cpp cannot take, else its last lines."""
    unsupported = re.search(r"Model (\S+) is not supported", output)
    if unsupported:
        return (f"llama.cpp's converter has no {unsupported.group(1)} architecture: {model_dir.name} cannot become a "
                "GGUF with this llama-cpp-python; export another family's model")
    if "BPE pre-tokenizer was not recognized" in output:
        return (f"llama.cpp's converter does not recognize the tokenizer of {model_dir.name} (BPE pre-tokenizer not "
                "recognized): it converts the tokenizers of the model families it knows, and this one is not among "
                "them (a tokenizer borrowed from another model?)")
    return f"llama.cpp's converter failed on {model_dir} (is the architecture supported by llama.cpp?):\n" + _tail(output)


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, converter_dir: Path) -> Path:
    """The adapter as a LoRA GGUF. ``--base`` is always a local folder, or the script reaches for the Hub."""
    cmd = converter_command(
        "convert_lora_to_gguf.py", converter_dir, str(adapter_dir), "--base", str(base_dir),
        "--outfile", str(out_path), "--outtype", "f16",
    )
    result = subprocess.run(cmd, capture_output=True, text=True, env=converter_env())
    if result.returncode != 0 or not out_path.is_file():
        _raise_if_disk_full(result.stderr + result.stdout, out_path)
        raise GGUFError(f"llama.cpp's LoRA converter failed on {adapter_dir}:\n" + _tail(result.stderr or result.stdout))
    return out_path


@dataclass
class Fallback:
    tensor: str
    wanted: str
    got: str


@dataclass
class QuantizeReport:
    """What llama.cpp did to each tensor: the fallbacks it needed and the types in the file."""

    quant_type: str
    fallbacks: list[Fallback] = field(default_factory=list)
    n_tensors: int = 0
    type_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_fallback(self) -> int:
        return len(self.fallbacks)

    def summary(self) -> dict[str, int]:
        """``{"q4_K->q5_0": 120, ...}``: how many tensors fell back from which type to which."""
        counts: dict[str, int] = {}
        for fb in self.fallbacks:
            key = f"{fb.wanted}->{fb.got}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_json(self) -> dict:
        return {
            "fallback_tensors": self.n_fallback,
            "total_tensors": self.n_tensors,
            "fallbacks": self.summary(),
            "fallback_tensor_list": {fb.tensor: f"{fb.wanted}->{fb.got}" for fb in self.fallbacks},
            "tensor_types": self.type_counts,
        }


# llama-quant.cpp: "warning: NAME - ncols N not divisible by K (required for type T) ... -> falling back to U"
_FALLBACK = re.compile(
    r"warning:\s+(?P<name>\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(?P<wanted>\S+)\).*?"
    r"-> falling back to\s+(?P<got>\S+)"
)

_QUANTIZE_SCRIPT = """
import ctypes, sys
import llama_cpp

@llama_cpp.llama_log_callback
def _log(level, text, user_data):
    sys.stderr.write(text.decode("utf-8", "replace"))

llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ftype)
params.nthread = threads
params.max_buf_size = int(sys.argv[5])
sys.exit(0 if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0 else 3)
"""


#: Rows the quantizer converts at a time, in bytes of float32: llama.cpp's default (8 GiB) holds a whole
#: tensor, so a 128k-vocabulary embedding set the export's peak; 64 MiB slabs write the same bytes.
QUANTIZE_BUFFER_BYTES = 64 * 1024 * 1024


def quantize_gguf(src: Path, dst: Path, quant_type: str, threads: int = 0) -> QuantizeReport:
    """Quantize an F16 GGUF with ``llama_cpp.llama_model_quantize``; report every fallback."""
    import sys

    ftype = QUANTIZED_TYPES[quant_type]
    cmd = [sys.executable, "-c", _QUANTIZE_SCRIPT, str(src), str(dst), ftype, str(threads), str(QUANTIZE_BUFFER_BYTES)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not dst.is_file():
        _raise_if_disk_full(result.stderr, dst)
        raise GGUFError(f"llama.cpp could not quantize {src.name} to {quant_type}:\n" + _tail(result.stderr))
    fallbacks = [Fallback(m["name"], m["wanted"], m["got"]) for m in _FALLBACK.finditer(result.stderr)]
    return QuantizeReport(quant_type=quant_type, fallbacks=fallbacks)


def read_tensor_types(path: Path) -> dict[str, str]:
    """``{tensor name: type}`` from a GGUF file's header (the tensor table; no tensor data is read).

    gguf-py's ``GGUFReader`` gives the same (a test pins it) but builds an object for every
    metadata value first: 5 s for a 128k-token vocabulary, for a table of ~150 entries.
    """
    import mmap

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _tensor_table(buf)
    except (struct.error, ValueError, IndexError) as err:  # mmap of an empty file is a ValueError too
        raise GGUFError(f"{path.name} is not a readable GGUF file ({err})") from err


#: GGUF metadata value types: fixed sizes (bytes) of the scalar ones; 8 is a string, 9 an array.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _ggml_type_names() -> dict[int, str]:
    import llama_cpp

    names = {getattr(llama_cpp, n): n.removeprefix("GGML_TYPE_") for n in dir(llama_cpp)
             if n.startswith("GGML_TYPE_") and n != "GGML_TYPE_COUNT"}
    names.setdefault(30, "BF16")  # ggml.h's GGML_TYPE_BF16, not among llama_cpp's constants
    return names


def _tensor_table(buf) -> dict[str, str]:
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    pos = 24

    def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8:pos + 8 + n], pos + 8 + n

    def skip_value(kind: int, pos: int) -> int:
        if kind in _GGUF_SCALAR_SIZES:
            return pos + _GGUF_SCALAR_SIZES[kind]
        if kind == _GGUF_STRING:
            return string(pos)[1]
        if kind == _GGUF_ARRAY:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _GGUF_SCALAR_SIZES:
                return pos + count * _GGUF_SCALAR_SIZES[item]
            for _ in range(count):
                pos = skip_value(item, pos)
            return pos
        raise ValueError(f"unknown metadata value type {kind}")

    for _ in range(n_kv):
        _, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(kind, pos + 4)
    names = _ggml_type_names()
    types = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * n_dims
        ggml_type, _offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        types[name.decode("utf-8")] = names.get(ggml_type, f"type {ggml_type}")
    return types


def count_types(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
