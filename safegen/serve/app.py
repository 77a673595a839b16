"""The HTTP side: OpenAI's routes on Starlette, plus /health and /metrics.

A generation request goes: body (size limit) -> JSON -> schema.parse (fields and limits) -> encode
(prompt length limit) -> Batcher.submit (429 when full) -> the batch's result -> JSON, or a stream.
Every refusal is OpenAI's error JSON with the field at fault in `param`.

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

from .auth import Gate
from .batcher import QueueFull
from .engine import batch_key, split_for_stream
from .schema import APIError, Limits, ServerDefaults, parse

log = logging.getLogger("safegen.serve")

KEEPALIVE_SECONDS = 10.0
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


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
        body = await read_body(request, self.limits.max_body_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = parse(kind, data, self.defaults, self.limits, self.new_seed)
        token_ids = self.engine.encode(req)
        for i, ids in enumerate(token_ids):
            if len(ids) > self.limits.max_prompt_tokens:
                param = "messages" if kind == "chat" else ("prompt" if len(token_ids) == 1 else f"prompt[{i}]")
                raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, above this server's limit of "
                               f"{self.limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
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
        except Exception as e:
            log.exception("%s: generation failed", rid)
            raise APIError(500, f"generation failed ({type(e).__name__})", type="server_error",
                           code="generation_failed") from None
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
                choice = {"index": k, "message": {"role": "assistant", "content": c.text}}
            else:
                choice = {"index": k, "text": c.text}
            choices.append({**choice, "logprobs": None, "finish_reason": c.finish_reason, "safegen": c.report})
        completion = sum(c.completion_tokens for c in outcome.choices)
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": completion,
                          "total_tokens": outcome.prompt_tokens + completion},
                "safegen": {"seed": req.seed, "seed_given": req.seed_given, "policy": req.extension.policy}}

    async def _stream(self, request: Request, job, req, rid: str, started: float):
        kind = req.kind
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(choices: list, **extra) -> str:
            chunk = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        def piece(k: int, text: Optional[str], finish=None, report=None, role=False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
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
                    yield event([piece(k, text)])
                yield event([piece(k, None, finish=c.finish_reason, report=c.report)])
            yield "data: [DONE]\n\n"
            self.metrics.latency.labels(kind).observe(time.monotonic() - started)
        finally:
            if not job.future.done():  # the client left mid-stream (the response task was cancelled)
                self.batcher.cancel(job)
                log.info("%s: client left before its answer", rid)

    # ------------------------------------------------------------------ the other routes
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.defaults.model, "object": "model", "created": 0, "owned_by": "safegen",
            "safegen": {"policies": list(self.defaults.policies), "budget_cap": self.defaults.budget,
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


def create_app(service: Service) -> Starlette:
    def endpoint(kind: str):
        async def handle(request: Request) -> Response:
            try:
                return await service.generate(request, kind)
            except APIError as e:
                return error_response(e)
        return handle

    routes = [
        Route("/v1/chat/completions", endpoint("chat"), methods=["POST"]),
        Route("/v1/completions", endpoint("completion"), methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_page, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
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
