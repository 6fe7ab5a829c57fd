"""The base model and its adapter: resolve BASE_MODEL, load (optionally 4-bit), add LoRA.

Precision is chosen by device, never by the user: on CUDA the base computes in
bf16 (NF4 storage when 4-bit); on a CPU everything stays float32, because bf16
matrix work there is 10-15x slower (docs/benchmarks.md, notes/cpu-pipeline.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from train import speed
from train.settings import GPU_DEFAULT_BASE, TEMPLATES_DIR, TrainError, TrainSettings

@dataclass(frozen=True)
class Plan:
    """What the settings mean on this machine (the 'auto' values decided)."""

    cuda: bool
    base_model: str  # as the user gave it
    base_model_resolved: str  # a local folder or a Hub id
    load_in_4bit: bool
    optimizer: str
    compute_dtype: str  # "bfloat16" | "float32"
    notices: tuple[str, ...] = ()
    #: What makes a step fast here (train/speed/): on by default on CUDA, off on CPU.
    levers: speed.SpeedLevers = speed.SpeedLevers()


def plan_for(settings: TrainSettings, *, cuda: bool, processes: int = 1) -> Plan:
    """Decide the 'auto' settings for this machine (``processes``: how many train together). Does not load anything
    heavy."""
    notices = []
    base = settings.base_model
    if base == "auto":
        base = GPU_DEFAULT_BASE if cuda else "embedded"
        notices.append(f"BASE_MODEL=auto: using {base} ({'CUDA GPU found' if cuda else 'no CUDA GPU'})")
    if settings.load_in_4bit == "auto":
        load_in_4bit = cuda
        if not cuda:
            notices.append(
                "LOAD_IN_4BIT=auto: plain fp32 LoRA on CPU (faster here than 4-bit); set LOAD_IN_4BIT=true for QLoRA"
            )
    else:
        load_in_4bit = settings.load_in_4bit == "true"
    optimizer = settings.optimizer
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if cuda else "adamw_torch"
    try:
        levers, speed_notices = speed.plan(settings, cuda=cuda, processes=processes)
    except ValueError as err:
        raise TrainError(str(err)) from err
    notices.extend(speed_notices)
    return Plan(
        cuda=cuda,
        base_model=settings.base_model,
        base_model_resolved=base,
        load_in_4bit=load_in_4bit,
        optimizer=optimizer,
        compute_dtype="bfloat16" if cuda else "float32",
        notices=tuple(notices),
        levers=levers,
    )


def hub_id_of(base_model: str) -> str | None:
    """The Hub id a model card should name as ``base_model`` (None for a local folder)."""
    if base_model == "embedded":
        from loraship.embedded import EMBEDDED_HUB_ID

        return EMBEDDED_HUB_ID
    return None if Path(base_model).expanduser().exists() else base_model


def resolve_model_path(base_model: str) -> str:
    """A local folder for 'embedded' and local paths; a Hub id otherwise (transformers fetches it)."""
    if base_model == "embedded":
        from loraship.embedded import embedded_hf_folder

        return str(embedded_hf_folder())
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrainError(f"BASE_MODEL={base_model!r}: the folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    return base_model


def bundled_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def load_tokenizer(model_path: str, *, chat_template: str | None, token: str | None = None):
    """The base model's tokenizer, with a chat template (its own, else CHAT_TEMPLATE's) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, token=token)
    except OSError as err:
        raise TrainError(
            f"BASE_MODEL={model_path!r}: could not load its tokenizer ({str(err).splitlines()[0]}); "
            "check the id, HF_TOKEN for gated models, or the folder"
        ) from err
    if not getattr(tokenizer, "chat_template", None):
        if chat_template is None:
            raise TrainError(
                f"BASE_MODEL={model_path!r} has no chat template: set CHAT_TEMPLATE "
                "(llama3 for Llama-3 base models, llama2 for Llama-2/Mistral ones, or a .jinja file)"
            )
        path = Path(chat_template).expanduser()
        tokenizer.chat_template = path.read_text(encoding="utf-8") if path.is_file() else bundled_template(chat_template)
    if tokenizer.pad_token is None:
        # Padding positions carry label -100, so reusing eos (or unk) for padding never teaches the model anything.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not getattr(tokenizer, "is_fast", False):
        raise TrainError(f"BASE_MODEL={model_path!r}: needs a fast tokenizer (tokenizer.json) to locate assistant tokens")
    return tokenizer


def load_for_training(model_path: str, plan: Plan, settings: TrainSettings, *, token: str | None = None,
                      echo: Callable[[str], None] | None = None):
    """The frozen base (4-bit NF4, double quant, when the plan says so) with fresh LoRA adapters, ready to train,
    the plan's speed levers applied (train/speed/: all off on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, plan.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "token": token}
    if plan.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if plan.cuda:
        from train.launch import local_rank

        # One whole copy per process, on that process's GPU (DDP).
        kwargs["device_map"] = {"": local_rank()}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as err:
        raise TrainError(
            f"BASE_MODEL={model_path!r}: could not load the model ({str(err).splitlines()[0]})"
        ) from err
    model.config.use_cache = False  # the cache is useless in training and conflicts with checkpointing
    config = lora_config(settings, model)
    if echo and settings.lora_target_modules == ["attention"]:
        echo(f"lora: LORA_TARGET_MODULES=attention is {','.join(sorted(config.target_modules))} in this "
             f"{model.config.model_type} model")
    return speed.make_fast(model, config, plan.levers, load_in_4bit=plan.load_in_4bit,
                           gradient_checkpointing=settings.gradient_checkpointing, echo=echo)


def lora_config(settings: TrainSettings, model):
    """The adapter's settings for ``model`` (LORA_TARGET_MODULES looked up in it)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=target_modules(model, settings.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def target_modules(model, targets: list[str]) -> list[str] | str:
    """What LORA_TARGET_MODULES means for this model: its attention projections for ``attention``, peft's
    ``all-linear``, or the names given (each must be a module of this model)."""
    if targets == ["all-linear"]:
        return "all-linear"
    if targets == ["attention"]:
        return attention_projections(model)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        found = sorted(n for n in names if n.endswith("proj")) or sorted(names)[:12]
        raise TrainError(
            f"LORA_TARGET_MODULES={','.join(targets)!r}: {', '.join(missing)} not in this model; "
            f"its projection modules are {', '.join(found)}; LORA_TARGET_MODULES=attention finds them itself"
        )
    return list(targets)


def attention_projections(model) -> list[str]:
    """The linear layers of the model's attention blocks (``self_attn`` in every transformers decoder): q, k, v and
    o_proj in Llama, Mistral, Qwen and Gemma; Phi-3's fused qkv_proj and o_proj."""
    import torch

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "self_attn":
            found = sorted(child for child, sub in module.named_children() if isinstance(sub, torch.nn.Linear))
            if found:
                return found
    model_type = getattr(model.config, "model_type", "?")
    raise TrainError(
        f"LORA_TARGET_MODULES=attention: no attention block with linear projections (self_attn) in this "
        f"{model_type!r} model; name the modules (comma-separated), or use all-linear"
    )


def keep_adapter_float32(model) -> None:
    """Undo trl's bf16 cast of LoRA weights on a 4-bit base when we compute in float32 (CPU)."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
