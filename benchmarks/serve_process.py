"""Starting the real `python -m safegen serve` process on a free local port, for the tests and the
load benchmark. Everything stays on 127.0.0.1, and every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A policy that finds every answer toxic (the pattern "^" matches any text) and refuses: the
# refusal is certain whatever the tiny random model writes.
REFUSE_POLICY = """\
description: every answer is toxic, and refused (tests only)
classifiers:
  - name: lexicon
    patterns: ['^']
    hard: true
aggregate: max
threshold: 0.5
reward:
  transform: neg_toxicity
  alpha: 0.1
on_toxic: refuse
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Plain HTTP to a server at `url`, with `headers` (e.g. the bearer key) on every request."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url, self.headers = url.rstrip("/"), dict(headers or {})

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60.0):
        """(status, headers (case-insensitive), parsed JSON or text) of a plain HTTP request."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, head, raw = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, head, raw = e.code, e.headers, e.read()
        try:
            return status, head, json.loads(raw)
        except ValueError:
            return status, head, raw.decode(errors="replace")

    def get(self, path: str, headers=None):
        status, _, body = self.request("GET", path, headers=headers, timeout=5)
        return status, body

    def metric(self, name: str, headers=None) -> float:
        """The sum of a metric's samples named exactly `name` (labels ignored)."""
        status, text = self.get("/metrics", headers=headers)
        assert status == 200, text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.split("{")[0].split(" ")[0] == name)


class ServerProcess(Client):
    """`safegen serve` with `flags`, its output in `log`, at `url`; ready when constructed unless
    `wait=False` (then call wait_ready: several servers can start at once)."""

    def __init__(self, model_dir, log: Path, *flags: str, ready_timeout: float = 120.0, env: dict | None = None,
                 wait: bool = True):
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log = Path(log)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "safegen", "serve", "--model", str(model_dir), "--quantization", "none",
                 "--port", str(self.port), *flags], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.ready_timeout = ready_timeout
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "ServerProcess":
        """Returns once /health says ready; raises with the server's output if it exits or times out."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready in {self.ready_timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
