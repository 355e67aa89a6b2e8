"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn + pydantic).

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template),
``/health``, ``/metrics`` (Prometheus). ``stream: true`` answers with Server-Sent Events, one chunk per
finalized block (with a ``token_ids`` extension field) and a last chunk with the finish reason, then
``data: [DONE]``; the streamed text always
concatenates to the non-streamed text (text is decoded from all tokens so far and only the new suffix is sent,
holding back an incomplete UTF-8 character).

Policies: bodies are validated strictly (wrong types, unknown fields, out-of-range values, prompts past the
max sequence -> 400 with an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``); an unknown
model name is a 404; a full queue a 429; with ``api_key`` set every ``/v1`` call needs ``Authorization:
Bearer <key>`` (401 otherwise). A client that disconnects cancels its request, which frees its KV slot at the
engine's next iteration. On SIGTERM uvicorn stops accepting connections, in-flight requests finish, then the
engine drains and stops."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import BLOCK_GEN_KEYS
from .decoding import resolve_decoder
from .engine import Engine, QueueFull
from .request import Request

DISCONNECT_POLL_S = 0.2


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class DiffusionFields(BaseModel):
    """OpenAI fields dlc honours, the diffusion extras, and OpenAI fields accepted only at their defaults."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    top_p: float | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    logprobs: bool | int | None = None
    # diffusion parameters (defaults from the model or engine directory)
    gen_length: int | None = Field(default=None, gt=0)
    block_length: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0)
    threshold: float | None = Field(default=None, gt=0, le=1)
    factor: float | None = Field(default=None, gt=0)
    remasking: Literal["low_confidence", "random"] | None = None
    kv_cache: Literal["none", "prefix", "dual", "block"] | None = None
    cfg_scale: float | None = Field(default=None, ge=0)
    # block diffusion (LLaDA2.0 / 2.1, SDAR): decoding/DECODER_ALIASES spell LLaDA2.1's speed / quality modes
    decoder: Literal["llada", "llada2", "llada2.1", "llada2.1-speed", "llada2.1-quality"] | None = None
    steps_per_block: int | None = Field(default=None, gt=0)
    eos_early_stop: bool | None = None
    edit_threshold: float | None = Field(default=None, ge=0, le=1)
    max_post_edit_steps: int | None = Field(default=None, ge=0)
    tokens_per_step: int | None = Field(default=None, gt=0)


class CompletionBody(DiffusionFields):
    prompt: str | list[int] | list[str]
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]


class ChatBody(DiffusionFields):
    messages: list[Message] = Field(min_length=1)


# -- helpers ----------------------------------------------------------------------------------------------------

class TextStream:
    """Incremental detokenizer whose deltas always concatenate to decode(all ids)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, new_ids: list[int], final: bool) -> str:
        self.ids += new_ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):      # cannot happen for prefix-stable decoders; never retract
            return ""
        delta, self.sent = text[len(self.sent):], text if len(text) > len(self.sent) else self.sent
        return delta


def _message_text(m: Message) -> str:
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(p["text"])
    return "".join(parts)


def _params(body: DiffusionFields) -> dict:
    p = {k: getattr(body, k) for k in ("gen_length", "block_length", "steps", "threshold", "factor", "remasking",
                                       "kv_cache", "temperature", "seed", "cfg_scale") + BLOCK_GEN_KEYS}
    return {k: v for k, v in resolve_decoder(p).items() if v is not None}


def _check_unsupported(body: DiffusionFields) -> None:
    if body.stop:
        raise APIError(400, "'stop' sequences are not supported; generation stops at the model's end tokens",
                       param="stop")
    if body.logprobs:
        raise APIError(400, "'logprobs' are not supported by diffusion decoding", param="logprobs")


class Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.tok = engine.session.tokenizer
        self.draining = False

    # -- request lifecycle --------------------------------------------------------------------------------------
    def _submit(self, prompt_ids: list[int], body: DiffusionFields, chat: bool = False
                ) -> tuple[Request, asyncio.Queue]:
        max_tokens = body.max_tokens or body.max_completion_tokens
        try:
            req = self.engine.make_request(prompt_ids, _params(body), max_tokens=max_tokens,
                                           rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}")
        except ValueError as e:       # FieldError names the field
            raise APIError(400, str(e), param=getattr(e, "field", None)) from None
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def on_output(r, new, done):
            try:
                loop.call_soon_threadsafe(q.put_nowait, (new, done))
            except RuntimeError:     # the event loop is gone (shutdown): nothing to deliver to
                pass

        req.on_output = on_output
        try:
            self.engine.add_request(req)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded") from None
        except RuntimeError as e:
            raise APIError(503, str(e), type_="server_error", code="shutting_down") from None
        return req, q

    async def _collect(self, req: Request, q: asyncio.Queue, http: HTTPRequest) -> None:
        """Wait for the request to finish; cancel it if the client goes away (checked every poll interval,
        whether or not blocks keep arriving)."""
        try:
            while True:
                try:
                    _, done = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                    if done:
                        return
                except asyncio.TimeoutError:
                    pass
                if await http.is_disconnected():
                    self.engine.abort(req)
                    raise APIError(499, "client closed the request", code="client_closed")
        except asyncio.CancelledError:
            self.engine.abort(req)
            raise

    def _check_model(self, body: DiffusionFields) -> None:
        if body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def _encode_prompt(self, body: CompletionBody) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            return [self._encode(p)]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        return [self._encode(s) for s in p]

    def _encode(self, text: str) -> list[int]:
        if self.tok is None:
            raise APIError(400, "the model has no tokenizer: send the prompt as a list of token ids",
                           param="prompt")
        if not text:
            raise APIError(400, "the prompt is empty", param="prompt")
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _chat_prompt(self, body: ChatBody) -> list[int]:
        if self.tok is None or not getattr(self.tok, "chat_template", None):
            raise APIError(400, f"the model '{self.model_name}' has no chat template in its tokenizer; "
                                f"use /v1/completions", param="messages", code="no_chat_template")
        msgs = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
        ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    # -- endpoints ----------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionBody, http: HTTPRequest):
        self._check_model(body)
        _check_unsupported(body)
        prompts = self._encode_prompt(body)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt", param="prompt")
        if body.echo and body.stream:
            raise APIError(400, "'echo' is not supported with streaming", param="echo")
        return await self._run(prompts, body, http, chat=False, echo=body.echo)

    async def chat(self, body: ChatBody, http: HTTPRequest):
        self._check_model(body)
        _check_unsupported(body)
        return await self._run([self._chat_prompt(body)], body, http, chat=True)

    async def _run(self, prompts, body, http, chat: bool, echo: bool = False):
        if self.draining:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        subs = []
        try:
            for p in prompts:
                subs.append(self._submit(p, body, chat))
        except APIError:
            for r, _ in subs:
                self.engine.abort(r)
            raise
        created = int(time.time())
        if body.stream:
            req, q = subs[0]
            return StreamingResponse(self._sse(req, q, created, chat), media_type="text/event-stream")
        try:
            await asyncio.gather(*(self._collect(r, q, http) for r, q in subs))
        except asyncio.CancelledError:
            for r, _ in subs:
                self.engine.abort(r)
            raise
        for r, _ in subs:
            if r.finish_reason == "error":
                raise APIError(500, f"generation failed: {r.error}", type_="server_error")
        choices = []
        for i, (r, _) in enumerate(subs):
            text = self.tok.decode(r.output_ids, skip_special_tokens=True) if self.tok is not None else ""
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": r.finish_reason, "logprobs": None})
            else:
                if echo:
                    text = self.tok.decode(r.prompt, skip_special_tokens=True) + text
                choices.append({"index": i, "text": text, "finish_reason": r.finish_reason, "logprobs": None,
                                "token_ids": r.output_ids})
        usage = {"prompt_tokens": sum(r.P for r, _ in subs),
                 "completion_tokens": sum(len(r.output_ids) for r, _ in subs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": subs[0][0].rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": self.model_name, "choices": choices, "usage": usage,
                "dlc": {"forwards": [r.forwards for r, _ in subs]}}

    async def _sse(self, req: Request, q: asyncio.Queue, created: int, chat: bool):
        stream = TextStream(self.tok)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish, first=False, ids=()):
            if chat:
                d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            choice["token_ids"] = list(ids)          # dlc extension: the block's tokens (text may lag a char)
            data = {"id": req.rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            while True:
                new, done = await q.get()
                delta = stream.push(new, done)
                if done:
                    if req.finish_reason == "error":
                        err = {"error": {"message": f"generation failed: {req.error}",
                                         "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                    else:
                        if delta or new:
                            yield chunk(delta, None, ids=new)
                        yield chunk(None, req.finish_reason)
                    yield "data: [DONE]\n\n"
                    return
                yield chunk(delta, None, ids=new)           # one chunk per finalized block
        finally:                      # client gone (generator closed) or finished: abort is a no-op when done
            self.engine.abort(req)


class APIKeyMiddleware:
    """Plain ASGI (BaseHTTPMiddleware would hide client disconnects from the handlers): /v1 needs the key."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                      "authentication_error", code="invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: Engine, model_name: str, api_key: str | None = None, start_engine: bool = True) -> FastAPI:
    srv = Server(engine, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        yield
        srv.draining = True
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.shutdown(
            drain=True, timeout=engine.cfg.drain_timeout_s))

    app = FastAPI(title="dlc", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5])
        return error_response(400, f"invalid request: {msg}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                              else "server_error")

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        if srv.draining:
            return error_response(503, "the server is shutting down", "server_error", code="shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "dlc", "max_model_len": engine.max_seq}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):                    # the openai client's models.retrieve
        if model_id != model_name:
            return error_response(404, f"The model '{model_id}' does not exist; this server serves "
                                       f"'{model_name}'", param="model", code="model_not_found")
        return card

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        return await srv.completions(body, http)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        return await srv.chat(body, http)

    return app
