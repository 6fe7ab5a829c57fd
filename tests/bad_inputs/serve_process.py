"""Start a real ``python -m serve`` on a free loopback port and talk to it over HTTP."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.bad_inputs.corpus import base_env

STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Reply:
    status: int
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.body or b"{}")


def http(method: str, url: str, body: bytes | None = None, timeout: float = 120) -> Reply:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read())


class ServerExited(AssertionError):
    """The server stopped before it was healthy (e.g. it refused its MODEL)."""

    def __init__(self, returncode: int, log: str):
        super().__init__(f"server exited with {returncode}:\n{log[-4000:]}")
        self.returncode, self.log = returncode, log


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def health(self) -> Reply:
        return http("GET", self.url + "/health", timeout=30)


@contextlib.contextmanager
def running_server(model: str, workdir: Path, n_ctx: int = 512, max_tokens: int = 16,
                   n_threads: int = 2) -> Iterator[Server]:
    """``python -m serve`` for ``model``; yields once /health answers, stops it afterwards."""
    port = free_port()
    env = base_env()
    env.update(MODEL=model, HOST="127.0.0.1", PORT=str(port), N_CTX=str(n_ctx), N_THREADS=str(n_threads),
               MAX_TOKENS=str(max_tokens), TEMPERATURE="0")
    log = workdir / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "serve"], cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise ServerExited(process.returncode, log.read_text(errors="replace"))
            with contextlib.suppress(OSError):
                if server.health().status == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"server not healthy after {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
