"""`make install` installs the versions of constraints.txt: every requirement of the package and of
its extras is pinned there, within the package's own range, and (in the environment `make test`
made) installed at that version."""
import configparser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in config["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(line) for line in (x.split("#")[0].strip() for x in lines) if line]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a NAME==VERSION pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_every_requirement_is_pinned_within_its_range():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} (setup.cfg) has no pin in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside setup.cfg's {req}"


def test_the_installed_versions_are_the_pinned_ones():
    mismatched = []
    for req in requirements():
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            pytest.skip(f"{req.name} is not installed here (not the environment `make install` made)")
        pinned = pins()[canonicalize_name(req.name)]
        if installed.public != pinned.public:  # a local label (torch's +cpu) is the build, not the version
            mismatched.append(f"{req.name} {installed} (pinned {pinned})")
    assert not mismatched, "installed versions differ from constraints.txt (run `make install` on a fresh " \
                           "venv, or update constraints.txt after testing): " + ", ".join(mismatched)
