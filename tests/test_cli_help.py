"""The command line documents itself: every option has help text with its default, and the README's synopsis
is made of command lines the real parser accepts (issue #17, "a student's first hour")."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from course_lib.cli import build_parser
from course_lib.cli.args import has_default

README = Path(__file__).resolve().parents[1] / "README.md"
PREFIX = ["python", "-m", "course_lib"]


def parsers(parser: argparse.ArgumentParser | None = None):
    """The main parser and every (nested) subcommand's parser."""
    parser = parser or build_parser()
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):     # aliases share a parser
                yield from parsers(sub)


def documented(action) -> bool:
    return not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))


def test_every_option_has_help_and_shows_its_default():
    missing, no_default = [], []
    for parser in parsers():
        formatter = parser._get_formatter()
        for action in filter(documented, parser._actions):
            name = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                missing.append(f"{parser.prog} {name}")
            elif action.option_strings and has_default(action) and "default" not in formatter._get_help_string(action):
                no_default.append(f"{parser.prog} {name}")
    assert missing == [] and no_default == []


def test_help_text_is_plain():
    """--help is read in a terminal: no backticks or reStructuredText roles in any description or help."""
    markup = re.compile(r"`|:\w+:|\*\*")
    found = [f"{p.prog}: {text!r}" for p in parsers()
             for text in [p.description or ""] + [a.help or "" for a in p._actions if documented(a)]
             if markup.search(text)]
    assert found == []


def synopsis_lines() -> list[str]:
    """The README's command lines (a line starting with spaces continues the one above), comments removed."""
    text = README.read_text()
    section = text[text.index("## Command line"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    lines: list[str] = []
    for raw in block.splitlines():
        if raw.startswith(" ") and lines:
            lines[-1] += " " + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    return [re.sub(r"\s+#.*", "", line) for line in lines]           # no command has a "#" in it


def test_the_synopsis_names_every_command():
    lines = synopsis_lines()
    assert len(lines) >= 20 and all(shlex.split(line)[:3] == PREFIX for line in lines)
    words = {w for line in lines for w in shlex.split(line)}
    commands = {name for p in parsers() for a in p._actions if isinstance(a, argparse._SubParsersAction)
                for name in a.choices}
    assert commands - words == set()


@pytest.mark.parametrize("line", synopsis_lines())
def test_each_synopsis_line_parses(line):
    """With every [optional] part and with none: what is outside the brackets is all that is required."""
    everything = shlex.split(line.replace("[", " ").replace("]", " "))[3:]
    required_only = shlex.split(re.sub(r"\[[^\]]*\]", " ", line))[3:]
    for argv in (everything, required_only):
        args = build_parser().parse_args(argv)          # a UsageError (one line) fails the test
        assert callable(args.func)
