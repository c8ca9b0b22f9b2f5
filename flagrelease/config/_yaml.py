"""Reading a config file as YAML, with bounds a hostile or broken file cannot get past.

Before anything is built from the text, one pass over the parser's events checks the
shape of the document: the nesting depth, the number of values it expands to (an alias
counts as everything its anchor holds, so a "billion laughs" file of a few kilobytes is
refused at once, in bounded memory) and duplicate keys (YAML lets the last one win
silently).  The file's size is capped and it must be UTF-8.  Every problem is a
:class:`~flagrelease.errors.ConfigError` naming the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flagrelease.errors import ConfigError

__all__ = ["MAX_ALIASES", "MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "read_yaml"]

#: The largest config file read, in bytes.
MAX_BYTES = 1 << 20
#: The deepest nesting of mappings and lists.
MAX_DEPTH = 32
#: The most values a document may expand to, aliases expanded.
MAX_VALUES = 100_000
#: The most aliases (``*name``) in one document.
MAX_ALIASES = 256

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class _Frame:
    kind: str  # "map" or "seq"
    start: int  # values counted before this collection began
    anchor: str | None
    key: str | None = None
    expecting_key: bool = True
    index: int = -1
    keys: set[str] = field(default_factory=set)


class _Problem(Exception):
    def __init__(self, where: str, line: int, message: str) -> None:
        super().__init__(message)
        self.where, self.line, self.message = where, line, message


def _line(event: Any) -> int:
    """The 1-based line an event starts on."""
    mark = getattr(event, "start_mark", None)
    return int(mark.line) + 1 if mark is not None else 0


def _path(stack: list[_Frame]) -> str:
    parts: list[str] = []
    for frame in stack:
        if frame.kind == "map":
            if frame.key is None:
                break
            parts.append(frame.key)
        elif frame.index >= 0:
            parts[-1:] = [f"{parts[-1]}[{frame.index}]"] if parts else [f"[{frame.index}]"]
    return ".".join(parts) or "(top level)"


def _shape_check(text: str, *, stop_at: tuple[int, int] | None = None) -> str:
    """Walk the events of ``text``; raise :class:`_Problem` past a bound.

    Returns:
        The field being written at ``stop_at`` (line, column), or at the end.
    """
    stack: list[_Frame] = []
    sizes: dict[str, int] = {}
    total = aliases = 0

    def begin_node(event: Any, *, scalar_key: str | None) -> None:
        if not stack:
            return
        parent = stack[-1]
        if parent.kind == "seq":
            parent.index += 1
        elif parent.expecting_key:
            line = _line(event)
            if scalar_key is not None and scalar_key != "<<":
                if scalar_key in parent.keys:
                    where = _path([*stack[:-1], _Frame("map", 0, None, key=scalar_key)])
                    raise _Problem(
                        where,
                        line,
                        f"duplicate key {scalar_key!r} (YAML would keep only the last one); keep one of them",
                    )
                parent.keys.add(scalar_key)
            parent.key = scalar_key if scalar_key is not None else "(complex key)"
            parent.expecting_key = False
            return
        else:
            parent.expecting_key = True

    def count(n: int, event: Any) -> None:
        nonlocal total
        total += n
        if total > MAX_VALUES:
            raise _Problem(
                _path(stack),
                _line(event),
                f"the document expands to more than {MAX_VALUES} values (anchors and aliases included); "
                "write the values out, or use fewer aliases",
            )

    for event in yaml.parse(text, Loader=_Loader):
        mark = getattr(event, "start_mark", None)
        if stop_at is not None and mark is not None and (mark.line, mark.column) > stop_at:
            return _path(stack)
        if isinstance(event, yaml.ScalarEvent):
            is_key = bool(stack) and stack[-1].kind == "map" and stack[-1].expecting_key
            begin_node(event, scalar_key=event.value if is_key else None)
            count(1, event)
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            begin_node(event, scalar_key=None)
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _Problem(_path(stack), _line(event), f"more than {MAX_ALIASES} aliases")
            count(sizes.get(event.anchor or "", 1), event)
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            begin_node(event, scalar_key=None)
            if len(stack) >= MAX_DEPTH:
                raise _Problem(
                    _path(stack),
                    _line(event),
                    f"nested deeper than {MAX_DEPTH} levels; a release config is a few levels deep",
                )
            count(1, event)
            kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
            stack.append(_Frame(kind, total, event.anchor))
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            frame = stack.pop()
            if frame.anchor:
                sizes[frame.anchor] = total - frame.start + 1
    return _path(stack)


def _field_by_indent(text: str, line: int) -> str:
    """The keys above ``line`` by indentation: a guess at the field for text that does not parse that far."""
    keys: list[str] = []
    limit = 1 << 30
    for row in reversed(text.splitlines()[: line + 1]):
        m = re.match(r"^(\s*)(?:- )?([A-Za-z0-9_.-]+)\s*:", row)
        if m and len(m.group(1)) < limit:
            keys.insert(0, m.group(2))
            limit = len(m.group(1))
            if limit == 0:
                break
    return ".".join(keys) or "(file)"


def _field_at(text: str, line: int, column: int) -> str:
    """The field being written at ``line``, ``column`` (0-based) of ``text``, as far as the text parses."""
    try:
        where = _shape_check(text, stop_at=(line, column))
    except _Problem as problem:
        where = problem.where
    except yaml.YAMLError:
        where = "(file)"
    return where if where not in ("(file)", "(top level)") else _field_by_indent(text, line)


def _read_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}", path=str(path)) from err
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_BYTES // 1024} KiB; a release config is a few kilobytes",
            path=str(path),
            errors=[("(file)", f"larger than {MAX_BYTES // 1024} KiB")],
        )
    return raw


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        before = raw[: err.start]
        line = before.count(b"\n")
        column = err.start - (before.rfind(b"\n") + 1) + 1
        where = _field_at(raw.decode("utf-8", errors="replace"), line, column - 1)
        why = f"not UTF-8: byte 0x{raw[err.start]:02x} at line {line + 1}, column {column}"
        raise ConfigError(
            f"{path}: {where}: {why}; save the file as UTF-8",
            path=str(path),
            errors=[(where, why)],
        ) from None


def read_yaml(path: Path) -> Any:
    """Read ``path`` as one YAML document, within the bounds above.

    Raises:
        ConfigError: the file cannot be read, is too large, is not UTF-8, is not YAML,
            nests too deeply, expands too far or repeats a key; the error names the line
            and field.
    """
    text = _decode(_read_bytes(path), path)
    try:
        _shape_check(text)
        return yaml.load(text, Loader=_Loader)  # a safe loader (CSafeLoader or SafeLoader)
    except _Problem as problem:
        why = f"line {problem.line}: {problem.message}"
        raise ConfigError(f"{path}: {problem.where}: {why}", path=str(path), errors=[(problem.where, why)]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        context = getattr(err, "context_mark", None) or mark  # where the broken construct began
        where = _field_at(text, context.line, context.column) if context is not None else "(file)"
        detail = " ".join(str(getattr(err, "problem", None) or err).split())
        if "maximum nesting depth" in detail:
            detail = f"nested deeper than {MAX_DEPTH} levels; a release config is a few levels deep"
        why = f"not valid YAML: {detail}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
        raise ConfigError(f"{path}: {where}: {why}", path=str(path), errors=[(where, why)]) from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of more digits than Python converts
        why = f"a value cannot be read: {str(err)[:200]}"
        raise ConfigError(f"{path}: {why}", path=str(path), errors=[("(file)", why)]) from None
