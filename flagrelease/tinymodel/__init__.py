"""The embedded demo model: a tiny Qwen2 causal LM that flagrelease generates itself.

The model is trained in about a minute on CPU, reproducibly (fixed seeds, deterministic
torch kernels, a fixed thread count), on TinyArith: questions such as
``What is 23+4?`` asked through the model's chat template and answered with the sum.
A real byte-level BPE tokenizer is trained with the ``tokenizers`` library, so vLLM's
OpenAI server serves the folder for both ``/v1/completions`` and ``/v1/chat/completions``.

Two lm-eval tasks that run offline ship in :func:`task_include_path`:

- ``tinyarith``: generative, ``exact_match``, meant for ``local-chat-completions`` with
  ``--apply_chat_template`` (the server renders the chat template the model was trained on);
- ``tinyarith_mc``: four-way multiple choice, ``acc``, meant for ``local-completions``
  (loglikelihood of each choice after the already chat-formatted prompt, so both tasks
  probe the very same skill).

The 200 evaluation questions are held out of training: the model has to add, not recall.

Modules: :mod:`~flagrelease.tinymodel._tasks` (TinyArith's items and the lm-eval task
data), :mod:`~flagrelease.tinymodel._train` (the tokenizer and the model's training) and
:mod:`~flagrelease.tinymodel._generate` (the model folder, stamped and reused).
"""

from __future__ import annotations

from flagrelease.tinymodel._generate import RECIPE_FILE, generate_tiny_model
from flagrelease.tinymodel._tasks import (
    CHAT_TEMPLATE,
    ArithItem,
    arith_items,
    chat_prompt,
    task_include_path,
    write_task_data,
)

__all__ = [
    "CHAT_TEMPLATE",
    "RECIPE_FILE",
    "ArithItem",
    "arith_items",
    "chat_prompt",
    "generate_tiny_model",
    "task_include_path",
    "write_task_data",
]
