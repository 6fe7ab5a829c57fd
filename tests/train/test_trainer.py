"""The trainer (``train/speed/trainer.py``): trl's loss and metrics, without reading them back from the device every step.

A tiny Llama on the CPU with LoRA and padding-free batches, as ``python -m train`` trains on CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest

from train import data, model, speed
from train.run import build_trainer
from train.settings import TrainSettings
from train.speed import compiled, packing

LENGTHS = (5, 9, 13, 7, 11, 6)


@pytest.fixture
def make_trainer(tmp_path, tiny_llama_dir, embedded_tokenizer):
    def make(levers=speed.SpeedLevers(packing=True), steps=1):
        settings = TrainSettings(base_model=str(tiny_llama_dir), output_dir=tmp_path / "out", max_steps=steps,
                                 lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=3, grad_accum=1, save_steps=100,
                                 logging_steps=1, gradient_checkpointing=False)
        plan = dataclasses.replace(model.plan_for(settings, cuda=False), levers=levers)
        uncompiled = dataclasses.replace(plan, levers=dataclasses.replace(levers, compile_mode=""))
        peft_model = model.load_for_training(str(tiny_llama_dir), uncompiled, settings)
        examples = [data.Example(list(range(3, 3 + n)), list(range(3, 3 + n)), f"row {i}")
                    for i, n in enumerate(LENGTHS)]
        return build_trainer(settings, plan, peft_model, embedded_tokenizer, examples, [], tmp_path / "ckpt", print)

    return make


def packed_batch(trainer, rows=(0, 1, 2)):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def test_the_loss_and_metrics_are_trls_own(make_trainer):
    from trl import SFTTrainer

    trainer = make_trainer()
    batch = packed_batch(trainer)
    theirs = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    expected = {name: trainer._metrics["train"][name][-1] for name in ("entropy", "mean_token_accuracy")}
    trainer._metrics["train"].clear()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    trainer.read_metrics("train")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for name, value in expected.items():
        assert trainer._metrics["train"][name] == [pytest.approx(value, rel=1e-6)]


@pytest.fixture
def compact_head(monkeypatch):
    """trl's fused head as it runs on CUDA: it scores only the labelled positions, picked with a boolean mask (on
    a CPU it scores every position instead)."""
    import trl.trainer.utils

    monkeypatch.setattr(trl.trainer.utils, "_use_triton", lambda device: True)


def test_with_label_positions_the_loss_gradients_and_metrics_are_still_trls_own(make_trainer, compact_head):
    """The collator's label positions (computed on the CPU) replace trl's boolean mask; nothing else changes."""
    import torch
    from trl import SFTTrainer

    trainer = make_trainer(levers=speed.SpeedLevers(packing=True, label_positions=True))
    assert trainer.scores_label_positions
    batch = packed_batch(trainer)
    assert packing.LABEL_POSITIONS in batch

    def adapter_grads():
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.model.zero_grad()
        return grads

    theirs = SFTTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items()
                                                               if k != packing.LABEL_POSITIONS})
    theirs.backward()
    their_grads = adapter_grads()
    expected = {name: trainer._metrics["train"][name][-1] for name in ("entropy", "mean_token_accuracy")}
    trainer._metrics["train"].clear()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    ours.backward()
    our_grads = adapter_grads()
    trainer.read_metrics("train")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for name, value in expected.items():
        assert trainer._metrics["train"][name] == [pytest.approx(value, rel=1e-6)]
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_with_label_positions_no_boolean_mask_indexes_a_tensor(make_trainer, compact_head, monkeypatch):
    """A boolean mask's indexing makes the CPU wait for the GPU (it must count the mask first): trl's head
    indexes the hidden states and the labels with one, and its backward pass does it again."""
    import torch

    masks = []
    for method in ("__getitem__", "masked_scatter"):
        original = getattr(torch.Tensor, method)

        def spy(self, index, *args, _original=original, **kwargs):
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                masks.append(index)
            return _original(self, index, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    for levers, expected in ((speed.SpeedLevers(packing=True), True),
                             (speed.SpeedLevers(packing=True, label_positions=True), False)):
        trainer = make_trainer(levers=levers)
        masks.clear()
        trainer.compute_loss(trainer.model, packed_batch(trainer)).backward()
        assert bool(masks) == expected


def test_a_head_with_scaled_or_capped_logits_keeps_trls_own_forward(make_trainer):
    from train.speed.trainer import score_label_positions

    trainer = make_trainer(levers=speed.SpeedLevers(packing=True, label_positions=True))
    base = trainer.model.get_base_model()
    base.config.final_logit_softcapping = 30.0
    before = base.forward
    assert not score_label_positions(base) and base.forward is before


def test_a_micro_batchs_metrics_are_not_read_back_from_the_device(make_trainer, monkeypatch):
    """Outside the decoder stack (which on CUDA runs as a compiled graph), nothing reads a tensor's value:
    not the loss, nor trl's entropy and token accuracy, nor the token count. A log line reads them."""
    import torch

    trainer = make_trainer()
    batch = packed_batch(trainer)
    stack, _ = compiled.decoder_stack(trainer.model)
    inside = []
    stack.register_forward_pre_hook(lambda *_: inside.append(True))
    stack.register_forward_hook(lambda *_: inside.pop() and None)

    def refusing(original):
        def read(self, *args, **kwargs):
            assert inside, "a tensor's value was read back during compute_loss"
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patched:
        for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patched.setattr(torch.Tensor, method, refusing(getattr(torch.Tensor, method)))
        trainer.compute_loss(trainer.model, dict(batch))
    assert not trainer._metrics["train"]["entropy"]  # still on the device
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["entropy"] > 0
    assert 0 <= trainer.state.log_history[-1]["mean_token_accuracy"] <= 1


def test_cuda_graphs_bucket_the_packed_rows(make_trainer):
    graphs = make_trainer(speed.SpeedLevers(packing=True, compile_mode="layers-cudagraphs"))
    assert graphs.data_collator.keywords["bucket"] is True
    assert make_trainer().data_collator.keywords["bucket"] is False


def test_tokens_seen_count_real_tokens_and_not_the_bucket_filler(make_trainer):
    trainer = make_trainer(speed.SpeedLevers(packing=True, compile_mode="layers-cudagraphs"), steps=2)
    assert packed_batch(trainer)["input_ids"].shape[1] == 64  # 27 real tokens, bucketed
    assert packed_batch(trainer, rows=(3, 4, 5))["input_ids"].shape[1] == 64  # 24
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(LENGTHS)
    assert trainer.state.log_history[-2]["num_tokens"] == sum(LENGTHS)
