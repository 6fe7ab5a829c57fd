"""API_KEY: the model's API answers only `Authorization: Bearer <key>`; /health and the chat UI stay open.

One real `python -m serve` on loopback (the embedded GGUF), with the key in its .env as a user would keep it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from loraship.embedded import embedded_gguf_path
from serve.app import bearer_problem
from tests.fixtures.serve_process import running_server

KEY = "sk-loraship-test-5f1c0ffee"


def get(url: str, headers: dict | None = None, body: bytes | None = None):
    """(status, headers (case-insensitive), body); a POST when there is a body."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve-with-key")
    (workdir / ".env").write_text(f"API_KEY={KEY}\n")
    with running_server(str(embedded_gguf_path()), workdir, n_ctx=512, max_tokens=8, n_threads=1) as running:
        yield running


def client(server, key: str):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.mark.slow
def test_the_openai_client_with_a_wrong_key_gets_401_naming_the_header(server):
    import openai

    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "sk-wrong").models.list()
    assert caught.value.status_code == 401
    assert "Authorization: Bearer <key>" in caught.value.message and "API_KEY" in caught.value.message


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/models", "/extras/tokenize"])
def test_a_request_without_the_header_gets_a_json_401(server, path):
    status, headers, body = get(server.url + path, body=b'{"input": "hi"}' if "extras" in path else None,
                                headers={"Content-Type": "application/json"})
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer <key>" in error["message"]


@pytest.mark.slow
def test_without_the_key_even_a_bad_request_is_a_401_not_a_400(server):
    status, _, _ = get(server.url + "/v1/chat/completions", body=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert status == 401


@pytest.mark.slow
def test_the_openai_client_with_the_key_chats(server):
    api = client(server, KEY)
    assert [m.id for m in api.models.list().data] == [embedded_gguf_path().name]
    reply = api.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.status_code == 200 and reply.parse().choices[0].message.content.strip()


@pytest.mark.slow
def test_health_and_the_chat_ui_stay_open(server):
    status, _, body = get(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = get(server.url + "/")
    assert status == 200 and "text/html" in headers.get("Content-Type", "")


@pytest.mark.slow
def test_the_key_is_never_logged(server):
    get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}x"})  # a near miss, rejected
    assert KEY not in server.log.read_text(errors="replace")


@pytest.mark.parametrize("header, ok", [
    (f"Bearer {KEY}".encode(), True),
    (f"bearer {KEY}".encode(), True),  # the scheme is case-insensitive (RFC 7235)
    (f"Bearer {KEY}x".encode(), False),
    (f"Basic {KEY}".encode(), False),
    (b"Bearer ", False),
    (None, False),
])
def test_only_a_bearer_header_with_the_key_passes(header, ok):
    assert (bearer_problem(header, KEY.encode()) is None) == ok
