"""The export, top to bottom: adapter -> merged HF folder -> GGUFs -> verified -> published.

Along the way the quality ladder (export/ladder.py) scores one held-out eval
set on the model as trained, the merged model and every GGUF, picks the merge
base under MERGE_BASE=auto, and stops the export at the first hand-off that
lost more than the LADDER_MAX_* settings allow. The ladder holds a float32 copy
of the merged model (4 bytes per parameter): check_inputs refuses to start when
the machine lacks the memory, and LADDER=false skips the ladder (MERGE_BASE=auto
then merges once, into the NF4 round trip for a 4-bit adapter, unscored).

Everything is built in a ``.tmp-export-*`` folder inside OUTPUT_DIR (same
filesystem) and renamed into place only once every file has passed its checks,
the manifest last: a killed or failed export leaves nothing at a final path.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import math
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
    #: What the train manifest says (None: no train manifest, so unknown; treated as full precision).
    load_in_4bit: bool | None = None
    #: The 4-bit settings the train manifest records (``inputs.quantization``), if any.
    quantization: dict | None = None


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
    base = load_in_4bit = quantization = None
    for candidate in (folder, folder.parent):
        manifest = read_manifest(candidate) if candidate.is_dir() else None
        if manifest and manifest.get("inputs", {}).get("base_model"):
            base = str(manifest["inputs"]["base_model"])
            if "load_in_4bit" in manifest["inputs"]:
                load_in_4bit = bool(manifest["inputs"]["load_in_4bit"])
            if isinstance(manifest["inputs"].get("quantization"), dict):
                quantization = manifest["inputs"]["quantization"]
            break
    if base is None:
        from export.merge import read_adapter_config

        base = read_adapter_config(folder).get("base_model_name_or_path") or None
    return AdapterSource(folder=folder, given=value, base_model=base, load_in_4bit=load_in_4bit,
                         quantization=quantization)


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
    if source and settings.merge_base == "nf4" and not source.load_in_4bit:
        trained = ("has no train manifest saying it was trained in 4-bit (load_in_4bit)" if source.load_in_4bit is None
                   else "was trained on a full-precision base (load_in_4bit=false)")
        problems.append(f"MERGE_BASE=nf4: ADAPTER={settings.adapter!r} {trained}, so there is no NF4 "
                        "base to merge into; use MERGE_BASE=auto or original")
    if settings.ladder and base_dir is not None:
        try:
            problems += check_ladder_memory(base_dir, settings.ladder_tokens)
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise ExportError("\n".join(problems))
    return converter_dir, source, adapter, base_name, base_dir


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


def unmeasured_merge_base(setting: str, load_in_4bit: bool | None) -> dict:
    """LADDER=false: the merge base without scoring it; ``auto`` takes the NF4 round trip for a 4-bit adapter.

    NF4 was the closer base on both models measured (KL from the model as
    trained: embedded 0.0003 vs 0.30, Llama-3.2-1B-shaped 0.00002 vs 0.0089).
    """
    if setting != "auto":
        chosen, why = setting, f"MERGE_BASE={setting}"
    elif load_in_4bit:
        chosen, why = "nf4", "MERGE_BASE=auto, and the adapter was trained in 4-bit"
    else:
        trained = ("no train manifest says the adapter was trained in 4-bit" if load_in_4bit is None
                   else "the adapter was trained on a full-precision base")
        chosen, why = "original", f"MERGE_BASE=auto, and {trained}"
    return {"setting": setting, "trained_in_4bit": load_in_4bit, "chosen": chosen,
            "reason": f"{chosen} ({why}; not measured (LADDER=false))", "candidates": {}}


def merge_candidates(merge_base: str, trained_4bit: bool) -> list[str]:
    """The bases to merge into: MERGE_BASE=auto means both, but only a 4-bit-trained adapter has an NF4 base."""
    if merge_base == "auto":
        return ["original", "nf4"] if trained_4bit else ["original"]
    return [merge_base]


def merge_base_record(setting: str, load_in_4bit: bool | None, candidates: list[str], scores: dict, chosen: str) -> dict:
    """What the manifest says about the merge base: every candidate's rung-2 numbers and why ``chosen`` won."""
    if len(candidates) > 1:
        reason = (f"{chosen} (MERGE_BASE=auto: KL from the model as trained "
                  + ", ".join(f"{c} {scores[c].kl:.5f}" for c in candidates) + "; the lower wins)")
    elif setting == "auto":
        why = ("no train manifest says the adapter was trained in 4-bit" if load_in_4bit is None
               else "the adapter was trained on a full-precision base")
        reason = f"original (MERGE_BASE=auto, and {why}: there is no NF4 base to compare)"
    else:
        reason = f"{chosen} (MERGE_BASE={setting})"
    return {
        "setting": setting,
        "trained_in_4bit": load_in_4bit,
        "chosen": chosen,
        "reason": reason,
        "candidates": {c: {k: v for k, v in scores[c].to_json().items() if k in ("nll", "perplexity", "kl", "top1")}
                       for c in candidates},
    }


def ladder_limits(settings: ExportSettings) -> dict:
    from export.ladder import FULL_PRECISION, QUANTIZED, Limits

    return {
        FULL_PRECISION: Limits(settings.ladder_max_nll_rise, settings.ladder_max_kl_rise,
                               "LADDER_MAX_NLL_RISE", "LADDER_MAX_KL_RISE"),
        QUANTIZED: Limits(settings.ladder_max_quant_nll_rise, settings.ladder_max_quant_kl_rise,
                          "LADDER_MAX_QUANT_NLL_RISE", "LADDER_MAX_QUANT_KL_RISE"),
    }


def run_export(settings: ExportSettings) -> Path:
    """Do the whole export; return OUTPUT_DIR."""
    from export import gguf, verify
    from export.merge import count_tensors, has_tokenizer, merge_into_folder
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
        # 1. Ladder rung 1: the model as trained (base as training loaded it + the unmerged adapter).
        from export import ladder

        tokenizer = verify.load_tokenizer(source.folder if has_tokenizer(source.folder) else base_dir)
        trained_4bit = bool(source.load_in_4bit)
        limits = ladder_limits(settings)
        rungs: list[ladder.RungScore] = []
        if settings.ladder:
            t = time.perf_counter()
            eval_set = ladder.build_eval_set(tokenizer, texts, settings.eval_ctx, settings.ladder_tokens)
            log(f"ladder: scoring the model as trained ({'4-bit NF4' if trained_4bit else 'full-precision'} base + "
                f"adapter) on {eval_set.positions} tokens")
            model, nf4_specs = ladder.trained_model(base_dir, source.folder, trained_4bit)
            rung1, reference = ladder.score_hf("adapter", "base as trained + adapter (peft, unmerged)"
                                               + (" [NF4]" if trained_4bit else ""), None, model, eval_set, None)
            del model
            gc.collect()  # the base leaves memory before the streamed merge starts
            log(ladder.log_line(rung1))
            timings["ladder_trained_s"] = time.perf_counter() - t
        else:
            log("LADDER=false: the quality ladder is skipped (no trained model, no float32 merged model, no scoring)")

        # 2. Merge into the chosen base(s), one tensor at a time; ladder rung 2 picks one under MERGE_BASE=auto.
        t = time.perf_counter()
        from tqdm import tqdm

        def merge(candidate: str, nf4: dict | None) -> Path:
            log(f"merging into the {candidate} base")
            with tqdm(total=count_tensors(base_dir), desc=f"merge ({candidate})", unit="tensor", disable=None) as bar:
                return merge_into_folder(base_dir, adapter, work / f"merged-{candidate}", tokenizer_dir=source.folder,
                                         progress=bar.update, nf4=nf4, matrices_as=matrices_as)

        # Matrices straight in the F16 GGUF's type, unless a BF16 GGUF is wanted too (rounded once, from float32).
        matrices_as = None if "BF16" in settings.quant_types else "F16"

        if settings.ladder:
            candidates = merge_candidates(settings.merge_base, trained_4bit)
            merged_scores = {}
            for candidate in candidates:
                model = ladder.merged_model(merge(candidate, nf4_specs if candidate == "nf4" else None))
                merged_scores[candidate], _ = ladder.score_hf(
                    "merged", f"merged into the {candidate} base (transformers, fp32)", "adapter", model, eval_set,
                    reference)
                del model
                gc.collect()
                log(ladder.log_line(merged_scores[candidate]))
            chosen = min(candidates, key=lambda c: merged_scores[c].kl)
            merge_record = merge_base_record(settings.merge_base, source.load_in_4bit, candidates, merged_scores, chosen)
            for candidate in candidates:
                if candidate != chosen:
                    shutil.rmtree(work / f"merged-{candidate}")
            rungs = [rung1, merged_scores[chosen]]
            ladder.check_rung(rungs[1], rung1, limits[ladder.FULL_PRECISION])
        else:
            merge_record = unmeasured_merge_base(settings.merge_base, source.load_in_4bit)
            chosen = merge_record["chosen"]
            merge(chosen, ladder.nf4_specs_as_trained(base_dir, source.quantization) if chosen == "nf4" else None)
        del adapter
        log(f"merge base: {merge_record['reason']}")
        merged = (work / f"merged-{chosen}").rename(work / name)
        timings["merge_s"] = time.perf_counter() - t
        memory = {"merge_peak_rss_mib": _peak_rss_mib()}

        # 3. Convert (F16 always: it is the quantizer's source and the perplexity reference).
        t = time.perf_counter()
        log(f"converting {merged.name} with llama.cpp's converter")
        files = [GGUFFile(gguf.convert_to_gguf(merged, work / f"{name}-F16.gguf", "f16", converter_dir), "F16")]
        if "BF16" in settings.quant_types:
            files.append(GGUFFile(gguf.convert_to_gguf(merged, work / f"{name}-BF16.gguf", "bf16", converter_dir), "BF16"))
        timings["convert_s"] = time.perf_counter() - t

        # 4. Quantize, reporting every tensor that could not get the requested type.
        t = time.perf_counter()
        for quant in settings.quant_types:
            if quant in CONVERTER_TYPES:
                continue
            log(f"quantizing to {quant}")
            target = work / f"{name}-{quant}.gguf"
            report = gguf.quantize_gguf(files[0].path, target, quant, settings.threads)
            types = gguf.read_tensor_types(target)
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

        # 5. Verify every file and measure its perplexity on held-out text (one llama.cpp load each); the ladder.
        t = time.perf_counter()
        ladder_s = 0.0
        by_type: dict[str, ladder.RungScore] = {}
        for f in files:
            log(f"verifying {f.name}")
            checked, f.token_nll = verify.check_gguf(
                f.path, tokenizer, texts, eval_ctx=settings.eval_ctx, eval_tokens=settings.eval_tokens,
                stop_check=settings.stop_check, threads=settings.threads, stop_prompts=settings.stop_prompts,
                stop_max_tokens=settings.stop_max_tokens)
            f.verification = checked.to_json()
            f.perplexity = math.exp(float(f.token_nll.mean()))
            log(f"{f.name}: checks passed; perplexity {f.perplexity:.3f} ({len(f.token_nll)} tokens)")
            if not settings.ladder:
                continue
            quantized = f.quant_type not in CONVERTER_TYPES
            parent = by_type["F16"] if quantized else rungs[1]
            score = ladder.score_gguf(f.quant_type, f.path, parent.rung, eval_set, reference, n_ctx=settings.eval_ctx,
                                      threads=settings.threads, quantized=quantized)
            ladder_s += score.seconds
            log(ladder.log_line(score))
            ladder.check_rung(score, parent, limits[score.kind])
            by_type[f.quant_type] = score
            rungs.append(score)
        timings["verify_s"] = time.perf_counter() - t
        if settings.ladder:
            timings["ladder_s"] = (timings["ladder_trained_s"] + sum(s.seconds for s in merged_scores.values())
                                   + ladder_s)
            ladder_table = ladder.ladder_json(rungs, eval_set, {k: vars(v) for k, v in limits.items()})
        else:
            ladder_table = {"skipped": True, "reason": "not measured (LADDER=false)"}

        # 6. Card, Modelfile, manifest; then everything into place, the manifest last.
        default = next((f for f in files if f.quant_type == "Q4_K_M"), files[-1])
        eos_texts = sorted({tokenizer.convert_ids_to_tokens(i) for i in default.verification["eos_token_ids"]
                            if i < len(tokenizer)})
        (work / "README.md").write_text(
            model_card(name, base_name, source.given, files, eval_text=eval_path.name, lora_file=lora_name,
                       ladder=ladder_table, merge_base=merge_record),
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
                   "memory": memory, "ladder": ladder_table, "merge_base": merge_record},
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
