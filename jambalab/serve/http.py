"""The OpenAI-compatible HTTP API on the serving engine (FastAPI; streams are server-sent events).

    app = create_app(engine, tokenizer, ServerConfig(model_name="m", max_model_len=4096, vocab_size=V))

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /health, GET /metrics. The app does not own the engine: the caller starts it before and stops
it after (see jambalab.commands.serve).

One request's life: the body is validated (protocol.py; 400 naming the field), the prompt encoded
and checked against the vocabulary and the context budget (400), then submitted to the engine
(503 with Retry-After when its queue is full). The engine thread reports each token through
on_event, which hands it to this request's asyncio queue; the tokens become text (TextStream:
whole characters only, stop strings held back and cut), and the text is sent as one response or
as SSE chunks ending with `data: [DONE]`. A matched stop string, or a client that goes away,
cancels the request in the engine, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jambalab.errors import InputError
from jambalab.serve import protocol as P
from jambalab.serve.chat import ChatFormatter
from jambalab.serve.metrics import CONTENT_TYPE, ServerMetrics
from jambalab.serve.middleware import APIError, ApiKeyAuth, BodyLimit, HttpMetrics
from jambalab.serve.textstream import TextStream

log = logging.getLogger("jambalab.serve")

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int  # prompt + max_tokens of one request (the engine's max_seq_len, within its KV budget)
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    chat_template_file: str | None = None
    retry_after_s: int = 1  # what a 503 (queue full) tells the client to wait


@dataclass
class Job:
    """A validated request, ready for the engine."""

    endpoint: str  # "completions" | "chat"
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict  # temperature, top_p, top_k, seed
    stops: list[str]
    n_logprobs: int | None  # top-N alternatives per token; None = no logprobs
    received: float = field(default_factory=time.perf_counter)


@dataclass
class Piece:
    """Text made visible by some tokens, with those tokens (for logprobs) and, last, the finish reason."""

    text: str
    tokens: list[tuple[int, float | None, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None


class ClientGone(Exception):
    pass


class Server:
    def __init__(self, engine, tokenizer, config: ServerConfig) -> None:
        self.engine, self.tok, self.config = engine, tokenizer, config
        self.chat = ChatFormatter.for_tokenizer(tokenizer, config.chat_template_file)
        self.metrics = ServerMetrics(engine.stats)
        self.created = P.now()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_token_ids = () if eos is None else (eos,)

    # -------------------------------------------------------------------------------
    # Validation and encoding
    # -------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"model {name!r} does not exist (this server serves {self.config.model_name!r})",
                           param="model", code="model_not_found")

    def job(self, endpoint: str, body: P._SamplingFields, prompt_ids: list[int], prompt_param: str,
            max_tokens: int | None, n_logprobs: int | None) -> Job:
        self.check_ids(prompt_ids, prompt_param)
        budget = self.config.max_model_len
        if len(prompt_ids) >= budget:
            raise APIError(400, f"{prompt_param}: the prompt has {len(prompt_ids)} tokens; the context budget "
                                f"is {budget} tokens (prompt + max_tokens)", param=prompt_param)
        if max_tokens is None:
            max_tokens = budget - len(prompt_ids)
        elif len(prompt_ids) + max_tokens > budget:
            raise APIError(400, f"max_tokens: the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                                f"exceeds the context budget of {budget} tokens", param="max_tokens")
        sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), seed=body.seed)
        return Job(endpoint, prompt_ids, max_tokens, sampling, body.stop_strings(), n_logprobs)

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param}: the prompt encodes to no tokens", param=param)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {ids[bad]} at position {bad} is outside the vocabulary "
                                f"[0, {self.config.vocab_size})", param=param)

    # -------------------------------------------------------------------------------
    # The engine
    # -------------------------------------------------------------------------------
    def submit(self, job: Job, on_event: Callable):
        from jambalab.serve.engine import EngineFullError, SamplingParams

        params = SamplingParams(max_tokens=job.max_tokens, stop_token_ids=self.stop_token_ids,
                                logprobs=0 if job.n_logprobs is None else max(job.n_logprobs, 1), **job.sampling)
        try:
            return self.engine.submit(job.prompt_ids, params, on_event=on_event)
        except EngineFullError as e:
            raise APIError(503, f"the server is busy ({e}); retry later", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except InputError as e:
            raise APIError(400, str(e)) from None

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id])


class Generation:
    """One request, submitted on creation (so a full queue or bad input is answered before any stream
    starts): engine events in, Pieces out."""

    def __init__(self, server: Server, job: Job, request: Request) -> None:
        self.server, self.job, self.request = server, job, request
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.handle = server.submit(job, self._on_event)
        self.text = TextStream(server.tok, job.prompt_ids, job.stops)
        self.n_generated = 0
        self.last_token_at: float | None = None

    def _on_event(self, event) -> None:  # called from the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def usage(self) -> P.Usage:
        return P.usage(len(self.job.prompt_ids), self.n_generated, self.handle.cached_tokens)

    async def pieces(self, watch_disconnect: bool) -> AsyncIterator[Piece]:
        finish = "cancelled"  # unless it ends otherwise: the client went away
        try:
            while True:
                event = await self._next_event(watch_disconnect)
                piece = Piece("")
                if event.token_id is not None:
                    self._count_token()
                    piece = self._add_token(event)
                if self.text.stopped:
                    self.handle.cancel()
                    piece.finish_reason = "stop"
                elif event.finish_reason in ("stop", "length"):
                    piece.finish_reason = event.finish_reason
                    piece.text += self.text.finish()
                elif event.finish_reason is not None:
                    finish = "error" if event.finish_reason == "error" else "cancelled"
                    raise _engine_failure(event)
                finish = piece.finish_reason or finish
                yield piece
                if piece.finish_reason is not None:
                    return
        finally:
            m = self.server.metrics
            if finish not in ("stop", "length"):
                self.handle.cancel()
            m.requests.labels(endpoint=self.job.endpoint, finish_reason=finish).inc()
            m.prompt_tokens.inc(len(self.job.prompt_ids))
            m.generation_tokens.inc(self.n_generated)
            m.duration.observe(time.perf_counter() - self.job.received)

    def _count_token(self) -> None:
        now, m = time.perf_counter(), self.server.metrics
        if self.last_token_at is None:
            m.ttft.observe(now - self.job.received)
        else:
            m.tpot.observe(now - self.last_token_at)
        self.last_token_at = now
        self.n_generated += 1

    def _add_token(self, event) -> Piece:
        tokens = []
        if self.job.n_logprobs is not None:
            tokens = [(event.token_id, event.logprob, (event.top_logprobs or [])[:self.job.n_logprobs])]
        end_token = event.finish_reason == "stop" and event.token_id in self.server.stop_token_ids
        text = "" if end_token else self.text.add(event.token_id)  # EOS ends the text, it is not part of it
        return Piece(text, tokens)


    async def _next_event(self, watch_disconnect: bool):
        if not watch_disconnect:  # a stream: Starlette cancels the response task when the client goes
            return await self.events.get()
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    raise ClientGone() from None


def _engine_failure(event) -> APIError:
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error or 'engine error'}", code="engine_error")
    return APIError(503, "the request was cancelled by the server (shutting down)", code="cancelled")


# ---------------------------------------------------------------------------------------
# Response bodies
# ---------------------------------------------------------------------------------------
def completion_logprobs(server: Server, tokens, offset: int, texts: list[str]) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for (tid, lp, top), start in zip(tokens, _offsets(offset, texts)):
        out.tokens.append(server.token_text(tid))
        out.token_logprobs.append(lp)
        alternatives: dict[str, float] = {}
        for t, v in top:  # most likely first; ids that decode alike (bytes of a cut character) keep the best
            alternatives.setdefault(server.token_text(t), v)
        out.top_logprobs.append(alternatives)
        out.text_offset.append(start)
    return out


def _offsets(offset: int, texts: list[str]) -> list[int]:
    starts = []
    for t in texts:
        starts.append(offset)
        offset += len(t)
    return starts


def chat_logprobs(server: Server, tokens) -> P.ChatLogprobs:
    def entry(tid: int, lp: float) -> dict:
        text = server.token_text(tid)
        return dict(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

    return P.ChatLogprobs(content=[P.ChatTokenLogprob(**entry(tid, lp), top_logprobs=[
        P.TopLogprob(**entry(t, v)) for t, v in top]) for tid, lp, top in tokens])


def sse(obj) -> str:
    data = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def collect(gen: Generation) -> tuple[str, list, str]:
    text, tokens, finish = [], [], "length"
    async for piece in gen.pieces(watch_disconnect=True):
        text.append(piece.text)
        tokens += piece.tokens
        finish = piece.finish_reason or finish
    return "".join(text), tokens, finish


async def stream_events(gen: Generation, chunks: Callable[[Piece], list], usage_chunk: Callable[[], object] | None,
                        first: list | None = None) -> AsyncIterator[str]:
    """SSE: `first` chunks, one chunk per non-empty piece, the usage chunk if asked, then [DONE]."""
    try:
        for c in first or []:
            yield sse(c)
        async for piece in gen.pieces(watch_disconnect=False):
            if piece.text or piece.tokens or piece.finish_reason:
                for c in chunks(piece):
                    yield sse(c)
        if usage_chunk is not None:
            yield sse(usage_chunk())
    except APIError as e:  # the headers are sent: report the failure in the stream, as OpenAI does
        yield sse(e.body())
    yield SSE_DONE


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------
def create_app(engine, tokenizer, config: ServerConfig) -> FastAPI:
    server = Server(engine, tokenizer, config)
    app = FastAPI(title="jambalab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(HttpMetrics, counter=server.metrics.http_requests, paths=ROUTES)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return P.ModelList(data=[_model_card(server)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        server.check_model(model_id)
        return _model_card(server).model_dump()

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        return await _completions(server, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await _chat(server, body, request)

    return app


def _model_card(server: Server) -> P.ModelCard:
    return P.ModelCard(id=server.config.model_name, created=server.created, max_model_len=server.config.max_model_len)


async def _completions(server: Server, body: P.CompletionRequest, request: Request):
    server.check_model(body.model)
    ids = server.tok.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
    job = server.job("completions", body, ids, "prompt", body.max_tokens, body.logprobs)
    gen = Generation(server, job, request)
    echo = "" if not body.echo else body.prompt if isinstance(body.prompt, str) else server.tok.decode(ids)
    rid, created = P.new_id("cmpl"), P.now()

    def response(text: str, tokens, finish: str | None, offset: int) -> P.CompletionResponse:
        lp = None
        if job.n_logprobs is not None:
            lp = completion_logprobs(server, tokens, offset, [server.token_text(t[0]) for t in tokens])
        choice = P.CompletionChoice(text=text, logprobs=lp, finish_reason=finish)
        return P.CompletionResponse(id=rid, created=created, model=server.config.model_name, choices=[choice])

    if not body.stream:
        text, tokens, finish = await _collect_or_gone(gen)
        out = response(echo + text, tokens, finish, len(echo))
        out.usage = gen.usage()
        return out.model_dump()

    sent = [len(echo)]

    def chunks(piece: Piece) -> list:
        out = response(piece.text, piece.tokens, piece.finish_reason, sent[0])
        sent[0] += len(piece.text)
        return [out]

    def usage_chunk():
        return P.CompletionResponse(id=rid, created=created, model=server.config.model_name, choices=[],
                                    usage=gen.usage())

    first = [response(echo, [], None, 0)] if echo else []
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(stream_events(gen, chunks, usage_chunk if include_usage else None, first),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _chat(server: Server, body: P.ChatCompletionRequest, request: Request):
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    server.check_model(body.model)
    try:
        ids = server.chat.encode(messages)
    except InputError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    job = server.job("chat", body, ids, "messages", body.token_limit(), body.n_logprobs())
    gen = Generation(server, job, request)
    rid, created, name = P.new_id("chatcmpl"), P.now(), server.config.model_name

    def logprobs(tokens) -> P.ChatLogprobs | None:
        return None if job.n_logprobs is None else chat_logprobs(server, tokens)

    if not body.stream:
        text, tokens, finish = await _collect_or_gone(gen)
        choice = P.ChatChoice(message=P.AssistantMessage(content=text), logprobs=logprobs(tokens),
                              finish_reason=finish)
        return P.ChatCompletionResponse(id=rid, created=created, model=name, choices=[choice],
                                        usage=gen.usage()).model_dump()

    def chunk(delta: P.ChatDelta, tokens=(), finish: str | None = None) -> P.ChatCompletionChunk:
        choice = P.ChatChunkChoice(delta=delta, logprobs=logprobs(list(tokens)) if tokens else None,
                                   finish_reason=finish)
        return P.ChatCompletionChunk(id=rid, created=created, model=name, choices=[choice])

    def chunks(piece: Piece) -> list:
        out = []
        if piece.text or piece.tokens:
            out.append(chunk(P.ChatDelta(content=piece.text), piece.tokens))
        if piece.finish_reason is not None:
            out.append(chunk(P.ChatDelta(), finish=piece.finish_reason))
        return out

    def usage_chunk():
        return P.ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=gen.usage())

    first = [chunk(P.ChatDelta(role="assistant", content=""))]
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(stream_events(gen, chunks, usage_chunk if include_usage else None, first),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _collect_or_gone(gen: Generation) -> tuple[str, list, str]:
    try:
        return await collect(gen)
    except ClientGone:
        # Nobody will read the answer; the slot is already freed (pieces() cancels on the way out).
        raise APIError(499, "client closed the request", code="client_closed") from None


# ---------------------------------------------------------------------------------------
# Errors: always OpenAI's error object, never a traceback
# ---------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def validation_error(errors) -> APIError:
    """The first of pydantic's errors as a 400 naming the field (messages[0].content, not a loc tuple)."""
    e = errors[0]
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
    param = _param([p for p in e.get("loc", ()) if p != "body"])
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else f"request body: {msg}", param=param)


def _param(loc: list) -> str | None:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.isidentifier() and p not in TYPE_TAGS:
            out += f".{p}" if out else p
        # else: a union member's tag such as "list[int]": not part of the field's name
    return out or None
