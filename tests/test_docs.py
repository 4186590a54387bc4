"""The documentation's commands and links: every flag in a fenced command exists in the program it
is given to (asked through the program's own ``--help``), and every relative link, anchors
included, leads somewhere."""
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, subprocess_env

PAGES = sorted([REPO / "README.md", REPO / "ops" / "README.md", *(REPO / "docs").glob("*.md")])
# Launchers whose last arguments are a command of its own: the number of their own arguments.
LAUNCHERS = {"tools/run_dist_launch.sh": 1, "tools/run_dist_slurm.sh": 3, "tools/submit_slurm.sh": 3}


@functools.cache
def known_flags(program: str) -> frozenset[str]:
    """The ``--flags`` a program of this repository lists in its ``--help``."""
    command = [sys.executable, program, "--help"] if program.endswith(".py") else ["bash", program, "--help"]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{program} --help: {proc.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z0-9][A-Za-z0-9_-]*)", proc.stdout))


def fenced_commands(page: Path) -> list[tuple[int, list[str]]]:
    """``(line, words)`` of every shell command in the page's fenced blocks (continuations
    joined, split at ``;``, ``&&``, ``||`` and ``|``)."""
    commands = []
    text = page.read_text()
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if block.group(1) not in ("", "bash", "sh", "shell", "console"):
            continue
        first_line = text[:block.start()].count("\n") + 2
        body = block.group(2).replace("\\\n", " ")
        for offset, line in enumerate(body.splitlines()):
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            for part in re.split(r";|&&|\|\||\|", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                if words:
                    commands.append((first_line + offset, words))
    return commands


def program_and_flags(words: list[str]) -> tuple[str, list[str]] | None:
    """The repository program a command runs and the flags given to it, or None for other commands."""
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # environment assignments
    for i, word in enumerate(words):
        name = word.removeprefix("./")
        if name in LAUNCHERS:
            return program_and_flags(words[i + 1 + LAUNCHERS[name]:])
        if name == "main.py" or re.fullmatch(r"configs/\w+\.sh", name):
            program = "main.py"
        elif re.fullmatch(r"tools/\w+\.py", name):
            program = name
        else:
            continue
        return program, [w.split("=")[0] for w in words[i + 1:] if w.startswith("--")]
    return None


COMMANDS = [(page, line, words) for page in PAGES for line, words in fenced_commands(page)
            if program_and_flags(words) is not None]


def test_the_pages_hold_commands_to_check():
    assert len(COMMANDS) > 10 and {page.name for page, _, _ in COMMANDS} >= {"README.md", "training.md"}


@pytest.mark.parametrize("page, line, words", COMMANDS,
                         ids=[f"{page.relative_to(REPO)}:{line}" for page, line, _ in COMMANDS])
def test_every_flag_of_a_documented_command_exists(page, line, words):
    program, flags = program_and_flags(words)
    unknown = sorted(set(flags) - known_flags(program))
    assert not unknown, f"{page.relative_to(REPO)}:{line}: {program} has no {unknown}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_\[\]()]", lambda m: m.group(0) if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


LINKS = [(page, target) for page in PAGES
         for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S))
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{p.relative_to(REPO)}->{t}" for p, t in LINKS])
def test_every_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.relative_to(REPO)} links to {target}: no such file"
    if anchor:
        assert destination.suffix == ".md" and anchor in anchors(destination), \
            f"{page.relative_to(REPO)} links to {target}: no such heading"


def test_github_anchors():
    assert github_anchor("Output directory (`--output_dir`)") == "output-directory---output_dir"
    assert github_anchor("Preemptible, elastic and multi-node runs") == "preemptible-elastic-and-multi-node-runs"
    assert github_anchor("Mixed precision (`--amp`)") == "mixed-precision---amp"


def test_every_new_flag_is_listed_among_the_differences():
    """docs/differences.md says that everything it does not list behaves as the original: every flag
    of the --help group of flags the original does not have must be named there."""
    from util.flags import get_args_parser

    group = next(g for g in get_args_parser()._action_groups if g.title.startswith("added by this"))
    flags = [action.option_strings[0] for action in group._group_actions]
    text = (REPO / "docs" / "differences.md").read_text()
    missing = [flag for flag in flags if not re.search(re.escape(flag) + r"\b", text)]
    assert len(flags) > 20 and not missing
