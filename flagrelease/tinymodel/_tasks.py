"""TinyArith, the demo model's task: its items, its chat prompt and the bundled lm-eval tasks.

Questions such as ``What is 23+4?``, asked through the model's chat template and
answered with the sum.  Every pair ``a`` in 0-99 and ``b`` in 0-9 is one item; 200 are
held out for evaluation (:func:`arith_items`), written as ``tinyarith.jsonl`` beside the
lm-eval task definitions (:func:`write_task_data`, :func:`task_include_path`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from flagrelease._atomic import atomic_write_text

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "IM_END",
    "IM_START",
    "SPECIAL_TOKENS",
    "ArithItem",
    "arith_items",
    "chat_prompt",
    "task_include_path",
    "write_task_data",
]

_EVAL_ITEMS = 200
_SPLIT_SEED = 20240601

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS, IM_START, IM_END)
"""The tokenizer's special tokens: ChatML's turn markers and the BOS/pad token."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML without a default system prompt: what the model was trained on."""


@dataclass(frozen=True)
class ArithItem:
    """One TinyArith question.

    Attributes:
        a: the two-digit (or one-digit) first addend, 0-99.
        b: the one-digit second addend, 0-9.
    """

    a: int
    b: int

    @property
    def question(self) -> str:
        """The user's question."""
        return f"What is {self.a}+{self.b}?"

    @property
    def answer(self) -> str:
        """The expected answer text."""
        return str(self.a + self.b)

    def choices(self) -> tuple[list[str], int]:
        """Four answer choices (the sum and three near misses) and the correct index."""
        total = self.a + self.b
        rng = random.Random(self.a * 100 + self.b)
        near = [total + d for d in (1, -1, 10, -10, 2, -2, 11, 9)]
        wrong = [n for n in dict.fromkeys(near) if n >= 0 and n != total]
        rng.shuffle(wrong)
        options = [total, *wrong[:3]]
        rng.shuffle(options)
        return [str(o) for o in options], options.index(total)


def arith_items(*, split: str) -> list[ArithItem]:
    """Return the TinyArith items of one split.

    Every pair ``a`` in 0-99 and ``b`` in 0-9 is one item; a fixed seed holds 200 of
    them out for evaluation and the other 800 are the training set.

    Args:
        split: ``"test"`` (the 200 held-out items) or ``"train"``.

    Returns:
        The items, in a fixed order.

    Raises:
        ValueError: for an unknown split.
    """
    items = [ArithItem(a, b) for a in range(100) for b in range(10)]
    random.Random(_SPLIT_SEED).shuffle(items)
    if split == "test":
        return items[:_EVAL_ITEMS]
    if split == "train":
        return items[_EVAL_ITEMS:]
    raise ValueError(f"unknown TinyArith split {split!r}; use 'train' or 'test'")


def chat_prompt(question: str) -> str:
    """Render one user question through the chat template, with the generation prompt."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def task_include_path() -> Path:
    """Return the folder of the bundled lm-eval task definitions (for ``--include_path``)."""
    return Path(__file__).resolve().parent.parent / "data" / "lm_eval_tasks"


def write_task_data(folder: Path | None = None) -> Path:
    """(Re)write ``tinyarith.jsonl``, the held-out evaluation items, and return its path.

    Args:
        folder: where to write; the bundled task folder by default.

    Returns:
        The path of the JSON-lines file.
    """
    folder = Path(folder) if folder is not None else task_include_path()
    lines = []
    for item in arith_items(split="test"):
        choices, label = item.choices()
        row = {
            "a": item.a,
            "b": item.b,
            "question": item.question,
            "prompt": chat_prompt(item.question),
            "answer": item.answer,
            "choices": choices,
            "label": label,
        }
        lines.append(json.dumps(row, sort_keys=True))
    return atomic_write_text(folder / "tinyarith.jsonl", "\n".join(lines) + "\n")
