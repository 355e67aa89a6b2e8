"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn + pydantic).

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template),
``/health``, ``/metrics`` (Prometheus). ``stream: true`` answers with Server-Sent Events, a chunk per step
that finalized tokens (with a ``token_ids`` extension field) and a last chunk with the finish reason, then
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
from .decoding import MAX_LOGPROBS, MAX_SEED, resolve_decoder
from .engine import Engine, QueueFull
from .request import Request
from .stops import check_stops

MAX_N = 128                        # choices per prompt (OpenAI's limit)
RETRY_AFTER_S = 1
UNLIKELY = -9999.0           # OpenAI's logprob for "no probability" (a position the rule never unmasked)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class DiffusionFields(BaseModel):
    """OpenAI fields dlc honours, the diffusion extras, and OpenAI fields accepted only at their defaults."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)           # -1 or 0: off (vLLM's and OpenAI-style clients')
    min_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None       # vLLM's extension: ids that end the output (not included)
    user: str | None = None
    # Penalties count tokens already emitted; diffusion unmasks a block's tokens in parallel from one forward,
    # so there is no left-to-right history to penalise within a block: only their no-op value 0 is accepted.
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    provisional: bool = False                     # dlc extension: stream each step's unmasked positions
    # diffusion parameters (defaults from the model or engine directory)
    gen_length: int | None = Field(default=None, gt=0)
    block_length: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0)
    threshold: float | None = Field(default=None, gt=0, le=1)
    factor: float | None = Field(default=None, gt=0)
    remasking: Literal["low_confidence", "random"] | None = None
    kv_cache: Literal["none", "prefix", "dual", "block"] | None = None
    cfg_scale: float | None = Field(default=None, ge=0)
    low_threshold: float | None = Field(default=None, ge=0, le=1)     # hierarchical decoding
    entropy_bound: float | None = Field(default=None, ge=0)          # entropy-bounded decoding
    credit: bool | None = None                                       # credit decoding
    smoothing: bool | None = None                                    # iteration smoothing
    smoothing_top_k: int | None = None                               # ... over the top k tokens (opt-in)
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
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)   # top alternatives per token


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]


class ChatBody(DiffusionFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


# -- helpers -------------------------------------------------------------------------------------------------

class TextStream:
    """Incremental detokenizer whose deltas always concatenate to the choice's final text: decode(all ids),
    or the text before the stop string that ended it. A tail that could start a stop string is held back."""

    def __init__(self, tokenizer, stop=None):
        self.tok, self.stop, self.ids, self.sent = tokenizer, stop, [], ""

    def push(self, new_ids: list[int], final: bool, final_text: str | None = None) -> str:
        self.ids += new_ids
        if self.tok is None:
            return ""
        if final and final_text is not None:
            text = final_text
        else:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            if not final:
                text = text.rstrip("\ufffd")
                if self.stop is not None:
                    text = text[:len(text) - self.stop.holdback(text)]
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
    p = {k: getattr(body, k) for k in ("gen_length", "block_length", "steps", "threshold", "factor",
                                       "remasking", "kv_cache", "temperature", "seed", "cfg_scale",
                                       "stop_token_ids", "low_threshold", "entropy_bound", "credit",
                                       "smoothing", "smoothing_top_k", "top_p", "min_p")
         + BLOCK_GEN_KEYS}
    if body.top_k is not None:
        p["top_k"] = max(0, body.top_k)                   # -1 (vLLM's "off") is 0 here
    p["logprobs"] = _logprobs_k(body)
    return {k: v for k, v in resolve_decoder(p).items() if v is not None}


def _logprobs_k(body) -> int | None:
    """Alternatives per token the response carries (None: no logprobs)."""
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)


def _check_unsupported(body: DiffusionFields) -> None:
    if getattr(body, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported: diffusion decoding has no sequence "
                            "log-probability to rank candidates by; use n for several samples",
                       param="best_of")
    if body.provisional and not body.stream:
        raise APIError(400, "provisional tokens are streamed: set stream to true", param="provisional")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    try:
        check_stops(body.stop)
    except ValueError as e:
        raise APIError(400, str(e), param="stop") from None


def _usage(subs: list["Choice"]) -> dict:
    """Prompt tokens once per prompt (OpenAI), completion tokens of every choice."""
    prompts = {c.prompt_index: c.req.P for c in subs}
    u = {"prompt_tokens": sum(prompts.values()),
         "completion_tokens": sum(len(c.req.output_ids) for c in subs)}
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    return u


class Choice:
    """One choice of a response: its request, index, and prompt (n > 1 gives a prompt several choices)."""

    def __init__(self, req: Request, index: int, prompt_index: int):
        self.req, self.index, self.prompt_index = req, index, prompt_index


class Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.tok = engine.session.tokenizer
        self.draining = False

    def text(self, r: Request) -> str:
        if r.stop_text is not None:
            return r.stop_text
        return self.tok.decode(r.output_ids, skip_special_tokens=True) if self.tok is not None else ""

    # -- request lifecycle -----------------------------------------------------------------------------------
    def _submit(self, prompt_ids: list[int], body: DiffusionFields, chat: bool, index: int, sample: int,
                q: asyncio.Queue) -> Request:
        """Queue one choice; its events arrive on ``q`` as (index, kind, payload): ("out", (new_ids, done))
        and, with ``provisional``, ("step", (block_start, positions, token_ids))."""
        max_tokens = body.max_tokens or body.max_completion_tokens
        params = _params(body)
        base = body.seed if body.seed is not None else self.engine.cfg.seed
        if base is not None:                  # n > 1: samples seed, seed + 1, ... (unseeded: fresh draws)
            params["seed"] = (base + sample) % (MAX_SEED + 1) if sample and 0 <= base <= MAX_SEED else base
        try:
            req = self.engine.make_request(prompt_ids, params, max_tokens=max_tokens,
                                           stop=check_stops(body.stop),
                                           rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}")
        except ValueError as e:       # FieldError names the field
            raise APIError(400, str(e), param=getattr(e, "field", None)) from None
        loop = asyncio.get_running_loop()

        def put(item):
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:     # the event loop is gone (shutdown): nothing to deliver to
                pass

        if body.stream:                       # a stream sends each block as it finalizes
            req.on_output = lambda r, new, done: put((index, "out", (new, done)))
        else:                                 # the response needs only the end: one event loop wake-up
            req.on_output = lambda r, new, done: done and put((index, "out", (new, done)))
        if body.provisional:
            req.on_step = lambda r, start, pos, ids: put((index, "step", (start, pos, ids)))
        try:
            self.engine.add_request(req)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type_="server_error", code="shutting_down") from None
        return req

    async def _collect(self, subs: list[Choice], q: asyncio.Queue, http: HTTPRequest) -> None:
        """Wait for every choice to finish; cancel them if the client goes away. Nothing polls: the loop
        wakes when a choice ends or when the server reads the client's disconnect (``_disconnected``)."""
        left = {c.index for c in subs}
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            while left:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self._abort(subs)
                    raise APIError(499, "client closed the request", code="client_closed")
                i, kind, payload = get.result()
                if kind == "out" and payload[1]:
                    left.discard(i)
        finally:
            gone.cancel()

    def _abort(self, subs: list[Choice]) -> None:
        for c in subs:
            self.engine.abort(c.req)

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

    def _logprobs(self, r: Request, start: int, end: int, chat: bool) -> dict | None:
        """OpenAI logprobs of output tokens [start, end): each token's log-probability and its top
        alternatives at the step that unmasked it (None when the request did not ask)."""
        rec = r.state.token_logprobs
        if rec is None:
            return None
        text = self._token_text
        ids = r.output_ids[start:end]
        # None: never unmasked
        entries = [rec[j] or (UNLIKELY, [], []) for j in range(start, start + len(ids))]
        if chat:
            def item(t, lp):
                s = text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in zip(alt, alp)]}
                                for t, (lp, alt, alp) in zip(ids, entries)]}
        toks = [text(t) for t in ids]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": [e[0] for e in entries],
                "top_logprobs": [{text(a): b for a, b in zip(alt, alp)} for _, alt, alp in entries],
                "text_offset": offsets}

    def _token_text(self, t: int) -> str:
        """A token as text; a partial UTF-8 character (decodes to U+FFFD) as its vocabulary string, so
        distinct alternatives keep distinct keys."""
        if self.tok is None:
            return str(t)
        s = self.tok.decode([t])
        return self.tok.convert_ids_to_tokens(t) if "\ufffd" in s else s

    # -- endpoints -------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionBody, http: HTTPRequest):
        self._check_model(body)
        _check_unsupported(body)
        if body.echo and body.stream:
            raise APIError(400, "'echo' is not supported with streaming", param="echo")
        prompts = await asyncio.to_thread(self._encode_prompt, body)      # tokenizing never blocks the loop
        return await self._run(prompts, body, http, chat=False, echo=body.echo)

    async def chat(self, body: ChatBody, http: HTTPRequest):
        self._check_model(body)
        _check_unsupported(body)
        return await self._run([await asyncio.to_thread(self._chat_prompt, body)], body, http, chat=True)

    def _submit_all(self, prompts, body, chat: bool, q: asyncio.Queue) -> list[Choice]:
        n = body.n or 1
        total, cap = len(prompts) * n, self.engine.cfg.max_queue
        if total > cap:                       # can never fit, whatever the load: not a 429
            raise APIError(400, f"the request asks for {total} sequences ({len(prompts)} prompts x n = {n}); "
                                f"this server queues at most {cap}", param="n" if n > 1 else "prompt")
        subs: list[Choice] = []
        try:
            for pi, p in enumerate(prompts):
                for j in range(n):
                    subs.append(Choice(self._submit(p, body, chat, len(subs), j, q), len(subs), pi))
        except APIError:
            self._abort(subs)
            raise
        return subs

    async def _run(self, prompts, body, http, chat: bool, echo: bool = False):
        if self.draining:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        q: asyncio.Queue = asyncio.Queue()
        subs = self._submit_all(prompts, body, chat, q)
        created = int(time.time())
        if body.stream:
            opts = body.stream_options
            return StreamingResponse(self._sse(subs, q, created, chat, bool(opts and opts.include_usage)),
                                     media_type="text/event-stream")
        try:
            await self._collect(subs, q, http)
        except BaseException:
            self._abort(subs)
            raise
        for c in subs:
            if c.req.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.req.error}", type_="server_error")
        return self._response(subs, created, chat, echo)

    def _response(self, subs: list[Choice], created: int, chat: bool, echo: bool) -> dict:
        choices = []
        for c in subs:
            r, text = c.req, self.text(c.req)
            lps = self._logprobs(r, 0, len(r.output_ids), chat)
            if chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "finish_reason": r.finish_reason, "logprobs": lps})
            else:
                if echo:
                    text = self.tok.decode(r.prompt, skip_special_tokens=True) + text
                choices.append({"index": c.index, "text": text, "finish_reason": r.finish_reason,
                                "logprobs": lps, "token_ids": r.output_ids})
        return {"id": subs[0].req.rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": self.model_name, "choices": choices, "usage": _usage(subs),
                "dlc": {"forwards": [c.req.forwards for c in subs]}}

    async def _sse(self, subs: list[Choice], q: asyncio.Queue, created: int, chat: bool, include_usage: bool):
        streams = {c.index: TextStream(self.tok, c.req.stop) for c in subs}
        reqs = {c.index: c.req for c in subs}
        rid, obj = subs[0].req.rid, "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, usage=None, with_usage=include_usage) -> str:
            data = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                    "choices": choices}
            if with_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        sent = {i: 0 for i in reqs}         # per choice: tokens whose logprobs went out

        def choice(i: int, delta: str | None, finish, first=False, ids=(), ext=None) -> dict:
            lps = self._logprobs(reqs[i], sent[i], sent[i] + len(ids), chat) if ids else None
            sent[i] += len(ids)
            if chat:
                d = ({"role": "assistant", "content": delta or ""} if first
                     else ({"content": delta} if delta else {}))
                c = {"index": i, "delta": d, "finish_reason": finish, "logprobs": lps}
            else:
                c = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": lps}
            c["token_ids"] = list(ids)          # dlc extension: the block's tokens (text may lag a char)
            if ext is not None:
                c["dlc"] = ext
            return c

        left = set(reqs)
        try:
            if chat:
                for i in reqs:
                    yield event([choice(i, "", None, first=True)])
            while left:
                i, kind, payload = await q.get()
                r = reqs[i]
                if kind == "step":
                    start, pos, ids = payload
                    ext = {"provisional": {"block_start": start, "positions": pos, "token_ids": ids,
                                           "tokens": [self._piece(t) for t in ids]}}
                    yield event([choice(i, None, None, ext=ext)])
                    continue
                new, done = payload
                delta = streams[i].push(new, done, r.stop_text if done else None)
                if not done:
                    yield event([choice(i, delta, None, ids=new)])      # the tokens a step finalized
                    continue
                left.discard(i)
                if r.finish_reason == "error":
                    err = {"error": {"message": f"generation failed: {r.error}", "type": "server_error",
                                     "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    self._abort(subs)
                    break
                if delta or new:
                    yield event([choice(i, delta, None, ids=new)])
                yield event([choice(i, None, r.finish_reason)])
            else:
                if include_usage:
                    yield event([], _usage(subs))
            yield "data: [DONE]\n\n"
        finally:                      # client gone (generator closed) or finished: abort is a no-op when done
            self._abort(subs)

    def _piece(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok is not None else ""


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client disconnects: the request's body is read, so the server's next message on the
    connection is ``http.disconnect`` (vLLM's listen_for_disconnect); no timer, no polling."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


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


class BodyGuard:
    """Plain ASGI: a POST to /v1 must be JSON (Content-Type), at most ``limit`` bytes (413 otherwise, before
    the rest is read), UTF-8, and parse without excessive nesting; each failure says which. The checked body
    is replayed to the app; later receive() calls (disconnect polls) go to the client as before."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        body, err = await self._read(scope, receive)
        if err is not None:
            await err(scope, receive, send)
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope, receive):
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return None, error_response(415, "the body must be JSON sent with "
                                             "'Content-Type: application/json' "
                                             f"(got {ctype or 'no Content-Type'})",
                                        code="unsupported_media_type")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return None, self._too_large(int(length))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return b"", PlainTextResponse("", status_code=499)
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None, self._too_large(size)
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        return body, _parse_error(body)

    def _too_large(self, size: int):
        return error_response(413, f"the request body ({size} bytes) exceeds the server's limit of "
                                   f"{self.limit} bytes (max_request_bytes)", code="request_too_large")


def _parse_error(body: bytes):
    """None when the body is UTF-8 JSON; else the 400 saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return error_response(400, "the body is not valid UTF-8 "
                                   f"(byte {e.start}: {body[e.start:e.start + 1]!r})",
                              code="invalid_encoding")
    try:
        json.loads(text)
    except RecursionError:
        return error_response(400, "the JSON body is nested too deeply", code="invalid_json")
    except json.JSONDecodeError as e:
        return error_response(400, f"malformed JSON body: {e.msg} (line {e.lineno}, column {e.colno})",
                              code="invalid_json")
    return None


def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              start_engine: bool = True) -> FastAPI:
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
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: "
                        f"{er.get('msg')}"
                        for er in errs[:5])
        return error_response(400, f"invalid request: {msg}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                              else "server_error")

    app.add_middleware(BodyGuard, limit=engine.cfg.max_request_bytes)
    if api_key:                                       # added last: runs first (no body read without the key)
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        if srv.draining:
            return error_response(503, "the server is shutting down", "server_error", code="shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "dlc",
            "max_model_len": engine.max_seq}

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
