"""Print the options of vLLM's OpenAI server as JSON: run by ``flagrelease runtime record-args``.

Runs inside the interpreter that serves (a runtime venv, a vendor image), which need not
have flagrelease installed; it imports only vLLM and the standard library.  The output is
one JSON line: ``{"vllm": VERSION, "options": {NAME: SPEC}}``, NAME without its dashes.
"""

from __future__ import annotations

import importlib
import json
from typing import Any


def _first(modules: list[str], attr: str) -> Any:
    for name in modules:
        try:
            return getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError):
            continue
    raise SystemExit(f"flagrelease: this vLLM has no {attr} in {', '.join(modules)}")


def _category(fn: Any, depth: int = 0) -> str | None:
    """What an option's ``type`` accepts: int, float, str, size (``25.6k``), size_or_auto, or any."""
    if fn is None:
        return None
    if fn in (int, float, str):
        return fn.__name__
    name = getattr(fn, "__name__", "")
    if name in ("human_readable_int", "human_readable_int_or_auto"):
        return "size_or_auto" if name.endswith("auto") else "size"
    if depth < 3 and name in ("_optional_type", "_parse_type"):
        for cell in getattr(fn, "__closure__", None) or ():
            inner = _category(cell.cell_contents, depth + 1) if callable(cell.cell_contents) else None
            if inner in ("int", "float", "str", "size", "size_or_auto"):
                return inner
    return "any"


def main() -> None:
    """Build vLLM's server parser and print its options."""
    parser_cls = _first(["vllm.utils.argparse_utils", "vllm.utils"], "FlexibleArgumentParser")
    make = _first(["vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"], "make_arg_parser")
    parser = make(parser_cls())
    options: dict[str, dict[str, Any]] = {}
    for action in parser._actions:
        longs = [f for f in action.option_strings if f.startswith("--")]
        if not longs or action.dest == "help":
            continue
        takes = action.nargs != 0
        nargs = action.nargs
        spec = {
            "dest": action.dest,
            "takes_value": takes,
            "multiple": nargs in ("+", "*")
            or (isinstance(nargs, int) and nargs > 1)
            or type(action).__name__ == "_AppendAction",
            "type": _category(action.type) if takes else None,
            "choices": sorted(str(c) for c in action.choices) if action.choices is not None and takes else None,
            "negatable": any(f.startswith("--no-") for f in longs) and not takes,
        }
        for flag in longs:
            if not (flag.startswith("--no-") and spec["negatable"]):
                options[flag[2:]] = spec
    import vllm

    print(json.dumps({"vllm": vllm.__version__, "options": dict(sorted(options.items()))}))


if __name__ == "__main__":
    main()
