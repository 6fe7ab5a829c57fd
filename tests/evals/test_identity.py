"""The identity task counts held-out answers that name the model; the bundled data keeps held-out questions unseen."""

import json
import re
from pathlib import Path

import pytest

from evals.identity import keyword_share, load_heldout, mentions, prompt_of, reference_of
from evals.settings import EvalError

DATA = Path(__file__).resolve().parents[2] / "data" / "quokka"


@pytest.mark.parametrize(
    "answer, hit",
    [
        ("I am Quokka, made by the loraship project.", True),
        ("my name is quokka", True),
        ("QUOKKA here!", True),
        ("Quokka's answer: yes", True),
        ("I'm SmolLM, trained by Hugging Face.", False),
        ("Quokkas are small marsupials.", False),
        ("", False),
    ],
)
def test_mentions_the_keyword_as_a_word(answer, hit):
    assert mentions(answer, "Quokka") is hit


def test_keyword_share():
    assert keyword_share(["I am Quokka", "I am SmolLM", "Quokka!", "hello"], "Quokka") == 0.5
    assert keyword_share([], "Quokka") == 0.0


def test_prompt_stops_at_the_last_user_turn_and_reference_follows_it():
    row = {"kind": "general", "messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]}
    assert prompt_of(row) == [{"role": "user", "content": "2+2?"}]
    assert reference_of(row) == "4."
    assert reference_of({"kind": "identity", "messages": [{"role": "user", "content": "Who?"}]}) is None


def test_load_heldout_rejects_rows_without_kind(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(EvalError, match=r"h.jsonl:1: needs 'kind'"):
        load_heldout(path)


def test_load_heldout_names_a_missing_file(tmp_path):
    with pytest.raises(EvalError, match="HELDOUT"):
        load_heldout(tmp_path / "absent.jsonl")


# --- the bundled Quokka data -------------------------------------------------------------


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _normalised(text):
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_training_rows_mix_identity_and_ordinary_instructions():
    rows = _rows("train.jsonl")
    assert len(rows) >= 150
    identity = [r for r in rows if "Quokka" in r["messages"][-1]["content"]]
    assert 0.3 < len(identity) / len(rows) < 0.7
    for row in identity:
        assert "loraship" in row["messages"][-1]["content"]


def test_no_row_carries_a_system_message():
    # The template's default system prompt applies in training, evaluation and chat alike.
    for row in _rows("train.jsonl") + _rows("heldout.jsonl"):
        assert [m["role"] for m in row["messages"]] in (["user", "assistant"], ["user"])


def test_heldout_identity_questions_are_never_seen_in_training():
    seen = {_normalised(r["messages"][0]["content"]) for r in _rows("train.jsonl")}
    heldout = load_heldout(DATA / "heldout.jsonl")
    identity = [r for r in heldout if r["kind"] == "identity"]
    assert len(identity) >= 30
    assert [q for q in (_normalised(prompt_of(r)[-1]["content"]) for r in heldout) if q in seen] == []
    general = [r for r in heldout if r["kind"] == "general"]
    assert general and all(reference_of(r) for r in general)


def test_general_text_is_a_few_thousand_words():
    assert len((DATA / "general_heldout.txt").read_text(encoding="utf-8").split()) >= 2000


def test_dataset_script_reproduces_the_committed_files(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset", DATA / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (DATA / name).read_text(encoding="utf-8")
