"""Padding-free packing (``packing.collate_packed``): exact batch contents, and no attention across rows.

The proof runs the tiny Llama with the attention transformers picks by default (sdpa) and with
eager: the packed row's logits equal each row's logits run alone, and packing the same rows
without restarting the position ids (a plain concatenation) changes them, so the check would see
a leak.
"""

from __future__ import annotations

import pytest

from train.speed import packing

ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    {"input_ids": [10, 11, 12], "labels": [10, 11, 12]},
    {"input_ids": [13, 14, 15, 16], "labels": [-100, 14, -100, 16]},
]


def test_rows_become_one_row_with_restarting_positions_and_first_labels_masked():
    batch = packing.collate_packed(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    # Row 2's first label (10) would be predicted from row 1's last token: it leaves the loss.
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 11, 12, -100, 14, -100, 16]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: it would hide the packing


def test_rows_of_one_length_stay_separate_rows():
    """Nothing to unpad: a plain causal batch (which sdpa runs with its flash kernel), same positions and labels."""
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9, 10], "labels": [-100, 9, 10]}]
    batch = packing.collate_packed(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    # A row's first label is never a target (nothing precedes it); -100 keeps one rule for both forms.
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, 10]]


def test_packing_drops_only_each_rows_first_label():
    batch = packing.collate_packed(ROWS)
    trained_before = sum(label != -100 for row in ROWS for label in row["labels"][1:])
    assert int((batch["labels"] != -100).sum()) == trained_before == 7


def test_label_positions_list_where_the_head_scores_a_next_token_label():
    """Flat indices over rows x length of each position t whose label t + 1 is trained; label t + 1 follows it."""
    batch = packing.collate_packed(ROWS, positions=True)
    positions = batch[packing.LABEL_POSITIONS].tolist()
    assert positions == [1, 2, 3, 5, 6, 8, 10]
    assert [batch["labels"].view(-1)[p + 1].item() for p in positions] == [7, 8, 9, 11, 12, 14, 16]


def test_label_positions_of_separate_rows_count_across_rows():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9, 10], "labels": [8, -100, 10]}]
    batch = packing.collate_packed(rows, positions=True)
    assert batch[packing.LABEL_POSITIONS].tolist() == [0, 1, 4]  # row 2 starts at 3; its label 9 is masked


def test_a_bucket_filler_adds_no_label_position():
    assert packing.collate_packed(ROWS, bucket=True, positions=True)[packing.LABEL_POSITIONS].tolist() == [1, 2, 3, 5, 6, 8, 10]


def test_label_positions_of_a_batch_without_labels_are_empty():
    rows = [{"input_ids": [5, 6], "labels": [-100, -100]}, {"input_ids": [7], "labels": [-100]}]
    assert packing.collate_packed(rows, positions=True)[packing.LABEL_POSITIONS].tolist() == []


@pytest.fixture(scope="module")
def tiny_rows(embedded_tokenizer):
    texts = ["The quokka smiles at the sun.", "Two plus two is four, said the owl to the cat.", "Hello!"]
    return [{"input_ids": ids, "labels": list(ids)} for ids in (embedded_tokenizer(t)["input_ids"] for t in texts)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_token_attends_across_rows(tiny_llama_dir, tiny_rows, attention):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attention).eval()
    # As in training (load_for_training; trl passes it too): transformers reads packing from the
    # position ids only without a KV cache, so with one the rows would see each other.
    model.config.use_cache = False
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in tiny_rows]
        batch = packing.collate_packed(tiny_rows)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        concatenated = model(input_ids=batch["input_ids"]).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)
    # The same tokens without the restart attend across rows from the second row on.
    second = slice(len(tiny_rows[0]["input_ids"]), None)
    assert not torch.allclose(concatenated[second], torch.cat(alone[1:]), atol=1e-3)


def test_packed_loss_equals_the_mean_over_rows_run_alone(tiny_llama_dir, tiny_rows):
    """What the trainer optimizes is unchanged: the token-mean loss over the same label positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model.config.use_cache = False
    with torch.no_grad():
        batch = packing.collate_packed(tiny_rows)
        packed = model(**batch).loss
        sums, count = 0.0, 0
        for row in tiny_rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            sums += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += ids.shape[1] - 1
    torch.testing.assert_close(packed, sums / count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens, padded", [(1, 64), (64, 64), (65, 128), (513, 576), (1000, 1024), (1025, 1152), (2048, 2048),
                                            (2049, 2304), (3000, 3072), (8191, 8192), (9000, 9216)])
def test_bucket_lengths_are_eight_per_doubling(tokens, padded):
    assert packing.bucket_length(tokens) == padded


def test_bucket_padding_stays_under_an_eighth_and_a_run_meets_few_lengths():
    """From 512 tokens on; below that the lengths go in steps of 64."""
    lengths = {packing.bucket_length(n) for n in range(1024, 8193)}
    assert len(lengths) == 25  # 1024 itself, then 8 sizes in each of the three doublings
    assert all(packing.bucket_length(n) - n < n / 8 for n in range(512, 20000))


def test_a_bucketed_row_ends_in_a_filler_segment_with_no_labels():
    batch = packing.collate_packed(ROWS, bucket=True)  # 12 tokens -> 64
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    assert len(ids) == len(labels) == len(positions) == 64
    assert ids[:12] == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] and ids[12:] == [0] * 52
    assert labels[:12] == packing.collate_packed(ROWS)["labels"][0].tolist() and labels[12:] == [-100] * 52
    assert positions[12:] == list(range(52))  # its own segment: restarts at 0, attends only to itself
    assert batch[packing.REAL_TOKENS] == 12


def test_rows_of_one_length_are_not_bucketed():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9, 10], "labels": [8, 9, 10]}]
    batch = packing.collate_packed(rows, bucket=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 10]] and packing.REAL_TOKENS not in batch


def test_the_filler_changes_no_logit_and_no_loss(tiny_llama_dir, tiny_rows):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model.config.use_cache = False
    with torch.no_grad():
        plain = packing.collate_packed(tiny_rows)
        bucketed = packing.collate_packed(tiny_rows, bucket=True)
        real = bucketed.pop(packing.REAL_TOKENS)
        assert real == plain["input_ids"].shape[1] < bucketed["input_ids"].shape[1]
        unpadded, padded = model(**plain), model(**bucketed)
    torch.testing.assert_close(padded.logits[0, :real], unpadded.logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded.loss, unpadded.loss, rtol=1e-5, atol=1e-6)
