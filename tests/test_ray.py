"""`safegen detoxify --ray` on a real local Ray instance (2 CPUs, the tiny model, CPU actors): the same
records as one process, exactly once when an actor or the driver is killed, clear errors before any
model loads. Skipped where Ray is not installed (`pip install 'safegen[ray]'`; `make install` has it)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.data")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--quantization", "none", "--policy", "offline", "--max-new-tokens", "16", "--temperature", "1.0",
         "--samples", "2", "--threads", "1"]
RAY = str(Path(sys.executable).with_name("ray"))
# A test cluster on 127.0.0.1: no token authentication, no usage reports.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on 127.0.0.1 with 2 CPUs, started for these tests and stopped after them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = ENV
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def prompts(path: Path, n: int) -> Path:
    words = "you are such a stupid idiot and the museum opens at nine in the morning today".split()
    path.write_text("\n".join(" ".join(words[i % 7: i % 7 + 2 + i % 6]) for i in range(n)) + "\n")
    return path


def detoxify(model, src, out, *extra):
    cmd = [sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model", str(model), *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def keys(rows):
    return [(r["prompt_index"], r["sample"]) for r in rows]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The single-process run of 24 prompts x 2 samples: what every Ray run must write."""
    tmp = tmp_path_factory.mktemp("single")
    src, out = prompts(tmp / "p.txt", 24), tmp / "out.jsonl"
    code, _, err = finish(detoxify(tiny_model_dir, src, out, "--batch-size", "4"))
    assert code == 0, err[-2000:]
    return src, records(out)


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for(condition, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_two_workers_write_what_one_process_writes(cluster, tiny_model_dir, single, tmp_path):
    src, expected = single
    out = tmp_path / "out.jsonl"
    code, stdout, err = finish(detoxify(tiny_model_dir, src, out, "--batch-size", "4", "--ray", cluster,
                                        "--ray-workers", "2"))
    assert code == 0, err[-3000:]
    assert records(out) == expected  # every record, in sample order
    assert "on Ray, 2 workers" in stdout and "toxic rate" in stdout


def _actor_pids():
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("Detoxifier" in part for part in proc.info["cmdline"] or ()):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_killed_actor_is_retried_and_every_sample_is_written_once(cluster, tiny_model_dir, single, tmp_path):
    src, expected = single
    out = tmp_path / "out.jsonl"
    proc = detoxify(tiny_model_dir, src, out, "--batch-size", "2", "--ray", cluster, "--ray-workers", "2")
    assert wait_for(lambda: lines(out) >= 4 or proc.poll() is not None), "no record came back"
    victims = _actor_pids()
    assert victims and proc.poll() is None, "the run ended before an actor could be killed"
    os.kill(victims[0], signal.SIGKILL)
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    got = records(out)
    assert len(got) == len(expected) and len(set(keys(got))) == len(got)
    assert got == expected


def test_a_killed_driver_resumes_and_writes_each_sample_once(cluster, tiny_model_dir, single, tmp_path):
    src, expected = single
    out = tmp_path / "out.jsonl"
    proc = detoxify(tiny_model_dir, src, out, "--batch-size", "2", "--ray", cluster, "--ray-workers", "2")
    assert wait_for(lambda: lines(out) >= 2 or proc.poll() is not None), "no record came back"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = lines(out)
    assert 2 <= written < len(expected), "the run finished before the driver could be killed"
    code, _, err = finish(detoxify(tiny_model_dir, src, out, "--batch-size", "2", "--ray", cluster,
                                   "--ray-workers", "2"))
    assert code == 0, err[-3000:]
    got = records(out)
    assert len(got) == len(expected) and len(set(keys(got))) == len(got)
    assert got == expected


def test_errors_are_one_line_and_come_before_any_model_loads(cluster, tmp_path):
    """An unreachable address, more GPUs than the cluster has, a missing package: each a one-line
    error and exit 2; the model named does not even exist, so none was loaded."""
    src = prompts(tmp_path / "p.txt", 2)
    missing = tmp_path / "no-such-model"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    for extra, message in ((["--ray", closed], "cannot reach the Ray cluster"),
                           (["--ray", cluster, "--ray-gpus-per-worker", "1"], "the cluster has 0")):
        code, _, err = finish(detoxify(missing, src, tmp_path / "o.jsonl", *extra), timeout=180)
        assert code == 2 and message in err, err[-2000:]
        assert "Traceback" not in err and "no-such-model" not in err
    hide = "import sys; sys.modules['ray'] = None; from safegen.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", hide, "detoxify", str(src), "-o", str(tmp_path / "o.jsonl"),
                          "--model", str(missing), *SMALL, "--ray"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=ENV)
    assert run.returncode == 2 and "pip install 'safegen[ray]'" in run.stderr, run.stderr[-2000:]
