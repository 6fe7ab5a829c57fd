"""Cold start of the serve image as a Space starts it: container start -> MODEL downloaded -> /health 200 -> a chat.

The serve image (built by `bench/space_build.py` or `.ci/images.sh`) runs with 2 CPUs, as a free CPU Space has,
and `MODEL` pointing at a public repo on the stand-in Hub on loopback (tests/fixtures/hub.py, run in this process)
that holds a Q4_K_M GGUF of a random-init Llama-3.2-1B shape (SmolLM2's tokenizer and chat template, so about
0.7 GB) and its manifest.json, as `python -m export` pushes them. The GGUF is made here with the export's own
convert and quantize (llama.cpp from the pinned llama-cpp-python source); nothing comes from the internet.

Each run is a fresh container with an empty Hugging Face cache. As in `bench/space_build.py`, the containers and
this process get the CPUs over other jobs on the machine (`--share-cpu`: no priority). Timed from `podman run`:

* download: the stand-in Hub's GET of the GGUF, first byte asked to last byte sent;
* serving: the server's "serving ... on" line (after the sha256 check against the manifest and the model load);
* /health 200: polled every 50 ms;
* first token and answer: a streamed /v1/chat/completions of MAX_TOKENS greedy tokens sent once /health is 200.

    python bench/space_cold_start.py --image localhost/loraship-serve:bench --runs 3 \\
        --out bench/results/space_cold_start-1b-q4km.json

Prints a table and writes JSON (each run's timeline, the GGUF's size, the machine's load).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, versions  # noqa: E402
from bench.space_build import CPU, PRIORITY_SHARES, commit, podman_env  # noqa: E402

CGROUP = "loraship-space-cold-start"
REPO = "bench/llama-1b-shaped-GGUF"
GGUF = "llama-1b-shaped-Q4_K_M.gguf"
PROMPT = "What is the capital of France? Answer in one word."


# --- the model --------------------------------------------------------------


def make_gguf(workdir: Path) -> Path:
    """The random-init Llama-3.2-1B-shaped Q4_K_M GGUF and its manifest.json in ``workdir/export`` (kept for reuse)."""
    export = workdir / "export"
    gguf = export / GGUF
    if gguf.is_file() and (export / "manifest.json").is_file():
        return gguf
    import shutil

    from bench.random_llama import SHAPES, build_random_llama
    from export.converter import locate_converter
    from export.gguf import convert_to_gguf, quantize_gguf
    from loraship.manifest import build_manifest, write_manifest
    from tests.fixtures.models import load_embedded_tokenizer

    tokenizer = load_embedded_tokenizer()
    base = workdir / "base"
    shutil.rmtree(base, ignore_errors=True)
    build_random_llama(base, {**SHAPES["llama-3.2-1b"], "vocab_size": len(tokenizer)}, tokenizer, seed=0)
    export.mkdir(parents=True, exist_ok=True)
    f16 = convert_to_gguf(base, workdir / "llama-1b-shaped-F16.gguf", "f16", locate_converter())
    quantize_gguf(f16, gguf, "Q4_K_M")
    write_manifest(export, build_manifest(kind="gguf", stage="export", folder=export, files=[GGUF],
                                          libraries=("llama-cpp-python",)))
    f16.unlink()
    shutil.rmtree(base)
    return gguf


# --- one cold start -----------------------------------------------------------


@contextlib.contextmanager
def cpu_priority(enabled: bool):
    """A cgroup with cpu.shares PRIORITY_SHARES for the containers and this process (the stand-in Hub serves the
    download): other work on the machine takes only what they leave, as a Space has its CPUs to itself. Yields
    the cgroup parent for podman run, or None."""
    if not enabled:
        yield None
        return
    group = CPU / CGROUP
    group.mkdir(exist_ok=True)
    (group / "cpu.shares").write_text(str(PRIORITY_SHARES))
    (group / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield f"/{CGROUP}"
    finally:
        (CPU / "cgroup.procs").write_text(str(os.getpid()))
        for hierarchy in Path("/sys/fs/cgroup").glob(f"*/{CGROUP}"):
            # podman's own groups inside (each container's, conmon's) are empty once the containers are gone.
            for leftover in [*(p for p in hierarchy.iterdir() if p.is_dir()), hierarchy]:
                with contextlib.suppress(OSError):
                    leftover.rmdir()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_time(line: str) -> float | None:
    """The epoch seconds of a `podman logs -t` line (its timestamp has nanoseconds; microseconds are kept)."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)", line)
    if not match:
        return None
    offset = "+00:00" if match[3] == "Z" else match[3]
    fraction = (match[2] or "0")[:6].ljust(6, "0")
    return dt.datetime.fromisoformat(f"{match[1]}.{fraction}{offset}").timestamp()


def health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def streamed_chat(url: str, max_tokens: int) -> tuple[float, float, str]:
    """Seconds (epoch) of the first content token and of the answer's end, and the answer."""
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    first, text = None, []
    with urllib.request.urlopen(request, timeout=300) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
            if delta:
                first = first or time.time()
                text.append(delta)
    return first, time.time(), "".join(text)


def cold_start(image: str, hub, downloads: list, env: dict, max_tokens: int, cpus: str, parent: str | None) -> dict:
    name = f"loraship-cold-start-{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Host networking: the container reaches the stand-in Hub on this machine's loopback.
    command = ["podman", "run", "-d", "--init", "--no-healthcheck", "--network", "host", "--cpus", cpus,
               "--name", name, "-e", f"MODEL={REPO}", "-e", f"HF_ENDPOINT={hub.url}", "-e", f"PORT={port}",
               "-e", "HOST=127.0.0.1", *(["--cgroup-parent", parent] if parent else []), image]
    seen = len(downloads)
    load = round(os.getloadavg()[0], 2)
    t0 = time.time()
    try:
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        t_started = time.time()
        deadline = t0 + 600
        while not health_ok(url):
            state = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", name], env=env,
                                   capture_output=True, text=True).stdout.strip()
            if state != "true" or time.time() > deadline:
                logs = subprocess.run(["podman", "logs", name], env=env, capture_output=True, text=True)
                sys.exit(f"the container stopped or never answered /health:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
            time.sleep(0.05)
        t_health = time.time()
        t_first, t_done, answer = streamed_chat(url, max_tokens)
        logs = subprocess.run(["podman", "logs", "-t", name], env=env, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True)
    serving = [log_time(line) for line in logs.splitlines() if " serving " in line]
    gguf_gets = [d for d in downloads[seen:] if d["file"] == GGUF and d["method"] == "GET"]
    marks = {
        "container_started": t_started, "download_start": gguf_gets[0]["start"] if gguf_gets else None,
        "download_end": gguf_gets[-1]["end"] if gguf_gets else None, "serving_line": serving[0] if serving else None,
        "health_200": t_health, "first_token": t_first, "answer_done": t_done,
    }
    timeline = {key: (round(value - t0, 2) if value else None) for key, value in marks.items()}
    return {"timeline_s": timeline, "parts_s": parts(timeline), "load_1m_at_start": load, "answer": answer, "log_tail": logs.splitlines()[-5:]}


def parts(timeline: dict) -> dict:
    """The timeline as consecutive parts; /health less the download: the goal is under 20 s plus the download."""
    order = ["container_started", "download_start", "download_end", "serving_line", "health_200", "first_token",
             "answer_done"]
    names = ["podman run", "start to download", "download", "sha256 check + load", "server up", "first token",
             "rest of the answer"]
    out, before = {}, 0.0
    for key, name in zip(order, names):
        out[name] = round(timeline[key] - before, 2) if timeline[key] is not None else None
        before = timeline[key] if timeline[key] is not None else before
    if timeline["download_end"] is not None:
        out["health 200 less the download"] = round(timeline["health_200"] - out["download"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/loraship-serve:bench", help="the serve image to start")
    parser.add_argument("--runs", type=int, default=3, help="cold starts, each a fresh container")
    parser.add_argument("--cpus", default="2", help="podman run --cpus")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens in the timed answer")
    parser.add_argument("--workdir", default="/tmp/loraship-space-cold-start", help="keeps the GGUF between runs")
    parser.add_argument("--share-cpu", action="store_true",
                        help="let other work on the machine compete (default: the containers and the stand-in Hub get "
                             f"cpu.shares {PRIORITY_SHARES}, as a Space has its CPUs to itself)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)

    import pytest

    import tests.fixtures.hub as stub
    from loraship.manifest import sha256_file

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = make_gguf(workdir)
    env = podman_env()
    downloads: list[dict] = []
    resolve = stub._Handler._resolve

    def timed_resolve(handler, repo, revision, filename):
        entry = {"file": filename, "method": handler.command, "start": time.time()}
        try:
            return resolve(handler, repo, revision, filename)
        finally:
            entry["end"] = time.time()
            downloads.append(entry)

    load_before = list(os.getloadavg())
    with pytest.MonkeyPatch.context() as monkeypatch, cpu_priority(not args.share_cpu) as parent, \
            tempfile.TemporaryDirectory(dir=workdir) as hub_files:  # the Hub's copy of the GGUF goes when done
        monkeypatch.setattr(stub._Handler, "_resolve", timed_resolve)
        with stub.running_stub_hub(monkeypatch, Path(hub_files)) as hub:
            hub.add_file(REPO, GGUF, gguf.read_bytes())
            hub.add_file(REPO, "manifest.json", (gguf.parent / "manifest.json").read_bytes())
            runs = [cold_start(args.image, hub, downloads, env, args.max_tokens, args.cpus, parent)
                    for _ in range(args.runs)]
    image_id = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", args.image], env=env,
                              capture_output=True, text=True).stdout.strip()
    keys = list(runs[0]["timeline_s"])
    medians = {key: statistics.median(r["timeline_s"][key] for r in runs if r["timeline_s"][key] is not None)
               for key in keys}
    result = {
        "commit": commit(), "image": args.image, "image_id": image_id, "cpus": args.cpus, "max_tokens": args.max_tokens,
        "cpu_shares": 1024 if args.share_cpu else PRIORITY_SHARES,
        "gguf": {"name": GGUF, "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)},
        "runs": runs, "median_timeline_s": medians,
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": list(os.getloadavg())},
        "versions": versions(("llama-cpp-python", "huggingface-hub")),
    }
    part_names = list(runs[0]["parts_s"])
    part_medians = {name: statistics.median(r["parts_s"][name] for r in runs if r["parts_s"][name] is not None)
                    for name in part_names}
    result["median_parts_s"] = part_medians
    header = [f"run {i + 1}" for i in range(len(runs))] + ["median"]
    rows = [[key.replace("_", " ")] + [r["timeline_s"][key] for r in runs] + [medians[key]] for key in keys]
    print(markdown_table(["from podman run, s"] + header, rows))
    rows = [[name] + [r["parts_s"][name] for r in runs] + [part_medians[name]] for name in part_names]
    print(markdown_table(["part, s"] + header, rows))
    print(f"GGUF {gguf.stat().st_size / 1e9:.3f} GB; answer of run 1: {runs[0]['answer'][:80]!r}; "
          f"load average before {load_before[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
