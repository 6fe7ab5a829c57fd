"""One port, one model: llama-cpp-python's OpenAI server with a Gradio chat on top.

The API is llama-cpp-python's own app (``create_app``); we add ``/health``, a
validator in front of its routes (it answers some bad requests with a 500, or
with a broken stream), a key check in front of both when ``API_KEY`` is set,
and mount the Gradio UI at ``/``. The UI uses the very
model object the API uses, behind the API's own lock, so chats from both sides
queue one after the other and never see each other's tokens.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Callable

from pydantic import SecretStr

from serve.chat import ContextOverflow, build_messages, content_text, history_to_messages, trim_to_context
from serve.model import ServeError, api_sampling_defaults, check_system_prompt, model_settings, token_counter
from serve.settings import ServeSettings

CHAT_PATH = "/v1/chat/completions"
API_ROOTS = ("/v1", "/extras")
COMPLETION_PATH = "/v1/completions"
MESSAGE_PLACEHOLDER = "Type a message and press Enter"
DRAIN_LIMIT = 64 * 1024 * 1024


def max_body_bytes(n_ctx: int) -> int:
    """Largest request body worth reading: no prompt fits the window beyond ~64 bytes of JSON a token."""
    return max(256 * 1024, 64 * n_ctx)


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> bytes:
        error = {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode("utf-8")


def check_request(path: str, raw: bytes, count_tokens: Callable[..., int], n_ctx: int) -> None:
    """Raise RequestRejected for a body that the model cannot or should not answer."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestRejected(
            400, f"the request body is not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})", "invalid_utf8"
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestRejected(400, f"the request body is not valid JSON ({err})", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestRejected(400, "the request body must be a JSON object", "invalid_json")
    if path == COMPLETION_PATH:
        check_parameters(path, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RequestRejected(400, "the prompt is empty", "empty_prompt", "prompt")
            _check_fits(count_tokens(prompt), n_ctx, "prompt")
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestRejected(400, "messages must be a non-empty list", "empty_messages", "messages")
    check_parameters(path, body)
    last = messages[-1]
    if not isinstance(last, dict) or not content_text(last.get("content")).strip():
        raise RequestRejected(400, "the last message is empty: there is nothing to answer", "empty_message", "messages")
    template_inputs = {k: body[k] for k in ("tools", "tool_choice", "functions", "function_call") if body.get(k)}
    try:
        tokens = count_tokens(messages, **template_inputs)
    except Exception as err:  # noqa: BLE001 - the template rejects the conversation: say why
        raise RequestRejected(400, f"the chat template cannot format these messages: {err}", "invalid_messages", "messages") from None
    _check_fits(tokens, n_ctx, "messages")


def check_parameters(path: str, body: dict) -> None:
    """Check the body against llama-cpp-python's own request model, naming the first bad field.

    Its route would turn a validation error into a 500 carrying part of a
    traceback; and it reads ``max_tokens <= 0`` as "until the context is
    full", which lets one request hold the model for all of N_CTX.
    """
    from pydantic import ValidationError
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    model = CreateCompletionRequest if path == COMPLETION_PATH else CreateChatCompletionRequest
    try:
        model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestRejected(400, f"{field}: {first.get('msg', 'invalid')}", "invalid_request", field) from None
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise RequestRejected(400, f"max_tokens must be at least 1 (got {max_tokens})", "invalid_request", "max_tokens")


def _check_fits(tokens: int, n_ctx: int, param: str) -> None:
    # Checked here, not left to llama-cpp-python: a streamed request would
    # otherwise get a 200 and a stream that ends with no answer and no reason.
    if tokens >= n_ctx:
        raise RequestRejected(
            400,
            f"the prompt is {tokens} tokens, but the context window (N_CTX) is {n_ctx} tokens: "
            "shorten it or drop older messages",
            "context_length_exceeded",
            param,
        )


class RequestValidator:
    """ASGI middleware: read a generation request whole, check it, then replay it to the route."""

    def __init__(self, app, count_tokens: Callable[..., int], n_ctx: int):
        self.app, self.count_tokens, self.n_ctx = app, count_tokens, n_ctx
        self.limit = max_body_bytes(n_ctx)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in (CHAT_PATH, COMPLETION_PATH):
            return await self.app(scope, receive, send)
        try:
            raw = await self._read_body(scope, receive)
            import anyio

            await anyio.to_thread.run_sync(check_request, scope["path"], raw, self.count_tokens, self.n_ctx)
        except RequestRejected as rejected:
            return await send_rejection(send, rejected)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read_body(self, scope, receive) -> bytes:
        too_big = RequestRejected(
            413, f"the request body is larger than {self.limit} bytes, more than any prompt that fits "
            f"the context window (N_CTX={self.n_ctx})", "request_too_large",
        )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejected(400, "the client went away", "client_closed")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.limit:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT:
                raise too_big
            if not message.get("more_body"):
                break
        # An oversized body is read to its end (up to DRAIN_LIMIT) before the
        # answer: a client still sending when the connection closes sees a
        # reset instead of the 413 and its reason.
        if size > self.limit:
            raise too_big
        return b"".join(chunks)


async def send_rejection(send, rejected: RequestRejected, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = rejected.body()
    await send({
        "type": "http.response.start",
        "status": rejected.status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


def needs_api_key(path: str) -> bool:
    """The model's API (llama-cpp-python's /v1 and /extras routes); /health and the UI stay open."""
    return path in API_ROOTS or path.startswith(tuple(root + "/" for root in API_ROOTS))


def bearer_problem(authorization: bytes | None, key: bytes) -> str | None:
    """Why an ``Authorization`` header does not carry ``Bearer <key>``; None when it does."""
    how = "send the header `Authorization: Bearer <key>`, the key being the server's API_KEY"
    if not authorization:
        return f"this API needs a key: {how}"
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return f"the Authorization header is not of the form `Bearer <key>`: {how}"
    if not hmac.compare_digest(token.strip(), key):
        return f"the key in the Authorization header is not this server's API_KEY: {how}"
    return None


class ApiKeyGate:
    """ASGI middleware: the model's API answers only requests that carry the API key.

    It sits outside the request validator, so a caller without the key learns
    nothing about the model (not even its context window) from a 400.
    """

    def __init__(self, app, key: SecretStr):
        self.app, self._key = app, key.get_secret_value().encode("utf-8")

    async def __call__(self, scope, receive, send):
        # CORS preflights carry no credentials; llama-cpp-python's CORS middleware answers them.
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not needs_api_key(scope["path"]):
            return await self.app(scope, receive, send)
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        problem = bearer_problem(authorization, self._key)
        if problem is None:
            return await self.app(scope, receive, send)
        rejected = RequestRejected(401, problem, "invalid_api_key")
        await send_rejection(send, rejected, ((b"www-authenticate", b"Bearer"),))


def model_lock():
    """The API's own lock around its model (an async context manager yielding the model proxy)."""
    from llama_cpp.server import app as server

    return contextlib.asynccontextmanager(server.get_llama_proxy)()


def build_chat_ui(llama, settings: ServeSettings, count_tokens: Callable[..., int], model_name: str):
    """The Gradio chat: streaming answers, a system prompt box, temperature and max-token controls."""
    import gradio as gr
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    n_ctx = settings.n_ctx
    sampling = api_sampling_defaults()

    async def respond(message: Any, history: list, system_prompt: str, temperature: float, max_tokens: int):
        text = content_text(message).strip()
        if not text:
            yield "Type a message first."
            return
        messages = build_messages(system_prompt, history_to_messages(history), text)
        async with model_lock():
            try:
                trimmed = await run_in_threadpool(trim_to_context, messages, count_tokens, n_ctx, int(max_tokens))
            except ContextOverflow as err:
                yield f"⚠️ Not sent: {err}."
                return
            notice = trimmed.notice(n_ctx)
            if notice:
                gr.Warning(notice)
            try:
                stream = await run_in_threadpool(
                    llama.create_chat_completion,
                    messages=trimmed.messages,
                    max_tokens=int(max_tokens),
                    temperature=float(temperature),
                    stream=True,
                    **sampling,
                )
                answer = ""
                async for chunk in iterate_in_threadpool(stream):
                    answer += chunk["choices"][0]["delta"].get("content") or ""
                    yield answer
            except Exception as err:  # noqa: BLE001 - a person gets a sentence, not a traceback
                raise gr.Error(f"The model could not answer: {err}") from None

    # Components made outside any Blocks are rendered by the ChatInterface
    # itself, inside its settings accordion under the chat.
    return gr.ChatInterface(
        respond,
        title=f"Chat with {model_name}",
        description=f"Runs on this machine's CPU with llama.cpp. Context window: {n_ctx} tokens. "
        "The same model answers the OpenAI-compatible API at /v1.",
        textbox=gr.Textbox(placeholder=MESSAGE_PLACEHOLDER, show_label=False, scale=7, autofocus=True, submit_btn=True),
        additional_inputs=[
            gr.Textbox(
                value=settings.system_prompt or "",
                label="System prompt",
                placeholder="Empty: the chat template's own default",
                lines=2,
            ),
            gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature"),
            gr.Slider(1, max(settings.max_tokens, min(4096, n_ctx)), value=settings.max_tokens, step=1, label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        api_name="chat",
        fill_height=True,
    )


def build_app(settings: ServeSettings, path: Path):
    """The FastAPI app: llama-cpp-python's API, /health, the validator and the Gradio UI at /."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from llama_cpp.server import app as server
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ServerSettings

    server_settings = ServerSettings(
        host=settings.host,
        port=settings.port,
        # Never cut a streaming answer short because another request is
        # waiting: requests queue on the lock instead.
        interrupt_requests=False,
    )
    try:
        app = create_app(
            server_settings=server_settings,
            model_settings=[model_settings(path, settings.n_ctx, settings.threads())],
        )
    except (ValueError, RuntimeError) as err:
        raise ServeError(f"MODEL={str(path)!r}: llama.cpp could not load it ({err})") from None
    # Our own handle on the model the API loaded (its getter is an async
    # generator holding the lock, not something a UI callback can call).
    llama = server._llama_proxy()
    check_system_prompt(llama, settings.system_prompt)
    count_tokens = token_counter(llama)
    model_name = str(llama.metadata.get("general.name") or path.stem)

    @app.get("/health", tags=["Extras"])
    async def health() -> dict:
        return {
            "status": "ok",
            "model": path.name,
            "name": model_name,
            "n_ctx": settings.n_ctx,
            "busy": server.llama_inner_lock.locked(),
        }

    app.add_middleware(RequestValidator, count_tokens=count_tokens, n_ctx=settings.n_ctx)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyGate, key=settings.api_key)  # added last: runs first
    demo = build_chat_ui(llama, settings, count_tokens, model_name)
    app.state.chat_ui = demo
    return gr.mount_gradio_app(app, demo, path="/", footer_links=["api"])


class QuietShutdown:
    """A logging filter for uvicorn's error log: a stream still open when the server stops is not an error.

    On SIGTERM uvicorn waits ``timeout_graceful_shutdown`` seconds, then cancels the requests
    still running (a browser tab's or gradio client's event stream) and logs each cancellation
    as "Exception in ASGI application" with a traceback. The cancellation is the shutdown doing
    its job, so those records are dropped; every other error still shows.
    """

    @staticmethod
    def filter(record) -> bool:
        import asyncio

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


def serve_forever(settings: ServeSettings, path: Path) -> None:
    import logging

    import uvicorn

    logging.getLogger("uvicorn.error").addFilter(QuietShutdown())
    app = build_app(settings, path)
    shown = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    api = "OpenAI API at /v1 (needs API_KEY)" if settings.api_key is not None else "OpenAI API at /v1"
    print(f"serving {path} on http://{shown}:{settings.port}  (chat UI at /, {api}, /health)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3)
