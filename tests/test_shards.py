"""Sharded batch runs with real processes: stale markers and locks, mixed world sizes, kill -9 during
the merge. Each rank is a Python process running batch.run_batch with a fake generator that sleeps
`delay` seconds per sample, so a test can catch a rank mid-run; one test goes through the CLI and
the tiny model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safegen import batch

REPO = Path(__file__).resolve().parents[1]

RANK = """
import json, sys, time
from safegen import batch
out, rank, world, n, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
fingerprint = json.loads(sys.argv[6])

def generate(lines, seeds):
    time.sleep(delay * len(lines))
    return [{"prompt": p.text, "seed": s, "toxic_before": False, "toxic_after": False, "refined": False,
             "toxicity_before": {"aggregate": 0.0}, "toxicity_after": {"aggregate": 0.0}, "rows": 1.0,
             "rows_before": 0.0, "reward_calls": 0.0, "seconds": 0.0} for p, s in zip(lines, seeds)]

prompts = [batch.PromptLine(i, i + 1, f"p{i}") for i in range(n)]
try:
    batch.run_batch(prompts, out, generate, samples=1, seed=0, batch_size=1, fingerprint=fingerprint,
                    shard=batch.Shard(rank, world), progress=False)
except batch.InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def rank(out, r, world, n=6, delay=0.0, env=None, fingerprint=None):
    fp = json.dumps(fingerprint or {"x": 1})
    return subprocess.Popen([sys.executable, "-c", RANK, str(out), str(r), str(world), str(n), str(delay), fp],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=60):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def keys(path):
    return [(r["prompt_index"], r["sample"]) for r in map(json.loads, Path(path).read_text().splitlines())]


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def earlier_run(out):
    """The meta file of an earlier run of the same configuration (rank 1 waits for rank 0 to write
    it for a new run)."""
    Path(f"{out}.meta.json").write_text(json.dumps({"x": 1}))


def line_count(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_stale_done_marker_of_another_rank_loses_nothing(tmp_path):
    out = tmp_path / "o.jsonl"
    earlier_run(out)
    (tmp_path / "o.jsonl.part1-of-2.done").touch()  # left by an interrupted merge of an earlier run
    slow = rank(out, 1, 2, delay=1.0)
    assert wait_for(lambda: line_count(tmp_path / "o.jsonl.part1-of-2") >= 1)
    assert finish(rank(out, 0, 2))[0] == 0  # finishes while rank 1 still writes
    assert finish(slow)[0] == 0
    assert keys(out) == [(i, 0) for i in range(6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.meta.json"]


def test_stale_merge_lock_does_not_block_the_merge(tmp_path):
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.merge-lock").touch()  # a crash during an earlier merge
    for r in range(2):
        assert finish(rank(out, r, 2))[0] == 0
    assert keys(out) == [(i, 0) for i in range(6)]


def test_world_1_and_world_2_on_one_output_never_both_write(tmp_path):
    out = tmp_path / "o.jsonl"
    single = rank(out, 0, 1, delay=1.0)
    assert wait_for(lambda: line_count(out) >= 1)
    codes = [finish(rank(out, r, 2)) for r in range(2)]
    for code, err in codes:
        assert code == 2 and "being written by another run" in err
    assert finish(single)[0] == 0
    assert keys(out) == [(i, 0) for i in range(6)]
    # And the other way round: a world-2 rank writing keeps a world-1 run out.
    out2 = tmp_path / "o2.jsonl"
    earlier_run(out2)
    slow = rank(out2, 1, 2, delay=1.0)
    assert wait_for(lambda: line_count(tmp_path / "o2.jsonl.part1-of-2") >= 1)
    code, err = finish(rank(out2, 0, 1))
    assert code == 2 and "being written by another run" in err
    assert finish(rank(out2, 0, 2))[0] == 0 and finish(slow)[0] == 0
    assert keys(out2) == [(i, 0) for i in range(6)]


def test_kill_9_during_the_merge_then_rerun_keeps_each_sample_once(tmp_path):
    for stage, seen in (("written", lambda d: (d / "o.jsonl.merging").exists()),
                        ("replaced", lambda d: line_count(d / "o.jsonl") == 6)):
        d = tmp_path / stage
        d.mkdir()
        out = d / "o.jsonl"
        assert finish(rank(out, 0, 2))[0] == 0
        merger = rank(out, 1, 2, env={"SAFEGEN_TEST_MERGE_PAUSE": f"{stage}:60"})
        assert wait_for(lambda: seen(d)), stage
        assert (d / "o.jsonl.part0-of-2").exists()  # the merge had not finished
        merger.send_signal(signal.SIGKILL)
        merger.wait()
        for r in range(2):  # the same command again, on every rank
            code, err = finish(rank(out, r, 2))
            assert code == 0, err
        assert keys(out) == [(i, 0) for i in range(6)], stage
        assert sorted(p.name for p in d.iterdir()) == ["o.jsonl", "o.jsonl.meta.json"], stage


def test_resume_reads_parts_of_an_earlier_world_size(tmp_path):
    """A world-3 run that stopped, resumed as world 2: nothing is redone or lost, and the old parts
    are merged."""
    out = tmp_path / "o.jsonl"
    assert finish(rank(out, 0, 3))[0] == 0
    assert finish(rank(out, 1, 3))[0] == 0  # rank 2 never ran
    for r in range(2):
        assert finish(rank(out, r, 2))[0] == 0
    assert keys(out) == [(i, 0) for i in range(6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.meta.json"]


SMALL = ["--quantization", "none", "--policy", "offline", "--max-new-tokens", "8", "--steps", "8",
         "--block-length", "8", "--temperature", "1.0", "--proposals", "2", "--iterations", "1"]


def test_cli_ranks_with_stale_markers_merge_every_sample(tiny_model_dir, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(f"line {i}" for i in range(5)) + "\n")
    out = tmp_path / "out.jsonl"
    for stale in ("out.jsonl.part1-of-2.done", "out.jsonl.merge-lock"):
        (tmp_path / stale).touch()
    for r in range(2):
        proc = subprocess.run([sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model",
                               str(tiny_model_dir), *SMALL, "--batch-size", "2"], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": str(r)},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert keys(out) == [(i, 0) for i in range(5)]
    assert "samples (prompts)" in proc.stdout and "5 (5)" in proc.stdout  # the merger sums up all ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.meta.json", "p.txt"]


def test_resume_state_is_a_few_bytes_per_sample(tmp_path):
    """Over 100,000 records, traced Python memory stays under 8 MB for a run that resumes 60,000 and
    writes 40,000, and for a resume of all 100,000 (keeping the records, as before, takes over 100 MB)."""
    import tracemalloc

    prompts = [batch.PromptLine(i, i + 1, "p") for i in range(50_000)]

    def generate(lines, seeds):
        return [{"prompt": p.text, "seed": s, "toxic_before": False, "toxic_after": s % 3 == 0, "refined": True,
                 "toxicity_before": {"aggregate": 0.5}, "toxicity_after": {"aggregate": 0.25}, "rows": 2.0,
                 "rows_before": 1.0, "reward_calls": 3.0, "seconds": 0.5, "text_after": "x" * 200}
                for p, s in zip(lines, seeds)]

    out = tmp_path / "o.jsonl"
    run = dict(generate=generate, samples=2, seed=0, batch_size=1000, fingerprint={"x": 1}, progress=False)
    batch.run_batch(prompts[:30_000], out, **run)  # untraced, to be quick: 60,000 records
    peaks = []
    for _ in range(2):  # the rest of the run, then a resume with nothing left to do
        tracemalloc.start()
        result = batch.run_batch(prompts, out, **run)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        summary = batch.summarize(result)
        assert summary["samples"] == 100_000 and summary["prompts"] == 50_000
        assert abs(summary["toxic_rate_after"] - 33_334 / 100_000) < 1e-12 and summary["seconds"] == 50_000
        del result
    assert line_count(out) == 100_000
    assert max(peaks) < 8e6, [f"{p / 1e6:.1f} MB" for p in peaks]


def test_ranks_finishing_together_merge_every_sample_once(tmp_path):
    for world in (2, 3):
        out = tmp_path / f"o{world}.jsonl"
        procs = [rank(out, r, world, n=30) for r in range(world)]
        for p in procs:
            code, err = finish(p)
            assert code == 0, err
        assert keys(out) == [(i, 0) for i in range(30)], world
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o2.jsonl", "o2.jsonl.meta.json", "o3.jsonl",
                                                          "o3.jsonl.meta.json"]


def test_rank_killed_mid_write_then_rerun(tmp_path):
    out = tmp_path / "o.jsonl"
    earlier_run(out)
    slow = rank(out, 1, 2, n=10, delay=1.0)
    part1 = tmp_path / "o.jsonl.part1-of-2"
    assert wait_for(lambda: line_count(part1) >= 1)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    with open(part1, "ab") as f:
        f.write(b'{"prompt_index": 9, "sam')  # a write the kill cut short
    code, err = finish(rank(out, 0, 2, n=10))
    assert code == 0 and "samples are not written yet" in err and "rerun any rank that stopped" in err
    assert not out.exists() and part1.exists()  # nothing merged, nothing lost
    code, err = finish(rank(out, 1, 2, n=10))  # the rerun of the killed rank finishes and merges
    assert code == 0, err
    assert keys(out) == [(i, 0) for i in range(10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.meta.json"]


def test_ranks_of_two_configurations_never_write_one_output(tmp_path):
    """Rank 0 of one run and rank 1 of a run with another configuration, before either has written a
    record: the second may not replace the first's configuration while the first still writes (its
    records would be merged under the second's), and may once the first is gone."""
    out = tmp_path / "o.jsonl"
    first = rank(out, 0, 2, delay=30.0)
    assert wait_for(lambda: Path(f"{out}.meta.json").exists())
    code, err = finish(rank(out, 1, 2, fingerprint={"x": 2}))
    assert code == 2 and "another configuration" in err and "part0-of-2" in err, err
    assert line_count(tmp_path / "o.jsonl.part1-of-2") == 0
    assert json.loads(Path(f"{out}.meta.json").read_text()) == {"x": 1}
    first.kill()
    first.wait()
    # The first run is gone with no record written: the new configuration replaces it.
    codes = [finish(p) for p in [rank(out, r, 2, fingerprint={"x": 2}) for r in range(2)]]
    assert [c for c, _ in codes] == [0, 0], codes
    assert json.loads(Path(f"{out}.meta.json").read_text()) == {"x": 2}
    assert sorted(keys(out)) == [(i, 0) for i in range(6)]


def test_ranks_of_one_run_replace_a_stale_configuration_together(tmp_path):
    """A new configuration over an earlier one that wrote nothing: the ranks of the new run, started
    together, know each other by their signed part locks and neither refuses the other."""
    out = tmp_path / "o.jsonl"
    earlier_run(out)  # {"x": 1}, no record
    procs = [rank(out, r, 2, delay=0.3, fingerprint={"x": 3}) for r in range(2)]
    codes = [finish(p) for p in procs]
    assert [c for c, _ in codes] == [0, 0], codes
    assert json.loads(Path(f"{out}.meta.json").read_text()) == {"x": 3}
    assert sorted(keys(out)) == [(i, 0) for i in range(6)]


def test_a_configuration_is_replaced_only_past_ranks_of_its_own_run(tmp_path):
    """The rule itself, deterministically, with the part locks held here (flocks of separate opens
    conflict within one process too): a held part lock not yet signed is a rank that will check
    after this one; one signed with this configuration is a sibling; one signed with another is a
    run still writing, which blocks replacing the configuration."""
    import hashlib

    from safegen.shards import Flock, Shard, sign_part

    out = tmp_path / "o.jsonl"
    earlier_run(out)  # {"x": 1}, no record
    locks = [Flock(Path(f"{out}.part{r}-of-2.lock")) for r in range(2)]
    assert all(lock.acquire() is None for lock in locks)
    try:
        batch.check_resume(out, {"x": 3}, Shard(1, 2))  # rank 0 holds its lock, unsigned: no refusal
        assert json.loads(Path(f"{out}.meta.json").read_text()) == {"x": 3}
        sign_part(out, Shard(0, 2), "0123456789abcdef")  # rank 0 of another configuration
        with pytest.raises(batch.InputError, match="another configuration.*part0-of-2"):
            batch.check_resume(out, {"x": 4}, Shard(1, 2))
        assert json.loads(Path(f"{out}.meta.json").read_text()) == {"x": 3}
        mine = hashlib.sha256(json.dumps({"x": 4}, sort_keys=True).encode()).hexdigest()[:16]
        sign_part(out, Shard(0, 2), mine)  # now a sibling: rank 0 of this very configuration
        batch.check_resume(out, {"x": 4}, Shard(1, 2))
        assert json.loads(Path(f"{out}.meta.json").read_text()) == {"x": 4}
    finally:
        for lock in locks:
            lock.release()
