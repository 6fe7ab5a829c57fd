"""Which GGUF to serve, and whether it is fit to be handed to llama.cpp.

``MODEL`` may be a local file (or an export folder), a Hub repo id, or unset
(the newest export under ``outputs/``, else the embedded SmolLM2). Before
llama.cpp sees the file we read its GGUF header ourselves: llama.cpp answers a
wrong or cut-off file with a bare "failed to load model", while a user needs
to hear which setting points at what, and what is wrong with it.
"""

from __future__ import annotations

import fnmatch
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from loraship.errors import UserError
from loraship.hub import HubError, download_repo, looks_like_repo_id
from loraship.manifest import MANIFEST_NAME, find_file_entry, read_manifest, verify_files

GGUF_MAGIC = b"GGUF"
DEFAULT_PATTERN = "*Q4_K_M.gguf"
EXPORT_PATTERN = "*Q4_K_M*.gguf"
OUTPUTS = Path("outputs")
# The manifest's ``extra`` key that python -m demo sets on its untuned baseline export.
BASELINE_KEY = "baseline"
# (elements per block, bytes per block) of the ggml tensor types, to find
# where a GGUF's last tensor must end. A type missing here only skips the
# exact truncation check; llama.cpp still refuses a broken file.
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144),
    13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36),
    41: (128, 18),
}
# GGUF metadata value types: fixed-size scalars by struct format.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_STRINGS_UP_TO = 1 << 20


class ServeError(UserError):
    """A user's mistake: the model to serve cannot be found, fetched or read, or a deploy's input is wrong."""


@dataclass
class GgufInfo:
    """What the header of a GGUF file says (array values are skipped)."""

    path: Path
    version: int
    tensor_count: int
    metadata: dict = field(default_factory=dict)
    # Bytes the file needs to hold every tensor; None when a tensor type is unknown to us.
    needed_size: int | None = None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)


class _Truncated(Exception):
    pass


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _unpack(fh: BinaryIO, fmt: str):
    return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]


def _read_string(fh: BinaryIO, size: int, keep: bool) -> str | None:
    length = _unpack(fh, "<Q")
    if length > size:
        raise _Truncated
    if not keep or length > _KEEP_STRINGS_UP_TO:
        fh.seek(length, 1)
        return None
    return _read(fh, length).decode("utf-8", errors="replace")


def _read_value(fh: BinaryIO, kind: int, size: int, keep: bool):
    if kind in _SCALARS:
        return _unpack(fh, _SCALARS[kind])
    if kind == _STRING:
        return _read_string(fh, size, keep)
    if kind == _ARRAY:
        item_kind, count = _unpack(fh, "<I"), _unpack(fh, "<Q")
        if item_kind in _SCALARS:
            fh.seek(count * struct.calcsize(_SCALARS[item_kind]), 1)
        else:
            if count > size:
                raise _Truncated
            for _ in range(count):
                _read_value(fh, item_kind, size, keep=False)
        return None
    raise ValueError(f"unknown metadata value type {kind}")


def read_gguf_header(path: str | Path, setting: str = "MODEL") -> GgufInfo:
    """Parse a GGUF header; a ServeError naming ``setting`` if the file is not a whole GGUF."""
    path = Path(path)
    shown = f"{setting}={str(path)!r}"
    if not path.exists():
        raise ServeError(f"{shown}: no such file")
    if not path.is_file():
        raise ServeError(f"{shown}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ServeError(
                f"{shown}: not a GGUF file (it starts with {magic!r}, a GGUF starts with b'GGUF'); "
                "point MODEL at a .gguf made by `python -m export`"
            )
        try:
            version = _unpack(fh, "<I")
            if version not in (2, 3):
                raise ServeError(f"{shown}: GGUF version {version} is not supported (2 or 3 expected)")
            tensor_count, kv_count = _unpack(fh, "<Q"), _unpack(fh, "<Q")
            if tensor_count > size or kv_count > size:
                raise _Truncated
            metadata = {}
            for _ in range(kv_count):
                key = _read_string(fh, size, keep=True) or ""
                metadata[key] = _read_value(fh, _unpack(fh, "<I"), size, keep=True)
            data_end, known = 0, True
            for _ in range(tensor_count):
                _read_string(fh, size, keep=False)
                n_dims = _unpack(fh, "<I")
                if n_dims > 8:
                    raise _Truncated
                elements = 1
                for _ in range(n_dims):
                    elements *= _unpack(fh, "<Q")
                kind, offset = _unpack(fh, "<I"), _unpack(fh, "<Q")
                block = GGML_BLOCKS.get(kind)
                if block is None:
                    known = False
                    data_end = max(data_end, offset)
                else:
                    data_end = max(data_end, offset + elements // block[0] * block[1])
            alignment = metadata.get("general.alignment") or 32
            data_start = -(-fh.tell() // alignment) * alignment
        except (_Truncated, ValueError, struct.error):
            raise ServeError(
                f"{shown}: truncated or corrupt GGUF ({size} bytes, the header itself is cut off or "
                "garbled); download or export it again"
            ) from None
    needed = data_start + data_end
    if size < needed:
        raise ServeError(
            f"{shown}: truncated GGUF ({size} bytes, its tensors need {needed}); download or export it again"
        )
    return GgufInfo(path, version, tensor_count, metadata, needed if known else None)


def check_against_manifest(gguf: Path, setting: str = "MODEL") -> None:
    """Refuse a GGUF whose manifest.json (beside it) lists it with another sha256 or size."""
    manifest = read_manifest(gguf.parent)
    if manifest is None or find_file_entry(manifest, gguf.name) is None:
        return
    only_this = dict(manifest, files=[find_file_entry(manifest, gguf.name)])
    problems = verify_files(gguf.parent, only_this)
    if problems:
        raise ServeError(
            f"{setting}={str(gguf)!r}: does not match {gguf.parent / MANIFEST_NAME} "
            f"({problems[0]}); the file changed after export: export or download it again"
        )


def is_users_export(folder: Path) -> bool:
    """The folder holds a finished export (it has a manifest) that is not a comparison baseline.

    ``python -m demo`` marks its untuned base export with ``extra.baseline`` in
    the manifest: it is written after the tune, and must not be served in its place.
    """
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and not (manifest.get("extra") or {}).get(BASELINE_KEY)


def newest_export(outputs: Path = OUTPUTS) -> Path | None:
    """The newest ``*Q4_K_M*.gguf`` under ``outputs`` with a manifest beside it, baselines left out."""
    if not outputs.is_dir():
        return None
    candidates = [
        p for p in outputs.rglob(EXPORT_PATTERN)
        if p.is_file() and not any(part.startswith(".tmp-") for part in p.parts) and is_users_export(p.parent)
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def _pick_in_folder(folder: Path, pattern: str | None, shown: str) -> Path:
    """One GGUF inside ``folder``: ``pattern`` if given, else the Q4_K_M one, else the only one."""
    ggufs = sorted(p for p in folder.rglob("*.gguf") if p.is_file())
    if pattern:
        chosen = [p for p in ggufs if fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern) or p.name == pattern]
    else:
        chosen = [p for p in ggufs if fnmatch.fnmatch(p.name, DEFAULT_PATTERN)] or (ggufs if len(ggufs) == 1 else [])
    if len(chosen) == 1:
        return chosen[0]
    names = ", ".join(p.relative_to(folder).as_posix() for p in ggufs) or "none"
    wanted = f"MODEL_FILE={pattern!r}" if pattern else f"one {DEFAULT_PATTERN}"
    raise ServeError(f"{shown}: expected {wanted} among its .gguf files ({names}); set MODEL_FILE")


def resolve_model_path(model: str | None, model_file: str | None = None, token: str | None = None) -> Path:
    """The local GGUF that MODEL names (fetching it from the Hub if it is a repo id), checked."""
    from loraship.embedded import embedded_gguf_path

    if model is None:
        path = newest_export() or embedded_gguf_path()
    elif looks_like_repo_id(model):
        patterns = [model_file or DEFAULT_PATTERN, MANIFEST_NAME]
        try:
            folder = download_repo(model, token=token, allow_patterns=patterns, setting="MODEL")
        except HubError as err:
            # "outputs/export" reads as a repo id too: say that no such local path exists either.
            raise ServeError(f"{err} (and there is no local file or folder {model!r})") from None
        path = _pick_in_folder(folder, model_file, f"MODEL={model!r}")
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            path = _pick_in_folder(path, model_file, f"MODEL={model!r}")
    info = read_gguf_header(path)
    check_against_manifest(path)
    if info.chat_template is None:
        raise ServeError(
            f"MODEL={str(path)!r}: the GGUF carries no tokenizer.chat_template, so there is no chat "
            "format to follow; export it from a model whose tokenizer has one"
        )
    return path.absolute()


def model_settings(path: Path, n_ctx: int, n_threads: int):
    """llama-cpp-python's own ModelSettings for the server (one model, CPU only)."""
    from llama_cpp.server.settings import ModelSettings

    return ModelSettings(
        model=str(path),
        model_alias=path.name,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_gpu_layers=0,
        # The GGUF's own template, even where llama-cpp-python would guess a
        # built-in format that merely resembles it.
        chat_format="chat_template.default",
        # Logits for every prompt position cost n_ctx x vocab floats and time; chat needs the last only.
        logits_all=False,
        use_mlock=False,
        verbose=False,
    )


def load_llama(path: Path, n_ctx: int, n_threads: int):
    """A Llama on the CPU for ``path``, or a ServeError naming MODEL."""
    from llama_cpp.server.model import LlamaProxy

    settings = model_settings(path, n_ctx, n_threads)
    try:
        llama = LlamaProxy.load_llama_from_model_settings(settings)
    except (ValueError, RuntimeError) as err:
        raise ServeError(f"MODEL={str(path)!r}: llama.cpp could not load it ({err})") from None
    check_chat_template(llama, path)
    return llama


def check_chat_template(llama, path: Path) -> None:
    """Render the GGUF's template once on a sample conversation, so a broken or hostile one
    fails at start with one line instead of at the first chat."""
    import jinja2

    if not llama.metadata.get("tokenizer.chat_template"):
        raise ServeError(f"MODEL={str(path)!r}: the GGUF has no tokenizer.chat_template, so chats cannot be formatted")
    sample = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Bye"}]
    try:
        token_counter(llama)(sample)
    except jinja2.exceptions.SecurityError as err:
        raise ServeError(
            f"MODEL={str(path)!r}: the GGUF's chat template tries an unsafe operation and was refused ({err})"
        ) from None
    except jinja2.exceptions.TemplateError as err:
        raise ServeError(f"MODEL={str(path)!r}: the GGUF's chat template cannot be rendered ({err})") from None


def check_system_prompt(llama, system_prompt: str | None) -> None:
    """SYSTEM_PROMPT must be a turn the GGUF's chat template takes (Gemma-2's refuses any system turn), or the
    first chat would fail instead of the start."""
    import jinja2

    if not (system_prompt and system_prompt.strip()):
        return
    try:
        token_counter(llama)([{"role": "system", "content": system_prompt}, {"role": "user", "content": "Hello"}])
    except (jinja2.exceptions.TemplateError, ValueError) as err:  # llama-cpp-python's raise_exception: ValueError
        raise ServeError(f"SYSTEM_PROMPT is set, but the GGUF's chat template refuses a system turn ({err}); "
                         "unset SYSTEM_PROMPT") from None


def token_counter(llama):
    """``count(messages) -> prompt tokens`` exactly as llama-cpp-python's chat handler will build them
    (``count(text)`` for a plain completion prompt).

    The same sandboxed Jinja formatter and the GGUF's own template; the
    template adds BOS itself, so tokenizing must not add a second one.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = llama._model

    def text_of(token_id: int) -> str:
        return model.token_get_text(token_id) if token_id != -1 else ""

    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token=text_of(llama.token_eos()),
        bos_token=text_of(llama.token_bos()),
    )

    def count(messages: list[dict] | str, **template_inputs) -> int:
        if isinstance(messages, str):  # a plain completion prompt, tokenized as create_completion does
            return len(llama.tokenize(messages.encode("utf-8"), add_bos=True, special=True))
        prompt = formatter(messages=messages, **template_inputs).prompt
        return len(llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    return count


def api_sampling_defaults() -> dict:
    """The sampling llama-cpp-python's API applies when a request leaves it out.

    ``Llama.create_chat_completion`` has other defaults (no repeat penalty);
    the UI and the terminal chat use the API's, so a person and a program
    asking the same thing get the same answer.
    """
    from llama_cpp.server.types import CreateChatCompletionRequest

    fields = CreateChatCompletionRequest.model_fields
    names = ("top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
    return {name: fields[name].default for name in names}


def stream_chat(llama, messages: list[dict], max_tokens: int, temperature: float):
    """Yield the answer's text pieces as llama.cpp produces them (stops at EOS / end of turn)."""
    for chunk in llama.create_chat_completion(
        messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True, **api_sampling_defaults()
    ):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            yield piece
