"""The batch command end to end, with the tiny offline model and the offline policy."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safegen import batch
from safegen.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--quantization", "none", "--policy", "offline", "--max-new-tokens", "8", "--steps", "8",
         "--block-length", "8", "--temperature", "1.0", "--proposals", "2", "--iterations", "1"]


def detox(model_dir, *args):
    return main(["detoxify", *map(str, args), "--model", str(model_dir), *SMALL])


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_end_to_end_jsonl_rtp_schema(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "rtp.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": {"text": t, "toxicity": 0.9}}) for t in
                             ["Go suck a", "You are such an", "The museum opens at"]) + "\n")
    out = tmp_path / "out.jsonl"
    assert detox(tiny_model_dir, src, "-o", out, "--samples", "2", "--batch-size", "4") == 0
    records = lines(out)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(i, s) for i in range(3) for s in range(2)]
    for r in records:
        for key in ("prompt", "text_before", "text_after", "toxicity_before", "toxicity_after", "toxic_before",
                    "toxic_after", "refined", "action", "rows", "reward_calls", "acceptance_rate", "seconds", "seed"):
            assert key in r
        assert r["rows"] >= 8
    assert len({r["seed"] for r in records}) == 6
    printed = capsys.readouterr().out
    assert "toxic rate" in printed and "denoiser rows" in printed
    # Running again redoes nothing and changes nothing.
    before = out.read_bytes()
    assert detox(tiny_model_dir, src, "-o", out, "--samples", "2", "--batch-size", "4") == 0
    assert out.read_bytes() == before
    # A changed configuration is refused and the file is untouched.
    assert detox(tiny_model_dir, src, "-o", out, "--samples", "3") == 2
    assert "samples" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "no prompts"),
    ("bad.txt", b"fine line\n\xff\xfe broken\n", ":2: bytes that are not UTF-8"),
    ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n', ":2: malformed JSON"),
    ("nofield.jsonl", b'{"text": "a"}\n', ":1: no 'prompt' field"),
    ("nocol.csv", b"text\nhello\n", "no column 'prompt'"),
    ("prompts.pdf", b"x", "unsupported input type"),
])
def test_bad_inputs_name_file_and_line(tmp_path, capsys, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    code = main(["detoxify", str(src), "-o", str(tmp_path / "out.jsonl"), "--policy", "offline"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and name in err
    assert "Traceback" not in err


def test_skip_bad_continues_and_field_option(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text('{"q": {"body": "first"}}\nnot json\n{"q": {"body": "third"}}\n')
    prompts = batch.read_prompts(src, field="q.body", skip_bad=True)
    assert [(p.line, p.text) for p in prompts] == [(1, "first"), (3, "third")]
    csv = tmp_path / "p.csv"
    csv.write_text('id,prompt\n1,"hello, world"\n2,second\n')
    assert [p.text for p in batch.read_prompts(csv)] == ["hello, world", "second"]


def test_unknown_policy_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("hello\n")
    assert main(["detoxify", str(src), "-o", str(tmp_path / "o.jsonl"), "--policy", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "Traceback" not in err


def test_long_prompt_is_truncated_with_warning(tiny_model_dir, tmp_path, caplog):
    from safegen.generator import SafeGenerator
    from safegen.models.loading import load_model

    model, tok, prof = load_model(str(tiny_model_dir), quantization="none")
    g = SafeGenerator(model, tok, policy="offline", profile=prof,
                      sampling=dict(max_new_tokens=4, steps=4, block_length=4))
    ids, _, _ = g.encode_prompts(["the " * 500], max_prompt_tokens=20)
    assert ids.shape[1] < 40
    assert "truncated" in caplog.text


def fake_generate(lines, seeds):
    return [{"prompt": p.text, "seed": s, "toxic_before": False, "toxic_after": False, "refined": False,
             "toxicity_before": {"aggregate": 0.0}, "toxicity_after": {"aggregate": 0.0}, "rows": 1.0,
             "rows_before": 0.0, "reward_calls": 0.0, "seconds": 0.0} for p, s in zip(lines, seeds)]


def test_shards_partition_the_work_and_merge(tmp_path):
    prompts = [batch.PromptLine(i, i + 1, f"p{i}") for i in range(7)]
    out = tmp_path / "o.jsonl"
    fp = {"x": 1}
    results = [batch.run_batch(prompts, out, fake_generate, samples=2, seed=10, batch_size=3, fingerprint=fp,
                               shard=batch.Shard(r, 3), progress=False) for r in range(3)]
    merged = lines(out)
    assert [(r["prompt_index"], r["sample"]) for r in merged] == [(i, s) for i in range(7) for s in range(2)]
    assert [r["seed"] for r in merged] == [10 + i * 2 + s for i in range(7) for s in range(2)]
    assert batch.summarize(results[2]) == batch.summarize(merged)  # the last shard to finish merged everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.meta.json"]


def test_unfinished_tail_is_cut_and_damaged_file_refused(tmp_path):
    prompts = [batch.PromptLine(i, i + 1, f"p{i}") for i in range(3)]
    out = tmp_path / "o.jsonl"
    batch.run_batch(prompts[:2], out, fake_generate, 1, 0, 8, {"x": 1}, progress=False)
    good = out.read_bytes()
    out.write_bytes(good + b'{"prompt_index": 2, "sam')  # a write cut short
    calls = []
    records = batch.run_batch(prompts, out, lambda t, s: calls.append([p.text for p in t]) or fake_generate(t, s), 1, 0, 8,
                              {"x": 1}, progress=False)
    assert calls == [["p2"]] and batch.summarize(records)["samples"] == 3
    assert out.read_bytes().startswith(good) and out.read_bytes().count(b"\n") == 3
    out.write_bytes(b"garbage\n" + good)
    with pytest.raises(batch.InputError, match=":1: not a safegen report line"):
        batch.run_batch(prompts, out, fake_generate, 1, 0, 8, {"x": 1}, progress=False)


def _cli(model_dir, src, out, extra=(), env=None):
    cmd = [sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model", str(model_dir),
           *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_after_kill_9(tiny_model_dir, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(f"prompt number {i} is about" for i in range(24)) + "\n")
    out = tmp_path / "out.jsonl"
    proc = _cli(tiny_model_dir, src, out, ["--batch-size", "1"])
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes()
    n_before = written.count(b"\n")
    assert 3 <= n_before < 24, "the run finished before it could be killed"
    kept = written[: written.rfind(b"\n") + 1]
    proc = _cli(tiny_model_dir, src, out, ["--batch-size", "4"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    final = out.read_bytes()
    assert final.startswith(kept)  # nothing finished was redone or rewritten
    records = lines(out)
    assert sorted((r["prompt_index"], r["sample"]) for r in records) == [(i, 0) for i in range(24)]
    assert len(records) == 24  # no duplicate, no partial line


def test_two_processes_shard_and_merge(tiny_model_dir, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(f"line {i}" for i in range(6)) + "\n")
    out = tmp_path / "out.jsonl"
    procs = [_cli(tiny_model_dir, src, out, ["--batch-size", "2"], {"WORLD_SIZE": "2", "RANK": str(r)})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    records = lines(out)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(i, 0) for i in range(6)]
    assert not list(tmp_path.glob("out.jsonl.part*"))


def test_generate_command_prints_before_and_after(tiny_model_dir, capsys):
    code = main(["generate", "Go suck a", "--model", str(tiny_model_dir), *SMALL, "--exact", "--schedule", "final"])
    out = capsys.readouterr().out
    assert code == 0
    before = [l for l in out.splitlines() if l.startswith("[before] toxicity ")]
    after = [l for l in out.splitlines() if l.startswith("[after] toxicity ")]
    assert len(before) == 1 and len(after) == 1
    assert "denoiser rows" in out


def _config_flags(command: str) -> dict:
    """field name -> its flags, for the config dataclasses' fields, in `command`'s parser."""
    from safegen.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a.option_strings for a in sub._actions if a.option_strings}


@pytest.mark.parametrize("command", ["generate", "detoxify", "serve"])
def test_every_config_field_has_a_flag(command):
    from dataclasses import fields

    from safegen import RefineConfig, SamplingConfig

    flags = _config_flags(command)
    missing = [f.name for c in (SamplingConfig, RefineConfig) for f in fields(c) if f.name not in flags]
    assert missing == []


def test_flags_set_the_fields_they_name():
    """Each derived flag reaches its field (and 'none' sets an optional one to None), from the
    middleware preset."""
    from safegen.arguments import refine_options, sampling_options
    from safegen.cli import build_parser

    args = build_parser().parse_args(
        ["generate", "hi", "--model", "x", "--proposal-order", "random", "--budget", "none", "--accept-reward",
         "-0.5", "--at-steps", "4,8", "--no-adaptive", "--logits-eos-inf", "--proposals", "3", "--steps", "8"])
    args.model = None  # no model type to look up
    assert refine_options(args) == {"proposal_order": "random", "budget": None, "accept_reward": -0.5,
                                    "at_steps": (4, 8), "adaptive": False, "n_proposals": 3}
    assert sampling_options(args) == {"logits_eos_inf": True, "steps": 8}
    assert args.preset == "middleware"
