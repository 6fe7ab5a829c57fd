"""One of two CPU processes (gloo, started by torchrun) for tests/train/test_ddp.py: the trainer's DDP path with
packed batches, as ``python -m train`` runs it on several GPUs. Writes what it saw to OUT/rank-R.json.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/train/ddp_worker.py MODEL TOKENIZER OUT
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

#: Row lengths: all different, so a packed batch's position ids say which rows it holds.
LENGTHS = (5, 31, 9, 27, 13, 23, 7, 29, 11, 25, 6, 19)
BATCH_SIZE = 3
SEED = 3


def make_trainer(model_dir: str, tokenizer, out: Path, steps: int):
    from train import data, model, speed
    from train.run import build_trainer
    from train.settings import TrainSettings

    settings = TrainSettings(base_model=model_dir, output_dir=out / "run", max_steps=steps, lora_r=4, lora_alpha=8,
                             lora_dropout=0.0, batch_size=BATCH_SIZE, grad_accum=1, save_steps=100, logging_steps=1,
                             seed=SEED)
    plan = dataclasses.replace(model.plan_for(settings, cuda=False, processes=2),
                               levers=speed.SpeedLevers(packing=True))
    base = model.load_base_model(model_dir, plan, gradient_checkpointing=False)
    examples = [data.Example(list(range(3, 3 + n)), list(range(3, 3 + n)), f"row {i}") for i, n in enumerate(LENGTHS)]
    return build_trainer(settings, plan, model.add_lora(base, settings), tokenizer, examples, [], out / "ckpt",
                         lambda _: None)


def row_lengths(batch) -> list[int]:
    """The rows a packed batch holds, by length (each row's position ids start again at 0)."""
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return sorted(b - a for a, b in zip(starts, starts[1:]))


def main(model_dir: str, tokenizer_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    out = Path(out)
    rank = int(os.environ["RANK"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    seen: dict = {}

    # 1. Which rows each process gets, micro-batch by micro-batch.
    trainer = make_trainer(model_dir, tokenizer, out / "a", steps=2)
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    seen["micro_batches"] = [row_lengths(batch) for batch in batches]

    # 2. The loss, its gradients and the metrics against trl's own, on this process's first micro-batch, with the
    #    label count over both processes (as transformers passes it).
    batch = dict(batches[0])
    count = (batch["labels"][..., 1:] != -100).sum()
    dist.all_reduce(count)

    def grads():
        values = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.model.zero_grad()
        return values

    theirs = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=count)
    theirs.backward()
    their_grads = grads()
    their_metrics = {name: trainer._metrics["train"][name][-1]
                     for name in ("entropy", "mean_token_accuracy", "num_tokens")}
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
    ours.backward()
    our_grads = grads()
    trainer.read_metrics("train")
    seen["loss"] = [float(theirs), float(ours)]
    seen["grads_max_diff"] = max(float((our_grads[n] - their_grads[n]).abs().max()) for n in their_grads)
    seen["grads_max"] = max(float(g.abs().max()) for g in their_grads.values())
    seen["metrics"] = {name: [value, trainer._metrics["train"][name][-1]] for name, value in their_metrics.items()}

    # 3. Two real steps: the logged token count covers both processes' rows.
    trainer = make_trainer(model_dir, tokenizer, out / "b", steps=2)
    trainer.train()
    seen["logged"] = [{key: entry[key] for key in ("step", "num_tokens", "entropy", "mean_token_accuracy")}
                      for entry in trainer.state.log_history if "loss" in entry]
    (out / f"rank-{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
