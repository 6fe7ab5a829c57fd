"""What the export was asked to work on: the adapter, the base, the converter; every problem found up front."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.settings import DEFAULT_EVAL_TEXT, ExportSettings
from loraship.errors import UserError


class ExportError(UserError):
    """A user's mistake in what the export was asked to do; the message says the fix."""


@dataclass
class AdapterSource:
    """The adapter folder on disk and the base model it names."""

    folder: Path
    given: str
    base_model: str | None
    #: What the train manifest says (None: no train manifest, so unknown; treated as full precision).
    load_in_4bit: bool | None = None
    #: The 4-bit settings the train manifest records (``inputs.quantization``), if any.
    quantization: dict | None = None
    #: The train manifest names a local base folder (by its name only: the manifest is pushed).
    base_is_local: bool = False


@dataclass
class ExportInputs:
    """Everything the export starts from, resolved and checked."""

    converter_dir: Path
    source: AdapterSource
    #: The adapter's weights (export.merge.Adapter); dropped once merged, to free its memory.
    adapter: object | None
    base_name: str
    base_dir: Path
    name: str
    eval_path: Path
    texts: list[str]
    #: The train run's eval split as trained (loraship.heldout); None when the adapter folder carries none.
    heldout_rows: list[tuple[list[int], list[int]]] | None = None


def resolve_inputs(settings: ExportSettings, token: str | None) -> ExportInputs:
    """Check every input (raising every problem at once), then name the files and read the eval text."""
    from export.verify import read_eval_texts

    converter_dir, source, adapter, base_name, base_dir = check_inputs(settings, token)
    eval_path = settings.eval_text or DEFAULT_EVAL_TEXT
    name = settings.model_name or default_name(base_name)
    check_hub_names(settings, name)
    return ExportInputs(converter_dir=converter_dir, source=source, adapter=adapter, base_name=base_name,
                        base_dir=base_dir, name=name,
                        eval_path=eval_path, texts=read_eval_texts(eval_path),
                        heldout_rows=read_adapter_heldout_rows(source.folder))


def read_adapter_heldout_rows(folder: Path) -> list[tuple[list[int], list[int]]] | None:
    """The held-out rows train wrote beside the adapter (loraship.heldout), or None."""
    from loraship.heldout import HELDOUT_ROWS, read_heldout_rows

    try:
        return read_heldout_rows(folder)
    except ValueError as err:
        raise ExportError(f"ADAPTER: {err}; delete {folder / HELDOUT_ROWS} to export without the fine-tune's "
                          "held-out rows, or train again") from err


def resolve_adapter(value: str, token: str | None) -> AdapterSource:
    """ADAPTER (train OUTPUT_DIR, adapter folder or Hub repo id) -> the folder holding adapter_config.json."""
    from loraship.hub import download_repo, looks_like_repo_id
    from loraship.manifest import read_manifest

    path = Path(value).expanduser()
    if not path.exists() and looks_like_repo_id(value):
        path = download_repo(value, token=token, setting="ADAPTER", ignore_patterns=["checkpoints/*"])
    folder = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (folder / "adapter_config.json").is_file():
        raise ExportError(f"ADAPTER={value!r}: no adapter_config.json in it or in its adapter/ folder")
    base = load_in_4bit = quantization = None
    base_is_local = False
    for candidate in (folder, folder.parent):
        manifest = read_manifest(candidate) if candidate.is_dir() else None
        if manifest and manifest.get("inputs", {}).get("base_model"):
            base = str(manifest["inputs"]["base_model"])
            if "load_in_4bit" in manifest["inputs"]:
                load_in_4bit = bool(manifest["inputs"]["load_in_4bit"])
            if isinstance(manifest["inputs"].get("quantization"), dict):
                quantization = manifest["inputs"]["quantization"]
            if manifest["inputs"].get("base_model_is_local"):
                base, base_is_local = local_base_of_train_run(folder, base), True
            break
    if base is None:
        from export.merge import read_adapter_config

        base = read_adapter_config(folder).get("base_model_name_or_path") or None
    return AdapterSource(folder=folder, given=value, base_model=base, load_in_4bit=load_in_4bit,
                         quantization=quantization, base_is_local=base_is_local)


def local_base_of_train_run(adapter_folder: Path, name: str) -> str:
    """A base folder the train manifest names by folder name only (it is pushed): the path its run used.

    train_summary.json beside ``adapter/`` is the run's local record and keeps the path as BASE_MODEL gave it;
    an adapter without it (downloaded from the Hub) keeps the name, which BASE_MODEL must then replace.
    """
    import json

    summary = adapter_folder.parent / "train_summary.json"
    if not summary.is_file():
        return name
    record = json.loads(summary.read_text(encoding="utf-8"))
    for given in (record.get("base_model_resolved"), record.get("base_model")):
        if given and Path(str(given)).expanduser().name == name:
            return str(given)
    return name


def resolve_base(value: str, token: str | None) -> Path:
    """BASE_MODEL (local folder, Hub repo id or ``embedded``) -> a local HF folder in full precision."""
    from loraship.embedded import EMBEDDED, embedded_hf_folder
    from loraship.hub import download_repo, looks_like_repo_id

    if value == EMBEDDED:
        return embedded_hf_folder()
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if looks_like_repo_id(value):
        return download_repo(
            value, token=token, setting="BASE_MODEL",
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"],
        )
    raise ExportError(f"BASE_MODEL={value!r}: no such folder, not a Hub repo id and not `embedded`")


def default_name(base_model: str) -> str:
    from loraship.embedded import EMBEDDED, EMBEDDED_NAME

    stem = EMBEDDED_NAME if base_model == EMBEDDED else Path(base_model.rstrip("/")).name
    return f"{stem}-lora"


def check_inputs(settings: ExportSettings, token: str | None):
    """Every problem with the inputs, found before anything heavy runs, raised together."""
    from export.converter import ConverterError, locate_converter
    from export.merge import check_compatible, load_adapter

    problems: list[str] = []
    converter_dir = None
    try:
        converter_dir = locate_converter()
    except ConverterError as err:
        problems.append(str(err))
    source = adapter = base_dir = None
    try:
        source = resolve_adapter(settings.adapter, token)
        adapter = load_adapter(source.folder)
    except UserError as err:
        problems.append(str(err))
    base_name = settings.base_model or (source.base_model if source else None)
    if source and base_name is None:
        problems.append(f"BASE_MODEL: not set, and ADAPTER={settings.adapter!r} names no base model; set BASE_MODEL")
    if base_name is not None:
        try:
            base_dir = resolve_base(base_name, token)
        except UserError as err:
            if settings.base_model is None and source and source.base_is_local and not Path(base_name).is_absolute():
                err = ExportError(f"ADAPTER={settings.adapter!r}: was trained on a local base folder named "
                                  f"{base_name!r}, which is not here; set BASE_MODEL to that folder")
            problems.append(str(err))
    if adapter is not None and base_dir is not None:
        try:
            problems += check_compatible(adapter, base_dir, label=base_name)
        except UserError as err:
            problems.append(str(err))
    if source and settings.merge_base == "nf4" and not source.load_in_4bit:
        trained = ("has no train manifest saying it was trained in 4-bit (load_in_4bit)" if source.load_in_4bit is None
                   else "was trained on a full-precision base (load_in_4bit=false)")
        problems.append(f"MERGE_BASE=nf4: ADAPTER={settings.adapter!r} {trained}, so there is no NF4 "
                        "base to merge into; use MERGE_BASE=auto or original")
    if base_dir is not None:
        try:
            problems += check_disk_room(settings, base_dir, source)
        except UserError as err:
            problems.append(str(err))
    if settings.ladder and base_dir is not None:
        try:
            problems += check_ladder_memory(base_dir, settings.ladder_tokens)
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise ExportError("\n".join(problems))
    return converter_dir, source, adapter, base_name, base_dir


def check_hub_names(settings: ExportSettings, name: str) -> None:
    """With HUB_REPO, every uploaded type's ``:TYPE`` selector (llama.cpp, Ollama) must find its own file."""
    from export.publish import gguf_file_name, lora_file_name, pushed_types, selector_problems

    if not settings.hub_repo:
        return
    tags = {t: gguf_file_name(name, t) for t in pushed_types(settings.quant_types, settings.push_f16)}
    if {"F16", "BF16"} <= set(tags):
        raise ExportError("PUSH_F16=true with BF16 in QUANT_TYPES: llama.cpp's `-hf REPO:F16` would fetch the BF16 "
                          "file (it looks for 'F16.' anywhere in a name); upload one of the two")
    ggufs = list(tags.values()) + ([lora_file_name(name)] if settings.export_lora_gguf else [])
    problems = selector_problems(ggufs, tags)
    if problems:
        raise ExportError(f"MODEL_NAME={name!r}: holds a quant type name, so {problems[0]}; set MODEL_NAME to a name "
                          "without one")


def check_disk_room(settings: ExportSettings, base_dir: Path, source: AdapterSource | None) -> list[str]:
    """MERGED=true writes a second 16-bit copy of the model: refuse up front when OUTPUT_DIR's disk cannot hold
    the export's peak (empty when it fits)."""
    from export.merge_base import merge_candidates
    from export.merged_folder import amount, export_disk_need

    if not settings.merged:
        return []
    candidates = len(merge_candidates(settings.merge_base, bool(source and source.load_in_4bit)))
    need, explained = export_disk_need(base_dir, settings.quant_types, candidates, settings.merged_dtype)
    free = free_disk_bytes(settings.output_dir)
    if need <= free:
        return []
    return [f"MERGED=true: OUTPUT_DIR={str(settings.output_dir)!r} has {amount(free)} free and the export with the "
            f"merged model needs about {amount(need)} ({explained}); free some space, point OUTPUT_DIR elsewhere or "
            "set MERGED=false"]


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or would: its nearest existing parent)."""
    import shutil

    folder = folder.expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_ladder_memory(base_dir: Path, ladder_tokens: int) -> list[str]:
    """The quality ladder's memory against what this machine has available now (empty when it fits)."""
    from export.ladder import GIB, available_memory, ladder_memory_need

    need = ladder_memory_need(base_dir, ladder_tokens)
    available = available_memory()
    if need.total <= available:
        return []
    return [f"LADDER: the quality ladder needs about {need.total / GIB:.1f} GiB ({need.explain(ladder_tokens)}); "
            f"this machine has {available / GIB:.1f} GiB available: set LADDER=false to export without it, "
            "or use a machine with more memory"]
