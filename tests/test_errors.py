"""One base class for every error a user's input can cause: callers catch SafegenError once."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_user_error_is_a_safegen_error():
    import safegen
    from benchmarks.rtp.settings import BenchmarkError
    from safegen.batch import InputError
    from safegen.errors import ArgumentError, ArgumentTypeError, SafegenError
    from safegen.models.loading import LoadError
    from safegen.policy import PolicyError
    from safegen.policy.scorers import OptionError
    from safegen.sampling.sampler import ConfigError

    assert safegen.SafegenError is SafegenError and issubclass(SafegenError, ValueError)
    for error in (InputError, LoadError, PolicyError, OptionError, ConfigError, BenchmarkError, ArgumentError,
                  ArgumentTypeError):
        assert issubclass(error, SafegenError), error
    assert issubclass(LoadError, RuntimeError)  # what it was before the common base
    assert issubclass(ArgumentTypeError, TypeError)  # what Python raises for a keyword a call does not take


def test_the_base_class_costs_no_torch_import():
    code = "import sys, safegen; safegen.SafegenError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_cli_reports_any_safegen_error_in_one_line(monkeypatch, capsys):
    """An error class the CLI never names (a scorer's OptionError) still gets the one-line answer."""
    from safegen import cli
    from safegen.policy.scorers import OptionError

    def fail(args):
        raise OptionError("device", "not a device")

    args = cli.build_parser().parse_args(["tiny-model", "unused"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, fail))
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"safegen tiny-model: error: {OptionError('device', 'not a device')}"]


class _Fixed:
    def __init__(self, args, run):
        self.args, args.run = args, run

    def parse_args(self, argv):
        return self.args


def test_a_bug_is_not_swallowed(monkeypatch):
    from safegen import cli

    args = cli.build_parser().parse_args(["tiny-model", "unused"])

    def bug(args):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, bug))
    with pytest.raises(KeyError):
        cli.main([])


# ---------------------------------------------------------------- scorers' packages, at policy load
CLI_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if the package were not installed: find_spec and import both fail
import safegen.models.loading
def load_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was reported")
safegen.models.loading.load_model = load_model
from safegen.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_eval_neural_without_its_package_fails_in_one_line_before_the_model_loads(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n")
    out = subprocess.run([sys.executable, "-c", CLI_WITHOUT, "toxic_classifier", "detoxify", str(prompts),
                          "-o", str(tmp_path / "o.jsonl"), "--policy", "eval-neural", "--quantization", "none"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("safegen detoxify: error: ") and "eval-neural.yaml: classifiers[toxic_lstm]" in lines[0]
    assert "toxic-comment-classifier" in lines[0] and "pip install --no-deps toxic-comment-classifier==0.3.0" in lines[0]
    assert not (tmp_path / "o.jsonl").exists()


SCORER_PACKAGES = [
    # (classifier entry, module made missing, what the message must say)
    ("{scorer: toxic_lstm}", "toxic_classifier", "pip install --no-deps toxic-comment-classifier==0.3.0"),
    ("{scorer: toxic_lstm}", "h5py", "pip install h5py"),
    ("{scorer: detoxify}", "detoxify", "pip install detoxify"),
    ("{scorer: hf, model: org/model, labels: [toxic]}", "transformers", "pip install transformers"),
    ("{scorer: profanity_check}", "profanity_check", "pip install alt-profanity-check"),
]


@pytest.mark.parametrize("entry, module, install", SCORER_PACKAGES)
def test_every_scorer_checks_its_packages_when_the_policy_loads(tmp_path, monkeypatch, entry, module, install):
    from safegen.policy import PolicyError, load_policy

    path = tmp_path / "p.yaml"
    path.write_text(f"classifiers: [{entry}]\n")
    load_policy(path)  # installed here
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "classifiers[" in message
    assert install in message


def test_toxic_lstm_with_its_own_files_needs_no_package(tmp_path, monkeypatch):
    from safegen.policy import load_policy
    from safegen.policy.scorers.toxic_lstm import package_file

    path = tmp_path / "p.yaml"
    path.write_text(f"classifiers: [{{scorer: toxic_lstm, weights_file: {package_file('model.weights.h5')}, "
                    f"tokenizer_file: {package_file('tokenizer.pickle')}}}]\n")
    monkeypatch.setitem(sys.modules, "toxic_classifier", None)
    load_policy(path)


# ---------------------------------------------------------------- arguments of the Python API
@pytest.fixture(scope="module")
def generator(tiny_generator_parts):
    from safegen.generator import SafeGenerator

    model, tokenizer, profile = tiny_generator_parts
    return SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                         sampling=dict(max_new_tokens=8, steps=8, block_length=8))


@pytest.mark.parametrize("kwargs, kind, message", [
    (dict(max_length_typo=3), TypeError, "unknown argument"),
    (dict(num_beams=2), TypeError, "num_beams"),
    (dict(max_length=4), ValueError, "max_length=4 leaves no room"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences must be a positive integer"),
    (dict(num_return_sequences=2, temperature=0.0), ValueError, "identical"),
    (dict(do_sample=True, temperature=0.0), ValueError, "contradicts itself"),
    (dict(eos_token_id="x"), ValueError, "eos_token_id"),
])
def test_generate_arguments_are_safegen_errors(generator, kwargs, kind, message):
    """Still the TypeError / ValueError a caller of transformers' generate() expects, and a SafegenError."""
    from safegen.errors import SafegenError

    ids, attn, _ = generator.encode_prompts(["hello there"])
    with pytest.raises(SafegenError, match=message) as error:
        generator.generate(ids, attention_mask=attn, **kwargs)
    assert isinstance(error.value, kind)


def test_prompts_and_configs_of_the_wrong_kind_are_safegen_errors(generator, tiny_generator_parts):
    from safegen.errors import SafegenError
    from safegen.generator import SafeGenerator

    with pytest.raises(SafegenError, match=r"prompts\[0\]") as error:
        generator.generate_text([[{"text": "no role"}]])
    assert isinstance(error.value, TypeError)
    model, tokenizer, profile = tiny_generator_parts
    with pytest.raises(SafegenError, match="sampling must be a SamplingConfig or a dict"):
        SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=8)
    with pytest.raises(SafegenError, match="seeds must be"):
        ids, attn, _ = generator.encode_prompts(["hello there"])
        generator.generate(ids, attention_mask=attn, seeds=[1, 2, 3], refine=False)
    with pytest.raises(SafegenError, match="texts"):
        generator.policy.score(["fine", 3])


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantization="3bit"), "quantization must be one of"),
    (dict(quantization="none", dtype="float33"), "dtype must be"),
])
def test_load_model_arguments_are_load_errors(tiny_model_dir, kwargs, message):
    from safegen.models.loading import LoadError, load_model

    with pytest.raises(LoadError, match=message):
        load_model(str(tiny_model_dir), **kwargs)


def test_from_pretrained_checks_the_policy_before_the_model(monkeypatch):
    import safegen.models.loading
    from safegen.generator import SafeGenerator
    from safegen.policy import PolicyError

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was reported")

    monkeypatch.setattr(safegen.models.loading, "load_model", load_model)
    monkeypatch.setitem(sys.modules, "toxic_classifier", None)
    with pytest.raises(PolicyError, match="toxic-comment-classifier"):
        SafeGenerator.from_pretrained("unused", policy="eval-neural")


def test_a_scorer_that_cannot_load_its_model_is_a_one_line_policy_error(tmp_path, monkeypatch):
    """A download that fails offline surfaces at the first score as a PolicyError naming the classifier."""
    from safegen.policy import SCORERS, Options, PolicyError, Scorer, load_policy

    class Offline(Scorer):
        name, labels = "offline_model", ("toxic",)

        @classmethod
        def from_options(cls, options):
            Options(options).done()
            return cls()

        def score(self, texts):
            raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setitem(SCORERS, "offline_model", Offline)
    path = tmp_path / "p.yaml"
    path.write_text("classifiers: [{name: remote, scorer: offline_model}]\n")
    with pytest.raises(PolicyError) as error:
        load_policy(path).score(["hello"])
    assert str(error.value).splitlines() == [
        f"{path}: classifiers[remote]: the offline_model scorer cannot load its model "
        "(OSError: We couldn't connect to 'https://huggingface.co')"]
