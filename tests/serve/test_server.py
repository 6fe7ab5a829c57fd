"""The real server: `python -m serve` on a loopback port, driven by real clients.

One server process for the whole module (the embedded SmolLM2 GGUF in real
llama.cpp), so the module stays well under a minute of model time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loraship.embedded import embedded_gguf_path
from serve.app import MESSAGE_PLACEHOLDER
from tests.fixtures.serve_process import running_server

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
N_CTX = 512
MAX_TOKENS = 24

pytestmark = pytest.mark.slow


def http(method: str, url: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    with running_server(str(embedded_gguf_path()), workdir, n_ctx=N_CTX, max_tokens=MAX_TOKENS, n_threads=1) as running:
        yield running.url
    log = (workdir / "server.log").read_text()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0, timeout=60)


QUESTION = "Which city is the capital of France?"


@pytest.fixture(scope="module")
def model_answer() -> str:
    """The embedded model's own greedy answer to QUESTION, straight from llama.cpp in this process.

    Served answers must equal it: that proves the server passes the model's words through unchanged,
    without asserting a fact a 135M model gets right on one CPU and wrong on another (the greedy
    answer depends on the SIMD kernels the llama.cpp build compiled in).
    """
    from serve.model import load_llama, stream_chat

    llama = load_llama(embedded_gguf_path(), N_CTX, 1)
    try:
        # the sampling defaults of the OpenAI API (repeat penalty etc.), as every surface of the server uses
        answer = "".join(stream_chat(llama, [{"role": "user", "content": QUESTION}], MAX_TOKENS, 0.0)).strip()
    finally:
        llama.close()
    assert answer
    return answer


def ask(client, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
    )
    return reply.choices[0].message.content


def assert_still_serving(server, openai_client):
    status, body = http("GET", server + "/health")
    assert status == 200 and body["status"] == "ok"
    assert ask(openai_client, "Say hello.", max_tokens=8).strip()


def test_health_names_the_model(server):
    status, body = http("GET", server + "/health")
    assert status == 200
    assert body["status"] == "ok" and body["model"] == embedded_gguf_path().name and body["n_ctx"] == N_CTX


def test_models_lists_the_served_gguf(openai_client):
    assert [m.id for m in openai_client.models.list().data] == [embedded_gguf_path().name]


def test_openai_client_streams_a_chat(openai_client, model_answer):
    stream = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=MAX_TOKENS, stream=True,
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, pieces
    answer = "".join(pieces)
    assert answer.strip() == model_answer
    # the template's end-of-turn marker ends the answer; it never shows in it
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
    # streaming and not streaming give the same greedy answer
    assert ask(openai_client, QUESTION) == answer


def test_gradio_client_streams_a_chat(server, model_answer):
    from gradio_client import Client

    client = Client(server, verbose=False)
    job = client.submit(QUESTION, "", 0.0, MAX_TOKENS, api_name="/chat")
    updates = list(job)
    assert len(updates) > 1, updates  # streamed: several partial answers
    final = job.result()
    assert final.strip() == model_answer
    assert all(final.startswith(partial) for partial in updates)


def test_concurrent_chats_from_ui_and_api_never_mix(server, openai_client):
    from gradio_client import Client

    prompts = ["Name a fruit.", "What is 2 + 2?", "Name a colour.", "Say something about cats."]
    alone = [ask(openai_client, p) for p in prompts]
    # one browser session each, as two people would have
    people = [Client(server, verbose=False) for _ in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(ask, openai_client, p)
            if i % 2 == 0
            else pool.submit(people[i].predict, p, "", 0.0, MAX_TOKENS, api_name="/chat")
            for i, p in enumerate(prompts)
        ]
        together = [f.result(timeout=120) for f in futures]
    assert together == alone


@pytest.mark.parametrize(
    "name, body, status, reason",
    [
        ("empty message", json.dumps({"messages": [{"role": "user", "content": "  "}]}).encode(), 400, "empty"),
        ("no messages", json.dumps({"messages": []}).encode(), 400, "non-empty"),
        ("1 MB message", json.dumps({"messages": [{"role": "user", "content": "a" * 1_000_000}]}).encode(), 413, "larger than"),
        ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}', 400, "UTF-8"),
        ("not JSON", b'{"messages": [', 400, "JSON"),
        ("beyond N_CTX", json.dumps({"messages": [{"role": "user", "content": "word " * 2000}]}).encode(), 400, "context window"),
        ("beyond N_CTX, streamed", json.dumps({"stream": True, "messages": [{"role": "user", "content": "word " * 2000}]}).encode(), 400, "context window"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_keeps_serving(server, openai_client, name, body, status, reason):
    got, answer = http("POST", server + "/v1/chat/completions", body)
    assert got == status, answer
    assert reason in answer["error"]["message"]
    assert_still_serving(server, openai_client)


def test_plain_completions_are_checked_too(server, openai_client):
    for body, reason in (({"prompt": " "}, "empty"), ({"prompt": "word " * 2000, "stream": True}, "context window")):
        got, answer = http("POST", server + "/v1/completions", json.dumps(body).encode())
        assert got == 400 and reason in answer["error"]["message"]
    assert_still_serving(server, openai_client)


def test_openai_client_sees_the_context_error_as_a_bad_request(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="N_CTX"):
        ask(openai_client, "word " * 2000)


def test_chat_command_prints_one_answer_on_stdout(model_answer):
    env = {k: v for k, v in os.environ.items() if k not in ("SYSTEM_PROMPT",)}
    env.update(MODEL=str(embedded_gguf_path()), TEMPERATURE="0", MAX_TOKENS="24", N_CTX="512", N_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "serve", "chat", QUESTION],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == model_answer
    assert result.stdout.count("\n") >= 1 and "error" not in result.stderr.lower()


@pytest.mark.browser
def test_browser_shows_one_exchange(server, model_answer):
    """A person types a message in the UI, sends it, and reads the answer (screenshot kept)."""
    from playwright.sync_api import expect, sync_playwright

    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            # not "networkidle": the page may keep asking for web fonts this offline machine cannot fetch
            page.goto(server + "/", wait_until="domcontentloaded")
            box = page.get_by_placeholder(MESSAGE_PLACEHOLDER)
            expect(box).to_be_visible(timeout=30_000)
            box.fill(QUESTION)
            box.press("Enter")
            # the answer's opening words are not in the question: only the model's answer can show them
            opening = " ".join(model_answer.split()[:3])
            assert opening not in QUESTION
            expect(page.locator("body")).to_contain_text(opening, timeout=60_000)
            page.wait_for_timeout(1500)  # let the last streamed tokens land
            page.screenshot(path=str(ARTIFACTS / "serve-ui-exchange.png"), full_page=True)
            text = page.inner_text("body")
            assert QUESTION in text and "Traceback" not in text
        finally:
            browser.close()


def test_chat_command_without_prompt_is_an_interactive_conversation(model_answer):
    env = {k: v for k, v in os.environ.items() if k not in ("SYSTEM_PROMPT",)}
    env.update(MODEL=str(embedded_gguf_path()), TEMPERATURE="0", MAX_TOKENS="24", N_CTX="512", N_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "serve", "chat"], input=f"{QUESTION}\n\nSay that again.\n",
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.split("> ") if line.strip()]
    assert len(answers) == 2 and answers[0].strip() == model_answer
    assert "Traceback" not in result.stderr


def test_chat_command_with_an_empty_prompt_is_a_usage_error():
    env = dict(os.environ, MODEL=str(embedded_gguf_path()), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "serve", "chat", "  "], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: PROMPT is empty")
