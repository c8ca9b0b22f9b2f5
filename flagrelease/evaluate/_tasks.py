"""lm-eval task names: check them before anything is served."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from flagrelease.errors import EvalError

__all__ = ["check_tasks", "include_paths"]


def include_paths(include_path: Path | None) -> list[str]:
    """Task folders lm-eval scans: flagrelease's bundled tasks, then the release's own."""
    from flagrelease.tinymodel import task_include_path

    paths = [str(task_include_path())]
    if include_path is not None:
        paths.append(str(include_path))
    return paths


@lru_cache(maxsize=8)
def _known_tasks(paths: tuple[str, ...]) -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=list(paths)).all_tasks)


def check_tasks(names: Sequence[str], *, include_path: Path | None = None) -> None:
    """Check that lm-eval knows every task name, before anything is served.

    Args:
        names: lm-eval task or group names.
        include_path: a folder of extra task definitions (flagrelease's bundled tasks,
            ``tinyarith`` and ``tinyarith_mc``, are always available).

    Raises:
        EvalError: a name is unknown; the message lists the closest known names.
    """
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"eval.include_path {include_path} is not a folder of lm-eval task definitions")
    known = _known_tasks(tuple(include_paths(include_path)))
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}" if close else "no similar task name"
        lines.append(f"  {name!r}: {hint}")
    where = f" or in {include_path}" if include_path else " (set eval.include_path for local task definitions)"
    raise EvalError(
        f"unknown lm-eval task name(s) in eval.tasks; they are not in lm-eval's registry{where}:\n"
        + "\n".join(lines)
        + "\nList the names with `python -m lm_eval ls tasks`."
    )
