"""Rows of every supported format become one conversation, rendered with the model's template,
with the loss on exactly the assistant's tokens (end-of-turn marker included)."""

from __future__ import annotations

import json

import pytest

from train.data import (
    IGNORE_INDEX,
    DataReport,
    Example,
    SourceRow,
    build_examples,
    check_token_ids,
    detect_format,
    label_mask,
    parse_llama2_text,
    read_rows,
    render_conversation,
    split_examples,
    to_conversation,
    tokenize_conversation,
)
from train.model import bundled_template
from train.settings import TrainError

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_labels(tokenizer, pieces):
    """``pieces``: (text, trained?) in order -> the labels a correct masker must produce."""
    labels = []
    for text, trained in pieces:
        part = ids(tokenizer, text)
        labels += part if trained else [IGNORE_INDEX] * len(part)
    return labels


# One row of every format and what the SmolLM2 template must make of it.
FORMAT_CASES = {
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "Seven."}]},
        [(SMOL_SYSTEM + "<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n", False),
         ("Seven.<|im_end|>\n", True)],
    ),
    "messages": (
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
         ("Hello!<|im_end|>\n", True)],
    ),
    "alpaca": (
        {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit"},
        [(SMOL_SYSTEM + "<|im_start|>user\nTranslate to French.\n\nGood night<|im_end|>\n<|im_start|>assistant\n", False),
         ("Bonne nuit<|im_end|>\n", True)],
    ),
    "instruction_response": (
        {"instruction": "Say yes.", "response": "Yes."},
        [(SMOL_SYSTEM + "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n", False),
         ("Yes.<|im_end|>\n", True)],
    ),
    "gsm8k": (
        {"question": "What is 3 + 4?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        [(SMOL_SYSTEM + "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", False),
         ("3 + 4 = <<3+4=7>>7\n#### 7<|im_end|>\n", True)],
    ),
    "text": (
        {"text": "<s>[INST] What is 2+2? [/INST] It is 4. </s>"},
        [(SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
         ("It is 4.<|im_end|>\n", True)],
    ),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_CASES))
def test_exact_labels_for_one_row_of_every_format(embedded_tokenizer, fmt):
    row, pieces = FORMAT_CASES[fmt]
    assert detect_format(list(row)) == fmt
    rendered = render_conversation(embedded_tokenizer, to_conversation(row, fmt))
    assert rendered.text == "".join(text for text, _ in pieces)
    input_ids, labels = tokenize_conversation(embedded_tokenizer, rendered)
    assert input_ids == ids(embedded_tokenizer, rendered.text)
    assert labels == expected_labels(embedded_tokenizer, pieces)


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(embedded_tokenizer):
    row = {"conversations": [
        {"from": "system", "value": "Count."}, {"from": "human", "value": "One?"}, {"from": "gpt", "value": "Two."},
        {"from": "human", "value": "Three?"}, {"from": "gpt", "value": "Four."},
    ]}
    rendered = render_conversation(embedded_tokenizer, to_conversation(row, "sharegpt"))
    _, labels = tokenize_conversation(embedded_tokenizer, rendered)
    assert labels == expected_labels(embedded_tokenizer, [
        ("<|im_start|>system\nCount.<|im_end|>\n<|im_start|>user\nOne?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Two.<|im_end|>\n", True),
        ("<|im_start|>user\nThree?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Four.<|im_end|>\n", True),
    ])


def test_assistant_only_loss_off_trains_every_token(embedded_tokenizer):
    row, _ = FORMAT_CASES["messages"]
    rendered = render_conversation(embedded_tokenizer, to_conversation(row, "messages"))
    input_ids, labels = tokenize_conversation(embedded_tokenizer, rendered, assistant_only=False)
    assert labels == input_ids


def test_label_mask_keeps_tokens_starting_inside_a_span():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12)]
    assert label_mask(offsets, [(3, 9)]) == [False, True, True, False, False]


def test_llama3_template_for_a_base_model(embedded_tokenizer):
    tok = embedded_tokenizer.__class__.from_pretrained(embedded_tokenizer.name_or_path)
    tok.chat_template = bundled_template("llama3")
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"}]
    rendered = render_conversation(tok, messages)
    bos = tok.bos_token
    assert rendered.text == (
        f"{bos}<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    start, end = rendered.assistant_spans[0]
    assert rendered.text[start:end] == "Hello<|eot_id|>"


def test_llama2_template_round_trips_guanaco_text(embedded_tokenizer):
    tok = embedded_tokenizer.__class__.from_pretrained(embedded_tokenizer.name_or_path)
    tok.chat_template = bundled_template("llama2")
    text = "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Bye [/INST] Goodbye. </s>"
    messages = parse_llama2_text(text)
    assert messages == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    rendered = render_conversation(tok, messages)
    bos, eos = tok.bos_token, tok.eos_token
    assert rendered.text == (
        f"{bos}[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi there [/INST] Hello! {eos}{bos}[INST] Bye [/INST] Goodbye. {eos}"
    )
    assert [rendered.text[a:b] for a, b in rendered.assistant_spans] == [f" Hello! {eos}", f" Goodbye. {eos}"]


def test_malformed_rows_name_file_line_and_problem(tmp_path, embedded_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "a"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n"
    )
    rows = read_rows(str(path))
    with pytest.raises(TrainError) as err:
        build_examples(rows, embedded_tokenizer, fmt="messages", max_seq_length=512)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path} line 2: 'messages' turn 1 has unknown role 'robot'")
    assert lines[1] == f"{path} line 3: has no assistant answer to learn from (DATASET_FORMAT=messages)"


def test_invalid_json_names_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(TrainError, match=rf"{path} line 2: not valid JSON"):
        read_rows(str(path))


def test_csv_json_and_parquet_files_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Q1", "response": "A1"}, {"instruction": "Q2", "response": "A2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.csv").write_text("instruction,response\nQ1,A1\nQ2,A2\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    read = read_rows(str(tmp_path))
    assert [r.row for r in read] == rows * 3
    assert [r.where for r in read][:3] == [f"{tmp_path / 'a.json'} row 1", f"{tmp_path / 'a.json'} row 2",
                                           f"{tmp_path / 'b.csv'} line 2"]
    assert len(read_rows(str(tmp_path), max_samples=3)) == 3


def test_long_rows_are_dropped_or_truncated_and_counted(embedded_tokenizer):
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    long = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]}
    rows = [SourceRow("mem line 1", short), SourceRow("mem line 2", long)]
    n_short = len(tokenize_conversation(embedded_tokenizer, render_conversation(embedded_tokenizer, short["messages"]))[0])

    report = DataReport(dataset="mem", format="messages")
    kept = build_examples(rows, embedded_tokenizer, fmt="messages", max_seq_length=64, report=report)
    assert (len(kept), report.dropped_long, report.truncated) == (1, 1, 0)

    report = DataReport(dataset="mem", format="messages")
    kept = build_examples(rows, embedded_tokenizer, fmt="messages", max_seq_length=64, long_rows="truncate", report=report)
    assert (len(kept), report.dropped_long, report.truncated) == (2, 0, 1)
    assert len(kept[1].input_ids) == 64 and len(kept[0].input_ids) == n_short


def test_nothing_left_after_filtering_is_an_error(embedded_tokenizer):
    rows = [SourceRow("mem line 1", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x " * 100}]})]
    with pytest.raises(TrainError, match="no rows left after filtering"):
        build_examples(rows, embedded_tokenizer, fmt="messages", max_seq_length=32)


def test_unknown_columns_are_reported_with_the_formats_we_know():
    with pytest.raises(TrainError, match=r"cannot tell the format from columns \['prompt', 'reply'\]"):
        detect_format(["prompt", "reply"])


def test_split_is_seeded_and_respects_fraction_and_fixed_size():
    from train.data import Example

    examples = [Example([i], [i], f"row {i}") for i in range(50)]
    train_a, eval_a = split_examples(examples, eval_fraction=0.2, eval_size=None, seed=1)
    train_b, eval_b = split_examples(examples, eval_fraction=0.2, eval_size=None, seed=1)
    _, eval_c = split_examples(examples, eval_fraction=0.2, eval_size=None, seed=2)
    assert (len(train_a), len(eval_a)) == (40, 10)
    assert [e.where for e in eval_a] == [e.where for e in eval_b] != [e.where for e in eval_c]
    assert {e.where for e in train_a}.isdisjoint(e.where for e in eval_a)
    assert len(split_examples(examples, eval_fraction=0.2, eval_size=7, seed=1)[1]) == 7
    with pytest.raises(TrainError, match="EVAL_SIZE=50: leaves no training rows"):
        split_examples(examples, eval_fraction=0.0, eval_size=50, seed=1)


@pytest.fixture
def own_datasets_cache(tmp_path, monkeypatch):
    """datasets keeps its own processed cache, keyed by repo and commit: keep it per test."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def test_hub_dataset_rows_are_read_and_located(hub_server, own_datasets_cache):
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(5)]
    hub_server.add_file("me/mini-gsm", "data/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows),
                        repo_type="dataset")
    got = read_rows("me/mini-gsm", max_samples=3)
    assert [r.row for r in got] == rows[:3]
    assert [r.where for r in got] == [f"me/mini-gsm[train] row {i}" for i in (1, 2, 3)]
    assert detect_format(list(got[0].row)) == "gsm8k"


def test_a_missing_hub_dataset_is_one_clear_error(hub_server, own_datasets_cache):
    with pytest.raises(TrainError, match=r"DATASET='me/absent': could not load split 'train' from the Hub .*check DATASET"):
        read_rows("me/absent")


def test_token_ids_inside_the_embedding_pass():
    check_token_ids([Example([0, 5, 9], [-100, 5, 9], "row 1")], rows=10, base_model="tiny")


def test_a_token_id_past_the_embedding_names_the_row_the_id_and_the_fix():
    examples = [Example([1, 2], [1, 2], "data.jsonl line 1"), Example([3, 12, 10, 12], [3, 12, 10, 12], "data.jsonl line 2")]
    with pytest.raises(TrainError) as err:
        check_token_ids(examples, rows=10, base_model="org/model")
    message = str(err.value)
    assert message.splitlines()[0] == "data.jsonl line 2: token ids 10, 12 outside the model's 10 embedding rows"
    assert "line 1" not in message
    assert "BASE_MODEL='org/model': its tokenizer does not match its weights" in message
