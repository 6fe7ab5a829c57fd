"""The judge against a real OpenAI-compatible server: llama.cpp serving the embedded model."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from evals.judge import JudgeItem, judge_answers, parse_judge_score

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "judge-test-key-not-a-secret"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def judge_url(tmp_path_factory):
    """A llama.cpp server on loopback with the embedded model, requiring an API key."""
    from loraship.embedded import embedded_gguf_path

    port = _free_port()
    # A file, not a pipe: llama.cpp logs enough at load to fill a pipe and stall.
    log = open(tmp_path_factory.mktemp("judge") / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "1024", "--n_threads", "1", "--api_key", API_KEY],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama.cpp server exited: {log.read()[-2000:]}")
            try:
                request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
                urllib.request.urlopen(request, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("llama.cpp server did not answer within 90 s")
                time.sleep(0.5)
        # llama.cpp's first completion is slow (warm-up); pay it here, once.
        judge_answers(ITEMS[:1], url=url, model="any", api_key=API_KEY, max_tokens=1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


ITEMS = [
    JudgeItem("What is the capital of France?", "The capital of France is Paris.", "Paris."),
    JudgeItem("What is 9 times 8?", "9 times 8 is 12.", "72"),
]


def test_every_reply_is_kept_and_parsed_by_the_same_rule(judge_url):
    verdicts = judge_answers(ITEMS, url=judge_url, model="any", api_key=API_KEY, max_tokens=24)
    assert len(verdicts) == len(ITEMS)
    for verdict in verdicts:
        assert verdict.reply.strip()  # the judge really answered
        assert verdict.score == parse_judge_score(verdict.reply)
        assert verdict.score is None or 1 <= verdict.score <= 5


def test_a_wrong_key_is_refused(judge_url):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        judge_answers(ITEMS[:1], url=judge_url, model="any", api_key="wrong", max_tokens=8)


def test_evals_cli_judges_general_answers_without_writing_the_key(judge_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "BASE_MODEL", "LIMIT")}
    env.update({"MODEL": "embedded", "TASKS": "judge", "LIMIT": "2", "MAX_NEW_TOKENS": "16", "N_THREADS": "1", "JUDGE_MAX_TOKENS": "24",
                "JUDGE_URL": judge_url, "JUDGE_API_KEY": API_KEY, "OUTPUT_DIR": str(tmp_path / "evals")})
    out = subprocess.run([sys.executable, "-m", "evals"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "evals" / "report.json").read_text())
    metrics = report["models"][0]["metrics"]
    assert metrics["judge_scored"] + metrics["judge_unparseable"] == 2
    judged = [a for a in report["models"][0]["answers"] if a["kind"] == "general"]
    assert len(judged) == 2 and all(a["judge_reply"] for a in judged)
    for written in (tmp_path / "evals").iterdir():
        assert API_KEY not in written.read_bytes().decode("utf-8", "replace")
    assert API_KEY not in out.stdout + out.stderr
