"""The quality ladder's metrics, pinned on hand-made logits, and the NF4 merge base against bitsandbytes itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.fixtures.adapters import make_adapter

from export.ladder import FULL_PRECISION, LadderError, Limits, RungScore, TextScore, build_heldout_eval_set, check_rung
from export.metrics import kl_divergence, log_softmax, score_windows, top1_matches


def test_kl_divergence_of_hand_made_distributions():
    # p = (1/4, 3/4), q = (1/2, 1/2): KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2).
    p = log_softmax([[0.0, math.log(3.0)]])
    q = log_softmax([[5.0, 5.0]])
    assert kl_divergence(p, q)[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-15)
    assert kl_divergence(q, q)[0] == 0.0


def test_kl_ignores_tokens_the_reference_gives_zero_probability():
    p = np.array([[0.0, -np.inf]])  # all mass on token 0
    q = log_softmax([[0.0, 0.0]])
    assert kl_divergence(p, q)[0] == pytest.approx(math.log(2.0), abs=1e-15)


def test_top1_agreement_counts_rows_with_the_same_argmax():
    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    other = np.array([[0.0, 5.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert top1_matches(ref, other).tolist() == [True, False, True]


def test_score_windows_gives_nll_kl_and_agreement_over_the_tokenizer_vocab():
    # One window of 3 tokens: rows 0 and 1 predict tokens 1 and 0. Column 2 is vocabulary padding.
    windows, vocab = [[0, 1, 0]], 2
    ref_logits = np.array([[0.0, math.log(3.0), 50.0], [math.log(3.0), 0.0, 50.0], [9.0, 9.0, 9.0]])
    nll, kl, top1, reference = score_windows([ref_logits], windows, vocab, None)
    assert nll == pytest.approx(-math.log(0.75), abs=1e-12)  # both targets have p = 3/4
    assert (kl, top1) == (0.0, 1.0)
    assert reference.logp[0].dtype == np.float32 and reference.logp[0].shape == (2, 2)
    uniform = np.zeros((3, 3))
    nll, kl, top1, made = score_windows([uniform], windows, vocab, reference)
    assert made is None
    assert nll == pytest.approx(math.log(2.0), abs=1e-12)
    # Rung 1 is kept in float32: the KL is exact to float32 rounding (float16 would be off by 1e-4 here).
    assert kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-7)
    assert top1 == 0.5  # a uniform row's argmax is token 0; rung 1's were token 1, then token 0


def test_score_windows_scores_only_the_rows_it_is_given():
    # Rows 0 and 2 count (they predict tokens 1 and 1); row 1, whose logits would cost log(2), does not.
    windows, vocab = [[0, 1, 0, 1]], 2
    sure = [0.0, 50.0]
    logits = np.array([sure, [0.0, 0.0], sure, [9.0, 9.0]])
    nll, _, _, reference = score_windows([logits], windows, vocab, None, scored=[[0, 2]])
    assert nll == pytest.approx(0.0, abs=1e-12) and reference.logp[0].shape == (2, 2)
    nll, kl, top1, _ = score_windows([np.zeros((4, 2))], windows, vocab, reference, scored=[[0, 2]])
    assert (nll, top1) == (pytest.approx(math.log(2.0)), 0.0) and kl == pytest.approx(math.log(2.0), abs=1e-6)


def test_heldout_rows_are_scored_where_training_put_the_loss():
    rows = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, -100]),  # predictions of tokens 7 and 8: rows 1 and 2
            ([1, 2, 3], [-100, -100, -100]),  # nothing in the loss: left out
            ([4, 3, 2, 1], [-100, 3, 2, 1])]
    held = build_heldout_eval_set(rows, vocab=10, max_positions=4)
    assert held.windows == [[5, 6, 7, 8], [4, 3, 2]] and held.scored == [[1, 2], [0, 1]]
    assert held.positions == 4 and held.longest == 4
    assert build_heldout_eval_set(rows[1:2], vocab=10, max_positions=4) is None


def _score(rung, nll, kl, text="general"):
    return RungScore(rung=rung, what=f"{rung} model", parent=None, kind=FULL_PRECISION, seconds=0.0,
                     texts={text: TextScore(tokens=10, nll=nll, perplexity=math.exp(nll), kl=kl, top1=1.0)})


def test_a_rung_that_loses_more_than_allowed_is_named_with_its_numbers():
    limits = Limits(nll_rise=0.02, kl_rise=0.02, nll_setting="LADDER_MAX_NLL_RISE", kl_setting="LADDER_MAX_KL_RISE")
    check_rung(_score("merged", 2.01, 0.019), _score("adapter", 2.0, 0.0), limits)  # within both limits
    check_rung(_score("merged", 1.5, 0.0), _score("adapter", 2.0, 0.0), limits)  # a better NLL is no loss
    with pytest.raises(LadderError) as err:
        check_rung(_score("F16", 2.0, 0.05), _score("merged", 2.0, 0.01), limits)
    assert str(err.value).startswith(
        "quality ladder: rung 'F16' (F16 model) lost too much against 'merged': on the general text the KL from the "
        "trained model grew by 0.0400 nats/token (0.0100 -> 0.0500; allowed 0.02, LADDER_MAX_KL_RISE)."
    )
    with pytest.raises(LadderError, match=r"on the fine-tune's held-out rows the mean NLL rose by 0\.5000 nats/token "
                                          r"\(2\.0000 -> 2\.5000; allowed 0\.02"):
        check_rung(_score("merged", 2.5, 0.0, "heldout"), _score("adapter", 2.0, 0.0, "heldout"), limits)
    # Merged into another base than training's, the KL is the rounding the merge removes: only the NLL counts.
    check_rung(_score("merged", 1.9, 0.3), _score("adapter", 2.0, 0.0), limits, kl_limited=False)


def test_nf4_round_trip_equals_the_weights_bitsandbytes_loads(tiny_llama_dir, tmp_path):
    """The NF4 merge base is exactly what a 4-bit-loaded model computes with, module by module."""
    import bitsandbytes.functional as bnbf

    from export.ladder import trained_model
    from export.merge import nf4_round_trip
    from export.safetensors_stream import load_safetensors

    original = load_safetensors(tiny_llama_dir / "model.safetensors")
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", r=2)
    model, specs = trained_model(tiny_llama_dir, adapter, load_in_4bit=True)
    # bitsandbytes quantizes every linear layer of the decoder, never the embeddings or the (tied) lm_head.
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.split(".")[-2] for name in specs} == per_layer and len(specs) == 2 * 7
    assert {(s.blocksize, s.quant_type, s.double_quant) for s in specs.values()} == {(64, "nf4", True)}
    modules = dict(model.base_model.model.named_modules())
    for name, spec in specs.items():
        module = modules[name.removesuffix(".weight")]
        layer = getattr(module, "base_layer", module)
        loaded = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        ours = nf4_round_trip(original[name], spec)
        assert torch_equal(ours, loaded), name
        assert not torch_equal(ours, original[name].float()), name


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_kl_of_identical_distributions_is_exactly_zero_never_negative():
    import numpy as np

    from export.metrics import kl_divergence, log_softmax

    logp = log_softmax(np.random.default_rng(0).normal(size=(64, 49152)) * 3)
    # the same distribution computed along another path differs from logp only by rounding
    again = log_softmax(logp + 7.0)
    assert (kl_divergence(logp, again) >= 0).all() and kl_divergence(logp, logp).max() == 0.0


@pytest.mark.gpu
def test_on_a_gpu_machine_the_model_as_trained_is_scored_on_the_cpu_like_its_nf4_merge(tiny_llama_dir, tmp_path):
    """bitsandbytes would put a 4-bit model on the GPU; the ladder keeps it on the CPU, where CI measures it."""
    import torch
    from transformers import AutoModelForCausalLM

    from export.ladder import hf_logits, trained_model
    from export.merge import load_adapter, merge_into_folder

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", r=2)
    model, specs = trained_model(tiny_llama_dir, adapter, load_in_4bit=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    windows = [[1, 5, 9, 40, 77, 3], [2, 8, 30]]
    trained = list(hf_logits(model, windows))
    merged = AutoModelForCausalLM.from_pretrained(
        merge_into_folder(tiny_llama_dir, load_adapter(adapter), tmp_path / "merged", nf4=specs), dtype=torch.float32)
    for as_trained, as_merged, window in zip(trained, hf_logits(merged, windows), windows):
        assert as_trained.shape == as_merged.shape == (len(window), model.config.vocab_size)
        # The merge rounds base + adapter once to the stored dtype: the distributions agree to that rounding
        # (a random-init model's near-flat top tokens may swap, so only the KL is asked).
        assert float(kl_divergence(log_softmax(as_merged), log_softmax(as_trained)).max()) < 1e-5
