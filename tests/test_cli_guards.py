"""The command line refuses what would hurt a user (duplicates, a mixed output file, a long wait
for an error) and says so in one line; all of it before any model loads."""
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
from safegen.models.loading import TOKENIZER_FILES

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--quantization", "none", "--policy", "offline", "--max-new-tokens", "8", "--steps", "8",
         "--block-length", "8", "--temperature", "1.0", "--proposals", "2", "--iterations", "1"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes loading a model a test failure: the checks must come first."""
    import safegen.models.loading

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(safegen.models.loading, "load_model", fail)


@pytest.fixture
def prompts(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("hello there\n")
    return src


def detox(*args, model="unused-model"):
    return main(["detoxify", "--model", str(model), *SMALL, *map(str, args)])


def test_import_loads_neither_torch_nor_transformers():
    code = ("import sys, safegen, safegen.cli; safegen.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args,message", [
    (["--seed", "-5"], "argument --seed: must be an integer from 0"),
    (["--seed", "99999999999999999999999"], "argument --seed: must be an integer from 0"),
    (["--samples", "0"], "argument --samples: must be a positive integer"),
    (["--at-steps", "3,x"], "argument --at-steps: must be comma-separated step numbers"),
])
def test_bad_numbers_are_argument_errors(prompts, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        detox(prompts, "-o", tmp_path / "o.jsonl", *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--steps", "9"], "--steps (9) exceeds --max-new-tokens (8)"),
    (["--rho", "2"], "--rho must be in (0, 1]"),
    (["--samples", "2", "--temperature", "0"], "--samples 2 at --temperature 0"),
])
def test_configuration_errors_name_the_flag_before_loading(prompts, tmp_path, capsys, no_model_load, args, message):
    assert detox(prompts, "-o", tmp_path / "o.jsonl", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "sampling." not in err and "refine." not in err


def test_best_without_the_report_before_is_refused_before_loading(prompts, tmp_path, capsys, no_model_load):
    """on_toxic best picks between the texts before and after refinement: --no-before leaves no choice."""
    policy = tmp_path / "best.yaml"
    policy.write_text("extends: offline\non_toxic: best\n")
    assert detox(prompts, "-o", tmp_path / "o.jsonl", "--policy", policy, "--no-before") == 2
    assert "on_toxic: best needs the text before refinement" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_loading(prompts, tmp_path, capsys, no_model_load):
    (tmp_path / "a-file").write_text("x")
    assert detox(prompts, "-o", tmp_path / "a-file" / "o.jsonl") == 2
    assert "cannot write there" in capsys.readouterr().err
    assert detox(prompts, "-o", tmp_path) == 2
    assert "is a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        assert detox(prompts, "-o", locked / "o.jsonl") == 2
        assert "cannot write there (Permission denied)" in capsys.readouterr().err


def test_lone_surrogate_is_a_bad_line_that_skip_bad_skips(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "fine"}\n{"prompt": "broken \\ud800 here"}\n{"prompt": "also fine"}\n')
    with pytest.raises(batch.InputError, match=r"p.jsonl:2: .*lone surrogate"):
        batch.read_prompts(src)
    assert [p.line for p in batch.read_prompts(src, skip_bad=True)] == [1, 3]


HOLD_LOCK = ("import sys, time; from safegen.batch import OutputLock\n"
             "with OutputLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)")


def test_second_writer_is_refused_naming_the_first_and_kill_leaves_no_lock(prompts, tmp_path, capsys, no_model_load):
    out = tmp_path / "o.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert detox(prompts, "-o", out) == 2
        assert f"being written by another run (process {holder.pid})" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with batch.OutputLock(out):  # the kernel dropped the killed process's lock
        pass
    assert not (tmp_path / "o.jsonl.lock").exists()


def _cli(model_dir, src, out, *extra):
    cmd = [sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model", str(model_dir),
           *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_run_refused_and_ctrl_c_exits_130(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "p.txt"
    # Far more prompts than the run can finish while the test acts, even on a loaded machine: the
    # SIGINT must arrive mid-run.
    n = 2000
    src.write_text("\n".join(f"prompt number {i} is about" for i in range(n)) + "\n")
    out = tmp_path / "o.jsonl"
    first = _cli(tiny_model_dir, src, out, "--batch-size", "1")
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 1):
        time.sleep(0.05)
    assert detox(src, "-o", out, model=tiny_model_dir) == 2  # refused at once: no model is loaded
    assert f"being written by another run (process {first.pid})" in capsys.readouterr().err
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "rerun the same command to resume" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["prompt_index"], r["sample"]) for r in records]
    assert 1 <= len(keys) < n and len(set(keys)) == len(keys)


def test_resume_compares_what_names_resolve_to(tiny_model_dir, tmp_path, capsys):
    from safegen.models.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "model", seed=0)
    src = tmp_path / "p.txt"
    src.write_text("hello there\n")
    out = tmp_path / "o.jsonl"
    assert detox(src, "-o", out, model=model) == 0
    written = out.read_bytes()
    # The same policy by path, the same folder with a trailing slash: the same run.
    assert main(["detoxify", str(src), "-o", str(out), "--model", f"{model}/", *SMALL,
                 "--policy", str(REPO / "policies" / "offline.yaml")]) == 0
    assert out.read_bytes() == written
    # Other weights under the same path: refused, the file untouched.
    write_tiny_model(model, seed=1)
    capsys.readouterr()
    assert detox(src, "-o", out, model=model) == 2
    assert "weights" in capsys.readouterr().err and out.read_bytes() == written


def test_changed_configuration_allowed_while_nothing_is_written(tmp_path):
    out = tmp_path / "o.jsonl"
    batch.check_resume(out, {"seed": 1})  # a run that crashed before its first record
    batch.check_resume(out, {"seed": 5})  # the corrected rerun
    out.write_text('{"prompt_index": 0, "sample": 0}\n')
    with pytest.raises(batch.InputError, match="seed: 5 -> 6"):
        batch.check_resume(out, {"seed": 6})


def test_weights_identity_sees_a_rewrite_of_the_same_size(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(3 << 20))
    first = batch.weights_identity(tmp_path)
    weights.write_bytes(bytes(3 << 20)[:-1] + b"\x01")  # last byte changed, size kept
    assert batch.weights_identity(tmp_path) != first
    (tmp_path / "notes.txt").write_text("not weights")
    assert batch.weights_identity(tmp_path) == batch.weights_identity(tmp_path)


def test_truncated_prompt_is_named_by_file_line(tiny_model_dir, tmp_path, caplog):
    src = tmp_path / "p.txt"
    src.write_text("short one\n\n" + "the " * 600 + "\n")
    assert detox(src, "-o", tmp_path / "o.jsonl", "--no-refine", "--steps", "1", model=tiny_model_dir) == 0
    assert f"{src}:3 has" in caplog.text


def _break_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["n_layers"] = 2.5
    (folder / "config.json").write_text(json.dumps(config))


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


@pytest.mark.parametrize("damage,message", [
    (_break_config, "cannot be built from its config.json"),
    (_truncate_weights, "cannot be built from its config.json and weights (SafetensorError"),
    (lambda folder: (folder / "tokenizer.json").unlink(), "the tokenizer of"),
    (lambda folder: [(folder / name).unlink() for name in TOKENIZER_FILES if (folder / name).exists()],
     "has no tokenizer files"),
])
def test_damaged_model_folder_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, damage, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    assert main(["generate", "hello", "--model", str(model), *SMALL]) == 2
    err = capsys.readouterr().err
    assert message in err and str(model) in err and "Traceback" not in err
