"""The SFT trainer ``python -m train`` runs: trl's SFTTrainer, without making the CPU wait for the GPU every step.

trl reads each micro-batch's metrics (entropy, token accuracy, token count) back to the CPU as it
computes the loss, and the Trainer reads back the loss (to keep NaN out of its log) and the token
count. Each read makes the CPU wait until the GPU has finished all it was given; the GPU then idles
until the CPU has queued the next work. Profiled on the 8B shape at 2 x 1024 with CUDA graphs
(docs/benchmarks.md, "Session 8"): 19 waits a step, and the GPU busy for 189 of the step's 231 ms.

Here the metrics stay on the GPU until a log line needs them (one read per LOGGING_STEPS), and the
token counts come from the batch's shape on the CPU. The loss is trl's, computed the same way
(tests/train/test_trainer.py pins it against trl's own). Whatever this does not cover
(several processes, label smoothing, a custom loss, padded batches) runs trl's own code.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from trl import SFTTrainer

from train.data import REAL_TOKENS, real_tokens


class Trainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: Per mode ("train"/"eval"): metric name -> one GPU scalar per micro-batch, not yet read back.
        self._unread: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}

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
        inputs = {key: value for key, value in inputs.items() if key != REAL_TOKENS}
        if return_outputs or self._runs_trls_own(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
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
