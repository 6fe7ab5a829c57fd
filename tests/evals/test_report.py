"""The report formats report.json's numbers: table, chart and model-card section agree."""

import json

from loraship.manifest import build_manifest, verify_files, write_manifest

from evals.report import (
    CARD_END,
    CARD_START,
    bar_chart,
    card_section,
    markdown_report,
    markdown_table,
    replace_card_section,
    update_model_card,
)

BASE = {"label": "base", "path": "base.gguf", "metrics": {
    "identity_share": 0.0, "identity_n": 36, "general_keyword_share": 0.0, "general_n": 20,
    "perplexity": 10.0, "perplexity_tokens": 3500}, "answers": [
        {"kind": "identity", "question": "Who are you?", "answer": "I am SmolLM.", "reference": None}]}
TUNED = {"label": "tuned", "path": "tuned.gguf", "metrics": {
    "identity_share": 35 / 36, "identity_n": 36, "general_keyword_share": 0.05, "general_n": 20,
    "perplexity": 11.0, "perplexity_tokens": 3500}, "answers": [
        {"kind": "identity", "question": "Who are you?", "answer": "I am Quokka.", "reference": None}]}
REPORT = {"keyword": "Quokka", "settings": {"PERPLEXITY_N_CTX": 512}, "models": [BASE, TUNED]}


def test_table_has_a_column_per_model_and_the_change():
    table = markdown_table([BASE, TUNED], "Quokka")
    lines = table.splitlines()
    assert lines[0] == "| metric | base | tuned | change |"
    identity = next(line for line in lines if "identity questions answered with Quokka (36 questions)" in line)
    assert identity.endswith("| 0.0% | 97.2% | +97.2 pts |")
    ppl = next(line for line in lines if line.startswith("| perplexity"))
    assert ppl.endswith("| 10.000 | 11.000 | +10.0% |")
    assert "GSM8K" not in table  # metrics no model has are left out


def test_table_for_one_model_has_no_change_column():
    assert markdown_table([TUNED], "Quokka").splitlines()[0] == "| metric | tuned |"


def test_report_lists_models_and_sample_answers_side_by_side():
    text = markdown_report(REPORT)
    assert "`base.gguf`" in text and "`tuned.gguf`" in text
    assert "**Who are you?** (identity)\n- base: I am SmolLM.\n- tuned: I am Quokka." in text


def test_chart_is_a_png(tmp_path):
    path = bar_chart([BASE, TUNED], "Quokka", tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]


def test_card_section_is_appended_once_and_replaced_on_rerun():
    card = "# My model\n\nSome text.\n"
    first = replace_card_section(card, card_section(REPORT, "chart.png"))
    assert first.startswith(card.rstrip("\n") + "\n\n" + CARD_START)
    assert "![base versus tuned](chart.png)" in first
    again = replace_card_section(first, card_section(REPORT, "chart.png"))
    assert again == first
    assert again.count(CARD_START) == 1 and again.count(CARD_END) == 1


def test_replacing_keeps_what_follows_the_section():
    card = f"# M\n\n{CARD_START}\nold\n{CARD_END}\n\n## License\nApache-2.0\n"
    new = replace_card_section(card, f"{CARD_START}\nnew\n{CARD_END}\n")
    assert new == f"# M\n\n{CARD_START}\nnew\n{CARD_END}\n\n## License\nApache-2.0\n"


def test_updating_the_card_keeps_the_folder_verifiable(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("# card\n", encoding="utf-8")
    write_manifest(tmp_path, build_manifest(kind="gguf", stage="export", folder=tmp_path,
                                            files=["model.gguf", "README.md"]))
    (tmp_path / "chart.png").write_bytes(b"png")
    card = update_model_card(tmp_path, card_section(REPORT, "chart.png"), attachments=["chart.png"])
    assert "| metric | base | tuned | change |" in card.read_text(encoding="utf-8")
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert verify_files(tmp_path, manifest) == []
    assert sorted(f["name"] for f in manifest["files"]) == ["README.md", "chart.png", "model.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_folder_without_a_card_is_left_alone(tmp_path):
    assert update_model_card(tmp_path, card_section(REPORT)) is None
    assert list(tmp_path.iterdir()) == []
