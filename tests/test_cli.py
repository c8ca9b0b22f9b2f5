"""The command line explains itself: what ``--help`` prints, for the program and every command."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flagrelease.cli import build_parser, main
from flagrelease.pipeline import STAGES

FLAGRELEASE = str(Path(sys.executable).parent / "flagrelease")


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """Each argument's entry in argparse's help: invocation -> its help text (empty if none)."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line.strip() or not line.startswith(" "):
            current = None  # a blank line or a section heading ends an entry
            continue
        if re.match(r"^ {2}\S", line):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation
            entries[current] = rest.strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_argument_of_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _commands()[command]
    arguments = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    for action in arguments:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, (command, action.dest)
    text = _help([command], capsys)
    entries = _entries(text)
    assert "-h, --help" in entries
    formatter = parser._get_formatter()
    for action in arguments:
        invocation = formatter._format_action_invocation(action)
        assert invocation in entries, (command, invocation, sorted(entries))
        assert entries[invocation], f"`flagrelease {command} --help` shows {invocation!r} without help"
    description = text.split("\n\n")[1].strip()
    assert description[0].isupper() and description.endswith("."), description


def test_stages_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    entries = _entries(_help(["run"], capsys))
    stages_help = next(text for invocation, text in entries.items() if invocation.startswith("--stages"))
    for stage in STAGES:
        assert re.search(rf"\b{stage}\b", stages_help), (stage, stages_help)


def test_top_level_help_is_a_sentence_then_the_two_commands_to_start_with() -> None:
    proc = subprocess.run(
        [FLAGRELEASE, "--help"], capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="100")
    )
    assert proc.returncode == 0, proc.stderr
    usage, description, start_here, *rest = proc.stdout.split("\n\n")
    assert usage.startswith("usage: flagrelease")
    sentence = " ".join(description.split())
    assert sentence[0].isupper() and sentence.endswith(".") and sentence.count(". ") == 0, sentence
    assert "`" not in sentence and ":mod:" not in sentence and "``" not in proc.stdout
    lines = start_here.splitlines()
    assert lines[0] == "start here:"
    assert lines[1].split()[:2] == ["flagrelease", "demo"]
    assert lines[2].split()[:3] == ["flagrelease", "run", "CONFIG"]
    assert "flagrelease validate CONFIG" in start_here
    commands = "\n\n".join(rest)
    assert "commands:" in commands and commands.index("demo") < commands.index("chips")
    listed = re.findall(r"^ {4}(\S+)", commands, flags=re.M)
    assert listed[:3] == ["demo", "run", "validate"] and set(listed) == set(_commands())
