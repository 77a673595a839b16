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
        self.samples = Counter("safegen_samples", "Samples generated (choices answered)", registry=r)
        self.toxic_before = Counter("safegen_toxic_before", "Samples the policy found toxic before "
                                    "refinement", registry=r)
        self.toxic_after = Counter("safegen_toxic_after", "Samples the policy found toxic after "
                                   "refinement", registry=r)
        self.refused = Counter("safegen_refused", "Samples answered with the policy's refusal "
                               "(finish_reason content_filter)", registry=r)
        self.denoiser_rows = Counter("safegen_denoiser_rows", "Denoiser rows spent (refinement and "
                                     "'before' included)", registry=r)
        self.dropped = Counter("safegen_dropped", "Queued requests dropped because their client left",
                               registry=r)
        self.rejected_full = Counter("safegen_rejected_queue_full", "Requests refused with 429 (queue full)",
                                     registry=r)
        self.ready = Gauge("safegen_ready", "1 once the model is loaded and the server is not draining",
                           registry=r)

    def record_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)

    def record_choice(self, report: dict) -> None:
        self.samples.inc()
        self.toxic_before.inc(bool(report["toxicity_before"]["toxic"]))
        self.toxic_after.inc(bool(report["toxicity_after"]["toxic"]))
        self.refused.inc(report["action"] == "refuse")
        self.denoiser_rows.inc(report["rows"] + report["rows_before"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
