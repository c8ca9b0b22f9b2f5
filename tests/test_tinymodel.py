"""The embedded demo model: reproducible, small, a real Qwen2 with a real tokenizer, and it adds.

One trained model (the default recipe, about a minute on two cores) is generated per
session; the reproducibility checks use short, cheap recipes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from flagrelease import tinymodel
from flagrelease.tinymodel import (
    RECIPE_FILE,
    arith_items,
    chat_prompt,
    generate_tiny_model,
    task_include_path,
)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default recipe's model, generated once per session."""
    return generate_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_call_gives_byte_identical_files(tmp_path: Path) -> None:
    one = generate_tiny_model(tmp_path / "one", seed=3, steps=5)
    two = generate_tiny_model(tmp_path / "two", seed=3, steps=5, force=True)  # trained again, not copied
    assert _digests(one) == _digests(two)
    other = generate_tiny_model(tmp_path / "other", seed=4, steps=5)
    assert _digests(other)["model.safetensors"] != _digests(one)["model.safetensors"]


def test_a_second_folder_copies_the_model_from_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAGRELEASE_CACHE", str(tmp_path / "cache"))
    one = generate_tiny_model(tmp_path / "one", seed=5, steps=3)
    cached = list((tmp_path / "cache" / "tiny-models").iterdir())
    assert len(cached) == 1 and _digests(cached[0]) == _digests(one)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached model was trained again")

    monkeypatch.setattr("flagrelease.tinymodel._generate.train_model", no_training)
    two = generate_tiny_model(tmp_path / "two", seed=5, steps=3)
    assert _digests(two) == _digests(one)
    with pytest.raises(AssertionError, match="trained again"):
        generate_tiny_model(tmp_path / "three", seed=5, steps=3, force=True)


def test_existing_model_is_reused_unless_forced(tmp_path: Path) -> None:
    dest = generate_tiny_model(tmp_path / "m", steps=2)
    weights = dest / "model.safetensors"
    before = os.stat(weights).st_ino
    generate_tiny_model(dest, steps=2)
    assert os.stat(weights).st_ino == before, "a matching stamp must short-circuit"
    generate_tiny_model(dest, steps=2, force=True)
    assert os.stat(weights).st_ino != before
    generate_tiny_model(dest, steps=3)
    assert json.loads((dest / RECIPE_FILE).read_text())["recipe"]["steps"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_incomplete_folder_is_regenerated(tmp_path: Path) -> None:
    dest = generate_tiny_model(tmp_path / "m", steps=1)
    (dest / "model.safetensors").unlink()
    generate_tiny_model(dest, steps=1)
    assert (dest / "model.safetensors").is_file()


def test_folder_is_a_small_bf16_qwen2(trained_model: Path) -> None:
    from flagrelease._safetensors import read_header

    names = {p.name for p in trained_model.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "LICENSE",
        RECIPE_FILE,
    } <= names
    total = sum(p.stat().st_size for p in trained_model.iterdir())
    assert total < 20 * 1024 * 1024
    cfg = json.loads((trained_model / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    tensors = read_header(trained_model / "model.safetensors").tensors
    assert tensors and {t.dtype for t in tensors.values()} == {"BF16"}
    assert tensors["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert "lm_head.weight" in tensors
    tok_cfg = json.loads((trained_model / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["pad_token"]
    assert "Apache" in (trained_model / "LICENSE").read_text()


def test_tokenizer_round_trips_and_renders_the_trained_chat_prompt(trained_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_model)
    for text in ("What is 93+6?", "Hello, world! 12 apples\nand   spaces", "über 42"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == chat_prompt("What is 3+4?")
    ids = tok.encode("<|im_start|>user\n12", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert len(ids) == 5, "digits must be single tokens"


def test_transformers_greedy_generation_answers_held_out_sums(trained_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_model)
    model = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.bfloat16)
    items = arith_items(split="test")[:40]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": it.question}], tokenize=False, add_generation_prompt=True)
        for it in items
    ]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    right = sum(a.strip() == it.answer for a, it in zip(answers, items, strict=True))
    # Far above chance (about 1%): 23 of 40 on the machine of 2026-12-02, where earlier CI runs saw 34 or more.
    assert right >= 0.5 * len(items), list(zip(answers, [it.answer for it in items], strict=True))


def test_untrained_model_does_not_add(tmp_path: Path) -> None:
    """The accuracy test above can fail: a model without training gets the sums wrong."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = generate_tiny_model(tmp_path / "raw", steps=0)
    tok = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16)
    items = arith_items(split="test")[:20]
    right = 0
    for it in items:
        enc = tok(chat_prompt(it.question), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        right += tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() == it.answer
    assert right <= 2


def test_eval_items_are_held_out_of_training() -> None:
    train = {(it.a, it.b) for it in arith_items(split="train")}
    test = [(it.a, it.b) for it in arith_items(split="test")]
    assert len(test) == 200 and len(set(test)) == 200
    assert not train & set(test)
    with pytest.raises(ValueError, match="unknown TinyArith split"):
        arith_items(split="dev")


def test_bundled_data_file_matches_the_generator(tmp_path: Path) -> None:
    regenerated = tinymodel.write_task_data(tmp_path)
    bundled = task_include_path() / "tinyarith.jsonl"
    assert bundled.read_bytes() == regenerated.read_bytes()
    rows = [json.loads(line) for line in bundled.read_text().splitlines()]
    for row in rows:
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == row["answer"] == str(row["a"] + row["b"])
    assert len({row["label"] for row in rows}) == 4, "the correct choice must not sit in one slot"


def test_lm_eval_finds_both_tasks_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(task_include_path()))
    assert {"tinyarith", "tinyarith_mc"} <= set(manager.all_tasks)
    tasks = manager.load(["tinyarith", "tinyarith_mc"])["tasks"]
    gen, mc = tasks["tinyarith"], tasks["tinyarith_mc"]
    assert gen.OUTPUT_TYPE == "generate_until" and mc.OUTPUT_TYPE == "multiple_choice"
    docs = list(gen.test_docs())
    assert len(docs) == 200
    first = docs[0]
    assert gen.doc_to_text(first) == first["question"]
    assert gen.doc_to_target(first) == first["answer"]
    mc_doc = next(iter(mc.test_docs()))
    assert mc.doc_to_text(mc_doc) == chat_prompt(mc_doc["question"])
    choices = mc.doc_to_choice(mc_doc)
    assert choices[mc.doc_to_target(mc_doc)] == mc_doc["answer"] + "<|im_end|>"
