"""A quantized file that fails its checks: MERGE_BASE=auto falls back to the other base, and when every base
fails, the files that passed are kept under OUTPUT_DIR/incomplete/ and the error names what would pass.

The tiny Llama never stops by itself, so STOP_CHECK=eos_token, and the stop check is made to fail for the
files named below (the real export steps run around it: merge, convert, quantize, verify, ladder).
"""

from __future__ import annotations

import json

import pytest

from loraship.manifest import read_manifest, verify_files
from tests.fixtures.adapters import add_heldout_rows, make_train_output, mark_trained_in_4bit
from tests.fixtures.export_runs import final_files, run_export_cli

NAME = "fails"
SETTINGS = {"STOP_CHECK": "eos_token", "EVAL_CTX": "64", "LADDER_TOKENS": "128", "MODEL_NAME": NAME}


@pytest.fixture(scope="module")
def qlora_train_output(tiny_llama_dir, tmp_path_factory):
    train = make_train_output(tiny_llama_dir, tmp_path_factory.mktemp("fails") / "train", base_name=str(tiny_llama_dir))
    return add_heldout_rows(mark_trained_in_4bit(train))


def failing_stop_check(monkeypatch, fails):
    """The stop check fails for each GGUF path ``fails(path)`` is true of, as a model that never stops does."""
    import export.verify

    real = export.verify.check_stop

    def check_stop(llm, tokenizer, name, mode, **kwargs):
        if fails(llm.model_path):
            raise export.verify.VerifyError(f"{name}: short chat 1 did not end within 128 tokens (forced)")
        return real(llm, tokenizer, name, mode, **kwargs)

    monkeypatch.setattr(export.verify, "check_stop", check_stop)


def test_auto_ships_the_other_base_when_one_bases_quant_fails(qlora_train_output, converter_dir, tmp_path,
                                                              monkeypatch, export_env):
    failing_stop_check(monkeypatch, lambda path: "/nf4/" in path and path.endswith("-Q4_K_M.gguf"))
    out = tmp_path / "out"
    result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out)})
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out)
    assert verify_files(out, manifest) == []
    record = manifest["extra"]["merge_base"]
    assert record["chosen"] == "original"
    nf4 = record["candidates"]["nf4"]
    assert (nf4["passed"], nf4["failed_at"]) == (False, "Q4_K_M") and "(forced)" in nf4["failure"]
    # The failed file was still scored: both bases' numbers at the shipped type are in the record.
    for candidate in record["candidates"].values():
        assert {"heldout", "general"} <= set(candidate["rungs"]["Q4_K_M"])
    assert "nf4 failed at Q4_K_M" in record["reason"]


def test_when_every_base_fails_the_passing_files_are_kept_apart_and_the_error_names_what_passes(
        qlora_train_output, converter_dir, tmp_path, monkeypatch, export_env):
    failing_stop_check(monkeypatch, lambda path: path.endswith("-Q4_K_M.gguf"))
    out = tmp_path / "out"
    result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out)})
    assert result.exit_code == 2
    [error] = result.stderr.strip().splitlines()[-1:]
    assert error.startswith("error: QUANT_TYPES=Q4_K_M: no merge base passed every check ([original base] ")
    kept = out / "incomplete"
    report = json.loads((kept / "report.json").read_text())
    passing = next(base for base, c in report["candidates"].items() if f"{NAME}-Q5_K_M.gguf" in c["files"])
    assert (f"What passes: Q5_K_M merged into the {passing} base passes every check: set QUANT_TYPES=Q5_K_M "
            f"MERGE_BASE={passing}; the files that passed are kept in {kept}/, nothing was written at a final "
            "path") in error
    # Nothing at a final path; every file kept passed, and nothing that failed was kept.
    assert final_files(out) == ["incomplete"]
    files = sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*.gguf"))
    other = "nf4" if passing == "original" else "original"
    assert files == sorted([f"{other}/{NAME}-F16.gguf", f"{passing}/{NAME}-F16.gguf", f"{passing}/{NAME}-Q5_K_M.gguf"])
    for base, candidate in report["candidates"].items():
        assert (candidate["passed"], candidate["failed_at"]) == (False, "Q4_K_M")
        for name, facts in candidate["files"].items():
            assert (kept / base / name).stat().st_size == facts["size"]
    assert "Not an export" in (kept / "README.md").read_text()

    # The fix the error names exports, and the finished export supersedes the kept files.
    result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out),
                             "QUANT_TYPES": "Q5_K_M", "MERGE_BASE": passing, "LADDER": "false"})
    assert result.exit_code == 0, result.stderr
    assert final_files(out) == sorted(["Modelfile", "README.md", "manifest.json", f"{NAME}-F16.gguf",
                                       f"{NAME}-Q5_K_M.gguf"])
