"""The training story, top to bottom: settings -> data -> model -> SFT -> adapter folder.

Longer than most modules on purpose: the whole story reads here in order, its helpers below it.

1. decide what 'auto' means on this machine (GPU or not) and say so;
2. tokenizer + data: every row rendered with the chat template, masked, filtered, split, each answer's
   end-of-turn token checked; the dataset report printed and written (``--dry-run`` stops here);
3. base model (4-bit NF4 on CUDA) + fresh LoRA adapters;
4. trl's SFTTrainer on our own ``input_ids``/``labels`` (dataset preparation skipped, so our
   masks are exactly what trains), eval every EVAL_STEPS, checkpoints for resuming;
5. the best checkpoint by eval loss becomes ``OUTPUT_DIR/adapter/`` (written atomically) with
   tokenizer, chat template, model card and manifest; loss.png and train_summary.json beside it;
6. push to the Hub when HUB_REPO is set: the adapter, with the run's logs under ``logs/``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

# This module is the heavy part of the stage: __main__ imports it only after the
# settings are valid, so --help and settings errors stay instant.
from transformers import TrainerCallback

from loraship.atomic import atomic_path, remove_stale_temporaries, write_json
from loraship.envsettings import public_settings
from loraship.heldout import write_heldout_rows
from loraship.manifest import build_manifest, write_manifest
from train import card, data, launch, model, run_logs, speed
from train.report import write_data_report
from train.checkpoints import (
    CHECKPOINTS_DIR, RUN_SETTINGS, AlreadyTrained, MirrorToHub, Preempted, StopOnSigterm, last_checkpoint,
    point_best_checkpoint_here, preempted_message, pull_checkpoints, step_of,
)
from train.throughput import StepClock, steady_throughput
from train.settings import TrainError, TrainSettings, cuda_available

#: Settings a resumed run must share with the checkpoints it continues (the rest may change, e.g. MAX_STEPS).
RESUME_SENSITIVE = (
    "BASE_MODEL", "CHAT_TEMPLATE", "DATASET", "DATASET_FORMAT", "DATASET_CONFIG", "DATASET_SPLIT", "MAX_SAMPLES",
    "EVAL_FRACTION", "EVAL_SIZE", "MAX_SEQ_LENGTH", "LONG_ROWS", "ASSISTANT_ONLY_LOSS", "LORA_R", "LORA_ALPHA",
    "LORA_DROPOUT", "LORA_TARGET_MODULES", "LOAD_IN_4BIT", "BATCH_SIZE", "GRAD_ACCUM", "SEED",
)
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")
ADAPTER_DIR = "adapter"


def train(settings: TrainSettings, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run the whole stage; returns the summary (None for a dry run).

    SIGTERM at any point raises :class:`train.checkpoints.Preempted` (exit status 75 in
    ``__main__``) once a checkpoint of the step reached is on disk (and on the Hub).
    """
    output_dir = Path(settings.output_dir)
    # Under torchrun every process runs this; only rank 0 talks and writes run files.
    main_process = launch.rank() == 0
    if not main_process:
        echo = _silent
    with StopOnSigterm(echo) as stopper:
        try:
            return _train(settings, dry_run, echo, stopper)
        except Preempted:
            # Said once, by rank 0; the other processes stop with the same status, silently.
            raise Preempted(preempted_message(output_dir, settings.hub_repo) if main_process else "") from None


def _train(settings: TrainSettings, dry_run: bool, echo: Callable[[str], None], stopper: StopOnSigterm):
    started = time.time()
    main_process = launch.rank() == 0
    output_dir = Path(settings.output_dir)
    checkpoints = output_dir / CHECKPOINTS_DIR
    token = settings.hf_token.get_secret_value() if settings.hf_token else None

    # 1. What the settings mean here; where an interrupted run left off (locally, else on the Hub).
    plan = model.plan_for(settings, cuda=cuda_available(), processes=launch.world_size())
    for notice in plan.notices:
        echo(f"note: {notice}")
    if not dry_run:
        if main_process:  # another rank's leftovers could be rank 0's writes in progress
            remove_stale_temporaries(output_dir)
            remove_stale_temporaries(checkpoints)
        if launch.world_size() == 1:  # several processes: the launcher fetched them before starting them
            fetch_hub_checkpoints(settings, token, echo)
        check_resumable(output_dir, settings)
        plan = keep_checkpoints_optimizer(output_dir, settings, plan, echo)
    model_path = model.resolve_model_path(plan.base_model_resolved)

    # 2. Data, rendered with the base model's own chat template.
    tokenizer = model.load_tokenizer(model_path, chat_template=settings.chat_template, token=token)
    train_examples, eval_examples, report = data.prepare_data(settings, tokenizer, token)
    if main_process:
        for line in write_data_report(output_dir, report, public_settings(settings)).splitlines():
            echo(line)
        echo(f"data: report written to {output_dir / 'data_report.txt'} (and .json, .png)")
    if dry_run:
        echo("dry run: stopping before the model is loaded")
        return None
    if main_process:  # only once the data is accepted: a refused run leaves no record behind
        record_run_settings(output_dir, settings, plan.optimizer)

    # 3. Base model and adapters.
    from transformers import set_seed

    set_seed(settings.seed)
    echo(f"model: loading {plan.base_model_resolved} ({'4-bit NF4' if plan.load_in_4bit else plan.compute_dtype}, "
         f"compute {plan.compute_dtype}, {'CUDA' if plan.cuda else 'CPU'})")
    if plan.levers.names():
        echo(f"speed: {', '.join(plan.levers.names())} (docs/performance.md)")
    peft_model = model.load_for_training(model_path, plan, settings, token=token, echo=echo)
    data.check_token_ids(train_examples + eval_examples, peft_model.get_input_embeddings().num_embeddings,
                         plan.base_model_resolved)

    # 4. Supervised fine-tuning, continuing the newest checkpoint.
    clock = StepClock()
    callbacks = [stopper, clock]
    if settings.hub_repo:
        callbacks.append(MirrorToHub(output_dir, settings.hub_repo, token=token, private=settings.hub_private, echo=echo))
    trainer = build_trainer(settings, plan, peft_model, tokenizer, train_examples, eval_examples, checkpoints, echo,
                            callbacks=callbacks)
    if main_process:
        # The settings record travels with the checkpoints (and so to the Hub), for a resume on another machine.
        write_json(checkpoints / RUN_SETTINGS, json.loads((output_dir / RUN_SETTINGS).read_text(encoding="utf-8")))
    processes = launch.world_size()
    global_batch = settings.batch_size * settings.grad_accum * processes
    rows, accumulation = micro_batching(settings, plan)
    echo(f"batch: {rows} rows{' packed into one' if plan.levers.packing else ''} x {accumulation} accumulation x "
         f"{processes} process{'es' if processes > 1 else ''} = {global_batch} rows per optimizer step")
    resume = last_checkpoint(checkpoints)
    resumed_from = step_of(resume) if resume else None
    if resume:
        point_best_checkpoint_here(resume)
        echo(f"resume: continuing from {resume} (step {resumed_from})")
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except AlreadyTrained:
        echo(f"resume: {resume.name} already reached the last step; writing the final files only")
        load_final_weights(trainer)
    if stopper.requested:
        raise Preempted("stopped by SIGTERM")
    if not main_process:
        return None
    finish_wandb_run(settings)
    runtime = time.time() - started

    # 5. The adapter folder, the summary and the plot (each written whole or not at all).
    summary = summarize(settings, plan, trainer, report, runtime, resumed_from, model_path)
    summary.update(processes=processes, global_batch_size=global_batch,
                   throughput=steady_throughput(clock.steps, clock.warmup_until(trainer.state.max_steps), global_batch))
    adapter_dir = write_adapter(output_dir / ADAPTER_DIR, trainer.model, tokenizer, settings, plan, summary,
                                heldout=eval_examples)
    echo(f"adapter: {adapter_dir}")
    train_curve, eval_curve = card.loss_curves(trainer.state.log_history)
    card.plot_losses(train_curve, eval_curve, output_dir / "loss.png", summary["best_step"])

    # 6. Publish: the adapter and the run's record in one commit.
    if settings.hub_repo:
        summary["hub_commit"] = run_logs.push_adapter_and_logs(adapter_dir, output_dir, summary, settings.hub_repo,
                                                               token=token, private=settings.hub_private)
        echo(f"hub: pushed {adapter_dir} and the run's logs ({run_logs.LOGS_DIR}/) to {settings.hub_repo} "
             f"({'private' if settings.hub_private else 'public'})")
    # Written last: its presence says the run is finished.
    write_json(output_dir / "train_summary.json", summary)
    pace = summary["throughput"]
    pace = f" ({pace['tokens_per_s']:,.0f} tokens/s from step {pace['from_step']})" if pace else ""
    echo(f"done: {summary['global_step']} steps in {runtime:.0f} s{pace}; best eval loss {summary['best_eval_loss']} "
         f"at step {summary['best_step']}; see {output_dir / 'loss.png'}")
    return summary


def _silent(_line: str) -> None:
    pass


def fetch_hub_checkpoints(settings: TrainSettings, token: str | None, echo: Callable[[str], None]) -> None:
    """A new machine (no local checkpoint) continues from the checkpoints pushed to HUB_REPO, if any."""
    output_dir = Path(settings.output_dir)
    if settings.hub_repo and last_checkpoint(output_dir / CHECKPOINTS_DIR) is None:
        pulled = pull_checkpoints(output_dir, settings.hub_repo, token=token)
        if pulled is not None:
            echo(f"resume: fetched checkpoints up to step {step_of(pulled)} from {settings.hub_repo}/{CHECKPOINTS_DIR}")


def finish_wandb_run(settings: TrainSettings) -> None:
    """transformers leaves the W&B run open until the process exits: close it, so its record is whole now."""
    if "wandb" in settings.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def load_final_weights(trainer) -> None:
    """A run resumed at its last step trains nothing: load the adapter the final folder must hold."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and (Path(best) / "adapter_model.safetensors").is_file():
        set_peft_model_state_dict(trainer.model, load_file(Path(best) / "adapter_model.safetensors"))


def micro_batching(settings: TrainSettings, plan: model.Plan) -> tuple[int, int]:
    """``(rows per micro-batch, accumulation steps)``: BATCH_SIZE x GRAD_ACCUM, folded into one packed micro-batch on CUDA."""
    options = speed_options(settings, plan)
    return options.rows, options.accumulation


def speed_options(settings: TrainSettings, plan: model.Plan) -> speed.TrainerOptions:
    return speed.trainer_options(plan.levers, batch_size=settings.batch_size, grad_accum=settings.grad_accum,
                                 max_seq_length=settings.max_seq_length,
                                 gradient_checkpointing=settings.gradient_checkpointing)


def build_trainer(settings, plan, peft_model, tokenizer, train_examples, eval_examples, checkpoints, echo,
                  callbacks=()):
    from trl import SFTConfig

    from train.speed.trainer import Trainer

    has_eval = bool(eval_examples)
    fast = speed_options(settings, plan)
    # TensorBoard event files go to OUTPUT_DIR/runs (transformers reads this variable).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(settings.output_dir) / run_logs.TENSORBOARD_DIR)
    args = SFTConfig(
        output_dir=str(checkpoints),
        max_steps=settings.max_steps or -1,
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=fast.rows,
        per_device_eval_batch_size=fast.rows,
        gradient_accumulation_steps=fast.accumulation,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        optim=plan.optimizer,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        # Its check reads every step's loss back from the GPU (a wait each step); a NaN loss shows in the log.
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=settings.best_by_eval and has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=plan.cuda,
        fp16=False,
        use_cpu=not plan.cuda,
        # The model is already set up for checkpointing (model.load_for_training); the Trainer repeats it,
        # except where its arguments cannot carry the model's settings.
        gradient_checkpointing=fast.trainer_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=settings.report_to,
        seed=settings.seed,
        data_seed=settings.seed,
        include_num_input_tokens_seen=fast.tokens_seen,
        # Our rows are already rendered, masked and cut to MAX_SEQ_LENGTH: trl must not
        # re-tokenize, re-mask or truncate them (tests/train pin the labels that reach the model).
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Several processes (torchrun): NCCL between GPUs, gloo between CPU processes (tests); LoRA
        # leaves no parameter unused, so DDP need not search for them every step.
        ddp_backend=("nccl" if plan.cuda else "gloo") if launch.world_size() > 1 else None,
        ddp_find_unused_parameters=False if launch.world_size() > 1 else None,
        disable_tqdm=False,
    )
    launch.one_gpu_per_process(args)
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=data.to_hf_dataset(train_examples),
        eval_dataset=data.to_hf_dataset(eval_examples) if has_eval else None,
        processing_class=tokenizer,
        data_collator=fast.collator,
        callbacks=[EvalLossAverage(settings.eval_average_window, echo), *callbacks],
    )
    if plan.load_in_4bit and plan.compute_dtype == "float32":
        model.keep_adapter_float32(trainer.model)
    return trainer


def resume_sensitive(settings: TrainSettings) -> dict[str, Any]:
    return {key: public_settings(settings)[key] for key in RESUME_SENSITIVE}


#: The run settings record's entry for the optimizer the run used (OPTIMIZER with 'auto' decided).
RESOLVED_OPTIMIZER = "resolved_optimizer"
#: What OPTIMIZER=auto meant on CUDA for runs whose record has no RESOLVED_OPTIMIZER (before adamw_torch_fused).
EARLIER_CUDA_AUTO_OPTIMIZER = "adamw_8bit"


def record_run_settings(output_dir: Path, settings: TrainSettings, optimizer: str) -> None:
    """What a later resume of this OUTPUT_DIR must match (see check_resumable), and the optimizer it must keep."""
    write_json(output_dir / RUN_SETTINGS, {**resume_sensitive(settings), RESOLVED_OPTIMIZER: optimizer})


def keep_checkpoints_optimizer(output_dir: Path, settings: TrainSettings, plan, echo: Callable[[str], None]):
    """The plan, with the optimizer whose state the checkpoints to continue hold.

    A checkpoint's optimizer.pt is one optimizer's state (adamw_8bit's quantized moments are not
    AdamW's), so a continued run keeps the optimizer that made it: OPTIMIZER=auto follows the
    checkpoints (what 'auto' means may have changed since: it was adamw_8bit on CUDA before
    adamw_torch_fused), and an explicit other optimizer is refused.
    """
    import dataclasses

    record = output_dir / RUN_SETTINGS
    if not (record.is_file() and last_checkpoint(output_dir / CHECKPOINTS_DIR)):
        return plan
    made_with = json.loads(record.read_text(encoding="utf-8")).get(RESOLVED_OPTIMIZER)
    if made_with is None and settings.optimizer == "auto" and plan.cuda:
        made_with = EARLIER_CUDA_AUTO_OPTIMIZER
    if made_with is None or made_with == plan.optimizer:
        return plan
    if settings.optimizer != "auto":
        raise TrainError(
            f"OPTIMIZER={settings.optimizer!r}: the checkpoints in {output_dir / CHECKPOINTS_DIR} hold {made_with}'s "
            f"state, which another optimizer cannot continue; set OPTIMIZER={made_with} (or auto) to resume, "
            "or use a new OUTPUT_DIR"
        )
    echo(f"note: OPTIMIZER=auto: continuing with {made_with}, the optimizer whose state the checkpoints hold")
    return dataclasses.replace(plan, optimizer=made_with)


def check_resumable(output_dir: Path, settings: TrainSettings) -> None:
    """Refuse to continue checkpoints made with other model/data settings."""
    record = output_dir / RUN_SETTINGS
    current = resume_sensitive(settings)
    if record.is_file() and last_checkpoint(output_dir / CHECKPOINTS_DIR):
        before = json.loads(record.read_text(encoding="utf-8"))
        changed = [f"{key} {before.get(key)!r} -> {current[key]!r}" for key in RESUME_SENSITIVE if before.get(key) != current[key]]
        if changed:
            raise TrainError(
                f"OUTPUT_DIR={str(output_dir)!r}: holds checkpoints of a run with other settings ({'; '.join(changed)}); "
                f"use a new OUTPUT_DIR, or delete {output_dir / CHECKPOINTS_DIR} to start over"
            )


class EvalLossAverage(TrainerCallback):
    """Logs the moving average of the last few eval losses (seed 000's stability monitor)."""

    def __init__(self, window: int, echo: Callable[[str], None]):
        self.window, self.echo, self.values = window, echo, []

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume the earlier evaluations are in the restored state.
        self.values = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        self.values.append(float(metrics["eval_loss"]))
        average = card.moving_average(self.values, self.window)
        state.log_history.append({"eval_loss_moving_average": average, "step": state.global_step})
        self.echo(
            f"step {state.global_step}: eval loss {self.values[-1]:.4f}, "
            f"moving average of last {min(self.window, len(self.values))}: {average:.4f}"
        )


def summarize(settings, plan, trainer, report, runtime: float, resumed_from: int | None, model_path: str) -> dict[str, Any]:
    state = trainer.state
    train_curve, eval_curve = card.loss_curves(state.log_history)
    averages = [e["eval_loss_moving_average"] for e in state.log_history if "eval_loss_moving_average" in e]
    best_step = None
    if state.best_model_checkpoint:
        best_step = step_of(Path(state.best_model_checkpoint))
    best_loss = state.best_metric if best_step is not None else (eval_curve[-1][1] if eval_curve else None)
    return {
        "base_model": plan.base_model,
        "base_model_resolved": model_path,
        "base_model_hub_id": model.hub_id_of(plan.base_model_resolved),
        "device": "CUDA " + _gpu_name() if plan.cuda else "CPU",
        "load_in_4bit": plan.load_in_4bit,
        "compute_dtype": plan.compute_dtype,
        "optimizer": plan.optimizer,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "resumed_from_step": resumed_from,
        "runtime_s": round(runtime, 2),
        "final_train_loss": card.final_train_loss(state.log_history),
        "best_step": best_step,
        "best_eval_loss": best_loss,
        "train_losses": train_curve,
        "eval_losses": eval_curve,
        "eval_loss_moving_average": averages,
        "tokens": {
            "train_rows_tokens": report.train_tokens,
            "train_loss_tokens": report.train_loss_tokens,
            "eval_rows_tokens": report.eval_tokens,
            "input_tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
        },
        "gpu_peak_memory_gib": _gpu_peak_memory_gib() if plan.cuda else None,
        "data": asdict(report),
        "hub_repo": settings.hub_repo,
        "settings": public_settings(settings),
    }


def _gpu_peak_memory_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def write_adapter(final: Path, peft_model, tokenizer, settings, plan, summary, heldout=()) -> Path:
    """PEFT adapter + tokenizer (with its chat template) + model card + manifest, all or nothing.

    The folder is pushed as it is, so nothing in it names a local path: the base and the dataset appear by
    Hub id or name (export finds a local base again through train_summary.json, which stays here).
    """
    from loraship.public import public_name, without_local_paths

    base = plan.base_model_resolved
    with atomic_path(final) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        name_base_in_adapter_config(tmp, public_name(base))
        tokenizer.save_pretrained(tmp)
        # The eval split as trained (ids and labels): export scores the files it ships on it.
        heldout_rows = write_heldout_rows(tmp, ((e.input_ids, e.labels) for e in heldout)) if heldout else None
        dataset_is_hub = not Path(settings.dataset).expanduser().exists()
        (tmp / "README.md").write_text(card.model_card(summary, dataset_is_hub=dataset_is_hub), encoding="utf-8")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = build_manifest(
            kind="adapter",
            stage="train",
            folder=tmp,
            files=files,
            inputs={
                # The base trained on (BASE_MODEL=auto decided): `embedded` and Hub ids as they are, for export
                # to resolve; a local folder by its name.
                "base_model": base if base == "embedded" else public_name(base),
                "base_model_is_local": Path(base).expanduser().is_dir(),
                "base_model_hub_id": summary["base_model_hub_id"],
                "dataset": settings.dataset if dataset_is_hub else public_name(settings.dataset),
                "load_in_4bit": plan.load_in_4bit,
            },
            settings=without_local_paths(public_settings(settings)),
            libraries=LIBRARIES,
            extra={
                "global_step": summary["global_step"],
                "best_step": summary["best_step"],
                "best_eval_loss": summary["best_eval_loss"],
                "final_train_loss": summary["final_train_loss"],
                "heldout_rows": heldout_rows,
                "chat_template_from": "base model" if not settings.chat_template else f"CHAT_TEMPLATE={settings.chat_template} (if the base had none)",
            },
        )
        write_manifest(tmp, manifest)
    return final


def name_base_in_adapter_config(adapter_dir: Path, base: str) -> None:
    """peft records the base's local folder; the pushed adapter names it by Hub id (or folder name) instead."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
