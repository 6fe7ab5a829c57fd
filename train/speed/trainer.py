"""The SFT trainer ``python -m train`` runs: trl's SFTTrainer, without making the CPU wait for the GPU every step.

Metrics stay on the GPU until a log line reads them all at once, token counts come from the batch's shape, and
the LM head gathers the positions it scores by index (:func:`score_label_positions`) instead of a boolean mask.
The loss is trl's (tests/train/test_trainer.py pins it); what this does not cover runs trl's own code.
docs/performance.md says why.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from trl import SFTTrainer

from train.speed import plain_head
from train.speed.packing import LABEL_POSITIONS, REAL_TOKENS, real_tokens


class Trainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: Per mode ("train"/"eval"): metric name -> one GPU scalar per micro-batch, not yet read back.
        self._unread: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        #: Whether the model's fused LM head takes the collator's label positions (:func:`score_label_positions`).
        self.scores_label_positions = score_label_positions(base)

    def _runs_trls_own(self, inputs) -> bool:
        """Whether this batch needs what trl's compute_loss does beyond the single-process, plain-NLL, packed case."""
        return (
            getattr(self, "compute_loss_func", None) is not None
            or getattr(self, "label_smoother", None) is not None
            or getattr(self, "aux_loss_enabled", False)
            or getattr(self.args, "loss_type", "nll") != "nll"
            or self.accelerator.num_processes > 1
            or "attention_mask" in inputs
            or "position_ids" not in inputs
            or not hasattr(self, "_metrics")
            or not hasattr(self, "_total_train_tokens")
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = real_tokens(inputs) if "input_ids" in inputs else None
        positions = inputs.get(LABEL_POSITIONS)
        inputs = {key: value for key, value in inputs.items() if key not in (REAL_TOKENS, LABEL_POSITIONS)}
        if return_outputs or self._runs_trls_own(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if positions is not None and self.scores_label_positions:
            outputs = model(**inputs, fused_lm_head=True, label_positions=positions)
            labelled = torch.as_tensor(positions.numel())  # a CPU count: no wait
        else:
            outputs = model(**inputs, fused_lm_head=True)
            labelled = outputs.label_mask.sum()
        # trl's loss: the summed negative log-likelihood over the step's label tokens (num_items_in_batch
        # when the Trainer counted them across the accumulation steps), never 0 / 0.
        count = labelled if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        with torch.no_grad():
            per_token = labelled.clamp(min=1)  # no label tokens: both metrics are 0, as trl logs them
            if outputs.entropy is not None:
                self._unread[mode]["entropy"].append(outputs.entropy.detach().sum() / per_token)
            if outputs.is_top1 is not None:
                self._unread[mode]["mean_token_accuracy"].append(outputs.is_top1.sum() / per_token)
        if mode == "train":
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def log(self, logs, *args, **kwargs):
        self.read_metrics("train" if self.model.training else "eval")
        return super().log(logs, *args, **kwargs)

    def read_metrics(self, mode: str) -> None:
        """Move ``mode``'s metrics from the GPU into trl's lists, with one read for all of them."""
        unread = self._unread[mode]
        if not any(unread.values()):
            return
        values = iter(torch.stack([value.float() for values in unread.values() for value in values]).tolist())
        for name, scalars in unread.items():
            self._metrics[mode][name].extend(next(values) for _ in scalars)
        unread.clear()

    def _track_num_input_tokens(self, inputs):
        """transformers' count of tokens seen, from the batch's shape (and without a bucket's filler)."""
        if self.args.include_num_input_tokens_seen == "all" and self.accelerator.num_processes == 1 \
                and "input_ids" in inputs:
            self.state.num_input_tokens_seen += real_tokens(inputs)
            return None
        return super()._track_num_input_tokens(inputs)


def score_label_positions(causal_lm) -> bool:
    """Let ``causal_lm``'s fused LM head (trl's ``add_fused_lm_head``) take ``label_positions``; whether it now does.

    Given them (flat indices over the batch's rows x length, ``packing.label_positions``), the forward runs the
    backbone as trl's does, gathers the scored hidden states and their next-token labels by index, and scores
    them with trl's ``ChunkedLogProbFunction`` as trl does: the same per-token log-probabilities, entropies and
    top-1 hits, compact (one per position), without the boolean mask. Without them, trl's forward runs. Only
    for :data:`train.speed.PLAIN_HEAD_FAMILIES` with trl's kernel importable; otherwise nothing changes.
    """
    if not plain_head(causal_lm.config):
        return False
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return False
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocab_tile
    except ImportError:
        vocab_tile = 32768
    fused = causal_lm.forward
    if not getattr(fused, "__wrapped__", None):  # not trl's fused forward: leave it alone
        return False

    @functools.wraps(fused)
    def forward(*args, label_positions=None, fused_lm_head=False, labels=None, **kwargs):
        if label_positions is None or not fused_lm_head or args or labels is None or "shift_labels" in kwargs:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = causal_lm.base_model(**kwargs).last_hidden_state
        head = causal_lm.get_output_embeddings()
        positions = label_positions.to(head.weight.device)
        scored = hidden.to(head.weight.device).reshape(-1, hidden.shape[-1]).index_select(0, positions)
        targets = labels.to(head.weight.device).reshape(-1).index_select(0, positions + 1)
        log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
            scored, head.weight, head.bias, targets, 1.0, vocab_tile, None, 1.0, ("entropy", "is_top1"))
        return FusedCausalLMOutput(log_probs=log_probs, entropy=entropy, is_top1=is_top1)

    causal_lm.forward = forward
    return True
