"""Quoting for each target flagrelease renders: shell, Markdown, Dockerfile, YAML, OmegaConf.

Every value from a release config or chip profile is checked to be one line
(:func:`one_line`) and then quoted for where it lands.  :mod:`flagrelease.render` and the
card use these; the hostile-input suite (``tests/hostile/``) renders every field with
every payload through them.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import yaml

from flagrelease.errors import ConfigError

if TYPE_CHECKING:
    from flagrelease.config import ReleaseConfig

__all__ = [
    "bad_value",
    "dockerfile_exec_form",
    "dockerfile_pairs",
    "dockerfile_word",
    "markdown_cell",
    "markdown_code",
    "markdown_text",
    "omegaconf_escape",
    "one_line",
    "shell_join",
    "shell_lines",
    "shell_word",
    "yaml_block",
    "yaml_inline",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Markdown's active characters: always, ``_`` at a word's edge (GFM ignores it inside a
# word), ``&`` starting an entity and ``#`` starting the text (a heading).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|&(?=#?[A-Za-z0-9]+;)|^#)")


def bad_value(field: str, value: object, why: str, fix: str, *, cfg: ReleaseConfig | None = None) -> ConfigError:
    """A ConfigError saying ``field`` = ``value`` ``why``, and the ``fix``."""
    return ConfigError(
        f"{field}: {value!r} {why}; {fix}",
        errors=[(field, why)],
        model=cfg.name if cfg else None,
        chip=cfg.chip if cfg else None,
    )


def one_line(value: object, field: str, *, cfg: ReleaseConfig | None = None) -> str:
    """``value`` as one line of text, or a ConfigError naming ``field``."""
    text = str(value)
    if _CONTROL.search(text):
        raise bad_value(field, text, "holds a newline or control character", "give it as one plain line", cfg=cfg)
    return text


# -- quoting for each target ---------------------------------------------------------------
def shell_word(value: object) -> str:
    """``value`` as one POSIX shell word (:func:`shlex.quote`), refused when it holds a control character."""
    return shlex.quote(one_line(value, "shell value"))


def shell_join(argv: Iterable[object]) -> str:
    """A command line of shell words, each quoted with :func:`shell_word`."""
    return " ".join(shell_word(a) for a in argv)


def markdown_text(value: object) -> str:
    """``value`` as Markdown text that renders as itself: one line, every Markdown/HTML character escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", one_line(value, "Markdown text"))


def markdown_cell(value: object) -> str:
    """``value`` (Markdown already) as one table cell: one line, ``|`` escaped so it cannot add a column."""
    return re.sub(r"(?<!\\)\|", r"\\|", one_line(value, "Markdown table cell"))


def markdown_code(value: object) -> str:
    """``value`` as an inline code span that no backtick inside can close early."""
    text = one_line(value, "Markdown code")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def omegaconf_escape(value: Any) -> Any:
    """Strings inside ``value`` with OmegaConf's ``${`` escaped, so Hydra (FlagScale) reads them as written."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    if isinstance(value, dict):
        return {k: omegaconf_escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [omegaconf_escape(v) for v in value]
    return value


def dockerfile_word(value: object) -> str:
    """A Dockerfile double-quoted word: no variable expansion, no word splitting."""
    text = one_line(value, "Dockerfile value")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def dockerfile_pairs(items: Iterable[tuple[str, object]], quote_keys: bool = False) -> list[str]:
    """``key="value"`` words for LABEL (keys quoted too) and ENV (keys are checked names)."""
    return [f"{dockerfile_word(k) if quote_keys else k}={dockerfile_word(v)}" for k, v in items]


def dockerfile_exec_form(argv: Iterable[object]) -> str:
    """A Dockerfile exec-form (JSON array) command: no shell and no variable expansion."""
    return json.dumps([one_line(a, "Dockerfile argument") for a in argv])


def yaml_inline(value: object) -> str:
    """``value`` as flow-style YAML on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 30, sort_keys=False)
    text = text.rstrip("\n")
    return text[: -len("\n...")] if text.endswith("\n...") else text


def yaml_block(value: object, indent: int) -> str:
    """``value`` as block-style YAML, every line indented by ``indent``."""
    text = yaml.safe_dump(value, default_flow_style=False, allow_unicode=True, width=1 << 30, sort_keys=False)
    pad = " " * indent
    return "\n".join(pad + line for line in text.rstrip("\n").splitlines())


def shell_lines(argv: list[str]) -> str:
    """``argv`` shell-quoted, one option (with its values) per continued line."""
    words = [shlex.quote(one_line(a, "command argument")) for a in argv]
    lines: list[list[str]] = [[]]
    for raw, word in zip(argv, words, strict=True):
        if raw.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(word)
    return " \\\n    ".join(" ".join(line) for line in lines)
