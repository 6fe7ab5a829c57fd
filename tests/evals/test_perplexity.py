"""Perplexity: exp of the mean NLL over predicted tokens, the same for HF folders and GGUFs."""

import math

import numpy as np
import pytest

from evals.perplexity import (
    NllSum,
    capped_windows,
    gguf_nll,
    hf_nll,
    hf_perplexity,
    llama_token_nll,
    nll_from_logits,
    paired_ratio,
    read_paragraphs,
    token_nll_from_logits,
    token_windows,
)

TEXTS = [
    "The river runs past the old mill and into the lake.",
    "Bread rises because yeast turns sugar into gas, and the gas is trapped in the dough.",
]


def test_nll_from_logits_by_hand():
    # Row 0 predicts token 1 with p = 1/2; row 1 predicts token 0 with p = 1/(1+3).
    logits = np.array([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]])
    result = nll_from_logits(logits, [0, 1, 0])
    assert result.tokens == 2
    assert result.total == pytest.approx(math.log(2) + math.log(4))
    assert result.perplexity == pytest.approx(math.sqrt(8))


def test_nll_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
    assert nll_from_logits(logits, [0, 1]).total == pytest.approx(1000.0)


def test_windows_cover_every_token_and_drop_single_token_tails():
    assert token_windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert token_windows(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows([5], 4) == []


def test_token_nll_from_logits_gives_one_nll_per_predicted_token():
    logits = np.array([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]])
    assert token_nll_from_logits(logits, [0, 1, 0]) == pytest.approx([math.log(2), math.log(4)])


def test_capped_windows_stop_after_exactly_the_token_budget():
    texts = [list(range(10)), list(range(10, 15))]
    # 4-token windows predict 3 tokens each: 3 + 2 = 5, the second window cut short.
    assert capped_windows(texts, 4, max_tokens=5) == [[0, 1, 2, 3], [4, 5, 6]]
    # A budget larger than the texts takes every window of every text.
    assert capped_windows(texts, 4, max_tokens=100) == capped_windows(texts, 4) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert capped_windows(texts, 4, max_tokens=3) == [[0, 1, 2, 3]]


def test_paired_ratio_is_the_perplexity_ratio_with_an_interval_from_per_token_differences():
    reference = [1.0, 2.0, 3.0, 4.0]
    other = [1.1, 2.0, 3.2, 3.9]  # differences 0.1, 0.0, 0.2, -0.1: mean 0.05
    ratio, low, high = paired_ratio(reference, other)
    assert ratio == pytest.approx(math.exp(np.mean(other)) / math.exp(np.mean(reference)))
    half = 1.96 * np.std([0.1, 0.0, 0.2, -0.1], ddof=1) / 2
    assert (low, high) == pytest.approx((math.exp(0.05 - half), math.exp(0.05 + half)))
    with pytest.raises(ValueError, match="one token sequence"):
        paired_ratio(reference, other[:3])


def test_windows_need_room_to_predict():
    with pytest.raises(ValueError):
        token_windows([1, 2, 3], 1)


def test_nll_sum_adds_and_refuses_an_empty_mean():
    total = NllSum(2.0, 1) + NllSum(4.0, 3)
    assert (total.total, total.tokens, total.mean) == (6.0, 4, 1.5)
    with pytest.raises(ValueError):
        NllSum(0.0, 0).mean


N_CTXS = (512, 8)


@pytest.fixture(scope="module")
def reference_nll(tiny_llama_dir):
    """The same quantity computed independently with torch's cross-entropy, per window size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    sums = {}
    with torch.inference_mode():
        for n_ctx in N_CTXS:
            total, count = 0.0, 0
            for text in TEXTS:
                ids = tokenizer(text)["input_ids"]
                for start in range(0, len(ids), n_ctx):
                    window = torch.tensor([ids[start : start + n_ctx]])
                    if window.shape[1] < 2:
                        continue
                    logits = model(window).logits[0, :-1].double()
                    total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
                    count += window.shape[1] - 1
            sums[n_ctx] = (total, count)
    return sums


@pytest.mark.parametrize("n_ctx", N_CTXS)
def test_hf_perplexity_matches_a_torch_reference(tiny_llama_dir, reference_nll, n_ctx):
    expected_total, expected_count = reference_nll[n_ctx]
    result = hf_nll(tiny_llama_dir, TEXTS, n_ctx=n_ctx)
    assert result.tokens == expected_count
    assert result.total == pytest.approx(expected_total, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected_total / expected_count), rel=1e-5)


def test_a_random_model_is_about_as_perplexed_as_its_vocabulary(tiny_llama_dir, embedded_tokenizer):
    # A random-init model spreads its bets nearly evenly over 49,152 tokens.
    ppl = hf_perplexity(tiny_llama_dir, TEXTS)
    assert 0.5 * len(embedded_tokenizer) < ppl < 2 * len(embedded_tokenizer)


@pytest.mark.slow
def test_gguf_and_hf_agree_on_the_same_weights():
    # transformers dequantizes the embedded Q4_1 GGUF to fp32: both back ends
    # then hold the same weights, and llama.cpp's quantized arithmetic may
    # move the figure only slightly.
    from loraship.embedded import embedded_gguf_path, embedded_hf_folder

    gguf = gguf_nll(embedded_gguf_path(), TEXTS, n_ctx=64, n_threads=2)
    hf = hf_nll(embedded_hf_folder(), TEXTS, n_ctx=64)
    assert gguf.tokens == hf.tokens
    assert gguf.perplexity == pytest.approx(hf.perplexity, rel=0.03)
    assert 1.5 < gguf.perplexity < 200  # a trained model, not a random one


@pytest.mark.slow
def test_a_llama_instance_that_served_a_chat_scores_as_a_fresh_one():
    # The export's checks and its perplexity share one llama.cpp instance, with a
    # larger context than the windows: the per-token NLL must not notice.
    from llama_cpp import Llama

    from loraship.embedded import embedded_gguf_path

    fresh = gguf_nll(embedded_gguf_path(), TEXTS, n_ctx=16, n_threads=2)
    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
    try:
        llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
        shared = llama_token_nll(llm, TEXTS, 16)
        capped = llama_token_nll(llm, TEXTS, 16, max_tokens=7)
    finally:
        llm.close()
    assert len(shared) == fresh.tokens
    assert float(shared.sum()) == pytest.approx(fresh.total, rel=1e-6)
    assert list(capped) == pytest.approx(list(shared[:7]), rel=1e-6)


def test_read_paragraphs_splits_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("One line\ncontinues.\n\n\nTwo.\n\n", encoding="utf-8")
    assert read_paragraphs(path) == ["One line continues.", "Two."]
