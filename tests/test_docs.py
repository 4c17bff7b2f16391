"""The README and docs/ say only what works: commands that parse, links that resolve.

Checked over ``README.md``, ``CHANGELOG.md`` and every ``docs/*.md``:

* every ``fedseal ...`` command in a shell code block (and in an untagged block, where a
  line names a fedseal command exactly) parses with the real parser
  (:func:`fedseal.common.cli.build_parser`), and every option it names exists, spelled in
  full, on that (sub)command; placeholder values (``L``, ``NAME``, ``<out>``) are fine;
* every option of a ``fedseal`` command in inline code exists on that (sub)command;
* every ``python -m MODULE`` line in a code block names a module of this checkout;
* every relative Markdown link (and image) outside code blocks names an existing file,
  and its ``#anchor``, if any, a heading of that file;
* every ``tests/FILE.py::NAME`` they cite (the threat model's claims) is a test of that file;
* every ``make TARGET`` the README names is a target of the Makefile.

The checkers are also run on bad samples, so that a broken link or a misspelt option
cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

from fedseal.common.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
PARSER = functools.cache(build_parser)  # the whole fedseal parser tree, built once
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

# Files another branch adds (linked here before that branch is merged). Remove each entry
# once its file exists on main: an entry whose file exists fails the test below.
PENDING: set[str] = set()

FENCE = re.compile(r"^(\s*)(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SHELL_STOPS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}
WRAPPERS = {"nice", "time"}
ELLIPSES = {"...", "…"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_markdown(text: str) -> tuple[list[str], list[str], list[str]]:
    """``(shell lines, prose lines, untagged lines)`` of a Markdown text.

    Shell lines are those of fenced blocks tagged ``bash``, ``sh``, ``shell`` or
    ``console``; untagged lines those of fenced blocks without a language (output, or a
    command someone forgot to tag); other blocks (``text``, TOML, Python) belong to none.
    """
    shell: list[str] = []
    prose: list[str] = []
    untagged: list[str] = []
    fence: str | None = None
    kind: list[str] | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and (fence is None or match.group(2) == fence):
            if fence is None:
                fence = match.group(2)
                language = line[match.end() :].strip().lower()
                kind = shell if language in SHELL_LANGUAGES else untagged if not language else None
            else:
                fence = None
            continue
        if fence is None:
            prose.append(line)
        elif kind is not None:
            kind.append(line)
    return shell, prose, untagged


def shell_commands(code: list[str]) -> list[list[str]]:
    """The commands of shell-like code lines, as word lists: continuations joined,
    comments dropped, each pipeline or ``&&`` chain split into its commands."""
    joined: list[str] = []
    buffer = ""
    for line in code:
        stripped = line.strip().removeprefix("$ ")
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        joined.append(buffer + stripped)
        buffer = ""
    if buffer:
        joined.append(buffer)
    commands = []
    for line in joined:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell (a TOML string, a Python line): nothing to check
            continue
        current: list[str] = []
        for word in [*words, ";"]:
            if word in SHELL_STOPS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def fedseal_arguments(command: list[str]) -> list[str] | None:
    """The arguments of a ``fedseal`` command (``None`` if it is another program's);
    leading ``VAR=value`` assignments, ``nice [-n N]``, ``time`` and a path before
    ``fedseal`` are allowed, and ``...`` (options left out) is dropped."""
    words = list(command)
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in WRAPPERS):
        if words.pop(0) == "nice" and words[:1] == ["-n"]:
            del words[:2]
    if not words or Path(words[0]).name != "fedseal":
        return None
    return [w for w in words[1:] if w not in ELLIPSES]


def unknown_option(arguments: list[str]) -> str | None:
    """The first option of ``fedseal ARGUMENTS`` its (sub)command lacks, spelled in full
    (argparse would take a prefix); ``None`` if every one exists."""
    known: set[str] = set()
    leaf: argparse.ArgumentParser = PARSER()
    for word in arguments:
        known |= set(leaf._option_string_actions)
        sub = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
        if sub and word in sub[0].choices:
            leaf = sub[0].choices[word]
    known |= set(leaf._option_string_actions)
    for word in arguments:
        option = word.split("=", 1)[0]
        if option.startswith("-") and not re.fullmatch(r"-[0-9.e+-]+", option) and option not in known:
            return option
    return None


def check_fedseal_command(arguments: list[str]) -> str | None:
    """Why ``fedseal ARGUMENTS`` does not parse or names an unknown option; ``None`` if fine."""
    if arguments[:1] and arguments[0] in ("-h", "--help", "-V", "--version") and len(arguments) == 1:
        return None  # answered by the dispatcher itself (fedseal.common.cli.main)
    option = unknown_option(arguments)
    if option is not None:
        return f"option {option} does not exist here (prefixes do not count)"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            PARSER().parse_args(arguments)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue() else str(exc)
    return None


def python_modules(command: list[str]) -> str | None:
    """The module of a ``python -m MODULE`` command, else ``None``."""
    words = [w for w in command if not ENV_ASSIGNMENT.match(w)]
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1] == "-m":
        return words[2]
    return None


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text (outside code blocks)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in split_markdown(text)[1]:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"[`*]", "", match.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(doc: Path, root: Path = ROOT, pending: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Each relative link of ``doc`` whose file (or anchor) does not exist."""
    text = doc.read_text(encoding="utf-8")
    problems = []
    prose = "\n".join(split_markdown(text)[1])
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code is not a link
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        file = (doc.parent / path_part).resolve() if path_part else doc
        relative = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
        if relative in pending:
            continue
        if not file.exists():
            problems.append(f"{doc.name}: link to {target}: no file {relative}")
        elif (
            anchor
            and file.suffix == ".md"
            and anchor not in heading_anchors(file.read_text(encoding="utf-8"))
        ):
            problems.append(f"{doc.name}: link to {target}: no heading #{anchor} in {relative}")
    return problems


def fedseal_commands(text: str) -> list[list[str]]:
    """The arguments of every ``fedseal`` command a Markdown text shows.

    Every one in a shell block; in an untagged block (mostly console output) a line counts
    only when it names a fedseal command exactly (``fedseal simulate: 3 sites`` is output).
    """
    shell, _, untagged = split_markdown(text)
    found = [a for c in shell_commands(shell) if (a := fedseal_arguments(c)) is not None]
    return found + [a for c in shell_commands(untagged) if (a := fedseal_arguments(c)) and a[0] in COMMANDS]


def inline_fedseal_commands(text: str) -> list[list[str]]:
    """The arguments of every ``fedseal COMMAND ...`` in the inline code of a Markdown text's
    prose: often a command's name or a fragment, so only its options are checked."""
    found = []
    for span in re.findall(r"`([^`]+)`", "\n".join(split_markdown(text)[1])):
        try:
            words = shlex.split(" ".join(span.split()))
        except ValueError:
            continue
        arguments = fedseal_arguments(words)
        if arguments and arguments[0] in COMMANDS:
            found.append(arguments)
    return found


def _commands():
    for doc in DOCS:
        for command in shell_commands(split_markdown(doc.read_text(encoding="utf-8"))[0]):
            yield doc, command


FEDSEAL_COMMANDS = [(doc, args) for doc in DOCS for args in fedseal_commands(doc.read_text(encoding="utf-8"))]
MODULES = [(doc, m) for doc, c in _commands() if (m := python_modules(c))]


def test_the_docs_show_commands_at_all():
    """The walk finds what it checks: the README's own examples are among them."""
    readme = [args[0] for doc, args in FEDSEAL_COMMANDS if doc.name == "README.md" and args]
    assert {"simulate", "server", "client", "keys"} <= set(readme)
    assert any(m.startswith("simulations.bench.") for _, m in MODULES)


COMMAND_IDS = [f"{d.name}: fedseal {' '.join(a)}"[:100] for d, a in FEDSEAL_COMMANDS]


@pytest.mark.parametrize("doc,arguments", FEDSEAL_COMMANDS, ids=COMMAND_IDS)
def test_every_fedseal_command_in_the_docs_parses(doc, arguments):
    problem = check_fedseal_command(arguments)
    assert problem is None, f"{doc.name}: `fedseal {' '.join(arguments)}`: {problem}"


INLINE = [(doc, args) for doc in DOCS for args in inline_fedseal_commands(doc.read_text(encoding="utf-8"))]


@pytest.mark.parametrize(
    "doc,arguments", INLINE, ids=[f"{d.name}: fedseal {' '.join(a)}"[:100] for d, a in INLINE]
)
def test_every_option_named_in_inline_code_exists(doc, arguments):
    assert unknown_option(arguments) is None, f"{doc.name}: `fedseal {' '.join(arguments)}`"


@pytest.mark.parametrize("doc,module", MODULES, ids=[f"{d.name}: {m}" for d, m in MODULES])
def test_every_python_module_in_the_docs_exists(doc, module):
    base = ROOT / Path(*module.removeprefix("fedseal.").split("."))
    assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), (
        f"{doc.name}: `python -m {module}`: no such module in the checkout"
    )


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_relative_link_resolves(doc):
    assert broken_links(doc, pending=PENDING) == []


TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def missing_tests(text: str, root: Path = ROOT) -> list[str]:
    """Each ``tests/FILE.py::NAME`` a text names whose file does not define ``NAME``."""
    missing = []
    for file, name in TEST_REFERENCE.findall(text):
        path = root / file
        if not path.is_file() or not re.search(
            rf"^\s*(async\s+)?def {name}\(", path.read_text(encoding="utf-8"), re.MULTILINE
        ):
            missing.append(f"{file}::{name}")
    return missing


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_test_the_docs_name_exists(doc):
    assert missing_tests(doc.read_text(encoding="utf-8")) == []


def test_pending_files_are_not_there_yet():
    """The allow-list holds only files another branch still has to bring."""
    assert [p for p in PENDING if (ROOT / p).exists()] == []


def test_make_targets_named_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:", makefile, flags=re.MULTILINE))
    shell, prose, _ = split_markdown((ROOT / "README.md").read_text(encoding="utf-8"))
    code = shell + re.findall(r"`([^`\n]*)`", "\n".join(prose))  # code blocks, inline code
    named = {m for line in code for m in re.findall(r"(?<![\w/.-])make\s+([a-z][\w-]*)", line)}
    assert {"run", "test"} <= named
    assert named <= targets, f"README names make targets the Makefile lacks: {named - targets}"


def test_the_link_checker_catches_a_broken_link_a_bad_anchor_and_a_missing_image(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# Present `heading`\n## snake_case\n", encoding="utf-8")
    sample = tmp_path / "README.md"
    sample.write_text(
        "See [ok](docs/there.md), [ok too](docs/there.md#present-heading),\n"
        "[underscore](docs/there.md#snake_case), [web](https://example.org), [self](#title),\n"
        "`[not a link](nowhere.md)`, [missing](docs/nowhere.md),\n"
        "[bad anchor](docs/there.md#absent), ![missing image](docs/bench/none.png),\n"
        "[pending](docs/later.md).\n\n# Title\n\n```bash\n[in code](nowhere-either.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(sample, root=tmp_path, pending={"docs/later.md"})
    assert len(problems) == 3, problems
    assert any("docs/nowhere.md" in p for p in problems)
    assert any("#absent" in p for p in problems)
    assert any("none.png" in p for p in problems)


def test_the_command_checker_catches_a_misspelt_option_a_prefix_and_a_bad_value():
    code, _, _ = split_markdown(
        "```bash\n.venv/bin/fedseal client --server x:1 \\\n"
        "    --epsilonn 8   # typo\nHF_HUB_OFFLINE=1 fedseal simulate "
        "--ep 8 | head\nfedseal ledger show --ledger L --ledger-key K\n"
        "```\n"
    )
    found = [fedseal_arguments(c) for c in shell_commands(code)]
    assert found[1] == ["simulate", "--ep", "8"] and found[2] is None  # `head` is not fedseal
    assert fedseal_arguments(["fedseal", "simulate", "--rounds", "5", "..."]) == ["simulate", "--rounds", "5"]
    assert "--epsilonn" in check_fedseal_command(found[0])
    assert "--ep" in check_fedseal_command(found[1])  # a prefix argparse would accept
    assert check_fedseal_command(found[3]) is None
    assert check_fedseal_command(["simulate", "--rounds", "many"]) is not None
    assert check_fedseal_command(["simulat"]) is not None
    assert check_fedseal_command(["simulate", "--help"]) is None
    assert inline_fedseal_commands(
        "Run `fedseal client --lables A` or `fedseal report`;\n`fedseal simulate\n--rounds 2` spans lines."
    ) == [["client", "--lables", "A"], ["report"], ["simulate", "--rounds", "2"]]
    assert unknown_option(["client", "--lables", "A"]) == "--lables"
    assert unknown_option(["ledger", "raise", "--by", "X"]) is None
    assert fedseal_commands(
        "```\nfedseal simulate: 3 sites\nfedseal audit --runz 3\n```\n"
        "```text\nfedseal report --bad\n```\n```console\n"
        "$ nice -n 10 fedseal report OUT\n```\n"
    ) == [["report", "OUT"], ["audit", "--runz", "3"]]


def test_the_test_reference_checker_catches_a_renamed_test_and_a_missing_file():
    assert missing_tests(
        "`tests/test_docs.py::test_every_test_the_docs_name_exists`, "
        "`tests/test_docs.py::test_that_was_renamed`, "
        "`tests/nowhere.py::test_x`"
    ) == ["tests/test_docs.py::test_that_was_renamed", "tests/nowhere.py::test_x"]
