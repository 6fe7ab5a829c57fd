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

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    #: What makes a step fast here (train/speed.py): on by default on CUDA, off on CPU.
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
    can_compile = cuda and settings.torch_compile != "off" and speed.compile_supported()
    try:
        no_graphs = speed.graphs_blocker(
            symbolic_lengths=can_compile and speed.symbolic_lengths_in_graph(), batch_size=settings.batch_size,
            grad_accum=settings.grad_accum, max_seq_length=settings.max_seq_length, processes=processes)
        levers, speed_notices = speed.choose_levers(cuda=cuda, compile=settings.torch_compile, can_compile=can_compile,
                                                    no_graphs=no_graphs, saved_mlp_mib=settings.saved_mlp_mib)
    except ValueError as err:
        raise TrainError(str(err)) from err
    notices.extend(speed_notices)
    if "saved_mlp_mib" in settings.model_fields_set and levers.compile_mode != "layers-cudagraphs":
        notices.append(f"SAVED_MLP_MIB={settings.saved_mlp_mib}: unused; it applies with per-layer CUDA graphs "
                       f"(TORCH_COMPILE=layers-cudagraphs, or auto where they run), and this run has none")
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


def load_base_model(model_path: str, plan: Plan, *, gradient_checkpointing: bool, token: str | None = None,
                    echo: Callable[[str], None] | None = None):
    """The frozen base, 4-bit NF4 (double quant) when the plan says so, ready for k-bit training.

    With the plan's speed levers (CUDA): frozen weights stay bf16 in memory (the residual stream
    float32, as after peft's upcast) and liger-kernel's fused RMSNorm/SwiGLU/RoPE replace the
    model's own (train/speed.py).
    """
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
    if plan.levers.host_embedding:  # before the hooks below, which go on the embedding module
        keep_embedding_in_host_memory(model, echo)
    if plan.levers.liger_kernels:
        notice = speed.apply_liger_kernels(model, plan.levers.liger_kernels)
        if notice and echo:
            echo(f"note: {notice}")
    if plan.load_in_4bit and (plan.levers.bf16_frozen or plan.levers.bf16_storage):
        model = speed.prepare_frozen_base(model, gradient_checkpointing=gradient_checkpointing,
                                          float32_stream=not plan.levers.bf16_frozen,
                                          compile_mode=plan.levers.compile_mode)
    elif plan.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=speed.checkpoint_kwargs(plan.levers.compile_mode),
        )
    elif gradient_checkpointing:
        speed.enable_checkpointing(model, speed.checkpoint_kwargs(plan.levers.compile_mode))
    if plan.load_in_4bit and plan.levers.dequantize_once and gradient_checkpointing:
        speed.dequantize_once(model, kernel=plan.levers.nf4_kernel)
    return model


def keep_embedding_in_host_memory(model, echo: Callable[[str], None] | None = None) -> int:
    """Move ``model``'s token embedding to pinned host memory where it can go (train/host_embedding.py); the bytes of
    GPU memory freed (what :func:`mlp_budget_mib` later reads back from the model, for :func:`add_lora`)."""
    from train import host_embedding

    why_not = host_embedding.movable(model) if host_embedding.available() else "it needs Triton and a CUDA GPU"
    if why_not:
        if echo:
            echo(f"note: speed: the token embedding stays in GPU memory: {why_not}")
        return 0
    try:
        freed = host_embedding.move_to_host(model)
    except RuntimeError as err:  # page-locking the table failed (a host short of memory): run with it on the GPU
        if echo:
            echo(f"note: speed: the token embedding stays in GPU memory: pinning it in host memory failed "
                 f"({str(err).splitlines()[0]})")
        return 0
    if echo:
        echo(f"note: speed: the token embedding is read from pinned host memory ({freed / 2**20:,.0f} MiB of GPU "
             "memory freed, given to the MLP outputs kept: SAVED_MLP_MIB)")
    return freed


def mlp_budget_mib(model, levers: speed.SpeedLevers) -> int:
    """MiB of MLP outputs the compiled layers keep: ``levers.saved_mlp_mib`` (SAVED_MLP_MIB), plus the GPU memory
    the token embedding left for host memory, so the peak stays where SAVED_MLP_MIB alone puts it (0 stays 0)."""
    if not levers.saved_mlp_mib:
        return 0
    from train import host_embedding

    return levers.saved_mlp_mib + host_embedding.held_bytes(model) // 2**20


def add_lora(model, settings: TrainSettings, levers: speed.SpeedLevers = speed.SpeedLevers()):
    """Wrap ``model`` with fresh LoRA adapters on LORA_TARGET_MODULES (fused on a 4-bit base: ``levers.fused_lora``)."""
    from peft import LoraConfig, get_peft_model

    targets = settings.lora_target_modules
    if targets != ["all-linear"]:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            found = sorted(n for n in names if n.endswith("proj")) or sorted(names)[:12]
            raise TrainError(
                f"LORA_TARGET_MODULES={','.join(targets)!r}: {', '.join(missing)} not in this model; "
                f"its projection modules are {', '.join(found)}"
            )
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if levers.fused_lora:
        from train.fused_lora import fuse_lora_layers

        fuse_lora_layers(peft_model)
    if levers.compile_mode:
        speed.compile_model(peft_model, levers.compile_mode, save_attention=levers.save_attention,
                            saved_mlp_mib=mlp_budget_mib(model, levers))
    return peft_model


def keep_adapter_float32(model) -> None:
    """Undo trl's bf16 cast of LoRA weights on a 4-bit base when we compute in float32 (CPU)."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
