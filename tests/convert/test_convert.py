"""Tests of flagrelease.convert: the arithmetic, the streaming converter, the stage, vLLM loading.

The synthetic checkpoints are DeepSeek-style block FP8: several shards, a scale stored in
another shard than its weight, edge blocks (130 x 200), BF16 router gates, norms and
embeddings, an F32 bias and an I64 buffer that must pass through unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flagrelease._safetensors import read_header
from flagrelease.cli import main as cli_main
from flagrelease.config import ConvertMode, ReleaseConfig
from flagrelease.convert import (
    ConvertReport,
    convert_checkpoint,
    dequant_fp8_block,
    dequantize_int,
    get_format,
    ignore_matches,
    list_formats,
    pack_int32,
    plan_conversion,
    quantize_int,
    quantize_int4_group,
    quantize_int8_per_channel,
    run_stage,
    unpack_int32,
    work_dir_for,
)
from flagrelease.convert.ops import Workspace, dequant_fp8_block_with_error, fp8_e4m3_to_float
from flagrelease.errors import ConvertError
from flagrelease.layout import BundleLayout
from flagrelease.pipeline import ReleaseContext, StageResult
from tests.fixtures_prefect import free_port

S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
FP8_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}


# -- helpers ------------------------------------------------------------------------------------
def _fp8(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(rows, cols, generator=gen) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(math.ceil(rows / 128), math.ceil(cols / 128), generator=gen) * 1e-2 + 1e-4
    return w, scale


def _reference_dequant(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The obvious computation: expand the scale to every element, multiply, round once."""
    rows, cols = w.shape
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


def _write_index(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    total = sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def make_fp8_checkpoint(folder: Path, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A three-shard DeepSeek-style FP8 checkpoint; returns every tensor by name."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    q_w, q_s = _fp8(256, 384, gen)
    d_w, d_s = _fp8(130, 200, gen)  # edge blocks in both dimensions
    u_w, u_s = _fp8(384, 256, gen)
    shards = {
        S1: {
            "model.embed_tokens.weight": torch.randn(96, 256, generator=gen).bfloat16(),
            "model.layers.0.self_attn.q_proj.weight": q_w,
            "model.layers.0.mlp.down_proj.weight": d_w,
            "model.layers.0.mlp.down_proj.weight_scale_inv": d_s,
        },
        S2: {
            "model.layers.0.self_attn.q_proj.weight_scale_inv": q_s,  # scale in another shard
            "model.layers.0.input_layernorm.weight": torch.ones(256).bfloat16(),
            "model.layers.0.mlp.gate.weight": torch.randn(8, 256, generator=gen).bfloat16(),  # MoE router
            "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=gen),
            "model.layers.0.mlp.gate_proj.weight": (torch.randn(256, 256, generator=gen) * 0.05).bfloat16(),
        },
        S3: {
            "model.layers.1.mlp.up_proj.weight": u_w,
            "model.layers.1.mlp.up_proj.weight_scale_inv": u_s,
            "model.layers.1.self_attn.rotary_emb.inv_freq_steps": torch.arange(4, dtype=torch.int64),
            "model.norm.weight": torch.ones(256).bfloat16(),
            "lm_head.weight": torch.randn(96, 256, generator=gen).bfloat16(),
        },
    }
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    _write_index(folder, shards)
    (folder / "config.json").write_text(json.dumps(FP8_CONFIG))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "generation_config.json").write_text('{"do_sample": false}')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept")
    (folder / "original.bin").write_bytes(b"old weights")  # another weight format: not carried over
    return {k: v for ts in shards.values() for k, v in ts.items()}


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        read_header(f)  # every output shard is a well-formed safetensors file
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("fp8") / "src"
    return folder, make_fp8_checkpoint(folder)


# -- the arithmetic -------------------------------------------------------------------------------
def test_fp8_bit_trick_is_exact_for_every_finite_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    got = fp8_e4m3_to_float(finite.view(torch.float8_e4m3fn))
    want = finite.view(torch.float8_e4m3fn).float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # subnormals and -0 included


@pytest.mark.parametrize("shape", [(130, 200), (256, 256), (1, 1), (127, 129), (384, 130)])
def test_dequant_matches_reference_bit_for_bit(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w, s = _fp8(*shape, gen)
    got = dequant_fp8_block(w, s)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), _reference_dequant(w, s).view(torch.int16))
    # With a reused workspace and an output buffer too, and with scales too big to fold.
    ws, out = Workspace(), torch.empty(shape, dtype=torch.bfloat16)
    big = s * 1000
    got2, st = dequant_fp8_block_with_error(w, big, out=out, work=ws)
    assert torch.equal(got2, _reference_dequant(w, big))
    assert st is not None and st.count == w.numel() and 0 < st.rel_error < 2**-8


def test_dequant_rejects_nan_and_bad_scales() -> None:
    gen = torch.Generator().manual_seed(1)
    w, s = _fp8(130, 200, gen)
    bad = w.clone().view(torch.uint8)
    bad[5, 7] = 0xFF
    with pytest.raises(ValueError, match="NaN"):
        dequant_fp8_block(bad.view(torch.float8_e4m3fn), s)
    with pytest.raises(ValueError, match=r"expected \[2, 2\]"):
        dequant_fp8_block(w, torch.ones(1, 2))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequant_fp8_block(w.float(), s)


def test_int8_per_channel_round_trip_error_is_half_a_step() -> None:
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 300, generator=gen) * 0.1).bfloat16()
    w[3] = 0  # an all-zero row quantizes to zeros
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 1) and scale.dtype == torch.bfloat16
    exact = w.float().abs().amax(dim=1, keepdim=True) / 127.5
    assert bool((scale.float() >= exact).all())  # rounded up to bf16: never saturates
    assert bool((scale.float() - exact <= scale.float() * 2**-7).all())  # by less than one bf16 step
    assert torch.equal(q[3], torch.zeros(300, dtype=torch.int8))
    back = dequantize_int(q, scale, dtype=torch.float32)
    step = scale.float().clamp_min(1e-30)
    assert bool(((w.float() - back).abs() <= step / 2 + 1e-6).all())
    _, _, st = quantize_int(w, num_bits=8, stats=True)
    assert st is not None and 35 < st.snr_db < 60  # type: ignore[operator]


def test_int4_group_round_trip_and_packing() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen).bfloat16()
    packed, scale = quantize_int4_group(w, 128)
    assert packed.dtype == torch.int32 and packed.shape == (48, 32) and scale.shape == (48, 2)
    q = unpack_int32(packed, num_bits=4, cols=256)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    back = dequantize_int(q, scale, dtype=torch.float32)
    step = scale.float().repeat_interleave(128, 1)
    assert bool(((w.float() - back).abs() <= step / 2 + 1e-6).all())
    # The packing layout, by hand: 8 values per int32, value i in bits 4i..4i+3, offset by 8.
    row = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -8, -1, 7]], dtype=torch.int8)
    words = pack_int32(row, num_bits=4)
    assert words.shape == (1, 2)
    assert int(words[0, 0]) == struct.unpack("<i", struct.pack("<I", 0xFEDCBA98))[0]
    assert int(words[0, 1]) == 0 | (7 << 4) | (15 << 8)  # -8 -> 0, -1 -> 7, 7 -> 15, zero padding
    assert torch.equal(unpack_int32(words, num_bits=4, cols=11), row)
    # 8-bit packing (W8A16): 4 per int32.
    q8 = torch.tensor([[-128, 127, 0, -1, 5]], dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_int32(q8, num_bits=8), num_bits=8, cols=5), q8)


def test_ignore_patterns() -> None:
    default = ["lm_head", "embed_tokens", "norm", "mlp.gate"]
    assert ignore_matches("model.layers.3.mlp.gate", default)
    assert not ignore_matches("model.layers.3.mlp.gate_proj", default)
    assert ignore_matches("model.layers.0.input_layernorm", default)
    assert ignore_matches("lm_head", default) and ignore_matches("model.embed_tokens", default)
    assert not ignore_matches("model.layers.0.self_attn.q_proj", default)
    assert ignore_matches("model.layers.0.self_attn.q_proj", [r"re:layers\.0\..*q_proj"])


def test_format_registry_lists_valid_names() -> None:
    assert {"bf16", "int8-w8a8", "int8-w8a16", "int4-w4a16", "none"} <= set(list_formats())
    assert get_format(ConvertMode.FP8_BLOCK_TO_BF16).name == "bf16"
    with pytest.raises(ConvertError, match=r"unknown convert format 'int3'.*valid formats: bf16, int4-w4a16"):
        get_format("int3")


# -- the streaming converter --------------------------------------------------------------------------
def test_fp8_to_bf16_checkpoint(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, tensors = fp8_src
    dst = tmp_path / "bf16"
    fractions: list[float] = []
    report = convert_checkpoint(src, dst=dst, to="bf16", workers=2, progress=lambda f, m: fractions.append(f))
    out = _load_dir(dst)
    assert not any(n.endswith("_scale_inv") for n in out)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ):
        want = _reference_dequant(tensors[name], tensors[name + "_scale_inv"])
        assert torch.equal(out[name].view(torch.int16), want.view(torch.int16)), name
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.mlp.gate.weight",
        "lm_head.weight",
        "model.layers.0.mlp.gate.e_score_correction_bias",
        "model.layers.1.self_attn.rotary_emb.inv_freq_steps",
    ):
        assert out[name].dtype == tensors[name].dtype and torch.equal(out[name], tensors[name]), name
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    for name, file in index["weight_map"].items():
        assert name in read_header(dst / file).tensors
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert (dst / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (dst / "extra" / "notes.txt").read_text() == "kept"
    assert not (dst / "original.bin").exists()
    assert not work_dir_for(dst).exists()
    assert report.format == "bf16" and len(report.tensors) == 3 and report.copied == 8
    assert all(0 < t.rel_error < 2**-8 for t in report.tensors)
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert json.loads(json.dumps(report.to_json()))["summary"]["tensors_converted"] == 3
    assert "3 tensors converted" in report.to_text()


def test_int8_w8a8_checkpoint(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, tensors = fp8_src
    dst = tmp_path / "w8a8"
    report = convert_checkpoint(src, dst=dst, to="int8-w8a8", workers=2)
    out = _load_dir(dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")} == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "channel",
        "group_size": None,
        "dynamic": False,
    }
    acts = group["input_activations"]
    assert (acts["num_bits"], acts["dynamic"], acts["strategy"], acts["symmetric"]) == (8, True, "token", True)
    assert {"lm_head", "model.layers.0.mlp.gate", "model.embed_tokens"} <= set(qc["ignore"])
    assert "model.layers.0.mlp.gate_proj" not in qc["ignore"]
    # Quantized linears: the FP8 ones go through the BF16 dequantization first.
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"):
        q, scale = out[name + ".weight"], out[name + ".weight_scale"]
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1) and scale.dtype == torch.bfloat16
        dense = tensors[name + ".weight"]
        if dense.dtype == torch.float8_e4m3fn:
            dense = _reference_dequant(dense, tensors[name + ".weight_scale_inv"])
        want_q, want_s = quantize_int8_per_channel(dense)
        assert torch.equal(q, want_q) and torch.equal(scale, want_s), name
    # Kept dense: the router gate, embeddings, head, norms.
    assert out["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert torch.equal(out["lm_head.weight"], tensors["lm_head.weight"])
    assert "model.layers.0.mlp.gate.weight_scale" not in out
    assert len(report.tensors) == 4 and all(t.snr_db is not None and t.snr_db > 35 for t in report.tensors)


@pytest.mark.parametrize("fmt", ["int8-w8a16", "int4-w4a16"])
def test_packed_checkpoints(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, fmt: str) -> None:
    src, tensors = fp8_src
    dst = tmp_path / fmt
    report = convert_checkpoint(src, dst=dst, to=fmt, workers=1)
    out = _load_dir(dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["input_activations"] is None
    weights = qc["config_groups"]["group_0"]["weights"]
    bits = 8 if fmt == "int8-w8a16" else 4
    assert weights["num_bits"] == bits
    assert (weights["strategy"], weights["group_size"]) == (("channel", None) if bits == 8 else ("group", 128))
    name = "model.layers.0.self_attn.q_proj"
    assert name + ".weight" not in out
    packed, scale, shape = out[name + ".weight_packed"], out[name + ".weight_scale"], out[name + ".weight_shape"]
    assert packed.dtype == torch.int32 and packed.shape == (256, 384 * bits // 32)
    assert shape.dtype == torch.int64 and shape.tolist() == [256, 384]
    assert scale.shape == ((256, 1) if bits == 8 else (256, 3))
    dense = _reference_dequant(tensors[name + ".weight"], tensors[name + ".weight_scale_inv"])
    q = unpack_int32(packed, num_bits=bits, cols=384)
    want_q, want_s, _ = quantize_int(dense, num_bits=bits, group_size=None if bits == 8 else 128)
    assert torch.equal(q, want_q) and torch.equal(scale, want_s)
    down = "model.layers.0.mlp.down_proj"
    if bits == 4:  # 200 input columns are not a multiple of 128: kept dense, and said so
        assert out[down + ".weight"].dtype == torch.bfloat16 and down in qc["ignore"]
        assert any("not a multiple of group size 128" in n for n in report.notes)
    else:
        assert out[down + ".weight_packed"].shape == (130, 50)


def test_page_cache_path_writes_the_same_bytes(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """Without O_DIRECT (tmpfs, some network file systems) the output is byte-identical."""
    src, _ = fp8_src
    a = tmp_path / "direct"
    b = tmp_path / "buffered"
    convert_checkpoint(src, dst=a, to="int4-w4a16", workers=2)
    convert_checkpoint(src, dst=b, to="int4-w4a16", workers=2, direct_io=False)
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == [S1, S2, S3]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_convert_refuses_to_clobber_and_replaces_its_own_output(
    fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    src, _ = fp8_src
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not an earlier flagrelease conversion"):
        convert_checkpoint(src, dst=dst, to="bf16")
    assert (dst / "precious.txt").exists()
    convert_checkpoint(src, dst=dst, to="bf16", overwrite=True)
    assert not (dst / "precious.txt").exists()
    convert_checkpoint(src, dst=dst, to="int8-w8a8")  # replaces its own earlier output
    assert json.loads((dst / "model.safetensors.index.json").read_text())["metadata"]["convert_format"] == "int8-w8a8"
    with pytest.raises(ConvertError, match="overlaps the source"):
        convert_checkpoint(src, dst=src / "inside", to="bf16")


# -- bad input -------------------------------------------------------------------------------------
def _broken(tmp_path: Path, fp8_src: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(fp8_src, folder)
    return folder


def _rewrite_shard(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _assert_clean_failure(src: Path, dst: Path, match: str) -> None:
    with pytest.raises(ConvertError, match=match):
        convert_checkpoint(src, dst=dst, to="int8-w8a8")
    assert not dst.exists()
    assert not work_dir_for(dst).exists()  # checked before anything is written


def test_missing_scale(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src = _broken(tmp_path, fp8_src[0])
    _rewrite_shard(src / S2, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_clean_failure(src, tmp_path / "dst", r"FP8 tensor 'model.layers.0.self_attn.q_proj.weight'.*has no scale")


def test_mismatched_scale_shape(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src = _broken(tmp_path, fp8_src[0])
    _rewrite_shard(src / S1, lambda t: t.update({"model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(2, 1)}))
    _assert_clean_failure(src, tmp_path / "dst", r"has shape \[2, 1\] but weight .* needs \[2, 2\]")


def test_unknown_dtype(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    header = json.dumps({"w.weight": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}).encode()
    header += b" " * (-len(header) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00")
    (src / "config.json").write_text("{}")
    _assert_clean_failure(src, tmp_path / "dst", "unknown dtype 'Q7'")


def test_index_naming_missing_shards(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src = _broken(tmp_path, fp8_src[0])
    (src / S3).unlink()
    _assert_clean_failure(src, tmp_path / "dst", rf"names 1 shard\(s\) missing from .*{S3}.*re-fetch")


def test_truncated_shard_and_index_disagreement(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src = _broken(tmp_path, fp8_src[0])
    data = (src / S3).read_bytes()
    (src / S3).write_bytes(data[:-10])
    _assert_clean_failure(src, tmp_path / "dst", f"{S3}: cannot read the safetensors header.*truncated")
    (src / S3).write_bytes(data)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = S1
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_clean_failure(src, tmp_path / "dst", f"puts 'lm_head.weight' in {S1} but it is in {S3}")


def test_nan_in_weights_leaves_no_output(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src = _broken(tmp_path, fp8_src[0])

    def poison(t: dict[str, torch.Tensor]) -> None:
        w = t["model.layers.1.mlp.up_proj.weight"].view(torch.uint8).clone()
        w[10, 10] = 0x7F
        t["model.layers.1.mlp.up_proj.weight"] = w.view(torch.float8_e4m3fn)

    _rewrite_shard(src / S3, poison)
    dst = tmp_path / "dst"
    with pytest.raises(ConvertError, match=r"'model.layers.1.mlp.up_proj.weight' .*NaN"):
        convert_checkpoint(src, dst=dst, to="bf16", workers=1)
    assert not dst.exists()
    assert not list((work_dir_for(dst) / "out").glob(".*incomplete"))  # no half-written shard kept


# -- resume ------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_interrupted_conversion_resumes(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, _ = fp8_src
    reference = tmp_path / "reference"
    convert_checkpoint(src, dst=reference, to="int4-w4a16", workers=1)

    dst = tmp_path / "resumed"
    records = work_dir_for(dst) / "records"

    def stop_after_first_shard(fraction: float, message: str) -> None:
        if records.is_dir() and any(records.iterdir()):
            raise _Stop(message)

    with pytest.raises(_Stop):
        convert_checkpoint(src, dst=dst, to="int4-w4a16", workers=1, progress=stop_after_first_shard)
    assert not dst.exists()
    finished = sorted(p.name.removesuffix(".json") for p in records.iterdir())
    assert finished and len(finished) < 3

    report = convert_checkpoint(src, dst=dst, to="int4-w4a16", workers=1)
    assert report.resumed_shards == finished
    for f in reference.iterdir():
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (dst / f.name).read_bytes(), f.name
    assert [t.to_json() for t in report.tensors] == [
        t.to_json() for t in convert_checkpoint(src, dst=tmp_path / "again", to="int4-w4a16").tensors
    ]
    assert not work_dir_for(dst).exists()


def test_resume_redoes_a_damaged_shard_and_a_changed_plan(
    fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    src, _ = fp8_src
    dst = tmp_path / "out"
    work = work_dir_for(dst)
    records = work / "records"

    def stop_when_done(fraction: float, message: str) -> None:
        if records.is_dir() and len(list(records.iterdir())) == 3:
            raise _Stop(message)

    with pytest.raises(_Stop):
        convert_checkpoint(src, dst=dst, to="bf16", workers=1, progress=stop_when_done)
    with open(work / "out" / S1, "r+b") as fh:  # a finished shard got truncated since
        fh.truncate(100)
    report = convert_checkpoint(src, dst=dst, to="bf16", workers=1)
    assert sorted(report.resumed_shards) == [S2, S3]
    _load_dir(dst)

    def stop_at_a_third(fraction: float, message: str) -> None:
        if fraction > 0.3:
            raise _Stop(message)

    with pytest.raises(_Stop):
        convert_checkpoint(src, dst=tmp_path / "other", to="bf16", workers=1, progress=stop_at_a_third)
    other_work = work_dir_for(tmp_path / "other")
    assert other_work.exists()
    report = convert_checkpoint(src, dst=tmp_path / "other", to="int8-w8a8", workers=1)  # another plan
    assert report.resumed_shards == []


# -- the CLI and the pipeline stage --------------------------------------------------------------------
def test_cli_convert(
    fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = fp8_src
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--to", "int8-w8a8", "--workers", "2"]) == 0
    assert "tensors converted" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "bf16"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def _context(src: Path, root: Path, mode: str, *, dry_run: bool = False) -> ReleaseContext:
    cfg = ReleaseConfig(
        name="convert-test",
        model={"source": "local", "repo_id": "test/fp8", "path": str(src)},
        chip="cpu",
        convert={"mode": mode},
        work_dir=root,
    )
    ctx = ReleaseContext.create(cfg, dry_run=dry_run)
    ctx.results["fetch"] = StageResult(stage="fetch", summary="", outputs={"model_dir": str(src)})
    return ctx


def test_run_stage_quantizes_and_reports(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, _ = fp8_src
    seen: list[tuple[str, float]] = []
    ctx = _context(src, tmp_path / "release", "int8-w8a8")
    ctx.progress = lambda stage, fraction, message="": seen.append((stage, fraction))
    res = run_stage(ctx)
    layout = BundleLayout.for_release(ctx.config)
    assert res.status == "ok" and res.outputs["model_dir"] == str(layout.converted_dir)
    assert res.outputs["mode"] == "int8-w8a8"
    report = json.loads(Path(res.outputs["report"]).read_text())
    assert Path(res.outputs["report"]) == layout.reports_dir / "quantization.json"
    assert report["summary"] == res.outputs["summary"] and report["summary"]["tensors_converted"] == 4
    rows = res.tables["quantization"]
    assert len(rows) == 4 and {"tensor", "target", "rel_error", "snr_db", "shape"} <= set(rows[0])
    assert all(stage == "convert" for stage, _ in seen) and seen[-1][1] == 1.0
    assert "quantization_config" in json.loads((layout.converted_dir / "config.json").read_text())
    json.dumps(res.to_json())


def test_run_stage_none_links_and_dry_run_plans(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, _ = fp8_src
    dry = run_stage(_context(src, tmp_path / "dry", "int4-w4a16", dry_run=True))
    assert dry.outputs["summary"]["tensors_quantized"] == 3 and "Would convert" in dry.summary
    assert not (tmp_path / "dry" / "converted").exists()

    res = run_stage(_context(src, tmp_path / "none", "none"))
    out = Path(res.outputs["model_dir"])
    assert res.outputs["report"] is None and res.outputs["summary"]["files"] >= 6
    assert os.stat(out / S1).st_ino == os.stat(src / S1).st_ino  # hard-linked, not copied
    assert (out / "extra" / "notes.txt").read_text() == "kept"


def test_plan_conversion_counts(fp8_src: tuple[Path, dict[str, torch.Tensor]]) -> None:
    plan = plan_conversion(fp8_src[0], to="int8-w8a8")
    kinds = [j.kind for s in plan.shards for j in s.jobs]
    assert kinds.count("quant") == 4 and plan.fp8_tensors == 3
    assert plan.total_size < plan.src_bytes * 1.2


def test_an_all_zero_row_gets_a_positive_zero_scale() -> None:
    """+0.0, not the -0.0 of max(+0.0, -0.0): the sign would differ between CPU and CUDA."""
    w = (torch.randn(4, 256) * 0.02).to(torch.bfloat16)
    w[1] = 0
    for group in (None, 128):
        q, scale, _ = quantize_int(w, num_bits=8 if group is None else 4, group_size=group)
        assert torch.equal(q[1], torch.zeros_like(q[1]))
        assert not torch.signbit(scale[1]).any() and (scale[1] == 0).all()


# -- compressed-tensors and vLLM (the serving runtime) -------------------------------------------------
@pytest.mark.vllm
def test_compressed_tensors_reads_our_checkpoints(
    fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, serve_python: Path
) -> None:
    """compressed-tensors' own config model and decompressors agree with our weights."""
    src, _ = fp8_src
    outs = {}
    for fmt in ("int8-w8a8", "int8-w8a16", "int4-w4a16"):
        outs[fmt] = tmp_path / fmt
        convert_checkpoint(src, dst=outs[fmt], to=fmt)
        # Our own dequantization, for the cross-check.
        out = _load_dir(outs[fmt])
        name = "model.layers.0.self_attn.q_proj"
        if fmt == "int8-w8a8":
            deq = dequantize_int(out[name + ".weight"], out[name + ".weight_scale"])
        else:
            bits = 8 if fmt == "int8-w8a16" else 4
            deq = dequantize_int(
                unpack_int32(out[name + ".weight_packed"], num_bits=bits, cols=384), out[name + ".weight_scale"]
            )
        save_file({"w": deq}, tmp_path / f"{fmt}-deq.safetensors")
    script = textwrap.dedent(
        """
        import json, sys, torch
        from pathlib import Path
        from safetensors.torch import load_file
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization.lifecycle.forward import dequantize
        root = Path(sys.argv[1])
        name = "model.layers.0.self_attn.q_proj"
        for fmt in ("int8-w8a8", "int8-w8a16", "int4-w4a16"):
            cfg = json.loads((root / fmt / "config.json").read_text())["quantization_config"]
            qc = QuantizationConfig.model_validate(cfg)
            scheme = qc.config_groups["group_0"]
            t = {}
            for f in (root / fmt).glob("*.safetensors"):
                t.update(load_file(f))
            if fmt == "int8-w8a8":
                q = t[name + ".weight"]
            else:
                q = unpack_from_int32(t[name + ".weight_packed"], scheme.weights.num_bits, t[name + ".weight_shape"])
            deq = dequantize(x_q=q, scale=t[name + ".weight_scale"], zero_point=None, g_idx=None)
            ours = load_file(root / f"{fmt}-deq.safetensors")["w"]
            assert torch.equal(deq.to(torch.bfloat16), ours), fmt
            print(fmt, qc.format, scheme.weights.strategy, "ok")
        """
    )
    proc = subprocess.run(
        [str(serve_python), "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 3


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen2 demo model (untrained: weights as initialised) in the three INT formats."""
    from flagrelease.tinymodel import generate_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = generate_tiny_model(root / "bf16", steps=0)
    return {
        fmt: Path(convert_checkpoint(model, dst=root / fmt, to=fmt).dst)
        for fmt in ("int8-w8a8", "int8-w8a16", "int4-w4a16")
    }


def _serve(python: Path, model: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "256",
        "--dtype",
        "bfloat16",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, port


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float = 400) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"vLLM did not become healthy in {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture
def int_server(tmp_path: Path, serve_python: Path) -> Iterator:  # type: ignore[type-arg]
    """Start plain vLLM (no flagrelease plugin options) on a checkpoint; stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(model: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
        log = tmp_path / f"vllm-{model.name}.log"
        proc, port = _serve(serve_python, model, log)
        started.append(proc)
        return proc, port, log

    yield start
    for proc in started:
        _stop(proc)


def _complete(port: int, model: Path) -> dict:  # type: ignore[type-arg]
    body = json.dumps({"model": str(model), "prompt": "1 + 1 =", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="session")
def vllm_cpu_has_avx512(serve_python: Path) -> bool:
    """Whether vLLM's CPU build loads its AVX-512 kernels here (it asks torch, as below)."""
    ask = "import torch; print(torch.cpu._is_avx512_supported())"
    out = subprocess.run([str(serve_python), "-c", ask], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize(
    ("fmt", "scheme"),
    [("int8-w8a8", "CompressedTensorsW8A8Int8"), ("int4-w4a16", "CPUWNA16LinearKernel for CompressedTensorsWNA16")],
)
def test_vllm_serves_int_checkpoint(  # type: ignore[no-untyped-def]
    tiny_quantized: dict[str, Path], int_server, vllm_cpu_has_avx512: bool, fmt: str, scheme: str
) -> None:
    """vLLM (CPU) loads the W8A8 and W4A16 outputs through its compressed-tensors schemes and serves them.

    W4A16 needs vLLM's AVX-512 kernels: on a CPU with AVX2 only (vLLM 0.32 loads
    ``vllm._C_AVX2`` there, and ``vllm.platforms.cpu`` picks it by
    ``torch.cpu._is_avx512_supported()``) the engine stops with "'_OpNamespace' '_C' object
    has no attribute 'cpu_gemm_wna16'". The test pins that failure on such a CPU, so a
    vLLM that gains the kernel there makes it fail and the case turns into a serving test.
    """
    model = tiny_quantized[fmt]
    proc, port, log = int_server(model)
    if fmt == "int4-w4a16" and not vllm_cpu_has_avx512:
        assert not _wait_healthy(proc, port), "vLLM served W4A16 without AVX-512: serve-test it on this CPU too"
        assert "object has no attribute 'cpu_gemm_wna16'" in log.read_text(errors="replace")
        return
    assert _wait_healthy(proc, port), log.read_text(errors="replace")[-4000:]
    out = _complete(port, model)
    assert out["usage"]["completion_tokens"] == 4 and isinstance(out["choices"][0]["text"], str)
    assert scheme in log.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_has_no_kernel_for_w8a16(tiny_quantized: dict[str, Path], int_server) -> None:  # type: ignore[no-untyped-def]
    """INT8 W8A16 is a valid compressed-tensors checkpoint that vLLM's CPU build cannot run.

    vLLM 0.32 (CPU) maps pack-quantized 8-bit weight-only layers to CompressedTensorsWNA16,
    whose CPU kernels only take 4-bit weights; the engine stops with "ValueError: Failed to
    find a kernel that can implement the WNA16 linear layer" ... "CPUWNA16LinearKernel cannot
    implement due to: Quant type (uint8b128) not supported by CPUWNA16, supported types are:
    (ScalarType.uint4, ScalarType.uint4b8)". It runs on CUDA (Marlin/Machete kernels).
    The test pins that precise failure, so a vLLM that gains the kernel makes it fail and
    this format gets a serving test instead.
    """
    model = tiny_quantized["int8-w8a16"]
    proc, port, log = int_server(model)
    assert not _wait_healthy(proc, port), "vLLM served W8A16 on CPU: turn this into a serving test"
    text = log.read_text(errors="replace")
    assert "Failed to find a kernel that can implement the WNA16 linear layer" in text
    assert "Quant type (uint8b128) not supported by CPUWNA16" in text


# -- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """The arithmetic and whole conversions give the same bits on CUDA as on CPU.

    Run on an H100 (torch 2.11+cu130) on 2026-11-22: every shape, format and file identical.
    """
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    gen = torch.Generator().manual_seed(7)
    w, s = _fp8(300, 520, gen)
    cpu = dequant_fp8_block(w, s)
    gpu = dequant_fp8_block(w.cuda(), s.cuda()).cpu()
    assert torch.equal(cpu.view(torch.int16), gpu.view(torch.int16))
    for bits, group in ((8, None), (4, 128)):
        q_c, s_c, _ = quantize_int(cpu, num_bits=bits, group_size=group)
        q_g, s_g, _ = quantize_int(cpu.cuda(), num_bits=bits, group_size=group)
        assert torch.equal(q_c, q_g.cpu()) and torch.equal(s_c, s_g.cpu())
        assert torch.equal(pack_int32(q_c, num_bits=bits), pack_int32(q_g, num_bits=bits).cpu())
    src, _ = fp8_src
    for fmt in ("bf16", "int8-w8a8", "int8-w8a16", "int4-w4a16"):
        a = convert_checkpoint(src, dst=tmp_path / f"{fmt}-cpu", to=fmt, device="cpu")
        b = convert_checkpoint(src, dst=tmp_path / f"{fmt}-cuda", to=fmt, device="cuda")
        for name in a.shards:
            assert (Path(a.dst) / name).read_bytes() == (Path(b.dst) / name).read_bytes(), (fmt, name)


def test_report_survives_json_round_trip(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    report: ConvertReport = convert_checkpoint(fp8_src[0], dst=tmp_path / "o", to="int4-w4a16")
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["group_size"] == 128 and data["summary"]["snr_db_min"] is not None
    assert data["tensors"][0].keys() >= {"tensor", "rel_error", "snr_db", "max_abs_error", "target"}
    assert "kept dense" in report.to_text() and "INT4 group 128" in report.to_text()


def test_bad_device_and_workers(fp8_src: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, _ = fp8_src
    with pytest.raises(ConvertError, match="not a torch device"):
        convert_checkpoint(src, dst=tmp_path / "o", to="bf16", device="warp-drive")
    with pytest.raises(ConvertError, match="not supported; use cpu or cuda"):
        convert_checkpoint(src, dst=tmp_path / "o", to="bf16", device="meta")
    with pytest.raises(ConvertError, match="workers must be 0"):
        convert_checkpoint(src, dst=tmp_path / "o", to="bf16", workers=-1)
    assert not (tmp_path / "o").exists()
