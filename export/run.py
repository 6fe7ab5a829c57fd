"""The export, top to bottom: adapter -> merged HF folder -> GGUFs -> verified -> published.

The quality ladder (export/ladder.py) scores one eval set at every hand-off and stops the export at
the first that lost more than LADDER_MAX_* allow. Everything is built in a ``.tmp-export-*`` folder
inside OUTPUT_DIR and renamed into place, the manifest last: a failed export leaves no final file.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from export.inputs import ExportError, ExportInputs, resolve_inputs
from export.merge_base import merge_base_record, merge_candidates, unmeasured_merge_base
from export.settings import CONVERTER_TYPES, ExportSettings

if TYPE_CHECKING:
    from export.ladder import EvalSet, RungScore
    from export.metrics import Reference
    from export.publish import GGUFFile


def run_export(settings: ExportSettings) -> Path:
    """Do the whole export; return OUTPUT_DIR."""
    from loraship.atomic import remove_stale_temporaries
    from loraship.manifest import MANIFEST_NAME

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    inputs = resolve_inputs(settings, token)
    out = settings.output_dir
    if out.is_dir():
        remove_stale_temporaries(out)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with disk_errors(out), work_folder(out) as work:
        tokenizer = load_training_tokenizer(inputs)
        ladder = score_model_as_trained(settings, inputs, tokenizer, timings)
        merged, merge_record = merge_adapter(settings, inputs, ladder, work, timings)
        memory = {"merge_peak_rss_mib": peak_rss_mib()}
        files = convert_merged_folder(settings, inputs, merged, work, timings)
        files += quantize_files(settings, inputs.name, files[0], work, timings)
        lora_name = write_lora_gguf(settings, inputs, work)
        shutil.rmtree(merged)
        verify_files(settings, inputs, files, tokenizer, ladder, timings)
        ladder_table = ladder_record(ladder, timings)
        extra_files = write_card_and_modelfile(inputs, files, tokenizer, lora_name, ladder_table, merge_record, work)
        timings["total_s"] = time.perf_counter() - started
        memory.update(export_process_peak_rss_mib=peak_rss_mib(), largest_child_peak_rss_mib=peak_rss_mib(children=True))
        write_export_manifest(settings, inputs, files, extra_files, work, timings=timings, memory=memory,
                              ladder_table=ladder_table, merge_record=merge_record)
        finals = [f.name for f in files] + extra_files
        move_into_place(work, out, finals)
    log(f"wrote {', '.join(finals)} and {MANIFEST_NAME} to {out}")

    if settings.hub_repo:
        publish(out, finals, settings.hub_repo, token)
    return out


# --- the steps, in the order run_export calls them ----------------------------


@dataclass
class LadderRun:
    """The quality ladder through one export: its eval set, rung 1's log-probs, the rungs scored so far."""

    eval_set: EvalSet
    reference: Reference
    limits: dict
    #: How bitsandbytes stored each 4-bit weight of the trained model (the NF4 merge base repeats it).
    nf4_specs: dict
    rungs: list[RungScore] = field(default_factory=list)
    merged_scores: dict[str, RungScore] = field(default_factory=dict)
    gguf_by_type: dict[str, RungScore] = field(default_factory=dict)
    gguf_seconds: float = 0.0


def ladder_limits(settings: ExportSettings) -> dict:
    """How much each kind of hand-off may lose, from the LADDER_MAX_* settings."""
    from export.ladder import FULL_PRECISION, QUANTIZED, Limits

    return {
        FULL_PRECISION: Limits(settings.ladder_max_nll_rise, settings.ladder_max_kl_rise,
                               "LADDER_MAX_NLL_RISE", "LADDER_MAX_KL_RISE"),
        QUANTIZED: Limits(settings.ladder_max_quant_nll_rise, settings.ladder_max_quant_kl_rise,
                          "LADDER_MAX_QUANT_NLL_RISE", "LADDER_MAX_QUANT_KL_RISE"),
    }


def load_training_tokenizer(inputs: ExportInputs):
    """The tokenizer training used: the adapter folder's when it carries one, else the base's."""
    from export import verify
    from export.merge import has_tokenizer

    folder = inputs.source.folder
    return verify.load_tokenizer(folder if has_tokenizer(folder) else inputs.base_dir)


def score_model_as_trained(settings: ExportSettings, inputs: ExportInputs, tokenizer,
                           timings: dict[str, float]) -> LadderRun | None:
    """Ladder rung 1, the reference of every other rung: the base as training loaded it + the unmerged adapter."""
    from export import ladder as scoring
    from export.ladder_report import log_line

    if not settings.ladder:
        log("LADDER=false: the quality ladder is skipped (no trained model, no float32 merged model, no scoring)")
        return None
    t = time.perf_counter()
    trained_4bit = bool(inputs.source.load_in_4bit)
    eval_set = scoring.build_eval_set(tokenizer, inputs.texts, settings.eval_ctx, settings.ladder_tokens)
    log(f"ladder: scoring the model as trained ({'4-bit NF4' if trained_4bit else 'full-precision'} base + "
        f"adapter) on {eval_set.positions} tokens")
    model, nf4_specs = scoring.trained_model(inputs.base_dir, inputs.source.folder, trained_4bit)
    rung1, reference = scoring.score_hf("adapter", "base as trained + adapter (peft, unmerged)"
                                       + (" [NF4]" if trained_4bit else ""), None, model, eval_set, None)
    del model
    gc.collect()  # the base leaves memory before the streamed merge starts
    log(log_line(rung1))
    timings["ladder_trained_s"] = time.perf_counter() - t
    return LadderRun(eval_set=eval_set, reference=reference, limits=ladder_limits(settings), nf4_specs=nf4_specs,
                     rungs=[rung1])


def merge_adapter(settings: ExportSettings, inputs: ExportInputs, ladder: LadderRun | None, work: Path,
                  timings: dict[str, float]) -> tuple[Path, dict]:
    """The merged HF folder at ``work/NAME``, and the manifest's record of which base it was merged into."""
    t = time.perf_counter()
    if ladder is not None:
        chosen, record = merge_and_score_candidates(settings, inputs, ladder, work)
    else:
        from export.ladder import nf4_specs_as_trained

        record = unmeasured_merge_base(settings.merge_base, inputs.source.load_in_4bit)
        chosen = record["chosen"]
        nf4 = nf4_specs_as_trained(inputs.base_dir, inputs.source.quantization) if chosen == "nf4" else None
        merge_into(settings, inputs, chosen, nf4, work)
    inputs.adapter = None  # its tensors leave memory before the converter starts
    log(f"merge base: {record['reason']}")
    merged = (work / f"merged-{chosen}").rename(work / inputs.name)
    timings["merge_s"] = time.perf_counter() - t
    return merged, record


def merge_and_score_candidates(settings: ExportSettings, inputs: ExportInputs, ladder: LadderRun,
                               work: Path) -> tuple[str, dict]:
    """Ladder rung 2: merge into each candidate base, score each, keep the one closest to the model as trained."""
    from export import ladder as scoring
    from export.ladder_report import log_line

    candidates = merge_candidates(settings.merge_base, bool(inputs.source.load_in_4bit))
    scores = ladder.merged_scores
    for candidate in candidates:
        folder = merge_into(settings, inputs, candidate, ladder.nf4_specs if candidate == "nf4" else None, work)
        model = scoring.merged_model(folder)
        scores[candidate], _ = scoring.score_hf(
            "merged", f"merged into the {candidate} base (transformers, fp32)", "adapter", model, ladder.eval_set,
            ladder.reference)
        del model
        gc.collect()
        log(log_line(scores[candidate]))
    chosen = min(candidates, key=lambda c: scores[c].kl)
    record = merge_base_record(settings.merge_base, inputs.source.load_in_4bit, candidates, scores, chosen)
    for candidate in candidates:
        if candidate != chosen:
            shutil.rmtree(work / f"merged-{candidate}")
    ladder.rungs.append(scores[chosen])
    scoring.check_rung(scores[chosen], ladder.rungs[0], ladder.limits[scoring.FULL_PRECISION])
    return chosen, record


def merge_into(settings: ExportSettings, inputs: ExportInputs, candidate: str, nf4: dict | None, work: Path) -> Path:
    """One streamed merge, one tensor at a time, into ``work/merged-CANDIDATE``."""
    from tqdm import tqdm

    from export.merge import count_tensors, merge_into_folder

    # Matrices straight in the F16 GGUF's type, unless a BF16 GGUF is wanted too (rounded once, from float32).
    matrices_as = None if "BF16" in settings.quant_types else "F16"
    log(f"merging into the {candidate} base")
    with tqdm(total=count_tensors(inputs.base_dir), desc=f"merge ({candidate})", unit="tensor", disable=None) as bar:
        return merge_into_folder(inputs.base_dir, inputs.adapter, work / f"merged-{candidate}",
                                 tokenizer_dir=inputs.source.folder, progress=bar.update, nf4=nf4,
                                 matrices_as=matrices_as)


def convert_merged_folder(settings: ExportSettings, inputs: ExportInputs, merged: Path, work: Path,
                          timings: dict[str, float]) -> list[GGUFFile]:
    """The F16 GGUF (always: the quantizer's source and the perplexity reference), and BF16 when asked for."""
    from export import gguf
    from export.publish import GGUFFile

    t = time.perf_counter()
    log(f"converting {merged.name} with llama.cpp's converter")
    files = [GGUFFile(gguf.convert_to_gguf(merged, work / f"{inputs.name}-F16.gguf", "f16", inputs.converter_dir),
                      "F16")]
    if "BF16" in settings.quant_types:
        files.append(GGUFFile(gguf.convert_to_gguf(merged, work / f"{inputs.name}-BF16.gguf", "bf16",
                                                   inputs.converter_dir), "BF16"))
    timings["convert_s"] = time.perf_counter() - t
    return files


def quantize_files(settings: ExportSettings, name: str, f16: GGUFFile, work: Path,
                   timings: dict[str, float]) -> list[GGUFFile]:
    """Each quantized type from the F16 file, reporting every tensor that could not get the requested type."""
    from export import gguf
    from export.publish import GGUFFile

    t = time.perf_counter()
    files = []
    for quant in settings.quant_types:
        if quant in CONVERTER_TYPES:
            continue
        log(f"quantizing to {quant}")
        target = work / f"{name}-{quant}.gguf"
        report = gguf.quantize_gguf(f16.path, target, quant, settings.threads)
        types = gguf.read_tensor_types(target)
        report.n_tensors, report.type_counts = len(types), gguf.count_types(types)
        if report.n_fallback:
            log(f"{target.name}: {report.n_fallback} of {report.n_tensors} tensors fell back to other types "
                f"({', '.join(f'{k}: {v}' for k, v in report.summary().items())})")
        files.append(GGUFFile(target, quant, fallbacks=report.to_json()))
    timings["quantize_s"] = time.perf_counter() - t
    return files


def write_lora_gguf(settings: ExportSettings, inputs: ExportInputs, work: Path) -> str | None:
    """The adapter alone as a LoRA GGUF (EXPORT_LORA_GGUF); its file name, or None."""
    from export import gguf

    if not settings.export_lora_gguf:
        return None
    lora_name = f"{inputs.name}-LoRA-F16.gguf"
    gguf.convert_lora_to_gguf(inputs.source.folder, inputs.base_dir, work / lora_name, inputs.converter_dir)
    return lora_name


def verify_files(settings: ExportSettings, inputs: ExportInputs, files: list[GGUFFile], tokenizer,
                 ladder: LadderRun | None, timings: dict[str, float]) -> None:
    """Check every file and measure its perplexity (one llama.cpp load each), then score it on the ladder."""
    from export import verify

    t = time.perf_counter()
    for f in files:
        log(f"verifying {f.name}")
        checked, f.token_nll = verify.check_gguf(
            f.path, tokenizer, inputs.texts, eval_ctx=settings.eval_ctx, eval_tokens=settings.eval_tokens,
            stop_check=settings.stop_check, threads=settings.threads, stop_prompts=settings.stop_prompts,
            stop_max_tokens=settings.stop_max_tokens)
        f.verification = checked.to_json()
        f.perplexity = math.exp(float(f.token_nll.mean()))
        log(f"{f.name}: checks passed; perplexity {f.perplexity:.3f} ({len(f.token_nll)} tokens)")
        if ladder is not None:
            score_gguf_rung(settings, f, ladder)
    timings["verify_s"] = time.perf_counter() - t


def score_gguf_rung(settings: ExportSettings, f: GGUFFile, ladder: LadderRun) -> None:
    """One GGUF's rung, checked against its parent: the merged model for F16/BF16, the F16 file for the rest."""
    from export import ladder as scoring
    from export.ladder_report import log_line

    quantized = f.quant_type not in CONVERTER_TYPES
    parent = ladder.gguf_by_type["F16"] if quantized else ladder.rungs[1]
    score = scoring.score_gguf(f.quant_type, f.path, parent.rung, ladder.eval_set, ladder.reference,
                               n_ctx=settings.eval_ctx, threads=settings.threads, quantized=quantized)
    ladder.gguf_seconds += score.seconds
    log(log_line(score))
    scoring.check_rung(score, parent, ladder.limits[score.kind])
    ladder.gguf_by_type[f.quant_type] = score
    ladder.rungs.append(score)


def ladder_record(ladder: LadderRun | None, timings: dict[str, float]) -> dict:
    """The ladder as the manifest and the card carry it; its scoring time goes into ``timings``."""
    from export.ladder_report import ladder_json

    if ladder is None:
        return {"skipped": True, "reason": "not measured (LADDER=false)"}
    timings["ladder_s"] = (timings["ladder_trained_s"] + sum(s.seconds for s in ladder.merged_scores.values())
                           + ladder.gguf_seconds)
    return ladder_json(ladder.rungs, ladder.eval_set, {k: vars(v) for k, v in ladder.limits.items()})


def write_card_and_modelfile(inputs: ExportInputs, files: list[GGUFFile], tokenizer, lora_name: str | None,
                             ladder_table: dict, merge_record: dict, work: Path) -> list[str]:
    """README.md (the model card) and an Ollama Modelfile for the Q4_K_M file (else the last); their names."""
    from export.publish import model_card, ollama_modelfile

    default = next((f for f in files if f.quant_type == "Q4_K_M"), files[-1])
    eos_texts = sorted({tokenizer.convert_ids_to_tokens(i) for i in default.verification["eos_token_ids"]
                        if i < len(tokenizer)})
    (work / "README.md").write_text(
        model_card(inputs.name, inputs.base_name, inputs.source.given, files, eval_text=inputs.eval_path.name,
                   lora_file=lora_name, ladder=ladder_table, merge_base=merge_record),
        encoding="utf-8",
    )
    (work / "Modelfile").write_text(ollama_modelfile(default.name, eos_texts), encoding="utf-8")
    return ["README.md", "Modelfile"] + ([lora_name] if lora_name else [])


def write_export_manifest(settings: ExportSettings, inputs: ExportInputs, files: list[GGUFFile],
                          extra_files: list[str], work: Path, *, timings: dict[str, float], memory: dict,
                          ladder_table: dict, merge_record: dict) -> None:
    """manifest.json: every file with its sha256, the settings without secrets, timings, memory, the ladder."""
    from export.publish import export_manifest
    from loraship.envsettings import public_settings
    from loraship.manifest import write_manifest

    manifest = export_manifest(
        work, files, extra_files,
        inputs={"adapter": inputs.source.given, "base_model": inputs.base_name},
        settings=public_settings(settings),
        extra={"eval_text": str(inputs.eval_path), "timings": {k: round(v, 2) for k, v in timings.items()},
               "memory": memory, "ladder": ladder_table, "merge_base": merge_record},
    )
    write_manifest(work, manifest)


def move_into_place(work: Path, out: Path, names: list[str]) -> None:
    """Every file from the scratch folder into OUTPUT_DIR, the manifest last."""
    from loraship.manifest import MANIFEST_NAME

    # A folder whose manifest is missing is unfinished to every reader: drop the old one first.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for file_name in names + [MANIFEST_NAME]:
        (work / file_name).replace(out / file_name)


def publish(out: Path, names: list[str], repo: str, token: str | None) -> None:
    """Push exactly the export's files (and its manifest) to HUB_REPO."""
    from export.publish import push_export
    from loraship.manifest import MANIFEST_NAME

    url = push_export(out, names + [MANIFEST_NAME], repo, token)
    log(f"pushed to {repo}: {url}")


# --- plumbing -------------------------------------------------------------------


def log(message: str) -> None:
    import click

    click.echo(f"export: {message}", err=True)


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory so far of this process (or of its largest finished child)."""
    import resource

    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB


@contextlib.contextmanager
def work_folder(output_dir: Path) -> Iterator[Path]:
    """A scratch folder inside OUTPUT_DIR (same filesystem, so renames are atomic), removed whatever happens."""
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
