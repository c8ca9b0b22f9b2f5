"""Malformed files and listings, as a careless or hostile source hands them over: convert and fetch.

Every case is tried on every way in: ``convert_checkpoint`` (and for some the
``flagrelease convert`` command), the fetch of a local folder, and, for listings a hub
sends, the fetch from the ModelScope endpoint on loopback.  Each must end in a clear
:class:`~flagrelease.errors.ConvertError` or :class:`~flagrelease.errors.FetchError`
whose message names the file or tensor; any other exception is a traceback and counts as
a failure, as does a malformed input that is accepted.  The counts join the hostile
suite's report (``tried``, ``refused``, ``traceback``).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from flagrelease.config import ModelSection
from flagrelease.convert import convert_checkpoint
from flagrelease.errors import ConvertError, FetchError
from flagrelease.fetch import fetch_model
from tests.fixtures_hub import ModelScopeFake, tiny_weights

#: This module's counts (also added to the suite's totals).
COUNTS: Counter[str] = Counter()
CONFIG = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 32}


def _st(header: Any, data: bytes = b"\0" * 16, *, raw: bytes | None = None) -> bytes:
    """A safetensors file: 8-byte length, the header (JSON of ``header``, or ``raw``), ``data``."""
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _ok_entry(**kw: Any) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **kw}


#: Malformed safetensors files: name -> file bytes.
HEADERS: dict[str, bytes] = {
    "header is null": _st(None),
    "header is a list": _st([{"dtype": "F32"}]),
    "header is a string": _st("model"),
    "header is a number": _st(7),
    "dtype is a list (unhashable)": _st({"w": _ok_entry(dtype=["F32"])}),
    "dtype is an object": _st({"w": _ok_entry(dtype={"x": 1})}),
    "dtype is null": _st({"w": _ok_entry(dtype=None)}),
    "unknown dtype": _st({"w": _ok_entry(dtype="F128")}),
    "data_offsets null": _st({"w": _ok_entry(data_offsets=None)}),
    "data_offsets [null, null]": _st({"w": _ok_entry(data_offsets=[None, None])}),
    "data_offsets strings": _st({"w": _ok_entry(data_offsets=["0", "16"])}),
    "data_offsets of three": _st({"w": _ok_entry(data_offsets=[0, 8, 16])}),
    "data_offsets end before start": _st({"w": _ok_entry(data_offsets=[16, 0])}),
    "data_offsets negative": _st({"w": _ok_entry(data_offsets=[-16, 0])}, b""),
    "__metadata__ is a list": _st({"__metadata__": ["format", "pt"], "w": _ok_entry()}),
    "__metadata__ is a string": _st({"__metadata__": "pt", "w": _ok_entry()}),
    "__metadata__ holds a number": _st({"__metadata__": {"format": 1}, "w": _ok_entry()}),
    "entry is a number": _st({"w": 3}),
    "entry is null": _st({"w": None}),
    "shape is null": _st({"w": _ok_entry(shape=None)}),
    "shape holds strings": _st({"w": _ok_entry(shape=["2", "2"])}),
    "shape holds booleans": _st({"w": _ok_entry(shape=[True, True], data_offsets=[0, 4])}, b"\0" * 4),
    "shape holds floats": _st({"w": _ok_entry(shape=[2.0, 2.0])}),
    "negative shape": _st({"w": _ok_entry(shape=[-2, -2])}),
    "overflowing shape": _st({"w": _ok_entry(shape=[2**62, 2**62, 0], data_offsets=[0, 0])}, b""),
    "shape bigger than the data": _st({"w": _ok_entry(shape=[4, 4])}),
    "overlapping tensors": _st({"a": _ok_entry(), "b": _ok_entry(shape=[2], data_offsets=[8, 16])}),
    "header longer than the file": struct.pack("<Q", 10**6) + b"{}",
    "header not JSON": _st(None, raw=b"{not json"),
    "header not UTF-8": _st(None, raw=b'{"\xff\xfe": 1}'),
    "header nested 100000 deep": _st(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "truncated to 5 bytes": b"\x10\x00\x00\x00\x00",
}


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _attempt(what: str, expected: type[Exception], fn: Callable[[], object]) -> str:
    """Run one case: ``refused`` (a clear flagrelease error), ``traceback`` or ``accepted``."""
    COUNTS["tried"] += 1
    try:
        fn()
    except expected as err:
        message = str(err)
        assert "Traceback" not in message and len(message) < 4000, message
        COUNTS["refused"] += 1
        return "refused"
    except Exception as err:  # counting tracebacks is the point
        COUNTS["traceback"] += 1
        raise AssertionError(f"{what}: {type(err).__name__} escaped instead of a {expected.__name__}: {err}") from err
    COUNTS["accepted"] += 1
    raise AssertionError(f"{what}: the malformed input was accepted")


@pytest.fixture(scope="module", autouse=True)
def _report(totals: Counter[str]) -> Any:
    yield
    totals.update({"tried": COUNTS["tried"], "refused": COUNTS["refused"], "traceback": COUNTS["traceback"]})
    totals.update({f"malformed_{k}": v for k, v in COUNTS.items()})
    print(
        f"\nmalformed files and listings: {COUNTS['tried']} cases tried, {COUNTS['refused']} refused with a clear "
        f"ConvertError/FetchError, {COUNTS['traceback']} tracebacks, {COUNTS['accepted']} accepted"
    )


# -- safetensors headers: convert and fetch ------------------------------------------------------
@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_header_is_a_clear_error_in_convert_and_fetch(case: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": HEADERS[case]})
    _attempt(f"convert: {case}", ConvertError, lambda: convert_checkpoint(src, dst=tmp_path / "out", to="int8-w8a8"))
    assert not (tmp_path / "out").exists()
    model = ModelSection(source="local", repo_id="flagtest/malformed", path=src)
    _attempt(f"fetch: {case}", FetchError, lambda: fetch_model(model, dest=tmp_path / "fetched", workers=1))
    assert not (tmp_path / "fetched" / "model.safetensors").exists()


def test_convert_command_prints_the_error_not_a_traceback(tmp_path: Path) -> None:
    src = _folder(
        tmp_path / "src", {"config.json": b"{}", "model.safetensors": HEADERS["dtype is a list (unhashable)"]}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flagrelease.cli", "convert", str(src), str(tmp_path / "out"), "--to", "bf16"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    COUNTS["tried"] += 1
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.safetensors" in proc.stderr and "dtype" in proc.stderr
    COUNTS["refused"] += 1


# -- indexes and listings: convert and fetch ----------------------------------------------------------
def _indexed(weight_map: Any) -> dict[str, bytes]:
    files = tiny_weights(seed=21)
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


INDEXES: dict[str, dict[str, bytes]] = {
    "weight_map value is a number": _indexed({"lm_head.weight": 7}),
    "weight_map value is null": _indexed({"lm_head.weight": None}),
    "weight_map value is a list": _indexed({"lm_head.weight": ["model-00002-of-00002.safetensors"]}),
    "weight_map value is an object": _indexed({"lm_head.weight": {"file": "x"}}),
    "weight_map mixes strings and numbers": _indexed({"a": "model-00001-of-00002.safetensors", "b": 3}),
    "weight_map is a list": _indexed(["model-00001-of-00002.safetensors"]),
    "index is a list": {
        **tiny_weights(seed=22),
        "model.safetensors.index.json": b'["model-00001-of-00002.safetensors"]',
    },
}


@pytest.mark.parametrize("case", list(INDEXES))
def test_malformed_index_is_a_clear_error_in_convert_and_fetch(case: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", INDEXES[case])
    _attempt(f"convert: {case}", ConvertError, lambda: convert_checkpoint(src, dst=tmp_path / "out", to="int8-w8a8"))
    model = ModelSection(source="local", repo_id="flagtest/malformed", path=src)
    _attempt(f"fetch: {case}", FetchError, lambda: fetch_model(model, dest=tmp_path / "fetched", workers=1))


def _symlink_loop(src: Path) -> None:
    (src / "loop-a.json").symlink_to(src / "loop-b.json")
    (src / "loop-b.json").symlink_to(src / "loop-a.json")


def _link_outside(src: Path) -> None:
    secret = src.parent / "secret.txt"
    secret.write_text("not part of the model")
    (src / "notes.txt").symlink_to(secret)


def _folder_link_outside(src: Path) -> None:
    (src.parent / "elsewhere").mkdir()
    (src.parent / "elsewhere" / "x.json").write_text("{}")
    (src / "extra").symlink_to(src.parent / "elsewhere", target_is_directory=True)


LOCAL_TREES: dict[str, Callable[[Path], None]] = {
    "a symbolic link loop": _symlink_loop,
    "a link to a file outside SRC": _link_outside,
    "a link to a folder outside SRC": _folder_link_outside,
}


@pytest.mark.parametrize("case", list(LOCAL_TREES))
def test_local_tree_with_bad_links_is_refused_by_convert_and_fetch(case: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", tiny_weights(seed=23))
    LOCAL_TREES[case](src)
    _attempt(f"convert: {case}", ConvertError, lambda: convert_checkpoint(src, dst=tmp_path / "out", to="bf16"))
    assert not (tmp_path / "out").exists()
    model = ModelSection(source="local", repo_id="flagtest/links", path=src)
    _attempt(f"fetch: {case}", FetchError, lambda: fetch_model(model, dest=tmp_path / "fetched", workers=1))
    assert not any((tmp_path / "fetched").rglob("notes.txt"))


def test_convert_command_refuses_a_link_leaving_src(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", tiny_weights(seed=24))
    _link_outside(src)
    proc = subprocess.run(
        [sys.executable, "-m", "flagrelease.cli", "convert", str(src), str(tmp_path / "out"), "--to", "bf16"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    COUNTS["tried"] += 1
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "outside" in proc.stderr and "notes.txt" in proc.stderr
    assert not (tmp_path / "out").exists()
    COUNTS["refused"] += 1


#: Listings a hub sends: (name, how to change the ModelScope fake's listing entries).
def _entries(files: dict[str, bytes]) -> list[dict[str, Any]]:
    import hashlib

    return [
        {
            "Name": n.rsplit("/", 1)[-1],
            "Path": n,
            "Type": "blob",
            "Size": len(d),
            "Sha256": hashlib.sha256(d).hexdigest(),
        }
        for n, d in files.items()
    ]


LISTINGS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "both a and a/b": lambda e: [*e, {**e[0], "Path": "tokenizer"}],
    "a 300-character name": lambda e: [*e, {**e[0], "Path": "x" * 300 + ".json"}],
    "a name that is a number": lambda e: [*e, {**e[0], "Path": 12345}],
    "a name that is null": lambda e: [*e, {**e[0], "Path": None}],
    "a negative size": lambda e: [{**e[0], "Size": -5}, *e[1:]],
    "a size that is text": lambda e: [{**e[0], "Size": "big"}, *e[1:]],
    "a name climbing out": lambda e: [*e, {**e[0], "Path": "../../escape.json"}],
    "a file that is a link": lambda e: [*e, {**e[0], "Path": "link.json", "Type": "symlink"}],
    "entries that are not objects": lambda e: ["config.json", *e],
}


@pytest.mark.parametrize("case", list(LISTINGS))
def test_malformed_hub_listing_is_a_clear_fetch_error(
    case: str, ms_env: ModelScopeFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "flagtest/tiny-ms"
    files = tiny_weights(seed=3)
    listing = LISTINGS[case](_entries(files))

    def listed(h: Any, served: Any, revision: str) -> None:
        ms_env._json(h, 200, {"Code": 200, "Success": True, "Message": "success", "Data": {"Files": listing}})

    monkeypatch.setattr(ms_env, "_list", listed)
    model = ModelSection(source="modelscope", repo_id=repo, revision="v1.0")
    dest = tmp_path / "dest"
    _attempt(f"fetch listing: {case}", FetchError, lambda: fetch_model(model, dest=dest, workers=1))
    assert not (tmp_path / "escape.json").exists() and not (dest / "fetch_manifest.json").exists()


def test_malformed_header_from_a_hub_is_a_clear_fetch_error(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    files = {"config.json": b"{}", "model.safetensors": HEADERS["__metadata__ is a list"]}
    ms_env.add_repo("flagtest/malformed-ms", "v1.0", files)
    model = ModelSection(source="modelscope", repo_id="flagtest/malformed-ms", revision="v1.0")
    _attempt("fetch from a hub: __metadata__ is a list", FetchError, lambda: fetch_model(model, dest=tmp_path / "d"))


# -- numbers: NaN and Inf in weights and scales ----------------------------------------------------
def _bf16_checkpoint(src: Path, poison: str | None, value: float) -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 128, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 128, generator=gen).bfloat16(),
        "model.norm.weight": torch.ones(128).bfloat16(),
        "lm_head.weight": torch.randn(64, 128, generator=gen).bfloat16(),
    }
    if poison:
        tensors[poison].view(-1)[7] = value
    src.mkdir(parents=True)
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(CONFIG))


def _fp8_checkpoint(src: Path, scale_value: float) -> None:
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(256, 128, generator=gen) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 1, generator=gen) * 1e-2 + 1e-4
    scale[1, 0] = scale_value
    src.mkdir(parents=True)
    save_file(
        {"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.up_proj.weight_scale_inv": scale},
        src / "model.safetensors",
    )
    cfg = {**CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (src / "config.json").write_text(json.dumps(cfg))


UP = "model.layers.0.mlp.up_proj.weight"


def _poisoned(tensor: str, value: float) -> Callable[[Path], None]:
    return lambda src: _bf16_checkpoint(src, tensor, value)


def _bad_scale(value: float) -> Callable[[Path], None]:
    return lambda src: _fp8_checkpoint(src, value)


NUMBERS: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("NaN in a quantized BF16 weight", "int8-w8a8", _poisoned(UP, float("nan")), UP),
    ("Inf in a quantized BF16 weight", "int4-w4a16", _poisoned(UP, float("inf")), UP),
    ("NaN in a copied norm", "int8-w8a8", _poisoned("model.norm.weight", float("nan")), "model.norm.weight"),
    ("-Inf in an ignored lm_head", "bf16", _poisoned("lm_head.weight", float("-inf")), "lm_head.weight"),
    ("NaN in a weight_scale_inv (to BF16)", "bf16", _bad_scale(float("nan")), UP),
    ("Inf in a weight_scale_inv (to INT8)", "int8-w8a8", _bad_scale(float("inf")), UP),
]


@pytest.mark.parametrize(("case", "to", "make", "tensor"), NUMBERS, ids=[n[0] for n in NUMBERS])
def test_non_finite_values_are_an_error_naming_the_tensor_unless_allowed(
    case: str, to: str, make: Callable[[Path], None], tensor: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make(src)
    COUNTS["tried"] += 1
    with pytest.raises(ConvertError, match=rf"tensor '{tensor}' .*(NaN|infinite).*convert\.allow_non_finite"):
        convert_checkpoint(src, dst=tmp_path / "out", to=to, workers=1)
    COUNTS["refused"] += 1
    assert not (tmp_path / "out").exists()
    report = convert_checkpoint(src, dst=tmp_path / "allowed", to=to, workers=1, allow_non_finite=True)
    assert (tmp_path / "allowed" / "model.safetensors").is_file() and report.format


def test_finite_checkpoints_still_convert(tmp_path: Path) -> None:
    _bf16_checkpoint(tmp_path / "src", None, 0.0)
    report = convert_checkpoint(tmp_path / "src", dst=tmp_path / "out", to="int8-w8a8", workers=1)
    assert report.summary()["snr_db_min"] is not None and report.summary()["snr_db_min"] > 30
