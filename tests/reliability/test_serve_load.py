"""Serve under load: 16 streamed API chats and 4 UI chats at once, answers unmixed, /health throughout.

One real ``python -m serve`` (the embedded GGUF) on loopback. Each prompt is
first asked alone (greedy); then all twenty run together, sixteen streamed
through the OpenAI-compatible API and four through the Gradio UI (one client
per person), while another thread polls ``/health``. Every answer must equal
its answer alone, and the server must never stop answering ``/health``.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time

import pytest

from tests.fixtures.serve_process import http, running_server

pytestmark = pytest.mark.slow
MAX_TOKENS = 16
API_PROMPTS = [f"What is {a} plus {b}?" for a, b in zip(range(2, 18), range(30, 46))]
UI_PROMPTS = ["Name a fruit.", "Name a colour.", "Which city is the capital of France?", "Say something about cats."]


def streamed(client, prompt: str) -> str:
    pieces = []
    for chunk in client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


def test_sixteen_streamed_api_chats_and_four_ui_chats_complete_unmixed_while_health_answers(tmp_path):
    import openai
    from gradio_client import Client

    from loraship.embedded import embedded_gguf_path

    with running_server(str(embedded_gguf_path()), tmp_path, n_ctx=512, max_tokens=MAX_TOKENS) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)
        alone = {p: streamed(client, p) for p in API_PROMPTS + UI_PROMPTS}

        people = [Client(server.url, verbose=False) for _ in UI_PROMPTS]
        health, stop = [], threading.Event()

        def poll_health():
            while not stop.is_set():
                health.append(http("GET", server.url + "/health", timeout=30).status)
                time.sleep(0.25)

        def timed(call, *args, **kwargs):
            started = time.monotonic()
            return call(*args, **kwargs), time.monotonic() - started

        poller = threading.Thread(target=poll_health)
        poller.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(len(API_PROMPTS) + len(UI_PROMPTS)) as pool:
                api = {p: pool.submit(timed, streamed, client, p) for p in API_PROMPTS}
                ui = {
                    p: pool.submit(timed, person.predict, p, "", 0.0, MAX_TOKENS, api_name="/chat")
                    for p, person in zip(UI_PROMPTS, people)
                }
                results = {p: f.result(timeout=600) for p, f in {**api, **ui}.items()}
        finally:
            stop.set()
            poller.join(timeout=60)

        together = {p: answer for p, (answer, _) in results.items()}
        assert together == alone
        assert len(health) >= 3 and set(health) == {200}, health
        latencies = sorted(seconds for _, seconds in results.values())
        p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
        print(f"\n20 concurrent chats: p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s, "
              f"{len(health)} /health polls all 200")
        assert server.process.poll() is None
