"""The bad-input corpus as data: load ``cases.yaml``, lay out a case's files, run its stage CLI.

A case is one mistake a user can make, with what the stage must answer. Each
entry of ``cases.yaml`` has:

``id``
    a unique, readable name (the pytest id).
``stage``
    ``train``, ``export``, ``serve``, ``evals`` (run as ``python -m STAGE ARGS``) or
    ``api`` (one HTTP request to a running ``python -m serve``; see ``test_api.py``).
``args``
    command-line arguments after ``python -m STAGE`` (default none).
``env``
    environment variables on top of the stage's defaults (``STAGE_DEFAULTS``); ``null``
    unsets a default.
``files``
    files to create in the case's folder before the run: ``path: content`` where
    content is text, ``{repeat: TEXT, times: N}``, or ``{latin1: TEXT}`` (each
    character one byte, for invalid UTF-8); a path ending in ``/`` is an empty folder.
``exit``
    the expected exit status (2: the user's mistake, reported in one line each).
``errors``
    what stderr's ``error:`` lines must say: each item a fragment, or a list of
    fragments that must all appear in one line (so "names the variable and the
    problem" is checked on the same line).
``fast``
    true for settings errors: they must be reported before any model loads, so
    the whole run must use less than ``FAST_CPU_SECONDS`` of CPU time.
``request``, ``status``, ``message`` (``stage: api`` only)
    the HTTP request (``method``, default POST; ``path``, default /v1/chat/completions; a
    body as ``json``, ``text`` or ``latin1``), the status it must get (one, or a list of
    acceptable ones) and a fragment the answer's body must contain.
``note``
    why the case exists, when its id does not say it all.
``xfail``
    a stage bug this case exposes (the reason names it); the case is a strict
    xfail, so fixing the stage turns it into a failure until the mark is removed.

Values may name inputs in braces: ``{tmp}`` (the case's folder, also its working
directory) and the session-built inputs of ``conftest.py`` (``{tiny_model}``,
``{tiny_adapter}``, ``{embedded_gguf}``, ``{truncated_gguf}``, ``{evil_gguf}``, ``{repo}``).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
CASES_FILE = Path(__file__).with_name("cases.yaml")
#: A settings error must be reported within this much CPU time: nothing heavy may have been
#: loaded (importing torch alone costs ~3 s here, transformers' trainer ~11 s, a model more).
#: CPU time, not wall time: on a shared 2-core machine the wall clock measures the neighbours.
FAST_CPU_SECONDS = 8.0
#: ... and within this much wall time, however busy the machine.
FAST_WALL_SECONDS = 60.0
#: Hard limit for any one run (a case that unexpectedly starts real work).
RUN_TIMEOUT = 240

STAGES = ("train", "export", "serve", "evals", "api")
KNOWN_KEYS = {"id", "stage", "args", "env", "files", "exit", "errors", "fast", "xfail",
              "request", "status", "message", "note"}

#: What every run of a stage gets unless the case says otherwise: outputs inside the
#: case folder, inputs that are valid, so only the case's own mistake is wrong.
STAGE_DEFAULTS: dict[str, dict[str, str]] = {
    "train": {
        "BASE_MODEL": "embedded",
        "DATASET": "{repo}/data/quokka/train.jsonl",
        "OUTPUT_DIR": "{tmp}/out",
        "MAX_STEPS": "1",
    },
    "export": {
        "ADAPTER": "{tiny_adapter}",
        "OUTPUT_DIR": "{tmp}/out",
        "THREADS": "2",
        "STOP_CHECK": "eos_token",
    },
    "serve": {
        "MODEL": "{embedded_gguf}",
        "N_CTX": "512",
        "N_THREADS": "2",
        "MAX_TOKENS": "16",
        "TEMPERATURE": "0",
        "HOST": "127.0.0.1",
        # Never a port anyone uses: a case that wrongly starts a server fails by timeout, alone.
        "PORT": "1",
    },
    "evals": {
        "MODEL": "embedded",
        "OUTPUT_DIR": "{tmp}/out",
        "HELDOUT": "{repo}/data/quokka/heldout.jsonl",
        "PERPLEXITY_TEXT": "{repo}/data/quokka/general_heldout.txt",
        "N_THREADS": "2",
        "LIMIT": "1",
    },
}

#: Variables passed through from the test process (caches, locale); nothing else leaks in.
PASS_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LORASHIP_CACHE",
                "LLAMA_CPP_CONVERTER", "HF_HOME", "XDG_CACHE_HOME")
FIXED_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}

#: Files a refused run may leave on purpose: records of what was tried, never a result. None today:
#: train writes OUTPUT_DIR/run_settings.json only once the data is accepted.
RUN_RECORDS: frozenset[str] = frozenset()

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass
class Case:
    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def stage(self) -> str:
        return self.raw["stage"]

    def __getattr__(self, key: str) -> Any:
        if key == "raw":
            raise AttributeError(key)
        return self.raw.get(key)


def load_cases(stage_filter: Callable[[str], bool] = lambda s: True) -> list[Case]:
    entries = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))
    cases, seen = [], set()
    for entry in entries:
        unknown = set(entry) - KNOWN_KEYS
        assert not unknown, f"case {entry.get('id')}: unknown keys {sorted(unknown)}"
        assert entry.get("stage") in STAGES, f"case {entry.get('id')}: stage must be one of {STAGES}"
        assert entry["id"] not in seen, f"duplicate case id {entry['id']}"
        seen.add(entry["id"])
        if stage_filter(entry["stage"]):
            cases.append(Case(entry))
    return cases


def placeholders(value: Any) -> set[str]:
    """Every ``{name}`` used anywhere in a case's values."""
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    if isinstance(value, dict):
        return set().union(*(placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(placeholders(v) for v in value)) if value else set()
    return set()


def expand(value: Any, inputs: dict[str, str]) -> Any:
    """Fill in ``{name}`` placeholders (unknown braces, e.g. JSON, are left alone)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: inputs.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        if set(value) == {"repeat", "times"}:
            return expand(value["repeat"], inputs) * int(value["times"])
        return {k: expand(v, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, inputs) for v in value]
    return value


def file_bytes(content: Any, inputs: dict[str, str]) -> bytes:
    if isinstance(content, dict) and set(content) == {"latin1"}:
        return expand(content["latin1"], inputs).encode("latin-1")
    return str(expand(content, inputs)).encode("utf-8")


def write_files(folder: Path, files: dict[str, Any] | None, inputs: dict[str, str]) -> None:
    for name, content in (files or {}).items():
        target = folder / name
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file_bytes(content, inputs))


def base_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    env.update(FIXED_ENV)
    env["PYTHONPATH"] = str(ROOT)
    return env


def stage_env(case: Case, inputs: dict[str, str]) -> dict[str, str]:
    env = base_env()
    env.update(expand(STAGE_DEFAULTS.get(case.stage, {}), inputs))
    for key, value in expand(case.env or {}, inputs).items():
        if value is None:  # `VAR: null` unsets a stage default
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


@dataclass
class Run:
    exit: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float  # user + system time of the stage process and its children

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_stage(stage: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float = RUN_TIMEOUT) -> Run:
    started, cpu_before = time.monotonic(), _children_cpu()
    proc = subprocess.run(
        [sys.executable, "-m", stage, *args], cwd=cwd, env=env, capture_output=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Run(
        proc.returncode,
        proc.stdout.decode("utf-8", errors="replace"),
        proc.stderr.decode("utf-8", errors="replace"),
        time.monotonic() - started,
        _children_cpu() - cpu_before,
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def files_under(folder: Path) -> set[str]:
    """Every file below ``folder`` (relative paths), to see what a run left behind."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
