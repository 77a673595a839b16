"""The README and docs/ run as written: every `safegen` command in their shell blocks parses, every
relative link resolves, every Python block compiles, and the serving examples agree with the server
they talk to. Fast: no model is loaded, only `safegen.cli.build_parser()` and the files themselves.

What counts as a command: a line of a fenced ```bash (or ```sh, ```shell) block that runs `safegen`,
`.venv/bin/safegen`, `python -m safegen` (any `python`, e.g. `.venv/bin/python`) or
`accelerate launch -m safegen`, possibly after `VAR=value` assignments and after `&&`, `;` or `|`.
Comments (`# ...`) are dropped and lines ending in `\\` are joined, as the shell does.

Convention for the rare block that must show something the parser cannot take (a placeholder such as
`<MODEL>`): put the line `<!-- docs-test: no-parse -->` directly above its opening fence. The marker
is invisible when the Markdown is rendered. Keep such blocks out where a concrete value will do.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

from safegen.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell"}
NO_PARSE = "<!-- docs-test: no-parse -->"
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def where(path: Path) -> str:
    """A file's name in messages: relative to the repository, or its own name (tests' files)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first line of content
    language: str
    lines: list[str]
    no_parse: bool


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file."""
    found, open_block, previous = [], None, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if open_block is None:
            if match:
                fence = match["fence"]
                language = (match["info"].split() or [""])[0].lower()
                open_block = (fence, Block(path, number + 1, language, [], previous.strip() == NO_PARSE))
            elif line.strip():
                previous = line
            continue
        fence, block = open_block
        if match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence) and not match["info"].strip():
            found.append(block)
            open_block, previous = None, ""
        else:
            block.lines.append(line)
    assert open_block is None, f"{path.name}: a code block opened at line {open_block[1].line - 1} is never closed"
    return found


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of a shell block, with `\\` continuations joined."""
    out, pending, start = [], "", None
    for offset, line in enumerate(block.lines):
        if start is None:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def words(text: str) -> list[str]:
    """The shell words of one line, comments dropped, with `&&`, `;`, `|`, `&` as words of their own."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(text: str) -> list[list[str]]:
    commands, current = [], []
    for word in words(text):
        if word and all(c in "();<>|&" for c in word):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    if current:
        commands.append(current)
    return commands


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def safegen_arguments(command: list[str]):
    """The arguments after the program if `command` runs safegen's command line, else None."""
    while command and ASSIGNMENT.match(command[0]):
        command = command[1:]
    if not command:
        return None
    program = os.path.basename(command[0])
    if program == "safegen":
        return command[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and command[1:3] == ["-m", "safegen"]:
        return command[3:]
    if program == "accelerate" and command[1:2] == ["launch"]:
        rest = command[2:]
        if "-m" in rest and rest[rest.index("-m") + 1: rest.index("-m") + 2] == ["safegen"]:
            return rest[rest.index("-m") + 2:]
    return None


@dataclass
class Command:
    where: str  # file:line
    text: str
    argv: list[str]


def commands(paths=DOCS) -> list[Command]:
    found = []
    for path in paths:
        for block in blocks(path):
            if block.language not in SHELL_LANGUAGES or block.no_parse:
                continue
            for number, text in logical_lines(block):
                for command in simple_commands(text):
                    argv = safegen_arguments(command)
                    if argv is not None:
                        found.append(Command(f"{where(path)}:{number}", text.strip(), argv))
    return found


def parse(argv: list[str]):
    """(ok, what argparse said): whether `safegen ARGV` gets past the parser (`--help` counts)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            return e.code == 0, err.getvalue().strip()
    return True, ""


ALL_COMMANDS = commands()


# ------------------------------------------------------------------------------ the commands
@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_command_parses(command):
    ok, message = parse(command.argv)
    assert ok, f"{command.where}: `{command.text}` is refused by safegen's parser: {message}"


def test_the_documented_commands_are_found():
    """The extraction itself: if it found nothing, every parse test above would pass vacuously."""
    subcommands = {c.argv[0] for c in ALL_COMMANDS if c.argv}
    assert {"tiny-model", "generate", "detoxify", "memory", "serve"} <= subcommands, subcommands
    readme = [c for c in ALL_COMMANDS if c.where.startswith("README.md")]
    assert {"tiny-model", "detoxify", "serve"} <= {c.argv[0] for c in readme}


def test_the_checker_refuses_a_wrong_command(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\n"
                   "safegen detoxify in.txt -o out.jsonl \\\n    --no-such-flag   # a comment\n"
                   "X=1 .venv/bin/python -m safegen serve --port 99999 && echo done\n"
                   "safegen generate 'a # not a comment' --seed 1\n"
                   "```\n\n"
                   f"{NO_PARSE}\n```bash\nsafegen serve --model <MODEL>\n```\n")
    found = commands([doc])
    assert [c.argv for c in found] == [
        ["detoxify", "in.txt", "-o", "out.jsonl", "--no-such-flag"],
        ["serve", "--port", "99999"],
        ["generate", "a # not a comment", "--seed", "1"],
    ]
    assert [parse(c.argv)[0] for c in found] == [False, False, True]
    assert parse(["serve", "--help"])[0]


def test_readme_starts_with_the_two_commands():
    first = blocks(ROOT / "README.md")[0]
    assert [line.split("#")[0].strip() for line in first.lines if line.strip()] == ["make demo", "make test"]
    head = (ROOT / "README.md").read_text(encoding="utf-8").split(first.lines[-1], 1)[0]
    assert len(head.splitlines()) < 10, "the two commands must be the README's first lines"


def test_readme_tells_how_to_get_safegen_on_the_path():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ". .venv/bin/activate" in text and ".venv/bin/safegen" in text


# ------------------------------------------------------------------------------ links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    in_code, seen, out = False, {}, set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[str, str]]:
    """(target, file:line) of the relative links outside code."""
    found, in_code = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                found.append((target, f"{where(path)}:{number}"))
    return found


def broken(path: Path) -> list[str]:
    bad = []
    for target, at in links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            bad.append(f"{at}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{at}: {target} (no such heading in {resolved.name})")
    return bad


def test_readme_links_to_every_doc_and_they_exist():
    targets = {t.partition("#")[0] for t, _ in links(ROOT / "README.md")}
    for name in ("docs/cli.md", "docs/python.md", "docs/serving.md", "docs/configuration.md",
                 "docs/method.md", "docs/cost.md", "docs/audit.md", "docs/policy.md"):
        assert name in targets, f"README.md does not link to {name}"
    assert all((ROOT / t).is_file() for t in targets if t.startswith("docs/")), targets


@pytest.mark.parametrize("path", DOCS, ids=[where(p) for p in DOCS])
def test_relative_links_resolve(path):
    assert broken(path) == []


def test_the_link_checker_finds_a_broken_link(tmp_path):
    # A scratch folder of its own ("pages"), so that no path here reads as a page of this repository.
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "one.md").write_text("# A title\n## Fast sampling\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](pages/one.md) [ok](pages/one.md#fast-sampling) [bad](pages/two.md) "
                    "[bad](pages/one.md#nope)\n"
                    "[web](https://example.com) `[code](pages/three.md)`\n```\n[in code](pages/four.md)\n```\n")
    assert broken(page) == ["README.md:1: pages/two.md (no such file)",
                            "README.md:1: pages/one.md#nope (no such heading in one.md)"]


# ------------------------------------------------------------------------------ Python blocks
PYTHON_BLOCKS = [b for path in DOCS for b in blocks(path) if b.language == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"{where(b.path)}:{b.line}" for b in PYTHON_BLOCKS])
def test_python_blocks_compile(block):
    compile("\n".join(block.lines), f"{block.path.name}:{block.line}", "exec")


# ------------------------------------------------------------------------------ serving examples
def test_openai_examples_name_what_their_server_serves():
    """A client example's `model` is the served id (--served-model-name, else --model as written) of
    a `safegen serve` command shown in the same file, and the policies it asks for are among that
    command's --policy values, named as on its command line."""
    checked = 0
    for path in DOCS:
        servers = []
        for c in commands([path]):
            if c.argv[:1] == ["serve"]:
                args = build_parser().parse_args(c.argv)
                servers.append((args.served_model_name or args.model, args.policy or ["default"]))
        for block in blocks(path):
            code = "\n".join(block.lines)
            if block.language != "python" or "OpenAI(" not in code:
                continue
            models = re.findall(r"\bmodel=\"([^\"]+)\"", code)
            policies = re.findall(r"\"policy\":\s*\"([^\"]+)\"", code)
            assert models, f"{path.name}:{block.line}: a client example without model=\"...\""
            for model in models:
                served = [p for m, p in servers if m == model]
                assert served, f"{path.name}:{block.line}: model={model!r}, but no serve command in " \
                               f"{path.name} serves it (served: {[m for m, _ in servers]})"
                for policy in policies:
                    assert any(policy in p for p in served), \
                        f"{path.name}:{block.line}: policy {policy!r} is not offered by the server of {model!r}"
            checked += 1
    assert checked >= 2  # the README's and serving.md's


# ------------------------------------------------------------------------------ the CLI reference
def undocumented_flags(text: str) -> dict[str, list[str]]:
    """{subcommand: its option strings that `text` never names} (`--[no-]x` names --x and --no-x)."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    out = {}
    for name, sub in subparsers.choices.items():
        missing = []
        for action in sub._actions:
            for option in action.option_strings:
                bare = option.replace("--no-", "--", 1)
                if option not in ("-h", "--help") and option not in text and \
                        bare.replace("--", "--[no-]", 1) not in text:
                    missing.append(option)
        out[name] = missing
    return out


def test_cli_md_documents_every_flag():
    assert {name: m for name, m in undocumented_flags((ROOT / "docs" / "cli.md").read_text(encoding="utf-8")).items()
            if m} == {}


def test_the_flag_check_finds_a_missing_flag():
    missing = undocumented_flags("`--seed` `--family` `--[no-]adaptive`")
    assert missing["tiny-model"] == []
    assert "--adaptive" not in missing["generate"] and "--no-adaptive" not in missing["generate"]
    assert "--model" in missing["generate"] and "--api-key-file" in missing["serve"]
