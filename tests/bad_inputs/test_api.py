"""Bad requests to a real ``python -m serve`` (embedded GGUF, N_CTX=512): each gets a 4xx that
says why, never a 5xx, and the server keeps answering; a burst of 100 requests is all answered.

One server for the whole module. The cases are the ``stage: api`` entries of ``cases.yaml``.
"""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from tests.fixtures.bad_input_cases import expand, load_cases
from tests.fixtures.serve_process import http, running_server

pytestmark = pytest.mark.slow

API_CASES = load_cases(lambda stage: stage == "api")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from loraship.embedded import embedded_gguf_path

    workdir = tmp_path_factory.mktemp("serve-api")
    with running_server(str(embedded_gguf_path()), workdir) as server:
        yield server
        alive = server.process.poll() is None
    assert alive, f"the server died during the tests:\n{server.log.read_text(errors='replace')[-4000:]}"


def request_body(request: dict) -> bytes:
    if "json" in request:
        return json.dumps(expand(request["json"], {})).encode("utf-8")
    if "latin1" in request:
        return request["latin1"].encode("latin-1")
    return request["text"].encode("utf-8")


def chat_body(content: str, max_tokens: int = 2) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()


def params():
    for case in API_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(params()))
def test_bad_request_gets_a_4xx_with_a_reason(server, case):
    request = case.request
    reply = http(request.get("method", "POST"), server.url + request.get("path", CHAT), request_body(request))

    allowed = case.status if isinstance(case.status, list) else [case.status]
    assert reply.status in allowed, reply.text()[:2000]
    assert case.message in reply.text(), reply.text()[:2000]
    assert server.health().status == 200


def test_a_burst_of_100_requests_is_all_answered_without_a_5xx(server):
    # Mixed like real traffic: mostly short chats, some listing models, some empty messages.
    def one(i: int):
        if i % 5 == 0:
            return "models", http("GET", server.url + "/v1/models").status
        if i % 5 == 1:
            return "empty", http("POST", server.url + CHAT, chat_body("")).status
        return "chat", http("POST", server.url + CHAT, chat_body(f"Say the number {i}.")).status

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(100)))

    expected = {"models": 200, "empty": 400, "chat": 200}
    wrong = [(i, kind, status) for i, (kind, status) in enumerate(replies) if status != expected[kind]]
    assert len(replies) == 100 and not wrong, wrong
    health = server.health()
    assert health.status == 200 and health.json()["status"] == "ok"
    answer = http("POST", server.url + CHAT, chat_body("What is the capital of France?", max_tokens=8))
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"].strip()
