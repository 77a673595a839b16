"""The HTTP side: OpenAI's routes on Starlette, plus /health and /metrics.

A generation request goes: content type (415 unless JSON) -> body (size limit) -> JSON (depth
included) -> schema.parse (fields and limits) -> encode (prompt and context limits) -> the sampler's
own checks of the request's settings -> Batcher.submit (429 when full) -> the batch's result -> JSON,
or a stream. Every refusal is OpenAI's error JSON with the field at fault in `param`, and so are
unknown routes (404) and methods (405): a client can always parse what it gets.

Only `application/json` bodies are read. A web page can make a browser POST a `text/plain` or form
body to any address, this machine's 127.0.0.1 included, without asking first (no CORS preflight);
a JSON body needs a preflight, which this server never grants. So without a key, no page a user
visits can make their browser run generations here.

What streams: refinement may change any token of an answer until the sampler's last step, and the
policy judges the answer as a whole, so no token is final before the answer is. A stream sends the
role at once (a chat stream), then, once the answer is final and judged, its text in pieces of about
24 characters, then each choice's finish_reason and safegen report, then `data: [DONE]`. While a
request waits, a comment line every 10 s keeps proxies from timing the connection out.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from starlette.exceptions import HTTPException

from ..errors import SafegenError
from .auth import Gate
from .batcher import QueueFull
from .engine import batch_key, split_for_stream
from .schema import APIError, Limits, ServerDefaults, check_text, parse

log = logging.getLogger("safegen.serve")

KEEPALIVE_SECONDS = 10.0
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (see the module's docstring for why this matters)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the request body must be JSON sent with Content-Type: application/json, not "
                       f"{media or 'no content type'!r}", code="unsupported_media_type")


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:  # nesting deeper than Python's stack: no request of the API nests past a few levels
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_big = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                       code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Service:
    """Holds what the routes share: the engine once loaded, the batcher, the limits, the metrics."""

    def __init__(self, defaults: ServerDefaults, limits: Limits, metrics, gate: Gate, log_content: bool = False):
        self.defaults, self.limits, self.metrics, self.gate = defaults, limits, metrics, gate
        self.log_content = log_content
        self.engine = None  # set once the model is loaded
        self.batcher = None
        self.load_error: Optional[str] = None
        self.load_exception: Optional[BaseException] = None  # re-raised by the command after uvicorn stops
        self.draining = False
        self.created = int(time.time())  # reset when the model is loaded: /v1/models' `created`
        self.samplers: dict = {}  # policy -> the sampler its answers come from (SamplingConfig.describe)
        self.in_flight = 0
        self.arriving = 0  # generation requests received and not yet queued (or refused): a batch waits for them
        self.new_seed = None  # set by the server: a random seed for a request without one

    # ------------------------------------------------------------------ generation
    async def generate(self, request: Request, kind: str) -> Response:
        self.arriving += 1
        try:
            job, req, rid, started = await self._admit(request, kind)
        finally:
            self.arriving -= 1
        if req.stream:
            return StreamingResponse(self._stream(request, job, req, rid, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        leave = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({job.future, leave}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leave.cancel()
        if not job.future.done():  # the client left; nobody reads what we would send
            self.batcher.cancel(job)
            log.info("%s: client left before its answer", rid)
            return Response(status_code=499)
        outcome = self._outcome(job, rid, req)
        self.metrics.latency.labels(kind).observe(time.monotonic() - started)
        return JSONResponse(self._body(kind, rid, req, outcome))

    async def _admit(self, request: Request, kind: str):
        """Body, fields, prompt length, queue: (job, request, id, start time), or an APIError."""
        started = time.monotonic()
        if self.engine is None:
            raise APIError(503, "the model is still loading" if self.load_error is None else
                           f"the model failed to load: {self.load_error}", code="not_ready",
                           type="server_error", headers={"Retry-After": "5"})
        require_json(request)
        data = parse_json(await read_body(request, self.limits.max_body_bytes))
        check_text(data)
        req = parse(kind, data, self.defaults, self.limits, self.new_seed)
        token_ids = self.engine.encode(req)
        limits = self.limits
        for i, ids in enumerate(token_ids):
            param = "messages" if kind == "chat" else ("prompt" if len(token_ids) == 1 else f"prompt[{i}]")
            if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
                raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, above this server's limit of "
                               f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
            if limits.context is not None and len(ids) + req.max_tokens > limits.context:
                raise APIError(400, f"{param}: the prompt's {len(ids)} tokens and max_tokens {req.max_tokens} "
                               f"make {len(ids) + req.max_tokens}, above the model's context of {limits.context} "
                               "tokens", param=param, code="context_length_exceeded")
        try:  # the sampler's own checks of these settings, here rather than failing the batch
            self.engine.check(req, token_ids)
        except SafegenError as e:
            raise APIError(400, f"these settings cannot run: {e}", code="invalid_value") from None
        try:
            job = self.batcher.submit(batch_key(req), req.rows, (req, token_ids))
        except QueueFull as full:
            self.metrics.rejected_full.inc()
            raise APIError(429, f"the server is busy ({self.batcher.max_queue} requests queued); retry after "
                           f"{full.retry_after} s", code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": str(full.retry_after)}) from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        return job, req, rid, started

    def _outcome(self, job, rid: str, req):
        try:
            outcome = job.future.result()
        except APIError:  # the server's own answer for this request (e.g. 503 at the drain deadline)
            raise
        except Exception as e:
            log.exception("%s: generation failed", rid)
            raise APIError(500, f"generation failed ({type(e).__name__})", type="server_error",
                           code="generation_failed") from None
        self.metrics.record_tokens(req.extension.policy, outcome.prompt_tokens,
                                   sum(c.completion_tokens for c in outcome.choices))
        for choice in outcome.choices:
            self.metrics.record_choice(choice.report)
        if self.log_content:
            log.info("%s: prompts %r -> %r", rid, req.prompts, [c.text for c in outcome.choices])
        log.info("%s: %d sample(s), seed %d, %s", rid, len(outcome.choices), req.seed,
                 ", ".join(f"{c.finish_reason}/{c.report['action']}" for c in outcome.choices))
        return outcome

    def _body(self, kind: str, rid: str, req, outcome) -> dict:
        choices = []
        for k, c in enumerate(outcome.choices):
            if kind == "chat":
                # A refusal is said in `refusal`, as OpenAI's models say theirs; `content` carries the
                # same text, so that a client that reads only `content` shows it.
                choice = {"index": k, "message": {"role": "assistant", "content": c.text,
                                                  "refusal": c.text if c.finish_reason == "content_filter" else None}}
            else:
                choice = {"index": k, "text": c.text}
            choices.append({**choice, "logprobs": None, "finish_reason": c.finish_reason, "safegen": c.report})
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": req.model, "choices": choices, "usage": usage(outcome),
                "safegen": {"seed": req.seed, "seed_given": req.seed_given, "policy": req.extension.policy}}

    async def _stream(self, request: Request, job, req, rid: str, started: float):
        kind = req.kind
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(choices: list, **extra) -> str:
            if req.include_usage:  # OpenAI's shape: every chunk says usage, null but in the last one
                extra.setdefault("usage", None)
            chunk = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        def piece(k: int, text: Optional[str], finish=None, report=None, role=False, refusal=False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                if refusal and text:
                    delta["refusal"] = text
                out = {"index": k, "delta": delta}
            else:
                out = {"index": k, "text": text or ""}
            out.update({"logprobs": None, "finish_reason": finish})
            if report is not None:
                out["safegen"] = report
            return out

        try:
            if kind == "chat":
                yield event([piece(k, None, role=True) for k in range(req.rows)])
            while not job.future.done():
                done, _ = await asyncio.wait({job.future}, timeout=KEEPALIVE_SECONDS)
                if not done:
                    yield ": waiting for the batch\n\n"
            try:
                outcome = self._outcome(job, rid, req)
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            for k, c in enumerate(outcome.choices):
                for text in split_for_stream(c.text):
                    yield event([piece(k, text, refusal=c.finish_reason == "content_filter")])
                yield event([piece(k, None, finish=c.finish_reason, report=c.report)])
            if req.include_usage:
                yield event([], usage=usage(outcome))
            yield "data: [DONE]\n\n"
            self.metrics.latency.labels(kind).observe(time.monotonic() - started)
        finally:
            if not job.future.done():  # the client left mid-stream (the response task was cancelled)
                self.batcher.cancel(job)
                log.info("%s: client left before its answer", rid)

    # ------------------------------------------------------------------ the other routes
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.defaults.model, "object": "model", "created": self.created, "owned_by": "safegen",
            "safegen": {"policies": list(self.defaults.policies), "budget_cap": self.defaults.budget,
                        "samplers": self.samplers,
                        "max_tokens": self.limits.max_tokens, "max_n": self.limits.max_n,
                        "max_prompt_tokens": self.limits.max_prompt_tokens}}]})

    async def health(self, request: Request) -> Response:
        if self.load_error is not None:
            status = "failed"
        else:
            status = "draining" if self.draining else ("ready" if self.engine is not None else "loading")
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def usage(outcome) -> dict:
    """OpenAI's usage of an answer: its prompts' tokens and the tokens of the text the client receives."""
    completion = sum(c.completion_tokens for c in outcome.choices)
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": completion,
            "total_tokens": outcome.prompt_tokens + completion}


def create_app(service: Service) -> Starlette:
    def endpoint(kind: str):
        async def handle(request: Request) -> Response:
            try:
                return await service.generate(request, kind)
            except APIError as e:
                return error_response(e)
            except Exception:  # a bug of ours: logged whole, answered in OpenAI's shape all the same
                log.exception("unexpected error on %s", request.url.path)
                return error_response(APIError(500, "internal server error (a bug in safegen: the server log "
                                                    "has the details)", type="server_error", code="internal_error"))
        return handle

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            error = APIError(404, f"no route {request.url.path!r}; this server answers {', '.join(ROUTES)}",
                             code="not_found")
        elif exc.status_code == 405:
            error = APIError(405, f"{request.method} is not allowed on {request.url.path}; allowed: "
                             f"{(exc.headers or {}).get('Allow', '')}", code="method_not_allowed",
                             headers=exc.headers)
        else:
            error = APIError(exc.status_code, str(exc.detail), code="http_error", headers=exc.headers)
        return error_response(error)

    routes = [
        Route("/v1/chat/completions", endpoint("chat"), methods=["POST"]),
        Route("/v1/completions", endpoint("completion"), methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_page, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: http_error, 405: http_error})
    return Guard(app, service)


class Guard:
    """ASGI middleware in front of every route: counts requests in flight (the drain waits for
    them), refuses new work while draining (503), checks the bearer key (401), and counts
    answers by endpoint and status."""

    OPEN = ("/health",)  # a load balancer's probe needs no key, and learns nothing from it

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service, path = self.service, scope["path"]
        status_seen = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        service.in_flight += 1
        service.metrics.in_flight.inc()
        try:
            error = None
            if service.draining and path not in self.OPEN and path != "/metrics":
                error = APIError(503, "the server is shutting down; send the request to another instance",
                                 code="draining", type="server_error", headers={"Connection": "close"})
            elif path not in self.OPEN and not service.gate.allows(scope):
                error = APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                                 code="invalid_api_key", type="invalid_request_error",
                                 headers={"WWW-Authenticate": "Bearer"})
            if error is not None:
                await error_response(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            service.in_flight -= 1
            service.metrics.in_flight.dec()
            # Known routes only: a label per arbitrary path would let any client grow the metrics.
            service.metrics.requests.labels(path if path in ROUTES else "other",
                                            str(status_seen.get("status", 0))).inc()
