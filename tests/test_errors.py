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
    from safegen.errors import SafegenError
    from safegen.loading import LoadError
    from safegen.policy import PolicyError
    from safegen.policy.scorers import OptionError
    from safegen.sampler import ConfigError

    assert safegen.SafegenError is SafegenError and issubclass(SafegenError, ValueError)
    for error in (InputError, LoadError, PolicyError, OptionError, ConfigError, BenchmarkError):
        assert issubclass(error, SafegenError), error
    assert issubclass(LoadError, RuntimeError)  # what it was before the common base


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
