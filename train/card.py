"""What a finished run leaves for people: the model card, train_summary.json, loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

CARD_HYPERPARAMETERS = (
    "LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGET_MODULES", "LEARNING_RATE", "LR_SCHEDULER",
    "WARMUP_STEPS", "BATCH_SIZE", "GRAD_ACCUM", "OPTIMIZER", "MAX_STEPS", "NUM_EPOCHS", "MAX_SEQ_LENGTH", "SEED",
)


def loss_curves(log_history: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, eval)`` as ``(step, loss)`` pairs from the trainer's log history."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evaluation = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evaluation


def final_train_loss(log_history: Sequence[dict[str, Any]]) -> float | None:
    """The last train loss the trainer logged: the last step's ``loss``, else the run's mean ``train_loss``.

    A run shorter than LOGGING_STEPS logs no step loss; the trainer's closing entry still holds ``train_loss``.
    """
    steps = [float(e["loss"]) for e in log_history if "loss" in e]
    if steps:
        return steps[-1]
    closing = [float(e["train_loss"]) for e in log_history if "train_loss" in e]
    return closing[-1] if closing else None


def moving_average(values: Sequence[float], window: int) -> float:
    tail = list(values)[-window:]
    return sum(tail) / len(tail)


def plot_losses(train: Sequence[tuple[int, float]], evaluation: Sequence[tuple[int, float]], path: Path,
                best_step: int | None = None) -> Path:
    """loss.png: train and eval loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loraship.atomic import write_png

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evaluation:
        ax.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_png(path, fig)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return repr(value)
    return json.dumps(str(value))  # JSON strings are valid YAML strings


def model_card(summary: dict[str, Any], *, dataset_is_hub: bool) -> str:
    """README.md for the adapter: YAML metadata the Hub indexes, then what was done and measured.

    It is pushed as it is: the base and dataset appear by Hub id or file name, never by a local path.
    """
    from loraship.embedded import EMBEDDED
    from loraship.public import public_name

    settings = summary["settings"]
    base = public_name(summary["base_model"])
    dataset = settings["DATASET"] if dataset_is_hub else public_name(settings["DATASET"])
    embedded = " (loraship's embedded copy, dequantized from its Q4_1 GGUF)" if summary["base_model"] == EMBEDDED else ""
    loss = summary["final_train_loss"]
    front = ["---", "library_name: peft", "pipeline_tag: text-generation", "tags:", "  - lora", "  - loraship"]
    if summary["load_in_4bit"]:
        front.append("  - qlora")
    if summary.get("base_model_hub_id"):
        front.append(f"base_model: {_yaml_scalar(summary['base_model_hub_id'])}")
    if dataset_is_hub:
        front += ["datasets:", f"  - {_yaml_scalar(settings['DATASET'])}"]
    front.append("hyperparameters:")
    for key in CARD_HYPERPARAMETERS:
        value = summary["optimizer"] if key == "OPTIMIZER" else settings.get(key)
        if isinstance(value, list):
            value = ",".join(value)
        if value is not None:
            front.append(f"  {key.lower()}: {_yaml_scalar(value)}")
    front.append(f"  load_in_4bit: {_yaml_scalar(summary['load_in_4bit'])}")
    if summary.get("best_eval_loss") is not None:
        dataset_name = dataset
        front += [
            "model-index:",
            f"  - name: {_yaml_scalar(summary.get('hub_repo') or 'loraship-adapter')}",
            "    results:",
            "      - task: {type: text-generation}",
            f"        dataset: {{name: {_yaml_scalar(dataset_name)}, type: {_yaml_scalar(dataset_name)}}}",
            "        metrics:",
            f"          - {{type: loss, name: eval loss, value: {summary['best_eval_loss']:.4f}}}",
        ]
    front.append("---")

    rows = "\n".join(
        f"| `{k}` | `{summary['optimizer'] if k == 'OPTIMIZER' else settings.get(k)}` |" for k in CARD_HYPERPARAMETERS
    )
    eval_line = (
        f"Best eval loss **{summary['best_eval_loss']:.4f}** at step {summary['best_step']} "
        f"(this adapter is that checkpoint)." if summary.get("best_eval_loss") is not None
        else "No eval split: this adapter is the last step's."
    )
    body = f"""
# LoRA adapter for {summary.get('base_model_hub_id') or base}

Trained with loraship's `python -m train`: supervised fine-tuning with
{'QLoRA (4-bit NF4 base, double quantization)' if summary['load_in_4bit'] else 'LoRA on a full-precision base'},
loss on {'assistant tokens only' if settings.get('ASSISTANT_ONLY_LOSS') else 'every token'}.

- Base model: `{base}`{embedded}
- Dataset: `{dataset}` ({summary['data']['format']} format), {summary['data']['train_rows']} train rows,
  {summary['data']['eval_rows']} eval rows, {summary['data']['train_tokens']} train tokens
- Steps: {summary['global_step']}, runtime {summary['runtime_s']:.0f} s on {summary['device']}
- Final train loss: {f'{loss:.4f}' if loss is not None else 'n/a (the trainer logged none)'}
- {eval_line}

| setting | value |
|---|---|
{rows}

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained("{summary.get('hub_repo') or 'PATH_OR_REPO'}")
tokenizer = AutoTokenizer.from_pretrained("{summary.get('hub_repo') or 'PATH_OR_REPO'}")  # the training chat template
```

`manifest.json` lists the inputs, settings (no secrets), library versions and the sha256 of every file.
"""
    return "\n".join(front) + "\n" + body
