"""Does the server cost speed? Decode tokens/s and time to first token through the
API versus llama_cpp called directly (same GGUF, same threads, one run), and 16
concurrent chats: all complete, none mixed, p50/p95 latency.

    python bench/serve_throughput.py [--model PATH] [--threads 2] [--runs 5]     # make bench-serve

Prints a table and writes bench/results/serve_throughput-embedded.json (with ``--model``:
serve_throughput-<the GGUF's name>.json), or ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraship.atomic import write_json  # noqa: E402
from loraship.embedded import embedded_gguf_path  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CONCURRENT_PROMPTS = [
    "Name a fruit and describe it.", "What is 7 times 8?", "Name a colour of the sky.", "Describe a cat.",
    "What is the capital of France?", "Name a planet.", "Give me a word that rhymes with moon.", "Describe rain.",
    "What do bees make?", "Name an ocean.", "What is 10 minus 3?", "Describe a mountain.",
    "Name a musical instrument.", "What is water made of?", "Describe a forest.", "Name a month of the year.",
]


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()}


def timed_stream(chunks) -> dict:
    """TTFT and decode rate from an iterator of text pieces (one piece ~ one token in both paths)."""
    start = time.perf_counter()
    first = None
    pieces = []
    for piece in chunks:
        if not piece:
            continue
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
    end = time.perf_counter()
    decode_s = end - first if first else float("nan")
    return {
        "ttft_s": (first or end) - start,
        "tokens": len(pieces),
        "decode_tok_s": (len(pieces) - 1) / decode_s if len(pieces) > 1 and decode_s > 0 else float("nan"),
        "text": "".join(pieces),
    }


def direct_pieces(llama, prompt: str, max_tokens: int):
    from serve.model import api_sampling_defaults

    # the API's sampling defaults (its repeat penalty included), so both paths do the same work
    for chunk in llama.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True,
        **api_sampling_defaults(),
    ):
        yield chunk["choices"][0]["delta"].get("content")


def api_pieces(client, prompt: str, max_tokens: int):
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            yield chunk.choices[0].delta.content


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MODEL=str(model), PORT=str(port), HOST="127.0.0.1", N_THREADS=str(threads),
               N_CTX=str(n_ctx), PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become healthy in 180 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF to measure (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5, help="single-stream runs per path (interleaved)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrent-max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, help="JSON results file (default: bench/results/serve_throughput-*.json)")
    args = parser.parse_args()
    model = (args.model or embedded_gguf_path()).resolve()

    import llama_cpp
    from openai import OpenAI

    from serve.model import load_llama

    load_before = os.getloadavg()
    direct = load_llama(model, args.n_ctx, args.threads)
    proc, url = start_server(model, args.threads, args.n_ctx)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        # Warm both paths (first decode after load is slower), then interleave so
        # any change in machine load hits both alike.
        timed_stream(direct_pieces(direct, PROMPT, 16))
        timed_stream(api_pieces(client, PROMPT, 16))
        results = {"direct": [], "api": []}
        for _ in range(args.runs):
            results["direct"].append(timed_stream(direct_pieces(direct, PROMPT, args.max_tokens)))
            results["api"].append(timed_stream(api_pieces(client, PROMPT, args.max_tokens)))
        same_text = results["direct"][0]["text"] == results["api"][0]["text"]

        # 16 concurrent chats: each answer must equal the one it gets alone.
        alone = {}
        for prompt in CONCURRENT_PROMPTS:
            reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=args.concurrent_max_tokens, temperature=0)
            alone[prompt] = reply.choices[0].message.content

        def one(prompt: str) -> tuple[str, float, str]:
            start = time.perf_counter()
            text = "".join(p or "" for p in api_pieces(client, prompt, args.concurrent_max_tokens))
            return prompt, time.perf_counter() - start, text

        wall = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(CONCURRENT_PROMPTS)) as pool:
            done = list(pool.map(one, CONCURRENT_PROMPTS))
        wall = time.perf_counter() - wall
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        direct.close()

    def summary(rows: list[dict]) -> dict:
        return {
            "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rows),
            "ttft_s_median": statistics.median(r["ttft_s"] for r in rows),
            "tokens_median": statistics.median(r["tokens"] for r in rows),
        }

    d, a = summary(results["direct"]), summary(results["api"])
    latencies = [latency for _, latency, _ in done]
    unmixed = sum(text == alone[prompt] for prompt, _, text in done)
    report = {
        "command": "python bench/serve_throughput.py " + " ".join(sys.argv[1:]),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_avg_before": load_before,
        "model": str(model),
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "max_tokens": args.max_tokens,
        "runs": args.runs,
        "llama_cpp_python": llama_cpp.__version__,
        "direct": d,
        "api": a,
        "api_over_direct_decode": a["decode_tok_s_median"] / d["decode_tok_s_median"],
        "same_greedy_text": same_text,
        "runs_detail": {k: [{x: r[x] for x in ("ttft_s", "tokens", "decode_tok_s")} for r in v] for k, v in results.items()},
        "concurrent": {
            "chats": len(done),
            "completed": sum(bool(text) for _, _, text in done),
            "unmixed": unmixed,
            "max_tokens": args.concurrent_max_tokens,
            "latency_p50_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
            "wall_s": wall,
        },
        "goal": "API decode >= 0.95x direct",
    }
    report["goal_met"] = report["api_over_direct_decode"] >= 0.95

    c = report["concurrent"]
    print(f"model {model.name}, {args.threads} threads, {args.runs} interleaved runs of {args.max_tokens} tokens (medians)")
    print(f"{'path':<10}{'decode tok/s':>14}{'TTFT s':>10}{'tokens':>8}")
    print(f"{'direct':<10}{d['decode_tok_s_median']:>14.1f}{d['ttft_s_median']:>10.3f}{d['tokens_median']:>8.0f}")
    print(f"{'API':<10}{a['decode_tok_s_median']:>14.1f}{a['ttft_s_median']:>10.3f}{a['tokens_median']:>8.0f}")
    print(f"API / direct decode: {report['api_over_direct_decode']:.3f}  (goal >= 0.95: {'met' if report['goal_met'] else 'NOT met'})")
    print(f"{c['chats']} concurrent chats: {c['completed']} completed, {c['unmixed']} identical to their answer alone; "
          f"latency p50 {c['latency_p50_s']:.2f} s, p95 {c['latency_p95_s']:.2f} s, wall {c['wall_s']:.1f} s")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 cores)")
    name = model.stem if args.model else "embedded"
    out = write_json(args.out or ROOT / "bench" / "results" / f"serve_throughput-{name}.json", report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
