"""Every knob of ``python -m train``, read from the environment, ``.env`` and a recipe.

Precedence, strongest first: the process environment, ``./.env``, the recipe
named by ``RECIPE`` (``recipes/<name>.env``), the defaults below. All problems
are collected and reported together (one line each) before anything heavy is
loaded: field checks come from pydantic, cross-field checks from
:func:`cross_field_problems`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraship.envsettings import CommaList, EmptyIsNone, SettingsError, load_settings
from loraship.errors import UserError
from loraship.hub import looks_like_repo_id
from train import cuda_check
from train.speed import SAVED_MLP_MIB

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
#: What BASE_MODEL=auto means on a machine with a CUDA GPU.
GPU_DEFAULT_BASE = "meta-llama/Llama-3.2-1B-Instruct"
#: Optimizers whose bitsandbytes kernels exist only for CUDA.
CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit")
#: REPORT_TO's trackers: the module each one's client is imported as, and the extra that installs it.
TRACKERS = {"tensorboard": ("tensorboard", "train"), "wandb": ("wandb", "tracking"), "mlflow": ("mlflow", "tracking"),
            "trackio": ("trackio", "tracking")}
#: LORA_TARGET_MODULES's names for a set of modules, found in the model at load (train/model.py).
TARGET_CHOICES = ("attention", "all-linear")
#: Recipes sized for a CPU; every other recipe needs a CUDA GPU and is refused without one.
CPU_RECIPES = ("demo",)


class TrainError(UserError):
    """A user mistake in training input: a setting, a dataset row, a model folder."""


def bundled_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def dataset_problem(value: str) -> str | None:
    if Path(value).expanduser().exists():
        return None
    if value.lower().endswith(DATA_SUFFIXES) or not looks_like_repo_id(value):
        return (
            "no such local file or folder, and not a Hub dataset id (owner/name); "
            f"local data may be {', '.join(DATA_SUFFIXES)} files or a folder of them"
        )
    return None


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _compile_choice(value: object) -> object:
    """TORCH_COMPILE's yes/no spellings: yes is the default (auto), no is eager; empty is unset."""
    value = _lower(value)
    if value in ("true", "1", "yes", "on"):
        return "auto"
    if value in ("false", "0", "no"):
        return "off"
    return "auto" if value == "" else value


def _distinct_lower(values: list[str]) -> list[str]:
    return list(dict.fromkeys(value.lower() for value in values))


def report_to_problem(trackers: list[str]) -> str | None:
    """What is wrong with REPORT_TO, checked here because each client fails only once training starts."""
    shown = f"REPORT_TO={','.join(trackers)!r}"
    unknown = [name for name in trackers if name != "none" and name not in TRACKERS]
    if unknown or not trackers:
        return (f"{shown}: {'unknown tracker ' + ', '.join(map(repr, unknown)) if unknown else 'no tracker named'}; "
                f"choose from {', '.join(TRACKERS)} (comma-separated), or none")
    if "none" in trackers and len(trackers) > 1:
        return f"{shown}: none turns every tracker off; give it alone, or list only the trackers"
    for name in trackers:
        module, extra = TRACKERS.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            return f"{shown}: the {name} client is not installed; pip install 'loraship[{extra}]', or leave {name} out"
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI") and not _installed("mlflow"):
        return (f"{shown}: MLFLOW_TRACKING_URI is not set, and mlflow-skinny keeps no local store; set it to your "
                "MLflow server, or to file:FOLDER with MLFLOW_ALLOW_FILE_STORE=true")
    return None


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def base_model_problem(value: str) -> str | None:
    if value in ("embedded", "auto") or Path(value).expanduser().is_dir():
        return None
    if value.startswith((".", "/", "~")) or not looks_like_repo_id(value):
        return "not a local model folder, not a Hub model id (owner/name), not 'embedded' or 'auto'"
    return None


def chat_template_problem(value: str | None) -> str | None:
    if value is None or value in bundled_templates() or Path(value).expanduser().is_file():
        return None
    return f"must be a bundled template ({', '.join(bundled_templates())}) or a .jinja file that exists"


class TrainSettings(BaseSettings):
    """QLoRA SFT settings. Field names are the lower-case environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", env_file_encoding="utf-8", validate_default=True
    )

    # --- what to train -----------------------------------------------------
    base_model: str = Field(
        "auto",
        description="Base model: a Hub id, a local Hugging Face folder, 'embedded' (SmolLM2-135M-Instruct "
        f"shipped with loraship) or 'auto' ('embedded' without a CUDA GPU, {GPU_DEFAULT_BASE} with one).",
    )
    chat_template: Annotated[str | None, EmptyIsNone] = Field(
        None,
        description="Chat template for a base model that has none: a bundled name (llama3, llama2) or a .jinja "
        "file. The base model's own template always wins.",
    )
    dataset: str = Field(
        "data/quokka/train.jsonl",
        description="Training data: a Hub dataset id or a local JSON/JSONL/CSV/Parquet file or folder.",
    )
    dataset_format: Literal["auto", "sharegpt", "messages", "alpaca", "instruction_response", "gsm8k", "text"] = Field(
        "auto",
        description="Row format; 'auto' detects it from the columns: conversations(from/value), messages(role/content), "
        "instruction/input/output, instruction/response, question/answer, or text ('<s>[INST] q [/INST] a </s>').",
    )
    dataset_config: Annotated[str | None, EmptyIsNone] = Field(
        None, description="Hub dataset configuration name (e.g. 'main' for openai/gsm8k)."
    )
    dataset_split: str = Field("train", description="Hub dataset split to read.")
    max_samples: Annotated[int | None, EmptyIsNone] = Field(
        None, ge=1, description="Use only the first N rows of the dataset (before the train/eval split)."
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of rows held out for evaluation (seeded); 0 means no eval split."
    )
    eval_size: Annotated[int | None, EmptyIsNone] = Field(
        None, ge=1, description="A fixed number of eval rows; overrides EVAL_FRACTION when set."
    )
    max_seq_length: int = Field(1024, ge=16, le=131072, description="Longest tokenized row, in tokens.")
    long_rows: Literal["drop", "truncate"] = Field(
        "drop", description="Rows longer than MAX_SEQ_LENGTH: 'drop' them or 'truncate' them (keep the start)."
    )
    assistant_only_loss: bool = Field(
        True, description="Train only on the assistant's tokens (false: every token of the rendered conversation)."
    )

    # --- adapter -------------------------------------------------------------
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target_modules: CommaList = Field(
        default_factory=lambda: ["attention"],
        description="Modules that get LoRA adapters: 'attention' (the family's attention projections: q,k,v,o_proj; "
        "Phi-3's qkv_proj,o_proj), 'all-linear' (every linear layer), or module names, comma-separated.",
    )
    load_in_4bit: Annotated[Literal["auto", "true", "false"], BeforeValidator(_lower)] = Field(
        "auto",
        description="Load the base in 4-bit NF4 (QLoRA). 'auto': true on CUDA (bf16 compute), false on CPU "
        "(plain fp32 LoRA is faster there); 'true' on CPU uses float32 compute.",
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory.")
    torch_compile: Annotated[Literal["auto", "layers-cudagraphs", "layers", "stack", "off"],
                             BeforeValidator(_compile_choice)] = Field(
        "auto",
        description="CUDA: what torch.compile covers. 'auto': each decoder layer, with CUDA graphs "
        "('layers-cudagraphs') where they apply (torch 2.11/2.13+, one process, one micro-batch a step), else 'layers' "
        "(no graphs); 'stack': the whole stack; 'off': eager.",
    )
    saved_mlp_mib: int = Field(
        SAVED_MLP_MIB, ge=0, le=1_048_576,
        description="With per-layer CUDA graphs: MiB of GPU memory spent keeping the MLP's gate and up outputs "
        "of the last layers instead of recomputing them; an untied token embedding moves to host memory and adds "
        "what it frees. 0: none.",
    )
    num_gpus: Annotated[int | None, EmptyIsNone] = Field(
        None, ge=1, le=64,
        description="GPUs to train on, one process each (DDP through torchrun; BATCH_SIZE is per GPU). "
        "Default: every visible CUDA device. Ignored without CUDA.",
    )

    # --- optimisation --------------------------------------------------------
    max_steps: Annotated[int | None, EmptyIsNone] = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides NUM_EPOCHS)."
    )
    num_epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training rows (when MAX_STEPS is unset).")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    batch_size: int = Field(2, ge=1, le=4096, description="Rows per device per forward pass.")
    grad_accum: int = Field(4, ge=1, le=4096, description="Forward passes per optimizer step (effective batch = BATCH_SIZE x GRAD_ACCUM).")
    optimizer: Literal["auto", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused"] = Field(
        "auto",
        description="Optimizer. 'auto': adamw_torch_fused on CUDA, adamw_torch on CPU. The 8-bit and paged ones need "
        "CUDA.",
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, ge=0, description="Seed for the split, shuffling and adapter init.")

    # --- eval, checkpoints, logs -------------------------------------------
    eval_steps: int = Field(50, ge=1, description="Evaluate the eval split every N optimizer steps.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N steps (resume starts from the last).")
    best_by_eval: bool = Field(
        True,
        description="The final adapter is the checkpoint with the lowest eval loss (needs an eval split and "
        "SAVE_STEPS a multiple of EVAL_STEPS); false: the last step's.",
    )
    eval_average_window: int = Field(3, ge=1, le=100, description="Evaluations in the logged moving average of eval loss.")
    logging_steps: int = Field(10, ge=1, description="Log the train loss every N steps.")
    report_to: Annotated[CommaList, AfterValidator(_distinct_lower)] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where the run's metrics go, comma-separated: tensorboard (OUTPUT_DIR/runs, pushed with the "
        "adapter), wandb, mlflow, trackio, or none. Each client reads its own variables (WANDB_API_KEY, "
        "MLFLOW_TRACKING_URI...).",
    )
    save_total_limit: int = Field(3, ge=1, description="Checkpoints kept on disk (the best one is always kept).")
    output_dir: Path = Field(
        Path("outputs/train"),
        description="Run folder: checkpoints/, runs/ (TensorBoard), adapter/, loss.png, train_summary.json.",
    )

    # --- publishing ----------------------------------------------------------
    hub_repo: Annotated[str | None, EmptyIsNone] = Field(
        None,
        description="Push the adapter folder, and the run's logs under logs/, to this Hub repo (owner/name) at the end.",
    )
    hub_private: bool = Field(True, description="Create the Hub repo as private.")
    hf_token: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, description="Hugging Face token (gated base models, pushing). Never printed or written."
    )
    recipe: Annotated[str | None, EmptyIsNone] = Field(
        None, description="Load recipes/<name>.env first; variables set in the environment or .env win over it."
    )


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.env"))


def recipe_path(name: str) -> Path:
    return RECIPES_DIR / f"{name}.env"


def requested_recipe(dotenv_file: Path) -> str | None:
    value = os.environ.get("RECIPE")
    if value is None and dotenv_file.is_file():
        from dotenv import dotenv_values

        value = dotenv_values(dotenv_file).get("RECIPE")
    return (value or "").strip() or None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cross_field_problems(s: TrainSettings, *, cuda: bool, skip: frozenset[str] = frozenset()) -> list[str]:
    """Problems that involve more than one setting (or the machine). ``skip``: fields already reported."""
    problems = []

    def ok(*fields: str) -> bool:
        return not (set(fields) & skip)

    # Paths are checked here, not in the fields: a default path may not exist in this folder,
    # and the re-read after field errors (load_train_settings) falls back to defaults.
    for var, value, check in (
        ("BASE_MODEL", s.base_model, base_model_problem),
        ("DATASET", s.dataset, dataset_problem),
        ("CHAT_TEMPLATE", s.chat_template, chat_template_problem),
    ):
        problem = check(value) if ok(var.lower()) else None
        if problem:
            problems.append(f"{var}={value!r}: {problem}")

    has_eval = s.eval_fraction > 0 or s.eval_size is not None
    if s.best_by_eval and ok("best_by_eval", "eval_fraction", "eval_size") and not has_eval:
        problems.append(
            "BEST_BY_EVAL=true: needs an eval split; set EVAL_FRACTION>0 or EVAL_SIZE, or BEST_BY_EVAL=false"
        )
    if s.best_by_eval and has_eval and ok("save_steps", "eval_steps", "best_by_eval") and s.save_steps % s.eval_steps:
        problems.append(
            f"SAVE_STEPS={s.save_steps}: must be a multiple of EVAL_STEPS={s.eval_steps} while BEST_BY_EVAL=true "
            f"(the best checkpoint must exist on disk), e.g. SAVE_STEPS={s.eval_steps * max(1, s.save_steps // s.eval_steps)}"
        )
    if not cuda and s.optimizer in CUDA_ONLY_OPTIMIZERS and ok("optimizer"):
        problems.append(
            f"OPTIMIZER={s.optimizer!r}: needs a CUDA GPU (bitsandbytes); on this machine use adamw_torch or auto"
        )
    if s.max_steps is not None and ok("max_steps", "warmup_steps") and s.warmup_steps >= s.max_steps:
        problems.append(f"WARMUP_STEPS={s.warmup_steps}: must be below MAX_STEPS={s.max_steps}")
    if s.hub_repo is not None and ok("hub_repo") and not looks_like_repo_id(s.hub_repo):
        problems.append(f"HUB_REPO={s.hub_repo!r}: must be a Hub repo id, owner/name")
    if ok("lora_target_modules") and not s.lora_target_modules:
        problems.append("LORA_TARGET_MODULES='': name at least one module, e.g. q_proj,v_proj, or attention")
    chosen = [name for name in s.lora_target_modules if name in TARGET_CHOICES]
    if ok("lora_target_modules") and chosen and len(s.lora_target_modules) > 1:
        problems.append(f"LORA_TARGET_MODULES={','.join(s.lora_target_modules)!r}: {chosen[0]} stands alone; "
                        f"give it alone, or list module names only")
    problem = report_to_problem(s.report_to) if ok("report_to") else None
    if problem:
        problems.append(problem)
    return problems


def load_train_settings(dotenv_file: str | os.PathLike = ".env", *, cuda: bool | None = None) -> TrainSettings:
    """Settings from environment > .env > recipe > defaults; every problem raised together."""
    dotenv_file = Path(dotenv_file)
    problems: list[str] = []
    files: list[Path] = []
    recipe = requested_recipe(dotenv_file)
    if recipe is not None:
        if recipe_path(recipe).is_file():
            files.append(recipe_path(recipe))
        else:
            problems.append(f"RECIPE={recipe!r}: no such recipe; choose one of {', '.join(recipe_names())}")
    files.append(dotenv_file)

    bad_fields: set[str] = set()
    try:
        settings = load_settings(TrainSettings, files)
    except SettingsError as err:
        problems.extend(err.problems)
        # Re-read with the broken fields at their defaults so the cross-field
        # checks can still report everything else in this same pass.
        bad_fields = {line.split("=")[0].split(":")[0].lower() for line in err.problems}
        defaults = {
            name: info.get_default(call_default_factory=True)
            for name, info in TrainSettings.model_fields.items()
            if name in bad_fields
        }
        try:
            settings = load_settings(TrainSettings, files, **defaults)
        except SettingsError:
            raise SettingsError(problems) from None
    if recipe is not None and not recipe_path(recipe).is_file():
        bad_fields.add("recipe")
    gpu_recipe = recipe is not None and "recipe" not in bad_fields and recipe not in CPU_RECIPES
    cuda_error = None
    if cuda is None:
        # Looking for a GPU imports torch (seconds): only a GPU recipe and the settings whose check depends
        # on the machine pay for it, so every other settings error is reported at once.
        machine_matters = gpu_recipe or settings.optimizer in CUDA_ONLY_OPTIMIZERS or (settings.num_gpus or 0) > 1
        cuda_error = cuda_check.cuda_start_error() if machine_matters else None
        cuda = machine_matters and cuda_error is None
    if gpu_recipe and not cuda:
        # Said once, with the driver's fix: the recipe's CUDA-only OPTIMIZER and NUM_GPUS would only repeat it.
        problems.append(f"RECIPE={recipe!r}: needs a CUDA GPU; {cuda_check.no_cuda_here(cuda_error)}")
        bad_fields |= {"optimizer", "num_gpus"}
    problems.extend(cross_field_problems(settings, cuda=cuda, skip=frozenset(bad_fields)))
    if settings.num_gpus and settings.num_gpus > 1 and "num_gpus" not in bad_fields:
        from train.launch import cuda_device_count

        visible = cuda_device_count() if cuda else 0
        if settings.num_gpus > visible:
            problems.append(
                f"NUM_GPUS={settings.num_gpus}: only {visible} CUDA device(s) visible; lower it or leave it unset"
            )
    if problems:
        raise SettingsError(problems)
    return settings
