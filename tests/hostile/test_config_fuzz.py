"""Broken and hostile config files: every one is a ConfigError naming the file and the field, fast.

Issue 12, item 1: duplicate keys, alias bombs, deep nesting, invalid UTF-8, oversized
files and values, non-finite or unbounded numbers, and what YAML tags can smuggle in.
``validate`` of a folder reports every file and goes on past a broken one.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from flagrelease.cli import main
from flagrelease.config import load_release
from flagrelease.config._base import MAX_FLOAT, MAX_INT
from flagrelease.errors import ConfigError
from tests.hostile._harness import BASE, NUMBER_FIELDS, set_path

# A valid config of two keys; the files below add what they attack after it.
_GOOD = yaml.safe_dump({"model": BASE["model"], "chip": "cpu"}, sort_keys=False)


def _alias_bomb(levels: int) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _in_reference_args(text: str) -> str:
    """``text`` (a YAML mapping) nested inside eval.reference.engine_args of a valid config."""
    body = "\n".join("      " + line for line in text.splitlines())
    return _GOOD + f"eval:\n  reference:\n    engine_args:\n{body}\n"


#: name -> (file bytes, the field the error must name, or None when the file is valid).
FILES: dict[str, tuple[bytes, str | None]] = {
    "alias-bomb-9": (_alias_bomb(9).encode(), None),
    "alias-bomb-in-engine-args": (_in_reference_args(_alias_bomb(9)).encode(), "eval.reference.engine_args"),
    "alias-bomb-30": (_alias_bomb(30).encode(), None),
    "invalid-utf8-value": (_GOOD.encode() + b"description: 'caf\xe9'\n", "description"),
    "invalid-utf8-key": (b"\xff\xfe: 1\n" + _GOOD.encode(), None),
    "invalid-utf8-truncated": (_GOOD.encode() + "description: 'é'\n".encode()[:-3] + b"\n", "description"),
    "utf16": (_GOOD.encode("utf-16"), None),
    "deep-flow-list": (b"model: " + b"[" * 20000 + b"]" * 20000 + b"\n", "model"),
    "deep-flow-map": (b"serve: " + b"{a: " * 20000 + b"1" + b"}" * 20000 + b"\n", "serve"),
    "deep-block": (
        ("model:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200))).encode(),
        "model.k0.k1",
    ),
    "duplicate-top-key": (_GOOD.encode() + b"chip: nvidia-h100\n", "chip"),
    "duplicate-nested-key": (b"model:\n  source: hf\n  source: local\n", "model.source"),
    "duplicate-in-flow": (_GOOD.encode() + b"gates: {alpha: 0.05, alpha: 0.1}\n", "gates.alpha"),
    "duplicate-in-list-item": (
        _GOOD.encode() + b"tags:\n  - a\nconvert:\n  mode: none\n  mode: int8-w8a8\n",
        "convert.mode",
    ),
    "too-large": (_GOOD.encode() + b"# " + b"x" * (2 << 20) + b"\n", "(file)"),
    "huge-integer": (_GOOD.encode() + b"eval:\n  concurrency: " + b"9" * 5000 + b"\n", None),
    "python-tag": (_GOOD.encode() + b"description: !!python/object/apply:os.system ['true']\n", "description"),
    "binary-tag": (_GOOD.encode() + b"description: !!binary aGVsbG8K\n", "description"),
    "set-tag": (_GOOD.encode() + b"tags: !!set {a, b}\n", None),
    "timestamp": (_GOOD.encode() + b"description: 2024-01-01\n", "description"),
    "unhashable-key": (_GOOD.encode() + b"? [a, b]\n: 1\n", None),
    "two-documents": (_GOOD.encode() + b"---\nchip: cpu\n", None),
    "empty": (b"", "(top level)"),
    "only-comment": (b"# nothing here\n", "(top level)"),
    "top-level-list": (b"- a\n- b\n", "(top level)"),
    "top-level-scalar": (b"hello\n", "(top level)"),
    "nul-byte": (_GOOD.encode() + b"description: a\x00b\n", None),
    "tab-indent": (b"model:\n\tsource: hf\n", None),
    "unterminated-quote": (_GOOD.encode() + b"description: 'abc\n", None),
    "bom": (b"\xef\xbb\xbf" + _GOOD.encode(), None),
    "crlf": (_GOOD.replace("\n", "\r\n").encode(), None),
    "merge-key": (
        b"x-base: &b {source: hf, repo_id: org/tiny, revision: " + b"a" * 40 + b"}\nmodel:\n  <<: *b\nchip: cpu\n",
        "x-base",
    ),
    "anchor-and-alias": (
        _GOOD.encode() + b"eval:\n  reference: {chip: cpu}\n  tasks:\n    - &t {name: a, label: A}\n    - *t\n",
        None,
    ),
    "inf-margin": (_GOOD.encode() + b"gates: {accuracy_margin: .inf}\n", "gates.accuracy_margin"),
    "nan-ratio": (_GOOD.encode() + b"gates: {throughput_min_ratio: .nan}\n", "gates.throughput_min_ratio"),
    "float-overflow": (_GOOD.encode() + b"gates: {accuracy_margin: 1.0e+999}\n", "gates.accuracy_margin"),
    "long-key": (_GOOD.encode() + b"x" * 10000 + b": 1\n", None),
    "long-value": (_GOOD.encode() + b"description: '" + b"y" * 100000 + b"'\n", "description"),
    "many-keys": (_GOOD.encode() + b"serve:\n  envs:\n" + b"".join(b"    K%d: v\n" % i for i in range(5000)), None),
}
# Files whose field is None are refused too, but where the field is (file) or hard to name.
_VALID = {"bom", "crlf", "anchor-and-alias", "set-tag"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("configs")
    for name, (raw, _) in FILES.items():
        (out / f"{name}.yaml").write_bytes(raw)
    return out


@pytest.mark.parametrize("name", list(FILES))
def test_every_broken_file_is_a_clear_error(folder: Path, name: str, totals: Counter[str]) -> None:
    path = folder / f"{name}.yaml"
    field = FILES[name][1]
    totals["tried"] += 1
    start = time.perf_counter()
    try:
        load_release(path)
    except ConfigError as err:
        elapsed = time.perf_counter() - start
        assert name not in _VALID, f"{name} is a valid config, refused: {err}"
        assert str(path) in str(err), "the message names the file"
        assert err.errors, "each problem names its field"
        if field is not None:
            assert any(f == field or f.startswith(field) for f, _ in err.errors), (field, err.errors)
        assert elapsed < 2.0, f"{name} took {elapsed:.1f}s to refuse"
        totals["refused"] += 1
        return
    except Exception:
        totals["traceback"] += 1
        raise
    assert name in _VALID, f"{name} was accepted"
    totals["escaped"] += 1


def test_alias_bomb_is_refused_fast_in_bounded_memory(folder: Path) -> None:
    """The 3 KB bomb inside engine args: refused in a fresh process in well under a second, small RSS."""
    path = folder / "alias-bomb-in-engine-args.yaml"
    code = (
        "import re, sys, time\n"
        "from flagrelease.config import load_release\n"
        "from flagrelease.errors import ConfigError\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    load_release({str(path)!r})\n"
        "except ConfigError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('accepted')\n"
        # VmHWM: this process's peak RSS since exec (ru_maxrss would count the forking parent's).
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print(time.perf_counter() - t, hwm)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    seconds, rss_kb = proc.stdout.split()
    assert float(seconds) < 1.0
    assert int(rss_kb) < 400 * 1024, f"peak RSS {int(rss_kb) // 1024} MB"
    assert len(path.read_bytes()) < 3500


def test_validate_reports_every_file_and_goes_on(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = folder / "zz-good.yaml"
    good.write_text(_GOOD, encoding="utf-8")
    try:
        assert main(["validate", str(folder)]) == 1
    finally:
        good.unlink()
    out = capsys.readouterr().out
    for name in FILES:
        assert str(folder / f"{name}.yaml") in out, f"validate stopped before {name}"
    assert f"ok    {good}" in out
    assert f"{len(_VALID) + 1} valid, {len(FILES) - len(_VALID)} invalid" in out
    assert "Traceback" not in out


_BAD_NUMBERS: list[Any] = [
    True,
    False,
    "8",
    "1e12",
    1e12,
    10**30,
    2**64,
    -1,
    1.5,
    math.inf,
    -math.inf,
    math.nan,
    [],
    {},
]


@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_numbers_are_finite_and_bounded(field: str, tmp_path: Path, totals: Counter[str]) -> None:
    for value in _BAD_NUMBERS:
        data = copy.deepcopy(BASE)
        data.setdefault("gates", {})
        data["eval"].setdefault("generation", {})
        data["serve"]["load_test"]["concurrency"] = [1]
        if field == "serve.nodes[0].slots":
            data["serve"]["nodes"] = [{"host": "127.0.0.1", "slots": 1}]
        set_path(data, field, value)
        path = tmp_path / "numbers.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        totals["tried"] += 1
        try:
            cfg = load_release(path)
        except ConfigError as err:
            assert any(f.startswith(field.split("[")[0]) or f == "(top level)" for f, _ in err.errors), err.errors
            totals["refused"] += 1
            continue
        except Exception:
            totals["traceback"] += 1
            raise
        totals["escaped"] += 1
        got = cfg.model_dump(mode="python")
        for part in field.replace("[", ".").replace("]", "").split("."):
            got = got[int(part)] if part.isdigit() else got[part]
        assert not isinstance(value, bool | str | list | dict), f"{field} = {value!r} was accepted"
        assert isinstance(got, int | float) and not isinstance(got, bool), (field, value, got)
        assert math.isfinite(got) and abs(got) <= max(MAX_INT, MAX_FLOAT), (field, value, got)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"serve.engine_args.max_model_len": 1e12}, "serve.engine_args.max_model_len"),
        ({"serve.engine_args.max_model_len": 10**12}, "serve.engine_args.max_model_len"),
        ({"eval.samples_per_item": 1e30}, "eval.samples_per_item"),
        ({"serve.engine_args.max_num_seqs": True}, "serve.engine_args.max_num_seqs"),
        ({"gates.accuracy_margin": math.inf}, "gates.accuracy_margin"),
        ({"gates.throughput_min_ratio": math.inf}, "gates.throughput_min_ratio"),
        ({"serve.engine_args.dtype": "float3"}, "serve.engine_args.dtype"),
        ({"schedule": "61 25 * * 9"}, "schedule"),
        ({"schedule": "H * * * *"}, "schedule"),
        ({"convert.ignore": ["re:("]}, "convert.ignore"),
        ({"serve.engine_args.max_model_length": 512}, "serve.engine_args.max_model_length"),
    ],
)
def test_the_issues_cases_are_refused(changes: dict[str, Any], field: str, tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["gates"] = {}
    for dotted, value in changes.items():
        set_path(data, dotted, value)
    path = tmp_path / "issue.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_release(path)
    assert field in [f for f, _ in info.value.errors], info.value.errors
    json.dumps(info.value.errors)  # plain data, printable anywhere
