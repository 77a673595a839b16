"""`safegen serve`: SafeGenerator behind an OpenAI-compatible HTTP API.

    schema   the requests' fields and limits, OpenAI's error JSON
    engine   requests -> SafeGenerator.generate -> one choice (text, finish_reason, report) per sample
    batcher  the bounded queue and the loop that runs compatible requests together on the model thread
    auth     bearer keys, compared in constant time
    metrics  Prometheus counters, gauges and histograms
    app      the routes (Starlette) and the guard in front of them (drain, keys)
    server   the command: checks, model loading on a thread, uvicorn, drain on SIGTERM
    options  the command's flags

The optional packages (starlette, uvicorn, prometheus_client: the `serve` extra) are imported by
the command only, so the rest of safegen works without them.
"""
