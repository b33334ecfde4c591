"""The HTTP face of :class:`~deltatune.serving.engine.Engine`: OpenAI's API, on FastAPI.

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (``stream`` gives server-sent
events, ending in ``data: [DONE]``), ``GET /v1/models`` (the base, then every loaded delta: a
request's ``model`` picks one), ``GET /v1/stats`` (what the engine did, e.g. how many deltas
shared a decode step), and, only with ``allow_admin``, ``POST /v1/admin/deltas``
(``{"name", "path"}``) and ``DELETE /v1/admin/deltas/{name}``.

Every error is an OpenAI error object (``{"error": {"message", "type", "param", "code"}}``):
400 for a bad parameter (``param`` names it), 401 without the API key, 403 for admin routes
when they are off, 404 for a model not served, 409 when a delta would exceed the limits,
503 with ``Retry-After`` when the queue is full. Chat prompts are rendered as ``deltatune
generate`` and ``chat`` render them (:func:`deltatune.train.data.build_prompt`), completion
prompts are encoded as they are (:func:`deltatune.train.data.encode_prompt`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DeltatuneError
from ..train.data import Example, build_prompt, encode_prompt
from .engine import Engine, RequestError, Sampling, Sequence

#: what each status's error object calls its type (OpenAI's names)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 503: "overloaded_error", 500: "server_error"}
RETRY_AFTER_SECONDS = 1


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    n: int = 1

    def sampling(self, max_tokens: int) -> Sampling:
        if self.n != 1:
            raise RequestError(400, f"n must be 1 (one answer per request), got {self.n}", "n")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop, seed=self.seed)


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = 16   # OpenAI's default for completions


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [part.get("text") for part in self.content]
        if any(part.get("type") != "text" or not isinstance(text, str) for part, text in zip(self.content, parts)):
            raise RequestError(400, "message content parts must be text parts ({'type': 'text', 'text': ...})", "messages")
        return "".join(parts)


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None


class LoadRequest(BaseModel):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": None}}
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, *, api_key: str | None = None, allow_admin: bool = False,
               chat_max_tokens: int = 256, run_engine: bool = True) -> FastAPI:
    """The server's FastAPI app; it runs ``engine`` on a thread of its own while it is up, unless
    ``run_engine`` is False and the caller runs :meth:`Engine.run` (``deltatune serve`` runs it on
    the main thread, where torch's OpenMP workers serve it faster); the app stops the engine
    when it shuts down either way. ``chat_max_tokens`` is a chat answer's length when the request
    sets none."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=engine.run, name="deltatune-engine", daemon=True) if run_engine else None
        if thread is not None:
            thread.start()
        try:
            yield
        finally:
            engine.stop()
            if thread is not None:
                await asyncio.to_thread(thread.join)

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    tokenizer_lock = engine.tokenizer_lock
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc.status, str(exc), exc.field)

    @app.exception_handler(DeltatuneError)
    async def deltatune_error(request: Request, exc: DeltatuneError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = where[0] if where else None
        return _error(400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.get("/v1/models")
    async def list_models():
        names = engine.models()
        data = [{"id": name, "object": "model", "created": created, "owned_by": "deltatune",
                 **({"parent": names[0]} if i else {})} for i, name in enumerate(names)]
        return {"object": "list", "data": data}

    @app.get("/v1/stats")
    async def stats():
        return {**engine.stats.as_dict(), "models": engine.models(), "mixed": engine.mixed}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError(400, f"prompt must be one string (or a list of one), got {len(prompts)}", "prompt")
        with tokenizer_lock:
            ids = encode_prompt(engine.tokenizer, prompts[0])
        return await _answer(body, ids, body.sampling(_max_tokens(body.max_tokens, 16)), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        turns = tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages)
        with tokenizer_lock:
            ids = encode_prompt(engine.tokenizer, build_prompt(engine.tokenizer, Example(prompt=turns, completion="")))
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _answer(body, ids, body.sampling(_max_tokens(limit, chat_max_tokens)), chat=True)

    async def _answer(body: _Sampled, ids: list[int], sampling: Sampling, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple[str, Any]) -> None:
            # an answer sent whole needs only the end: no wake-up of the event loop per token,
            # which would take the interpreter from the engine's thread at every step
            if body.stream or event[0] != "text":
                loop.call_soon_threadsafe(events.put_nowait, event)

        sequence = Sequence(model=engine.resolve(body.model), prompt=ids, sampling=sampling, emit=emit)
        engine.submit(sequence)
        answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        model = body.model or engine.base_name
        head = {"id": answer_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model}
        if body.stream:
            return StreamingResponse(_stream(sequence, events, head, chat), media_type="text/event-stream")
        try:
            kind, value = await events.get()
        except asyncio.CancelledError:
            sequence.cancel()
            raise
        if kind == "error":
            return _error(500, value)
        text = sequence.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": value} if chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": value})
        return {**head, "choices": [choice], "usage": _usage(sequence)}

    async def _stream(sequence: Sequence, events: asyncio.Queue, head: dict, chat: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            extra = {"usage": _usage(sequence)} if finish is not None else {}
            return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield chunk(value, None)
                elif kind == "error":
                    error = {"message": value, "type": ERROR_TYPES[500], "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                else:
                    yield chunk(None, value)
                    break
            yield "data: [DONE]\n\n"
        finally:
            sequence.cancel()  # a no-op once it is done; stops the work when the client left early

    def _max_tokens(value: int | None, default: int) -> int:
        return default if value is None else value

    def _usage(sequence: Sequence) -> dict[str, Any]:
        prompt, completion = len(sequence.prompt), len(sequence.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sequence.cached_tokens}}

    @app.post("/v1/admin/deltas")
    async def load_delta(body: LoadRequest):
        _check_admin()
        size = await asyncio.wrap_future(engine.load_delta(body.name, body.path))
        return {"name": body.name, "path": body.path, "bytes": size, "models": engine.models()}

    @app.delete("/v1/admin/deltas/{name}")
    async def unload_delta(name: str):
        _check_admin()
        await asyncio.wrap_future(engine.unload_delta(name))
        return {"name": name, "unloaded": True, "models": engine.models()}

    def _check_admin() -> None:
        if not allow_admin:
            raise RequestError(403, "admin routes are off; start the server with --allow-admin to load and unload deltas")

    return app
