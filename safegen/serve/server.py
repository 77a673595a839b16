"""`safegen serve`: check everything, start listening, load the model, serve, drain on SIGTERM.

Order of events: the flags, policies and key file are checked first (a mistake costs a second, not a
model load); the server then listens at once and answers /health with 503 "loading" while the model
loads on a thread, so an orchestrator can tell "starting" from "dead"; /health turns 200 once it is
loaded. The first SIGTERM (or Ctrl-C) starts a drain: /health and every new request get 503, the
requests in flight finish (queued ones included), then the process exits 0. --drain-timeout is a
deadline: when it passes, every request still queued or running is answered 503 (OpenAI's error
JSON, Retry-After) at once, and the process exits 0 within about a second, without waiting for the
batch on the model thread (the sampler cannot stop a batch midway; its result would go to nobody).
A second SIGTERM or Ctrl-C exits at once.

The server keeps nothing between requests (no sessions, no cache that changes an answer), so any
number of them can run behind a load balancer.
"""
from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time

from ..errors import SafegenError

log = logging.getLogger("safegen.serve")

EXTRA_MODULES = ("starlette", "uvicorn", "prometheus_client")


class ServeError(SafegenError):
    """A flag of `safegen serve` that cannot work, or a missing optional dependency."""


def require_extra() -> None:
    """One clear line when the `serve` extra is not installed."""
    import importlib

    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServeError(f"serving needs the optional packages {', '.join(missing)}: "
                         "pip install 'safegen[serve]'")


def _policy_configs(args):
    """{name: (policy, sampling, refinement)} for each --policy, in order, validated."""
    from ..arguments import refine_options, sampling_options
    from ..generator import check_best, middleware_configs
    from ..policy import load_policy

    names = args.policy or ["default"]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ServeError(f"--policy {repeated[0]} is given twice")
    configs = {}
    for name in names:
        policy = load_policy(name)
        sampling, refinement = middleware_configs(policy, sampling_options(args), refine_options(args), args.preset)
        check_best(policy, refinement.iterations > 0 and not args.no_refine, not args.no_before)
        configs[name] = (policy, sampling, refinement)
    return configs


def _limits(args, sampling, context: int | None):
    """A request's limits. With the model's context known, a prompt is limited by what is left of it
    after the request's own max_tokens (checked per request), and --max-prompt-tokens only if given."""
    from .schema import Limits

    default_cap = 512 if context is None else min(512, context // 2)
    cap = args.max_tokens or max(default_cap, sampling.max_new_tokens)
    if cap < sampling.max_new_tokens:
        raise ServeError(f"--max-tokens {cap} is below the default generation length "
                         f"--max-new-tokens {sampling.max_new_tokens}")
    if context is not None and sampling.max_new_tokens >= context:
        raise ServeError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context}")
    prompt = args.max_prompt_tokens or (2048 if context is None else None)
    return Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=prompt, max_tokens=cap, max_n=args.max_n,
                  context=context)


def _load(args, configs, service, server) -> None:
    """On a thread: the model once, one SafeGenerator per policy around it; then the service is ready."""
    try:
        from ..arguments import revision as _revision
        from ..generator import SafeGenerator
        from ..models.loading import load_model, require_tokenizer
        from .engine import Engine

        model, tokenizer, profile = load_model(args.model, quantization=args.quantization, revision=_revision(args),
                                               device_map=args.device_map, trust_remote_code=args.trust_remote_code)
        require_tokenizer(tokenizer, args.model)
        generators = {name: SafeGenerator(model, tokenizer, policy=policy, profile=profile, sampling=sampling,
                                          refinement=refinement, report_before=not args.no_before)
                      for name, (policy, sampling, refinement) in configs.items()}
        context = getattr(model.config, "max_sequence_length", None) or \
            getattr(model.config, "max_position_embeddings", None)
        service.limits = _limits(args, next(iter(configs.values()))[1], context)
        service.engine = Engine(generators, service.defaults.model)
        service.samplers = {name: g.sampling.describe() for name, g in generators.items()}
        service.created = int(time.time())
        service.metrics.ready.set(1)
        log.info("model %s loaded: ready on http://%s:%d (policies: %s)", args.model, args.host, args.port,
                 ", ".join(configs))
    except BaseException as e:  # noqa: BLE001 (reported by the main thread, which exits 2)
        service.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, SafegenError) else str(e)
        service.load_exception = e
        server.should_exit = True


def command(args) -> int:
    require_extra()
    import uvicorn

    from .app import Service, create_app
    from .auth import Gate, read_keys
    from .batcher import Batcher
    from .metrics import Metrics
    from .schema import MAX_SEED, ServerDefaults

    logging.getLogger("safegen.serve").setLevel(logging.INFO)
    configs = _policy_configs(args)
    from ..threads import set_threads

    log.info("torch CPU threads: %d%s", set_threads(args.threads), "" if args.threads else " (the default: "
             "usable cores minus one; --threads to change)")
    gate = Gate(read_keys(args.api_key_file) if args.api_key_file else None)
    _, sampling, refinement = next(iter(configs.values()))
    defaults = ServerDefaults(model=args.served_model_name or args.model, max_tokens=sampling.max_new_tokens,
                              temperature=sampling.temperature, policies=tuple(configs), budget=refinement.budget,
                              refine=not args.no_refine)
    metrics = Metrics()
    metrics.start_policies(configs)
    # The limits' own contradictions are found before the model loads; the context length after.
    service = Service(defaults, _limits(args, sampling, None), metrics, gate, log_content=args.log_content)
    service.new_seed = lambda: secrets.randbelow(MAX_SEED - args.max_n + 2)

    def run_batch(payloads):
        requests, token_ids = zip(*payloads)
        return service.engine.run_steps(list(requests), list(token_ids))  # a group, one step at a time

    service.batcher = Batcher(run_batch, max_queue=args.max_queue, max_rows=args.max_batch_rows,
                              max_wait=args.batch_wait_ms / 1000, on_batch=metrics.record_batch,
                              on_drop=metrics.dropped.inc, arriving=lambda: service.arriving,
                              step_level=args.scheduling == "step")
    metrics.queue_depth.set_function(lambda: len(service.batcher.queue))
    # Once the drain ends, connections get 1 s to finish sending what they have (their answers are
    # final by then: the drain deadline answers every request still waiting).
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, lifespan="off",
                            log_level="info", timeout_graceful_shutdown=1)
    server = DrainingServer(config, service, args.drain_timeout)
    threading.Thread(target=_load, args=(args, configs, service, server), name="safegen-load", daemon=True).start()
    server.run()  # returns once drained (or exits 1 itself if it cannot listen on host:port)
    service.batcher.close()
    if service.load_exception is not None:  # a SafegenError is a one-line message and exit 2
        raise service.load_exception
    if service.batcher.model_busy or server.force_exit:
        # A batch still runs on the model thread, which Python would wait for at exit: the deadline
        # (or the second signal) says not to.
        log.info("exiting without waiting for the batch on the model thread")
    # Every request is answered and logged, and the server writes no file: exit now. The interpreter's
    # own teardown (the libraries' exit handlers) took about 3 s here, past a 2 s drain deadline.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _draining_server_class():
    import uvicorn

    class _DrainingServer(uvicorn.Server):
        """uvicorn's server with a drain: the first SIGTERM/SIGINT stops new work but lets the
        requests in flight finish; uvicorn's own handler would stop accepting connections at once
        and re-raise the signal at the end (exit status 143, not 0)."""

        def __init__(self, config, service, drain_timeout: float):
            super().__init__(config)
            self.service, self.drain_timeout = service, drain_timeout
            self.drain_started = None
            self.deadline_hit = None  # when the drain's deadline answered what was left

        def handle_exit(self, sig, frame) -> None:
            if self.drain_started is not None:  # a second signal: stop now
                log.info("second signal: exiting now")
                self.should_exit = self.force_exit = True
                return
            self.drain_started = time.monotonic()
            self.service.draining = True
            self.service.metrics.ready.set(0)
            log.info("draining: %d request(s) in flight, %d queued; new requests get 503",
                     self.service.in_flight, len(self.service.batcher.queue))

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            if self.drain_started is None:
                return False
            service, now = self.service, time.monotonic()
            idle = service.in_flight == 0 and not service.batcher.busy
            if idle:
                log.info("drained: exiting")
                return True
            if self.deadline_hit is None and now - self.drain_started > self.drain_timeout:
                from .schema import APIError

                self.deadline_hit = now
                answered = service.batcher.abort(APIError(
                    503, "the server is shutting down and its drain deadline passed before this request was "
                    "answered; send it again (to another instance)", code="shutting_down", type="server_error",
                    headers={"Retry-After": "1", "Connection": "close"}))
                log.info("drain deadline: %d request(s) answered 503; exiting", answered)
            # After the deadline, the handlers get a moment (a few ticks) to send their 503s.
            return self.deadline_hit is not None and (service.in_flight == 0 or now - self.deadline_hit > 0.5)

    return _DrainingServer


def DrainingServer(config, service, drain_timeout):  # noqa: N802 (a class built once uvicorn is known to import)
    return _draining_server_class()(config, service, drain_timeout)

