"""The export, top to bottom: adapter -> merged HF folder -> GGUFs -> verified -> published.

Everything is built in a ``.tmp-export-*`` folder inside OUTPUT_DIR (same
filesystem) and renamed into place only once every file has passed its checks,
the manifest last: a killed or failed export leaves nothing at a final path.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from export.settings import CONVERTER_TYPES, DEFAULT_EVAL_TEXT, ExportSettings
from loraship.errors import UserError


class ExportError(UserError):
    """A user's mistake in what the export was asked to do; the message says the fix."""


@dataclass
class AdapterSource:
    """The adapter folder on disk and the base model it names."""

    folder: Path
    given: str
    base_model: str | None


def log(message: str) -> None:
    import click

    click.echo(f"export: {message}", err=True)


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
    base = None
    for candidate in (folder, folder.parent):
        manifest = read_manifest(candidate) if candidate.is_dir() else None
        if manifest and manifest.get("inputs", {}).get("base_model"):
            base = str(manifest["inputs"]["base_model"])
            break
    if base is None:
        from export.merge import read_adapter_config

        base = read_adapter_config(folder).get("base_model_name_or_path") or None
    return AdapterSource(folder=folder, given=value, base_model=base)


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


def _peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory so far of this process (or of its largest finished child)."""
    import resource

    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB


def default_name(base_model: str) -> str:
    from loraship.embedded import EMBEDDED, EMBEDDED_NAME

    stem = EMBEDDED_NAME if base_model == EMBEDDED else Path(base_model.rstrip("/")).name
    return f"{stem}-lora"


@contextlib.contextmanager
def work_folder(output_dir: Path) -> Iterator[Path]:
    """A scratch folder inside OUTPUT_DIR, removed whatever happens."""
    output_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=output_dir))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def disk_errors(output_dir: Path) -> Iterator[None]:
    """A full disk is the user's to fix: say so in one line naming OUTPUT_DIR."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(
                f"OUTPUT_DIR={str(output_dir)!r}: no space left on the device ({err.strerror}); "
                "free some space or point OUTPUT_DIR elsewhere (the export needs about 3x the model size)"
            ) from err
        raise


def check_inputs(settings: ExportSettings, token: str | None):
    """Every problem with the inputs, found before anything heavy runs, raised together."""
    from export.converter import ConverterError, locate_converter
    from export.merge import MergeError, check_compatible, load_adapter

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
            problems.append(str(err))
    if adapter is not None and base_dir is not None:
        try:
            problems += check_compatible(adapter, base_dir, label=base_name)
        except MergeError as err:
            problems.append(str(err))
    if problems:
        raise ExportError("\n".join(problems))
    return converter_dir, source, adapter, base_name, base_dir


def run_export(settings: ExportSettings) -> Path:
    """Do the whole export; return OUTPUT_DIR."""
    from export import gguf, verify
    from export.merge import count_tensors, merge_into_folder
    from export.publish import GGUFFile, export_manifest, model_card, ollama_modelfile, push_export
    from loraship.atomic import remove_stale_temporaries
    from loraship.envsettings import public_settings
    from loraship.manifest import MANIFEST_NAME, write_manifest

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    converter_dir, source, adapter, base_name, base_dir = check_inputs(settings, token)
    out = settings.output_dir
    name = settings.model_name or default_name(base_name)
    eval_path = settings.eval_text or DEFAULT_EVAL_TEXT
    texts = verify.read_eval_texts(eval_path)
    if out.is_dir():
        remove_stale_temporaries(out)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with disk_errors(out), work_folder(out) as work:
        # 1. Merge into the full-precision base, one tensor at a time.
        from tqdm import tqdm

        with tqdm(total=count_tensors(base_dir), desc="merge", unit="tensor", disable=None) as bar:
            merged = merge_into_folder(base_dir, adapter, work / name, tokenizer_dir=source.folder, progress=bar.update)
        del adapter
        timings["merge_s"] = time.perf_counter() - started
        memory = {"merge_peak_rss_mib": _peak_rss_mib()}
        tokenizer = verify.load_tokenizer(merged)

        # 2. Convert (F16 always: it is the quantizer's source and the perplexity reference).
        t = time.perf_counter()
        log(f"converting {merged.name} with llama.cpp's converter")
        files = [GGUFFile(gguf.convert_to_gguf(merged, work / f"{name}-F16.gguf", "f16", converter_dir), "F16")]
        if "BF16" in settings.quant_types:
            files.append(GGUFFile(gguf.convert_to_gguf(merged, work / f"{name}-BF16.gguf", "bf16", converter_dir), "BF16"))
        timings["convert_s"] = time.perf_counter() - t

        # 3. Quantize, reporting every tensor that could not get the requested type.
        t = time.perf_counter()
        for quant in settings.quant_types:
            if quant in CONVERTER_TYPES:
                continue
            log(f"quantizing to {quant}")
            target = work / f"{name}-{quant}.gguf"
            report = gguf.quantize_gguf(files[0].path, target, quant, settings.threads)
            types = gguf.read_tensor_types(target, converter_dir)
            report.n_tensors, report.type_counts = len(types), gguf.count_types(types)
            if report.n_fallback:
                log(f"{target.name}: {report.n_fallback} of {report.n_tensors} tensors fell back to other types "
                    f"({', '.join(f'{k}: {v}' for k, v in report.summary().items())})")
            files.append(GGUFFile(target, quant, fallbacks=report.to_json()))
        timings["quantize_s"] = time.perf_counter() - t
        lora_name = None
        if settings.export_lora_gguf:
            lora_name = f"{name}-LoRA-F16.gguf"
            gguf.convert_lora_to_gguf(source.folder, base_dir, work / lora_name, converter_dir)
        shutil.rmtree(merged)

        # 4. Verify every file; measure perplexity on held-out text.
        t = time.perf_counter()
        for f in files:
            log(f"verifying {f.name}")
            f.verification = verify.verify_gguf(f.path, tokenizer, stop_check=settings.stop_check,
                                                threads=settings.threads).to_json()
            f.perplexity = verify.perplexity(f.path, texts, n_ctx=settings.eval_ctx, threads=settings.threads)
            log(f"{f.name}: checks passed; perplexity {f.perplexity:.3f}")
        timings["verify_s"] = time.perf_counter() - t

        # 5. Card, Modelfile, manifest; then everything into place, the manifest last.
        default = next((f for f in files if f.quant_type == "Q4_K_M"), files[-1])
        eos_texts = sorted({tokenizer.convert_ids_to_tokens(i) for i in default.verification["eos_token_ids"]
                            if i < len(tokenizer)})
        (work / "README.md").write_text(
            model_card(name, base_name, source.given, files, eval_text=eval_path.name, lora_file=lora_name),
            encoding="utf-8",
        )
        (work / "Modelfile").write_text(ollama_modelfile(default.name, eos_texts), encoding="utf-8")
        extra_files = ["README.md", "Modelfile"] + ([lora_name] if lora_name else [])
        timings["total_s"] = time.perf_counter() - started
        memory.update(export_process_peak_rss_mib=_peak_rss_mib(), largest_child_peak_rss_mib=_peak_rss_mib(children=True))
        manifest = export_manifest(
            work, files, extra_files,
            inputs={"adapter": source.given, "base_model": base_name},
            settings=public_settings(settings),
            extra={"eval_text": str(eval_path), "timings": {k: round(v, 2) for k, v in timings.items()},
                   "memory": memory},
        )
        write_manifest(work, manifest)
        finals = [f.name for f in files] + extra_files
        # A folder whose manifest is missing is unfinished to every reader: drop the old one first.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for file_name in finals + [MANIFEST_NAME]:
            (work / file_name).replace(out / file_name)
    log(f"wrote {', '.join(finals)} and {MANIFEST_NAME} to {out}")

    if settings.hub_repo:
        url = push_export(out, finals + [MANIFEST_NAME], settings.hub_repo, token)
        log(f"pushed to {settings.hub_repo}: {url}")
    return out
