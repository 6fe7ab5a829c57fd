"""Export settings: environment variables (or a .env file), validated all at once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraship.envsettings import CommaList, EmptyIsNone

#: Types the converter writes itself (no quantize step).
CONVERTER_TYPES = ("F16", "BF16")
#: Types made from the F16 file by llama.cpp's quantizer, with their llama_ftype names.
QUANTIZED_TYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
QUANT_TYPES = (*CONVERTER_TYPES, *QUANTIZED_TYPES)
DEFAULT_EVAL_TEXT = Path(__file__).with_name("heldout.txt")


class ExportSettings(BaseSettings):
    """What `python -m export` reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_file_encoding="utf-8")

    adapter: str = Field(
        "outputs/train",
        description="The adapter: a train OUTPUT_DIR (holding adapter/), an adapter folder itself, or a Hub repo id.",
    )
    base_model: Annotated[str | None, EmptyIsNone] = Field(
        None,
        description="Full-precision base to merge into: a local HF folder, a Hub repo id, or `embedded` "
        "(default: the base the adapter's manifest / adapter_config.json names).",
    )
    quant_types: CommaList = Field(
        default_factory=lambda: ["Q4_K_M"],
        description=f"GGUF types to write besides F16 (always written: the quantizer's source); the first other "
        f"than F16 is the shipped type MERGE_BASE=auto judges. One or more of {', '.join(QUANT_TYPES)}.",
    )
    output_dir: Path = Field(Path("outputs/export"), description="Folder for the GGUF files, manifest, card and Modelfile.")
    hub_repo: Annotated[str | None, EmptyIsNone] = Field(
        None, description="Push the result to this Hub model repo (owner/name); unset: no push."
    )
    hf_token: Annotated[SecretStr | None, EmptyIsNone] = Field(
        None, description="Hugging Face token for HUB_REPO and gated or private repos (never printed or written)."
    )
    export_lora_gguf: bool = Field(
        False, description="Also write the adapter itself as a LoRA GGUF (for llama.cpp --lora on the base GGUF)."
    )
    eval_text: Annotated[Path | None, EmptyIsNone] = Field(
        None,
        description="Held-out plain text for the perplexity check (paragraphs separated by blank lines; "
        "default: a short general-prose file shipped with export).",
    )
    stop_check: Literal["natural", "eos_token"] = Field(
        "natural",
        description="`natural`: a short greedy chat must end by itself (the fine-tune still emits EOS). "
        "`eos_token`: only check that llama.cpp stops on the tokenizer's end-of-generation ids (for random-init "
        "test models).",
    )
    stop_prompts: int = Field(
        3, ge=1, le=5,
        description="How many fixed short chats the stop check runs (each must end within STOP_MAX_TOKENS; "
        "with STOP_CHECK=eos_token each must stop on a forced end-of-turn token).",
    )
    stop_max_tokens: int = Field(
        128, ge=8, le=4096, description="Token budget a short chat must end within (STOP_CHECK=natural).",
    )
    eval_ctx: int = Field(256, ge=16, le=8192, description="Context window (tokens) for the perplexity check and the quality ladder.")
    eval_tokens: int = Field(
        256, ge=16, le=65536,
        description="Most predicted tokens the perplexity check scores per file (the start of EVAL_TEXT, in "
        "EVAL_CTX windows). Quantized files are compared with F16 on the same tokens, with a 95% interval.",
    )
    ladder: bool = Field(
        True,
        description="Score the quality ladder: the model as trained, the merged model and every GGUF on the "
        "fine-tune's held-out rows and the general text; its memory is checked first. `false` skips it (the "
        "manifest and card say so).",
    )
    merge_base: Literal["auto", "original", "nf4"] = Field(
        "auto",
        description="What the adapter is merged into: `original` (full-precision base), `nf4` (its NF4 round trip, "
        "what a QLoRA adapter trained against) or `auto` (both, each taken to the shipped type; the manifest's "
        "rule picks one, the other is the fallback).",
    )
    ladder_tokens: int = Field(
        1024, ge=16, le=65536,
        description="Most predicted tokens the quality ladder scores on each text (held-out rows, EVAL_TEXT). "
        "Bounds its memory: the trained model's log-probs are kept as float32, 2 x tokens x vocabulary x 4 bytes.",
    )
    ladder_max_nll_rise: float = Field(
        0.02, ge=0.0, le=100.0,
        description="Full-precision hand-offs (model as trained -> merged -> F16/BF16): most the mean NLL may rise "
        "on either text, in nats. Catches a merge or conversion that loses the fine-tune (a dropped delta, a "
        "wrong base).",
    )
    ladder_max_kl_rise: float = Field(
        0.02, ge=0.0, le=100.0,
        description="Full-precision hand-offs onto training's own base: most the KL from the model as trained may "
        "grow, in nats/token. Catches broken arithmetic; the original-base merge of a 4-bit adapter is held to "
        "the NLL only.",
    )
    ladder_max_quant_nll_rise: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Quantized GGUFs against the F16 one: most the mean NLL may rise on either text, in nats. "
        "Catches a broken file, not a small model's low-bit cost (the stop check and MERGE_BASE judge that).",
    )
    ladder_max_quant_kl_rise: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Quantized GGUFs against the F16 one: most the KL from the model as trained may grow on either "
        "text, in nats per token. Catches a broken file, not a low-bit one.",
    )
    threads: int = Field(0, ge=0, le=512, description="CPU threads for llama.cpp (0: all cores).")
    model_name: Annotated[str | None, EmptyIsNone] = Field(
        None,
        description="File name stem for the GGUF files and the Ollama model (default: from the adapter folder).",
    )
    hub_private: bool = Field(
        True, description="Create the Hub repos (GGUFs, merged model) as private; `false` makes them public. A repo "
        "that exists keeps its visibility.",
    )
    push_f16: bool = Field(
        False, description="Also upload the F16 GGUF (always written to OUTPUT_DIR: every quantization is made from "
        "it). Each type in QUANT_TYPES is uploaded, F16 too when listed there.",
    )
    merged: bool = Field(
        False, description="Also write the merged model as a Hugging Face folder (OUTPUT_DIR/merged: 16-bit "
        "safetensors, config, tokenizer, card), checked on the quality ladder and pushed to MERGED_REPO.",
    )
    merged_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Weight type of the merged model's safetensors (MERGED=true).",
    )
    merged_max_shard_mb: int = Field(
        5000, ge=1, le=100000,
        description="Largest safetensors file of the merged model, in MB (10^6 bytes); a tensor larger than this "
        "gets a file of its own.",
    )
    merged_repo: Annotated[str | None, EmptyIsNone] = Field(
        None, description="Hub repo for the merged model (default: HUB_REPO + `-merged`); MERGED=true pushes it "
        "when HUB_REPO is set.",
    )

    @field_validator("quant_types")
    @classmethod
    def _known_quant_types(cls, value: list[str]) -> list[str]:
        wanted = [v.strip().upper() for v in value]
        unknown = [v for v in wanted if v not in QUANT_TYPES]
        if unknown:
            raise ValueError(f"unknown quant type {', '.join(unknown)}; choose from {', '.join(QUANT_TYPES)}")
        if not wanted:
            raise ValueError("give at least one quant type")
        return list(dict.fromkeys(wanted))

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, value: str) -> str:
        from loraship.hub import looks_like_repo_id

        value = value.strip()
        if not value:
            raise ValueError("empty; give a train OUTPUT_DIR, an adapter folder or a Hub repo id")
        path = Path(value).expanduser()
        if path.exists():
            if not (path / "adapter_config.json").is_file() and not (path / "adapter" / "adapter_config.json").is_file():
                raise ValueError("no adapter_config.json in it or in its adapter/ folder; run `make train` first")
            return value
        if looks_like_repo_id(value):
            return value
        raise ValueError("no such folder (and not a Hub repo id); run `make train` first or point ADAPTER at an adapter")

    @field_validator("hub_repo")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError("not a Hub repo id; use owner/name")
        return value

    @field_validator("merged_repo")
    @classmethod
    def _merged_repo_id(cls, value: str | None, info) -> str | None:
        if value is None:
            return value
        parts = value.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError("not a Hub repo id; use owner/name")
        if not info.data.get("merged") or not info.data.get("hub_repo"):
            raise ValueError("the merged model is pushed only with MERGED=true and HUB_REPO set")
        if value == info.data.get("hub_repo"):
            raise ValueError("the merged model needs its own repo, not HUB_REPO's")
        return value

    @field_validator("eval_text")
    @classmethod
    def _eval_text_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        import re

        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return value
