"""Greedy chat answers from a GGUF (llama.cpp) or a Hugging Face folder (transformers).

Both back ends render the conversation with the model's own chat template and
send no system message unless the conversation has one, so SmolLM2's
template adds its default system prompt exactly as the served chat does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from loraship.embedded import EMBEDDED, embedded_gguf_path

from evals.settings import EvalError

Messages = list[dict[str, str]]


def resolve_model_path(model: str, quant: str = "Q4_K_M") -> Path:
    """Turn a MODEL setting into a .gguf file or a Hugging Face folder.

    ``embedded`` is the bundled SmolLM2 GGUF; a folder with ``config.json`` is
    a Hugging Face model; any other folder must hold exactly one .gguf whose
    name contains ``quant`` (an export folder).
    """
    if model == EMBEDDED:
        return embedded_gguf_path()
    path = Path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise EvalError(f"{path} is not a .gguf file; give a .gguf, a Hugging Face folder or an export folder")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(p for p in path.glob("*.gguf") if quant.lower() in p.name.lower())
        if len(ggufs) == 1:
            return ggufs[0]
        found = ", ".join(p.name for p in sorted(path.glob("*.gguf"))) or "none"
        raise EvalError(
            f"{path} holds {len(ggufs)} .gguf files matching QUANT={quant} (all .gguf: {found}); "
            "point MODEL at one .gguf file or set QUANT"
        )
    raise EvalError(f"model {model!r} not found: give a .gguf file, a Hugging Face folder, an export folder or `embedded`")


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def gguf_answers(gguf_path: str | os.PathLike, conversations: Iterable[Messages], *, max_new_tokens: int = 64,
                 n_ctx: int = 2048, n_threads: int | None = None) -> list[str]:
    """Greedy answers from llama.cpp, one per conversation (each answered from a fresh context)."""
    from llama_cpp import Llama
    from tqdm import tqdm

    from evals.perplexity import default_threads

    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads or default_threads(), verbose=False)
    answers = []
    try:
        for messages in tqdm(list(conversations), desc=f"answers {Path(gguf_path).name}", unit="q", disable=None):
            reply = llm.create_chat_completion(
                messages=messages,
                temperature=0.0,
                top_k=1,
                repeat_penalty=1.0,
                max_tokens=max_new_tokens,
                seed=0,
            )
            answers.append((reply["choices"][0]["message"]["content"] or "").strip())
    finally:
        llm.close()
    return answers


def hf_answers(model_dir: str | os.PathLike, conversations: Iterable[Messages], *, max_new_tokens: int = 64,
               n_threads: int | None = None) -> list[str]:
    """Greedy answers from transformers (fp32 on CPU), one per conversation."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if n_threads:
        torch.set_num_threads(n_threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    answers = []
    with torch.inference_mode():
        for messages in tqdm(list(conversations), desc=f"answers {Path(model_dir).name}", unit="q", disable=None):
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def chat_answers(model_path: Path, conversations: Sequence[Messages], *, max_new_tokens: int = 64,
                 n_ctx: int = 2048, n_threads: int | None = None) -> list[str]:
    """Greedy answers from whichever back end ``model_path`` needs."""
    if is_gguf(model_path):
        return gguf_answers(model_path, conversations, max_new_tokens=max_new_tokens, n_ctx=n_ctx, n_threads=n_threads)
    return hf_answers(model_path, conversations, max_new_tokens=max_new_tokens, n_threads=n_threads)
