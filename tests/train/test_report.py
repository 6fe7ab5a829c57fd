"""The dataset report: exact counts, the loss-token share, the length histogram, the end-of-turn check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraship.envsettings import settings_rows
from train.data import IGNORE_INDEX, Example, check_end_of_turn, end_of_turn_token, prepare_data
from train.report import write_data_report
from train.settings import TrainError, TrainSettings

REPO = Path(__file__).resolve().parents[2]
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SECRET = "hf_report_never_shows_this"
MAX_LEN = 64


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# Two plain rows, one whose answer runs past MAX_LEN, one whose question alone does.
ROWS = [
    chat(("user", "Hi"), ("assistant", "Hello there.")),
    chat(("system", "Be brief."), ("user", "Name a prime."), ("assistant", "Seven.")),
    chat(("user", "Count words."), ("assistant", "word " * 100)),
    chat(("user", "word " * 100), ("assistant", "Done.")),
]


@pytest.fixture
def rows_file(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def report_for(tokenizer, rows_file, **overrides):
    settings = TrainSettings(dataset=str(rows_file), max_seq_length=MAX_LEN, eval_fraction=0, best_by_eval=False,
                             hf_token=SECRET, **overrides)
    return settings, prepare_data(settings, tokenizer)[2]


def test_truncate_mode_counts_and_loss_share_are_exact(embedded_tokenizer, rows_file):
    tok = embedded_tokenizer
    _, report = report_for(tok, rows_file, long_rows="truncate")
    # By hand: prompt and answer pieces of each kept row, as the SmolLM2 template renders them.
    prompt_1 = SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    answer_1 = "Hello there.<|im_end|>\n"
    prompt_2 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n"
    answer_2 = "Seven.<|im_end|>\n"
    prompt_3 = SMOL_SYSTEM + "<|im_start|>user\nCount words.<|im_end|>\n<|im_start|>assistant\n"
    lengths = [n_tokens(tok, prompt_1 + answer_1), n_tokens(tok, prompt_2 + answer_2), MAX_LEN]
    in_loss = [n_tokens(tok, answer_1), n_tokens(tok, answer_2), MAX_LEN - n_tokens(tok, prompt_3)]

    assert (report.rows, report.kept, report.dropped_long, report.truncated, report.dropped_no_loss) == (4, 3, 0, 1, 1)
    assert (report.train_rows, report.eval_rows) == (3, 0)
    assert report.train_tokens == sum(lengths) and report.train_loss_tokens == sum(in_loss)
    assert report.loss_token_share == sum(in_loss) / sum(lengths)
    assert report.longest == MAX_LEN
    # The truncated row lost its end-of-turn token by design: the other two were checked.
    assert (report.end_of_turn_token, report.end_of_turn_checked) == ("<|im_end|>", 2)
    edges = report.length_histogram["bin_edges"]
    assert edges == [0, 6, 12, 19, 25, 32, 38, 44, 51, 57, 64]
    expected = [sum(1 for n in lengths if lo < n <= hi) for lo, hi in zip(edges, edges[1:])]
    assert report.length_histogram["counts"] == expected and expected[-1] == 1


def test_drop_mode_counts_the_long_rows_as_dropped(embedded_tokenizer, rows_file):
    _, report = report_for(embedded_tokenizer, rows_file, long_rows="drop")
    assert (report.rows, report.kept, report.dropped_long, report.truncated, report.dropped_no_loss) == (4, 2, 2, 0, 0)
    assert report.end_of_turn_checked == 2 and sum(report.length_histogram["counts"]) == 2


def test_report_files_hold_the_counts_settings_and_histogram_but_no_secret(embedded_tokenizer, rows_file, tmp_path):
    settings, report = report_for(embedded_tokenizer, rows_file, long_rows="truncate")
    from loraship.envsettings import public_settings

    text = write_data_report(tmp_path / "out", report, public_settings(settings))
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert (saved["rows"], saved["truncated"], saved["dropped_no_loss"]) == (4, 1, 1)
    assert saved["settings"]["MAX_SEQ_LENGTH"] == MAX_LEN and "HF_TOKEN" not in saved["settings"]
    assert (tmp_path / "out" / "data_report.txt").read_text() == text
    assert f"{report.train_loss_tokens} of them in the loss ({report.loss_token_share:.1%})" in text
    assert "58-64 tokens | " in text and "LONG_ROWS=truncate" in text
    assert (tmp_path / "out" / "data_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in (tmp_path / "out").iterdir():
        assert SECRET.encode() not in path.read_bytes()


NO_END_OF_TURN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] != 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_drops_the_end_of_turn_token_is_refused_in_one_line_before_any_row_is_read(
        embedded_tokenizer, tmp_path):
    tok = embedded_tokenizer.__class__.from_pretrained(embedded_tokenizer.name_or_path)
    tok.chat_template = NO_END_OF_TURN
    assert end_of_turn_token(tok) is None
    with pytest.raises(TrainError) as err:
        report_for(tok, tmp_path / "never-read.jsonl", long_rows="drop")
    assert str(err.value) == (
        "BASE_MODEL='auto': its chat template ends an assistant answer without a special token (after it: ''; "
        "EOS is '<|im_end|>'), so a model trained on it never learns to stop; give the template an end-of-turn "
        "token (chat_template in tokenizer_config.json), or CHAT_TEMPLATE for a base without one")


def test_a_masked_end_of_turn_token_is_refused(embedded_tokenizer):
    tok = embedded_tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n", add_special_tokens=False)["input_ids"]
    answer_start = len(ids) - 3  # "Yo", "<|im_end|>", "\n"
    labels = [IGNORE_INDEX] * answer_start + [ids[answer_start], IGNORE_INDEX, IGNORE_INDEX]
    assert ids[answer_start + 1] == eot
    with pytest.raises(TrainError, match=r"^mem line 9: the end-of-turn token '<\|im_end\|>' is masked \(label -100\)"):
        check_end_of_turn([Example(ids, labels, "mem line 9")], tok)
    labels[answer_start + 1] = eot
    assert check_end_of_turn([Example(ids, labels, "mem line 9")], tok) == ("<|im_end|>", 1)


def test_dry_run_prints_the_report_writes_it_and_stops(tiny_llama_dir, rows_file, tmp_path, monkeypatch):
    from train.__main__ import main

    for var, *_ in settings_rows(TrainSettings):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    env = {"BASE_MODEL": str(tiny_llama_dir), "DATASET": str(rows_file), "OUTPUT_DIR": str(out),
           "MAX_SEQ_LENGTH": str(MAX_LEN), "LONG_ROWS": "truncate", "EVAL_FRACTION": "0", "BEST_BY_EVAL": "false",
           "HF_TOKEN": SECRET}
    result = CliRunner().invoke(main, ["--dry-run", "--env-file", str(tmp_path / "none.env")], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "data: 4 rows read from" in result.output and "kept 3" in result.output
    assert f"  MAX_SEQ_LENGTH={MAX_LEN}" in result.output and SECRET not in result.output
    assert result.output.rstrip().endswith("dry run: stopping before the model is loaded")
    assert {p.name for p in out.iterdir()} == {"data_report.json", "data_report.txt", "data_report.png"}
