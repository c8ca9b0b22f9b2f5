"""Loaders for the bundled TinyArith lm-eval tasks (read by lm-eval's ``!function``).

The data file lives beside this module, so the tasks work from any current directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_tinyarith", "mc_choices"]

_END_OF_TURN = "<|im_end|>"

_DATA = Path(__file__).resolve().parent / "tinyarith.jsonl"


def load_tinyarith(**_: Any) -> Any:
    """Return the held-out TinyArith items as a ``datasets.DatasetDict`` with one ``test`` split."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(_DATA)})


def mc_choices(doc: dict[str, Any]) -> list[str]:
    """Return the four answer choices, each closed by the end-of-turn token."""
    return [f"{choice}{_END_OF_TURN}" for choice in doc["choices"]]
