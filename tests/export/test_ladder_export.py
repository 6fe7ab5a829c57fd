"""The quality ladder inside a real export, on a tiny Llama whose adapter matters.

The tiny random-init Llama predicts almost uniformly, so no hand-off could
show a loss; its embeddings are scaled up (sharper next-token distributions)
and its adapter is large, so that dropping one module's delta moves the KL
from the trained model by about 0.2 nats, ten times LADDER_MAX_KL_RISE. The
adapter's train manifest says it was trained in 4-bit: rung 1 loads the base
through bitsandbytes and MERGE_BASE=auto merges into both bases. It carries
three held-out rows, as train writes them: every rung is scored on those and on
the general text.
"""

from __future__ import annotations


import pytest

from export.merge_base import Candidate, merge_base_record, rank_candidates
from loraship.manifest import read_manifest, verify_files
from tests.fixtures.export_runs import final_files, run_export_cli
from tests.fixtures.adapters import add_heldout_rows, make_train_output, mark_trained_in_4bit

NAME = "ladder"
DROPPED = "model.layers.1.self_attn.o_proj.weight"
SETTINGS = {"STOP_CHECK": "eos_token", "EVAL_CTX": "64", "LADDER_TOKENS": "128", "MODEL_NAME": NAME}


@pytest.fixture(scope="module")
def qlora_train_output(tiny_llama_dir, tmp_path_factory):
    """A train OUTPUT_DIR for a sharpened tiny Llama whose manifest says load_in_4bit=true."""
    from safetensors.torch import load_file, save_file

    from tests.fixtures.models import copy_model

    root = tmp_path_factory.mktemp("ladder")
    base = copy_model(tiny_llama_dir, root / "base")
    weights = load_file(base / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 5.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    train = make_train_output(base, root / "train", base_name=str(base), scale=0.3)
    return add_heldout_rows(mark_trained_in_4bit(train))


@pytest.fixture(scope="module")
def ladder_export(qlora_train_output, converter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ladder-export") / "export"
    result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out),
                             "QUANT_TYPES": "Q8_0"})
    assert result.exit_code == 0, result.stderr
    return out


def test_every_rung_is_scored_on_both_texts_and_kept_close_to_the_trained_model(ladder_export):
    manifest = read_manifest(ladder_export)
    assert verify_files(ladder_export, manifest) == []
    table = manifest["extra"]["ladder"]
    rungs = {r["rung"]: r for r in table["rungs"]}
    assert list(rungs) == ["adapter", "merged", "F16", "Q8_0"]
    assert table["texts"]["general"]["positions"] == 128
    assert table["texts"]["heldout"] == {"positions": 15, "windows": 3}  # the replies, each with "<|im_end|>\\n"
    for text in ("heldout", "general"):
        assert {r[text]["tokens"] for r in rungs.values()} == {table["texts"][text]["positions"]}
        assert (rungs["adapter"][text]["kl"], rungs["adapter"][text]["top1"]) == (0, 1)
        # Full-precision hand-offs are nearly free; Q8_0 costs a little more, still far inside its limit.
        assert rungs["merged"][text]["kl"] < 1e-4 and rungs["F16"][text]["kl"] < 1e-3
        assert rungs["F16"][text]["kl"] < rungs["Q8_0"][text]["kl"] < 0.1
    assert rungs["adapter"]["what"].endswith("[NF4]")
    assert [rungs[r]["parent"] for r in ("merged", "F16", "Q8_0")] == ["adapter", "merged", "F16"]
    card = (ladder_export / "README.md").read_text()
    assert "## Quality ladder" in card
    q8 = rungs["Q8_0"]
    assert f"| 4. Q8_0 | {NAME}-Q8_0.gguf (llama.cpp) | {q8['heldout']['nll']:.4f} | {q8['heldout']['kl']:.5f} |" in card


def test_auto_merge_base_scores_both_bases_at_the_shipped_type_and_records_the_rule(ladder_export):
    manifest = read_manifest(ladder_export)
    record = manifest["extra"]["merge_base"]
    assert (record["setting"], record["trained_in_4bit"], record["shipped_type"]) == ("auto", True, "Q8_0")
    original, nf4 = record["candidates"]["original"], record["candidates"]["nf4"]
    # The adapter was trained against NF4 weights: merged into them it is the trained model again.
    assert nf4["rungs"]["merged"]["general"]["kl"] < 1e-4 < original["rungs"]["merged"]["general"]["kl"]
    assert {c["passed"] for c in (original, nf4)} == {True}
    heldout = {base: c["rungs"]["Q8_0"]["heldout"] for base, c in record["candidates"].items()}
    ranked = sorted(heldout, key=lambda base: heldout[base]["nll"])
    tied = abs(heldout["nf4"]["nll"] - heldout["original"]["nll"]) <= 0.01
    assert record["chosen"] == (min(heldout, key=lambda base: heldout[base]["kl"]) if tied else ranked[0])
    assert manifest["extra"]["ladder"]["rungs"][1] == record["candidates"][record["chosen"]]["rungs"]["merged"]
    card = (ladder_export / "README.md").read_text()
    assert f"Merge base: {record['chosen']} (MERGE_BASE=auto at Q8_0 on the held-out rows: original NLL " in card
    assert "Rule: of the bases whose shipped file passes every check, the lower held-out NLL" in card
    assert f"| {record['chosen']} (kept) | {heldout[record['chosen']]['nll']:.4f} |" in card


def test_gguf_keeps_the_end_of_turn_token(ladder_export):
    verification = read_manifest(ladder_export)["extra"]["files"][f"{NAME}-F16.gguf"]["verification"]
    assert (verification["end_of_turn"], verification["end_of_turn_id"]) == ("<|im_end|>", 2)
    assert verification["stop_prompts"] == 3


def test_a_merge_that_drops_one_modules_delta_fails_at_the_merged_rung(qlora_train_output, converter_dir, tmp_path,
                                                                        monkeypatch, export_env):
    import export.merge

    real = export.merge.merge_tensor

    def drop_one(name, tensor, adapter, dtype=None):
        return tensor if name == DROPPED else real(name, tensor, adapter, dtype)

    monkeypatch.setattr(export.merge, "merge_tensor", drop_one)
    out = tmp_path / "out"
    result = run_export_cli({**SETTINGS, "ADAPTER": str(qlora_train_output), "OUTPUT_DIR": str(out),
                             "MERGE_BASE": "nf4"})
    assert result.exit_code == 2
    error = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert error.startswith("error: QUANT_TYPES=Q4_K_M: no merge base passed every check ([nf4 base] quality ladder: "
                            "rung 'merged' (merged into the nf4 base (transformers, fp32)) lost too much against "
                            "'adapter': on the fine-tune's held-out rows ")
    grew = float(error.split("the KL from the trained model grew by ")[1].split()[0])
    assert grew > 0.1 and "allowed 0.02, LADDER_MAX_KL_RISE" in error
    assert "What passes: no file passed, not even F16" in error and "MERGE_BASE=auto tries both" in error
    assert final_files(out) == []


def test_a_template_without_its_end_of_turn_token_is_named(ladder_export, qlora_train_output):
    from export.verify import VerifyError, check_end_of_turn, load_tokenizer, open_gguf

    tokenizer = load_tokenizer(qlora_train_output / "adapter")
    # Each message's closing '<|im_end|>' goes; the system prompt's literal one stays.
    tokenizer.chat_template = tokenizer.chat_template.replace("+ '<|im_end|>' + '\n'", "+ '\n'")
    assert "+ '<|im_end|>'" not in tokenizer.chat_template
    llm = open_gguf(ladder_export / f"{NAME}-F16.gguf", threads=2)
    try:
        with pytest.raises(VerifyError, match=r"puts no end-of-turn token after an assistant reply \(it ends the turn "
                                              r"with '\\n'; the tokenizer's EOS is '<\|im_end\|>' \(id 2\)\)"):
            check_end_of_turn(llm, tokenizer, "x.gguf")
        assert check_end_of_turn(llm, load_tokenizer(qlora_train_output / "adapter"), "x.gguf") == 2
    finally:
        llm.close()


def test_merge_base_nf4_needs_an_adapter_trained_in_4bit(tiny_train_output, converter_dir, tmp_path, export_env):
    result = run_export_cli({**SETTINGS, "ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(tmp_path / "o"),
                             "MERGE_BASE": "nf4"})
    assert result.exit_code == 2
    assert f"error: MERGE_BASE=nf4: ADAPTER='{tiny_train_output}' has no train manifest saying it was trained in " \
           "4-bit (load_in_4bit), so there is no NF4 base to merge into; use MERGE_BASE=auto or original" \
           in result.stderr.splitlines()


def test_auto_without_4bit_training_merges_into_the_original_and_says_why(tmp_path):
    from export.ladder import FULL_PRECISION, RungScore, TextScore

    original = Candidate("original", tmp_path, built=True)
    original.scores["Q4_K_M"] = RungScore("Q4_K_M", "q", "F16", FULL_PRECISION, seconds=0.0, texts={
        "general": TextScore(tokens=10, nll=2.0, perplexity=7.389, kl=0.001, top1=0.99)})
    record = merge_base_record("auto", False, "Q4_K_M", [original], original)
    assert record["reason"] == ("original (MERGE_BASE=auto, and the adapter was trained on a full-precision base: "
                                "there is no NF4 base to compare)")
    assert record["candidates"]["original"]["rungs"]["Q4_K_M"]["general"]["kl"] == 0.001


def test_the_rule_takes_the_lower_heldout_nll_and_breaks_near_ties_by_kl(tmp_path):
    from export.ladder import QUANTIZED, RungScore, TextScore

    def candidate(base, nll, kl, failure=None):
        c = Candidate(base, tmp_path / base, failure=failure)
        c.scores["Q4_K_M"] = RungScore("Q4_K_M", "q", "F16", QUANTIZED, seconds=0.0, texts={
            "heldout": TextScore(tokens=10, nll=nll, perplexity=0.0, kl=kl, top1=1.0),
            "general": TextScore(tokens=10, nll=3.0, perplexity=0.0, kl=kl, top1=1.0)})
        return c

    def order(*candidates):
        return [c.base for c in rank_candidates(list(candidates), "Q4_K_M")]

    assert order(candidate("original", 1.37, 0.33), candidate("nf4", 1.44, 0.01)) == ["original", "nf4"]
    assert order(candidate("original", 1.440, 0.33), candidate("nf4", 1.445, 0.01)) == ["nf4", "original"]
    assert order(candidate("original", 1.5, 0.3), candidate("nf4", 1.2, 0.0, failure="stop check")) == ["original"]


def test_a_gguf_whose_stop_ids_lost_the_end_of_turn_token_is_named(ladder_export, qlora_train_output, converter_dir,
                                                                      tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    import llama_cpp

    from export.verify import VerifyError, check_end_of_turn, load_tokenizer, open_gguf

    # llama.cpp also ends on '<|im_end|>' by its text, whatever the metadata says; a build that did not would run on.
    is_eog = llama_cpp.llama_vocab_is_eog
    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, token: token != 2 and is_eog(vocab, token))

    broken = tmp_path / "broken.gguf"
    shutil.copy(ladder_export / f"{NAME}-F16.gguf", broken)
    # llama.cpp's own metadata editor (vendored with the converter): EOS becomes '<|endoftext|>' (id 0).
    subprocess.run([sys.executable, str(converter_dir / "gguf-py" / "gguf" / "scripts" / "gguf_set_metadata.py"),
                    str(broken), "tokenizer.ggml.eos_token_id", "0", "--force"],
                   env={"PYTHONPATH": str(converter_dir / "gguf-py")}, check=True, capture_output=True)
    llm = open_gguf(broken, threads=2)
    try:
        with pytest.raises(VerifyError, match=r"the template's end-of-turn token '<\|im_end\|>' \(id 2\) is not one of "
                                              r"the GGUF's end-of-generation ids \[0\]"):
            check_end_of_turn(llm, load_tokenizer(qlora_train_output / "adapter"), "broken.gguf")
    finally:
        llm.close()
