"""The server's Prometheus metrics, in a registry of its own (nothing from other libraries leaks in)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("safegen_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("safegen_request_latency_seconds", "Time from a request's arrival to its "
                                 "complete answer", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("safegen_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("safegen_requests_in_flight", "HTTP requests being answered", registry=r)
        self.batch_requests = Histogram("safegen_batch_requests", "Requests per sampler batch",
                                        buckets=ROW_BUCKETS, registry=r)
        self.batch_rows = Histogram("safegen_batch_rows", "Samples (rows) per sampler batch",
                                    buckets=ROW_BUCKETS, registry=r)
        # Per policy (a server's policies are fixed at its start: a bounded label).
        by_policy = ["policy"]
        self.samples = Counter("safegen_samples", "Samples generated (choices answered)", by_policy, registry=r)
        self.toxic_before = Counter("safegen_toxic_before", "Samples the policy found toxic before "
                                    "refinement", by_policy, registry=r)
        self.toxic_after = Counter("safegen_toxic_after", "Samples the policy found toxic after "
                                   "refinement", by_policy, registry=r)
        self.refused = Counter("safegen_refused", "Samples answered with the policy's refusal "
                               "(finish_reason content_filter)", by_policy, registry=r)
        self.denoiser_rows = Counter("safegen_denoiser_rows", "Denoiser rows spent (refinement and "
                                     "'before' included)", by_policy, registry=r)
        self.prompt_tokens = Counter("safegen_prompt_tokens", "Prompt tokens of answered requests (usage)",
                                     by_policy, registry=r)
        self.completion_tokens = Counter("safegen_completion_tokens", "Completion tokens answered (usage: "
                                         "what clients received)", by_policy, registry=r)
        self.dropped = Counter("safegen_dropped", "Queued requests dropped because their client left",
                               registry=r)
        self.rejected_full = Counter("safegen_rejected_queue_full", "Requests refused with 429 (queue full)",
                                     registry=r)
        r.register(_EngineCounters())
        self.ready = Gauge("safegen_ready", "1 once the model is loaded and the server is not draining",
                           registry=r)

    def record_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)

    def record_choice(self, report: dict) -> None:
        policy = report["policy"]
        self.samples.labels(policy).inc()
        self.toxic_before.labels(policy).inc(bool(report["toxicity_before"]["toxic"]))
        self.toxic_after.labels(policy).inc(bool(report["toxicity_after"]["toxic"]))
        self.refused.labels(policy).inc(report["action"] == "refuse")
        self.denoiser_rows.labels(policy).inc(report["rows"] + report["rows_before"])

    def record_tokens(self, policy: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(policy).inc(prompt)
        self.completion_tokens.labels(policy).inc(completion)

    def start_policies(self, policies) -> None:
        """Each policy's series at 0 from the start, so that a rate over them has a first point."""
        for policy in policies:
            for counter in (self.samples, self.toxic_before, self.toxic_after, self.refused, self.denoiser_rows,
                            self.prompt_tokens, self.completion_tokens):
                counter.labels(policy)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters:
    """The step-level engine's counts (safegen.engine.counters), read when /metrics is scraped: how
    many forwards the generations asked for, and in how many model calls the engine made them."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        from .. import engine

        yield CounterMetricFamily("safegen_engine_forwards", "Model forwards the running generations asked "
                                  "for", value=engine.counters.forwards)
        yield CounterMetricFamily("safegen_engine_model_calls", "Model calls the engine made for them (a "
                                  "merged forward counts once)", value=engine.counters.calls)
