"""The export, top to bottom: adapter -> merged HF folder -> GGUFs -> verified -> published.

Longer than most modules because every step of the export is here in the order it runs, each a function
named for what it does, so the stage reads top to bottom in one file.

The quality ladder (export/ladder.py) scores the fine-tune's held-out rows and a general text at every
hand-off. Each candidate merge base is taken to the shipped type and checked; MERGE_BASE=auto keeps the
one the rule in export/merge_base.py picks, and tries the next when one fails. Everything is built in a
``.tmp-export-*`` folder inside OUTPUT_DIR and renamed into place, the manifest last: a failed export
leaves no final file (what passed is kept under OUTPUT_DIR/incomplete/).
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
from typing import TYPE_CHECKING, Iterator

from export.inputs import ExportError, ExportInputs, resolve_inputs
from export.merge_base import (Candidate, merge_base_record, merge_candidates, rank_candidates, shipped_type,
                                unmeasured_order)
from export.settings import CONVERTER_TYPES, ExportSettings

if TYPE_CHECKING:
    from export.ladder import EvalSet, RungScore
    from export.metrics import Reference
    from export.publish import GGUFFile, HubPush


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
        memory: dict = {}
        chosen, merge_record = build_and_choose(settings, inputs, tokenizer, ladder, work, timings, memory)
        merged, files = take_chosen_files(chosen, inputs.name, work)
        merged_record = write_merged_model(settings, inputs, merged, ladder, chosen, merge_record, work, timings)
        lora_name = write_lora_gguf(settings, inputs, work)
        shutil.rmtree(merged)
        ladder_table = ladder_record(ladder, chosen, timings)
        extra_files, hub = write_card_and_modelfile(settings, inputs, files, tokenizer, lora_name, ladder_table,
                                                    merge_record, work)
        timings["total_s"] = time.perf_counter() - started
        memory.update(export_process_peak_rss_mib=peak_rss_mib(), largest_child_peak_rss_mib=peak_rss_mib(children=True))
        write_export_manifest(settings, inputs, files, extra_files, work, timings=timings, memory=memory,
                              ladder_table=ladder_table, merge_record=merge_record, merged_record=merged_record, hub=hub)
        finals = [f.name for f in files] + extra_files + ([merged_record["folder"]] if merged_record else [])
        move_into_place(work, out, finals)
    log(f"wrote {', '.join(finals)} and {MANIFEST_NAME} to {out}")
    if (out / INCOMPLETE).is_dir():
        shutil.rmtree(out / INCOMPLETE)
        log(f"removed {out / INCOMPLETE}/ (an earlier failed export's files; this export supersedes them)")

    if hub is not None:
        publish(out, hub, settings.hub_private, token)
    return out


# --- the steps, in the order run_export calls them ----------------------------


@dataclass
class LadderRun:
    """The quality ladder through one export: its texts, rung 1's log-probs on each, rung 1's score."""

    #: ``heldout`` (the fine-tune's own eval rows, when the adapter carries them) and ``general`` (EVAL_TEXT).
    eval_sets: dict[str, EvalSet]
    references: dict[str, Reference]
    limits: dict
    #: How bitsandbytes stored each 4-bit weight of the trained model (the NF4 merge base repeats it).
    nf4_specs: dict
    trained: RungScore
    trained_4bit: bool
    scoring_seconds: float = 0.0


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
    from export.ladder import TEXT_NAMES
    from export.ladder_report import log_line

    if not settings.ladder:
        log("LADDER=false: the quality ladder is skipped (no trained model, no float32 merged model, no scoring)")
        return None
    t = time.perf_counter()
    trained_4bit = bool(inputs.source.load_in_4bit)
    eval_sets = {}
    heldout = (scoring.build_heldout_eval_set(inputs.heldout_rows, len(tokenizer), settings.ladder_tokens)
               if inputs.heldout_rows else None)
    if heldout is not None:
        eval_sets[scoring.HELDOUT] = heldout
    else:
        log("ladder: the adapter folder carries no held-out rows (heldout_rows.jsonl, written by train since "
            "this version): every rung is scored on the general text only")
    eval_sets[scoring.GENERAL] = scoring.build_eval_set(tokenizer, inputs.texts, settings.eval_ctx,
                                                        settings.ladder_tokens)
    log(f"ladder: scoring the model as trained ({'4-bit NF4' if trained_4bit else 'full-precision'} base + "
        f"adapter) on " + " and ".join(f"{s.positions} tokens of {TEXT_NAMES[name]}" for name, s in eval_sets.items()))
    model, nf4_specs = scoring.trained_model(inputs.base_dir, inputs.source.folder, trained_4bit)
    rung1, references = scoring.score_hf("adapter", "base as trained + adapter (peft, unmerged)"
                                         + (" [NF4]" if trained_4bit else ""), None, model, eval_sets, None)
    del model
    gc.collect()  # the base leaves memory before the streamed merge starts
    log(log_line(rung1))
    timings["ladder_trained_s"] = time.perf_counter() - t
    return LadderRun(eval_sets=eval_sets, references=references, limits=ladder_limits(settings),
                     nf4_specs=nf4_specs, trained=rung1, trained_4bit=trained_4bit)


def build_and_choose(settings: ExportSettings, inputs: ExportInputs, tokenizer, ladder: LadderRun | None,
                     work: Path, timings: dict[str, float], memory: dict) -> tuple[Candidate, dict]:
    """The merge base kept, with its files made and checked, and the manifest's record of the choice.

    With the ladder, every candidate is taken to the shipped type first and the rule ranks those that
    passed; without it, the candidates are tried in a fixed order. Either way the next candidate is tried
    when one fails; when all fail, :func:`fail_with_what_passed` keeps what passed and says what would pass.
    """
    shipped = shipped_type(settings.quant_types)
    if ladder is None:
        order = unmeasured_order(settings.merge_base, inputs.source.load_in_4bit)
    else:
        order = merge_candidates(settings.merge_base, bool(inputs.source.load_in_4bit))
    candidates = [Candidate(base=base, folder=work / base) for base in order]
    if ladder is not None:
        for candidate in candidates:
            build_candidate(settings, inputs, tokenizer, ladder, candidate, shipped, timings, memory)
        ranked = rank_candidates(candidates, shipped)
    else:
        ranked = candidates
    for candidate in ranked:
        if not candidate.built:
            build_candidate(settings, inputs, tokenizer, ladder, candidate, shipped, timings, memory)
        if candidate.passed:
            finish_candidate(settings, inputs, tokenizer, ladder, candidate, shipped, timings)
        if candidate.passed:
            record = merge_base_record(settings.merge_base, inputs.source.load_in_4bit, shipped, candidates,
                                       candidate, measured=ladder is not None)
            log(f"merge base: {record['reason']}")
            for other in candidates:
                if other is not candidate:
                    shutil.rmtree(other.folder, ignore_errors=True)
            inputs.adapter = None  # its tensors leave memory before anything else runs
            return candidate, record
    fail_with_what_passed(settings, inputs, tokenizer, ladder, candidates, shipped, work, timings)
    raise AssertionError("unreachable")  # fail_with_what_passed always raises


def build_candidate(settings: ExportSettings, inputs: ExportInputs, tokenizer, ladder: LadderRun | None,
                    candidate: Candidate, shipped: str, timings: dict[str, float], memory: dict) -> None:
    """Merge into one base, convert, quantize to the shipped type; check and score each step.

    A failed check is recorded on the candidate (the file that failed is deleted), not raised.
    """
    from export.ladder import LadderError
    from export.verify import VerifyError

    candidate.folder.mkdir(parents=True, exist_ok=True)
    candidate.built = True
    t = time.perf_counter()
    nf4 = None
    if candidate.base == "nf4":
        from export.ladder import nf4_specs_as_trained

        nf4 = ladder.nf4_specs if ladder else nf4_specs_as_trained(inputs.base_dir, inputs.source.quantization)
    merged = merge_into(settings, inputs, candidate.base, nf4, candidate.folder)
    timings["merge_s"] = timings.get("merge_s", 0.0) + time.perf_counter() - t
    try:
        if ladder is not None:
            candidate.failed_at = "merged"
            score_merged_rung(inputs, ladder, candidate, merged)
        memory["merge_peak_rss_mib"] = peak_rss_mib()
        for f in convert_merged_folder(settings, inputs, merged, candidate.folder, timings):
            candidate.failed_at = f.quant_type
            check_file(settings, inputs, f, tokenizer, ladder, candidate, timings)
        if shipped not in CONVERTER_TYPES:
            candidate.failed_at = shipped
            [f] = quantize_files(settings, inputs.name, candidate.file("F16"), candidate.folder, timings, [shipped])
            check_file(settings, inputs, f, tokenizer, ladder, candidate, timings)
        candidate.failed_at = None
    except (VerifyError, LadderError) as err:
        candidate.failure = str(err)
        log(f"merge base {candidate.base}: {candidate.failed_at} failed: {err}")


def finish_candidate(settings: ExportSettings, inputs: ExportInputs, tokenizer, ladder: LadderRun | None,
                     candidate: Candidate, shipped: str, timings: dict[str, float]) -> None:
    """The candidate's other quantized types, each checked; the first failure is recorded on the candidate."""
    from export.ladder import LadderError
    from export.verify import VerifyError

    for quant in settings.quant_types:
        if quant in CONVERTER_TYPES or candidate.file(quant) is not None:
            continue
        try:
            candidate.failed_at = quant
            [f] = quantize_files(settings, inputs.name, candidate.file("F16"), candidate.folder, timings, [quant])
            check_file(settings, inputs, f, tokenizer, ladder, candidate, timings)
        except (VerifyError, LadderError) as err:
            candidate.failure = str(err)
            log(f"merge base {candidate.base}: {quant} failed: {err}")
            return
    candidate.failed_at = None


def score_merged_rung(inputs: ExportInputs, ladder: LadderRun, candidate: Candidate, merged: Path) -> None:
    """Ladder rung 2: the merged model in float32 against the model as trained.

    Merged into another base than training's (the original base of a 4-bit adapter) only the NLL is held to
    LADDER_MAX_NLL_RISE: its KL measures the NF4 rounding that merge removes on purpose.
    """
    from export import ladder as scoring
    from export.ladder_report import log_line

    model = scoring.merged_model(merged)
    score, _ = scoring.score_hf("merged", f"merged into the {candidate.base} base (transformers, fp32)", "adapter",
                               model, ladder.eval_sets, ladder.references)
    del model
    gc.collect()
    ladder.scoring_seconds += score.seconds
    candidate.scores["merged"] = score
    log(f"[{candidate.base}] " + log_line(score))
    same_base = (candidate.base == "nf4") == ladder.trained_4bit
    scoring.check_rung(score, ladder.trained, ladder.limits[scoring.FULL_PRECISION], kl_limited=same_base)


#: Where the files that passed go when no merge base passes every check (never a final path).
INCOMPLETE = "incomplete"
#: Tried in this order, where F16 passed, when every candidate failed at a quantized type: the first to pass is named.
HIGHER_TYPES = ("Q5_K_M", "Q6_K", "Q8_0")


def fail_with_what_passed(settings: ExportSettings, inputs: ExportInputs, tokenizer, ladder: LadderRun | None,
                          candidates: list[Candidate], shipped: str, work: Path, timings: dict[str, float]) -> None:
    """Every candidate failed: find a higher-bit type that passes, keep every file that passed, raise naming both."""
    found = probe_higher_types(settings, inputs, tokenizer, ladder, candidates, timings)
    kept = settings.output_dir / INCOMPLETE
    message = all_failed_message(settings, inputs, candidates, found, kept)
    if not keep_passing_files(kept, candidates, shipped, message):
        message = message.replace(f"; the files that passed are kept in {kept}/", "")
    raise ExportError(message)


def probe_higher_types(settings: ExportSettings, inputs: ExportInputs, tokenizer, ladder: LadderRun | None,
                       candidates: list[Candidate], timings: dict[str, float]) -> tuple[Candidate, str] | None:
    """The first (candidate, type) of HIGHER_TYPES above the type that failed whose file passes every check."""
    from export.ladder import LadderError
    from export.settings import QUANTIZED_TYPES
    from export.verify import VerifyError

    bits_order = list(QUANTIZED_TYPES)  # most bits first
    with_f16 = [c for c in candidates if c.file("F16") is not None]
    if ladder is not None:  # the rule's order, on the F16 files
        with_f16 = rank_candidates(with_f16, "F16", passed_only=False)
    for candidate in with_f16:
        if candidate.file("F16") is None or candidate.failed_at not in QUANTIZED_TYPES:
            continue
        for quant in HIGHER_TYPES:
            if bits_order.index(quant) >= bits_order.index(candidate.failed_at) or candidate.file(quant):
                continue
            log(f"merge base {candidate.base}: trying {quant}, to name a type that passes")
            try:
                [f] = quantize_files(settings, inputs.name, candidate.file("F16"), candidate.folder, timings, [quant])
                check_file(settings, inputs, f, tokenizer, ladder, candidate, timings)
                return candidate, quant
            except (VerifyError, LadderError) as err:
                log(f"merge base {candidate.base}: {quant} failed too: {err}")
    return None


def all_failed_message(settings: ExportSettings, inputs: ExportInputs, candidates: list[Candidate],
                       found: tuple[Candidate, str] | None, kept: Path) -> str:
    """One line: what failed on each base, what would pass, where the files that passed are."""
    failures = "; ".join(f"[{c.base} base] {c.failure}" for c in candidates)
    if found is not None:
        candidate, quant = found
        fix = (f"{quant} merged into the {candidate.base} base passes every check: set QUANT_TYPES={quant} "
               f"MERGE_BASE={candidate.base}")
    else:
        with_f16 = [c for c in candidates if c.file("F16") is not None]
        fix = (f"only F16 passes (merged into the {with_f16[0].base} base; no type up to Q8_0 did): set "
               f"QUANT_TYPES=F16 MERGE_BASE={with_f16[0].base}" if with_f16 else
               "no file passed, not even F16: the failures above are the merged model's own")
    if settings.merge_base != "auto" and inputs.source.load_in_4bit:
        other = "original" if settings.merge_base == "nf4" else "nf4"
        fix += f" (the {other} base was not tried: MERGE_BASE=auto tries both)"
    return (f"QUANT_TYPES={','.join(settings.quant_types)}: no merge base passed every check ({failures}). "
            f"What passes: {fix}; the files that passed are kept in {kept}/, nothing was written at a final path")


def keep_passing_files(kept: Path, candidates: list[Candidate], shipped: str, message: str) -> bool:
    """Move every file that passed into ``kept/BASE/``, with a README and report.json saying it is no export."""
    from loraship.atomic import atomic_path, write_json
    from loraship.manifest import describe_file

    from export.merge_base import candidate_json

    if not any(c.files for c in candidates):
        return False
    with atomic_path(kept) as tmp:
        report = {"error": message, "shipped_type": shipped, "candidates": {}}
        for c in candidates:
            entry = candidate_json(c, shipped)
            if c.files:
                (tmp / c.base).mkdir(parents=True)
                for f in c.files:
                    f.path = f.path.replace(tmp / c.base / f.name)
                entry["files"] = {f.name: {**describe_file(f.path), "quant_type": f.quant_type,
                                           "perplexity": f.perplexity, "verification": f.verification}
                                  for f in c.files}
            report["candidates"][c.base] = entry
        write_json(tmp / "report.json", report)
        (tmp / "README.md").write_text(
            "# Not an export: the files that passed when the export failed\n\n"
            "The export stopped because no merge base passed every check at the requested types "
            "(report.json has the error, each base's scores and each file's sha256). Each file here passed "
            "every check on its own; the files that failed were deleted. Re-run the export with the fix the "
            "error names to get a finished export (with its manifest and card) at OUTPUT_DIR.\n",
            encoding="utf-8")
    return True


def take_chosen_files(chosen: Candidate, name: str, work: Path) -> tuple[Path, list[GGUFFile]]:
    """The chosen candidate's merged folder (as ``work/NAME``) and files, moved where the final steps expect them."""
    merged = (chosen.folder / f"merged-{chosen.base}").rename(work / name)
    for f in chosen.files:
        f.path = f.path.rename(work / f.path.name)
    order = {t: n for n, t in enumerate(("F16", "BF16"))}
    return merged, sorted(chosen.files, key=lambda f: order.get(f.quant_type, 2))


def merge_into(settings: ExportSettings, inputs: ExportInputs, candidate: str, nf4: dict | None, work: Path) -> Path:
    """One streamed merge, one tensor at a time, into ``work/merged-CANDIDATE``."""
    from tqdm import tqdm

    from export.merge import count_tensors, merge_into_folder

    # Matrices straight in the F16 GGUF's type, unless a BF16 GGUF or merged model is wanted too (rounded once,
    # from float32).
    bf16 = "BF16" in settings.quant_types or (settings.merged and settings.merged_dtype == "bfloat16")
    matrices_as = None if bf16 else "F16"
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
    timings["convert_s"] = timings.get("convert_s", 0.0) + time.perf_counter() - t
    return files


def quantize_files(settings: ExportSettings, name: str, f16: GGUFFile, work: Path,
                   timings: dict[str, float], types: list[str] | None = None) -> list[GGUFFile]:
    """Each quantized type (of QUANT_TYPES, or ``types``) from the F16 file, reporting every tensor that fell back."""
    from export import gguf
    from export.publish import GGUFFile

    t = time.perf_counter()
    files = []
    for quant in settings.quant_types if types is None else types:
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
    timings["quantize_s"] = timings.get("quantize_s", 0.0) + time.perf_counter() - t
    return files


def write_merged_model(settings: ExportSettings, inputs: ExportInputs, merged: Path, ladder: LadderRun | None,
                       chosen: Candidate, merge_record: dict, work: Path, timings: dict[str, float]) -> dict | None:
    """MERGED: the merged model as a Hugging Face folder (``work/merged``), checked like every other artifact;
    the manifest's record of it, or None."""
    from export.merged_folder import MERGED_DIR, merged_card, write_merged_folder
    from export.publish import LIBRARIES, adapter_reference
    from loraship.envsettings import public_settings
    from loraship.manifest import build_manifest, write_manifest
    from loraship.public import public_name, without_local_paths

    if not settings.merged:
        return None
    t = time.perf_counter()
    folder = work / MERGED_DIR
    log(f"writing the merged model ({settings.merged_dtype} safetensors, files of at most "
        f"{settings.merged_max_shard_mb} MB)")
    weights = write_merged_folder(merged, folder, dtype=settings.merged_dtype,
                                  max_shard_bytes=settings.merged_max_shard_mb * 10**6)
    rung = check_merged_folder(settings, folder, ladder, chosen)
    adapter = adapter_reference(inputs.source.given, inputs.source.folder)
    (folder / "README.md").write_text(merged_card(
        name=inputs.name, base_model=inputs.base_name, adapter=adapter, dtype=settings.merged_dtype,
        repo=merged_repo(settings), gguf_repo=settings.hub_repo, merge_reason=merge_record["reason"],
        scored=rung is not None, kl_limit=settings.ladder_max_kl_rise), encoding="utf-8")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    write_manifest(folder, build_manifest(
        kind="merged", stage="export", folder=folder, files=files, libraries=LIBRARIES,
        inputs={"adapter": adapter, "base_model": public_name(inputs.base_name)},
        settings=without_local_paths(public_settings(settings)),
        extra={"dtype": settings.merged_dtype, "weight_files": weights, "ladder_rung": rung,
               "merge_base": merge_record}))
    timings["merged_model_s"] = time.perf_counter() - t
    return {"folder": MERGED_DIR, "repo": merged_repo(settings), "dtype": settings.merged_dtype,
            "weight_files": weights, "ladder_rung": rung}


def check_merged_folder(settings: ExportSettings, folder: Path, ladder: LadderRun | None,
                        chosen: Candidate) -> dict | None:
    """The merged folder as transformers loads it, scored on the ladder against the merged rung (its JSON);
    with LADDER=false only loaded."""
    from export import ladder as scoring
    from export.ladder_report import log_line

    if ladder is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
        del model
        log(f"{folder.name}/: transformers loads it (LADDER=false: not scored)")
        return None
    model = scoring.merged_model(folder)
    score, _ = scoring.score_hf(f"merged-{settings.merged_dtype}",
                                f"the merged model as pushed ({settings.merged_dtype} safetensors; transformers, fp32)",
                                "merged", model, ladder.eval_sets, ladder.references)
    del model
    gc.collect()
    ladder.scoring_seconds += score.seconds
    log(log_line(score))
    scoring.check_rung(score, chosen.scores["merged"], ladder.limits[scoring.FULL_PRECISION])
    chosen.scores[score.rung] = score
    return score.to_json()


def merged_repo(settings: ExportSettings) -> str | None:
    """Where MERGED=true pushes the merged model: MERGED_REPO, else HUB_REPO + ``-merged``; None without HUB_REPO."""
    if not (settings.merged and settings.hub_repo):
        return None
    return settings.merged_repo or f"{settings.hub_repo}-merged"


def write_lora_gguf(settings: ExportSettings, inputs: ExportInputs, work: Path) -> str | None:
    """The adapter alone as a LoRA GGUF (EXPORT_LORA_GGUF); its file name, or None."""
    from export import gguf

    if not settings.export_lora_gguf:
        return None
    from export.publish import lora_file_name

    lora_name = lora_file_name(inputs.name)
    gguf.convert_lora_to_gguf(public_adapter_copy(inputs, work / ".tmp-lora-source"), inputs.base_dir,
                              work / lora_name, inputs.converter_dir)
    return lora_name


def public_adapter_copy(inputs: ExportInputs, folder: Path) -> Path:
    """The adapter's weights and config, its base named as a pushed file may name it, and no model card: llama.cpp's
    LoRA converter writes the card's metadata and the config's base into the GGUF."""
    import json
    import os

    from export.merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from loraship.public import public_name

    folder.mkdir()
    try:
        os.link(inputs.source.folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    except OSError:  # another filesystem (a Hub download's cache)
        shutil.copy2(inputs.source.folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    config = json.loads((inputs.source.folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = public_name(inputs.base_name)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def check_file(settings: ExportSettings, inputs: ExportInputs, f: GGUFFile, tokenizer, ladder: LadderRun | None,
               candidate: Candidate, timings: dict[str, float]) -> None:
    """Check one file and measure its perplexity (one llama.cpp load), score it on the ladder; keep it if it passed.

    A failure deletes the file and raises (VerifyError, LadderError): nothing failed is kept anywhere.
    """
    from export import verify

    t = time.perf_counter()
    try:
        log(f"verifying {f.name} ({candidate.base} base)")
        try:
            checked, f.token_nll = verify.check_gguf(
                f.path, tokenizer, inputs.texts, eval_ctx=settings.eval_ctx, eval_tokens=settings.eval_tokens,
                stop_check=settings.stop_check, threads=settings.threads, stop_prompts=settings.stop_prompts,
                stop_max_tokens=settings.stop_max_tokens)
        except verify.VerifyError:
            if ladder is not None:  # a failed file's scores still go into the record of the choice
                with contextlib.suppress(Exception):
                    score_gguf_rung(settings, f, ladder, candidate, check=False)
            raise
        f.verification = checked.to_json()
        f.perplexity = math.exp(float(f.token_nll.mean()))
        log(f"{f.name}: checks passed; perplexity {f.perplexity:.3f} ({len(f.token_nll)} tokens)")
        if ladder is not None:
            score_gguf_rung(settings, f, ladder, candidate)
    except Exception:
        f.path.unlink(missing_ok=True)
        raise
    finally:
        timings["verify_s"] = timings.get("verify_s", 0.0) + time.perf_counter() - t
    candidate.files.append(f)


def score_gguf_rung(settings: ExportSettings, f: GGUFFile, ladder: LadderRun, candidate: Candidate,
                    check: bool = True) -> None:
    """One GGUF's rung, checked against its parent: the merged model for F16/BF16, the F16 file for the rest."""
    from export import ladder as scoring
    from export.ladder_report import log_line

    quantized = f.quant_type not in CONVERTER_TYPES
    parent = candidate.scores["F16" if quantized else "merged"]
    score = scoring.score_gguf(f.quant_type, f.path, parent.rung, ladder.eval_sets, ladder.references,
                               n_ctx=settings.eval_ctx, threads=settings.threads, quantized=quantized)
    ladder.scoring_seconds += score.seconds
    candidate.scores[f.quant_type] = score
    log(f"[{candidate.base}] " + log_line(score))
    if check:
        scoring.check_rung(score, parent, ladder.limits[score.kind])


def ladder_record(ladder: LadderRun | None, chosen: Candidate, timings: dict[str, float]) -> dict:
    """The ladder of the chosen base as the manifest and the card carry it; its scoring time goes into ``timings``."""
    from export.ladder_report import ladder_json

    if ladder is None:
        return {"skipped": True, "reason": "not measured (LADDER=false)"}
    timings["ladder_s"] = timings["ladder_trained_s"] + ladder.scoring_seconds
    return ladder_json([ladder.trained, *chosen.scores.values()], ladder.eval_sets,
                       {k: vars(v) for k, v in ladder.limits.items()})


def write_card_and_modelfile(settings: ExportSettings, inputs: ExportInputs, files: list[GGUFFile], tokenizer,
                             lora_name: str | None, ladder_table: dict, merge_record: dict,
                             work: Path) -> tuple[list[str], HubPush | None]:
    """README.md (the model card), an Ollama Modelfile for the default GGUF and, with HUB_REPO, the files the Hub's
    Ollama integration reads; their names, and what goes to HUB_REPO (None without it)."""
    from export.ollama import chat_format_of, hub_ollama_files, modelfile
    from export.publish import HubPush, adapter_reference, default_file, files_to_push, model_card

    fmt = chat_format_of(tokenizer)
    log(f"Ollama template: {fmt.family if fmt else 'none of the known formats, Ollama reads the GGUF template'}")
    names = ["README.md", "Modelfile"] + ([lora_name] if lora_name else [])
    ollama_files: dict[str, str] = {}
    hub = None
    if settings.hub_repo:
        ollama_files = hub_ollama_files(fmt, eos_texts(tokenizer, files[0]))
        names += list(ollama_files)
        hub = HubPush(repo=settings.hub_repo, private=settings.hub_private,
                      files=files_to_push(settings.quant_types, settings.push_f16, files, names),
                      merged_repo=merged_repo(settings))
    default = default_file(files, hub.files if hub else None)
    (work / "README.md").write_text(
        model_card(inputs.name, inputs.base_name, adapter_reference(inputs.source.given, inputs.source.folder), files,
                   eval_text=inputs.eval_path.name, lora_file=lora_name, ladder=ladder_table,
                   merge_base=merge_record, hub=hub, ollama_files=bool(ollama_files)),
        encoding="utf-8",
    )
    (work / "Modelfile").write_text(modelfile(default.name, inputs.name.lower(), fmt, eos_texts(tokenizer, default)),
                                    encoding="utf-8")
    for name, text in ollama_files.items():
        (work / name).write_text(text, encoding="utf-8")
    return names, hub


def eos_texts(tokenizer, f: GGUFFile) -> list[str]:
    """The GGUF's end-of-generation tokens as text."""
    return sorted({tokenizer.convert_ids_to_tokens(i) for i in f.verification["eos_token_ids"] if i < len(tokenizer)})


def write_export_manifest(settings: ExportSettings, inputs: ExportInputs, files: list[GGUFFile],
                          extra_files: list[str], work: Path, *, timings: dict[str, float], memory: dict,
                          ladder_table: dict, merge_record: dict, merged_record: dict | None = None,
                          hub: HubPush | None = None) -> None:
    """manifest.json: every file with its sha256 (and, with HUB_REPO, whether it is pushed), the settings without
    secrets or local paths, timings, memory, the ladder, the merged model's record."""
    from dataclasses import asdict

    from export.publish import adapter_reference, export_manifest
    from loraship.envsettings import public_settings
    from loraship.manifest import write_manifest
    from loraship.public import public_name, without_local_paths

    manifest = export_manifest(
        work, files, extra_files,
        inputs={"adapter": adapter_reference(inputs.source.given, inputs.source.folder),
                "base_model": inputs.base_name if inputs.base_name == "embedded" else public_name(inputs.base_name)},
        settings=without_local_paths(public_settings(settings)),
        extra={"eval_text": inputs.eval_path.name, "timings": {k: round(v, 2) for k, v in timings.items()},
               "memory": memory, "ladder": ladder_table, "merge_base": merge_record, "merged": merged_record,
               "hub": asdict(hub) if hub else None},
    )
    write_manifest(work, manifest)


def move_into_place(work: Path, out: Path, names: list[str]) -> None:
    """Every file from the scratch folder into OUTPUT_DIR, the manifest last."""
    from loraship.manifest import MANIFEST_NAME

    # A folder whose manifest is missing is unfinished to every reader: drop the old one first.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for file_name in names + [MANIFEST_NAME]:
        if (out / file_name).is_dir():  # the merged model's folder: a rename cannot replace a full one
            shutil.rmtree(out / file_name)
        (work / file_name).replace(out / file_name)


def publish(out: Path, hub: HubPush, private: bool, token: str | None) -> None:
    """One commit per repo: the merged model (MERGED=true) to its own repo first, so the GGUF card's link to it
    resolves; then exactly the GGUF repo's files and the manifest."""
    from export.merged_folder import MERGED_DIR
    from export.publish import push_export
    from loraship.hub import push_folder
    from loraship.manifest import MANIFEST_NAME

    visibility = "private" if private else "public"
    if hub.merged_repo:
        url = push_folder(out / MERGED_DIR, hub.merged_repo, token=token, private=private,
                          commit_message="Upload merged model with loraship", setting="MERGED_REPO")
        log(f"pushed {MERGED_DIR}/ to {hub.merged_repo} ({visibility}): {url}")
    url = push_export(out, hub.files + [MANIFEST_NAME], hub.repo, token, private=private)
    log(f"pushed {len(hub.files)} files and {MANIFEST_NAME} to {hub.repo} ({visibility}): {url}")


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
