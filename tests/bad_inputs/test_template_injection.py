"""A GGUF's chat template is data from whoever made the file: serving it must never run Python.

The template of ``{evil_gguf}`` walks to every Python class and tries a shell call that would
create ``EVIL_MARKER`` in the working folder. Whatever else happens (a refusal, an error, an
answer), the marker never appears and no Python object leaks into what is shown.
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.bad_input_cases import EVIL_MARKER, EVIL_TEMPLATE
from tests.fixtures.serve_process import ServerExited, http, running_server
from tests.fixtures.stage_runs import base_env, run_stage

LEAKS = ("<class '", "subprocess.Popen", "os._wrap_close")


@pytest.mark.slow
def test_serve_chat_does_not_execute_the_template(evil_gguf, tmp_path):
    env = base_env()
    env.update(MODEL=evil_gguf, N_CTX="512", N_THREADS="2", MAX_TOKENS="8", TEMPERATURE="0")

    run = run_stage("serve", ["chat", "Hello"], env, tmp_path)

    assert not (tmp_path / EVIL_MARKER).exists(), "the chat template ran a shell command"
    assert not any(leak in run.stdout + run.stderr for leak in LEAKS), run.stdout + run.stderr


@pytest.mark.slow
def test_the_server_refuses_the_template_or_answers_4xx_and_keeps_serving(evil_gguf, tmp_path):
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).encode()
    try:
        with running_server(evil_gguf, tmp_path) as server:
            reply = http("POST", server.url + "/v1/chat/completions", body)
            assert 400 <= reply.status < 500, reply.text()[:2000]
            assert "chat template" in reply.text()
            assert not any(leak in reply.text() for leak in LEAKS), reply.text()[:2000]
            assert server.health().status == 200
    except ServerExited as refused:  # refusing such a model at start is as good
        assert refused.returncode == 2 and "error: MODEL=" in refused.log, refused.log[-4000:]
    assert not (tmp_path / EVIL_MARKER).exists(), "the chat template ran a shell command"


def test_the_probe_is_live_outside_a_sandbox(tmp_path, monkeypatch):
    """So the tests above are not vacuous: plain Jinja runs the shell call and leaks classes."""
    import jinja2

    monkeypatch.chdir(tmp_path)
    shown = jinja2.Environment().from_string(EVIL_TEMPLATE).render(
        messages=[{"role": "user", "content": "Hello"}], add_generation_prompt=True
    )
    assert (tmp_path / EVIL_MARKER).exists()
    assert "<class '" in shown
