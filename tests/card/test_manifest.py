"""The bundle manifest flagrelease.json: built from stage results, validated against the schema."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from flagrelease import __version__
from flagrelease.bundle import load_manifest, manifest_schema, validate_manifest
from flagrelease.card import run_stage as card_stage
from flagrelease.card.manifest import build_manifest, bundle_name, upstream_results
from flagrelease.config import load_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import PublishError
from tests._release_builder import build_release

CONFIGS = REPO_ROOT / "release_configs"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(manifest_schema())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("deepseek-r1-iluvatar", "DeepSeek-R1-FlagOS-Iluvatar-INT8"),
        ("deepseek-r1-distill-qwen-32b-nvidia", "DeepSeek-R1-Distill-Qwen-32B-FlagOS-NVIDIA"),
        ("demo-tiny-cpu", "Tiny-Qwen2-FlagOS-CPU-INT8"),
    ],
)
def test_bundle_names_follow_the_published_pattern(name: str, expected: str) -> None:
    assert bundle_name(load_release(CONFIGS / f"{name}.yaml")) == expected


def test_manifest_from_the_config_alone_records_every_stage_as_not_run(tmp_path: Path) -> None:
    cfg = load_release(CONFIGS / "deepseek-r1-iluvatar.yaml")
    m = build_manifest(cfg, bundle_dir=tmp_path, tools={"flagrelease": __version__})
    validate_manifest(m)
    assert {s["status"] for s in m["stages"].values()} == {"not-run"}
    assert [r["verdict"] for r in m["eval"]["rows"]] == ["missing"] * 6
    assert m["model"] == {
        "repo_id": "deepseek-ai/DeepSeek-R1",
        "source": "hf",
        "revision": "56d4cbbb4d29f4355bab4b9a39ccb717a14ad5ad",
        "display_name": "DeepSeek-R1",
        "license": "mit",
        "license_url": "https://github.com/deepseek-ai/DeepSeek-R1/blob/main/LICENSE",
    }
    assert (
        m["image"]["ref"] == "flagrelease-registry.cn-beijing.cr.aliyuncs.com/flagrelease/flagrelease:"
        "deepseek-r1-flagos-iluvatar-int8"
    )
    assert m["weights"]["published"] is True and m["conversion"]["quant"] == "INT8"
    assert "Quantization error report" in m["missing"]


def test_manifest_from_stage_results(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, triton_share=0.7, skip=("image",), deploy={"gems_library": "flag_gems"})
    card_stage(ctx)
    lay = ctx.layout
    m = load_manifest(lay.manifest_path)
    assert m["stages"]["image"]["status"] == "skipped" and m["stages"]["gate"]["status"] == "ok"
    assert m["stages"]["fetch"]["started_at"] == "2023-11-14T22:13:20Z"
    assert m["image"]["digest"] is None and m["image"]["built"] is None  # skipped: nothing recorded
    # every bundle file with its sha256, the manifest itself left out
    listed = {f["path"]: f for f in m["files"]}
    on_disk = {p.relative_to(lay.bundle_dir).as_posix() for p in lay.bundle_dir.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"flagrelease.json"}
    for rel, f in listed.items():
        assert f["sha256"] == _sha(lay.bundle_dir / rel) and f["size"] == (lay.bundle_dir / rel).stat().st_size
    # the converted weights, their own README left to the card
    weights = {f["path"]: f["sha256"] for f in m["weights"]["files"]}
    assert set(weights) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert weights["model.safetensors"] == _sha(lay.converted_dir / "model.safetensors")
    assert m["weights"]["location"] == "converted" and m["weights"]["published"] is True
    assert m["conversion"]["summary"]["max_rel_error"] == 0.0123
    assert m["conversion"]["scheme"]["input_activations"]["strategy"] == "token"
    # serve configs, FlagGems operators, eval with CIs and verdicts
    assert {f["path"] for f in m["serve"]["files"]} >= {"serve/config_tiny_qwen2.yaml", "serve/serve/tiny_qwen2.yaml"}
    assert m["serve"]["command"] == "flagscale serve tiny_qwen2"
    assert m["flaggems"]["operators"] == ["addmm", "silu_and_mul", "rms_norm"] and m["flaggems"]["triton_share"] == 0.7
    row = m["eval"]["rows"][0]
    assert (row["diff_ci"], row["verdict"], m["eval"]["verdict"]) == ([-1.6, 0.6], "consistent", "consistent")
    assert m["eval"]["variants"]["target"]["throughput"] == 100.0
    assert m["gate"] == {
        "verdict": "consistent",
        "failed": False,
        "reasons": [],
        "throughput_ok": True,
        "blamed_ops": [],
        "proposed_excluded_ops": [],
        "publish_on_fail": False,
    }
    assert m["release"]["config_sha256"] == _sha(tmp_path / "demo.yaml")
    assert m["tools"]["flagrelease"] == __version__ and m["tools"]["torch"] and m["tools"]["lm-eval"]


def test_a_failed_gate_is_recorded_with_reasons(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, verdict="inconsistent")
    up = upstream_results(ctx)
    assert up.gate is not None and up.gate.results
    gate = json.loads(Path(up.gate.results).read_text())
    m = build_manifest(
        ctx.config, bundle_dir=ctx.layout.bundle_dir, upstream=up, gate=gate, tools={"flagrelease": __version__}
    )
    assert m["gate"]["failed"] is True
    assert any("TinyArith (EM)" in r for r in m["gate"]["reasons"])
    assert not any("gate stage failed" in r for r in m["gate"]["reasons"])  # specific reasons suffice


def test_validation_rejects_a_broken_manifest(tmp_path: Path) -> None:
    cfg = load_release(CONFIGS / "demo-tiny-cpu.yaml")
    good = build_manifest(cfg, bundle_dir=tmp_path, tools={"flagrelease": __version__})
    validate_manifest(good)
    for breaker in (
        lambda m: m.pop("eval"),
        lambda m: m["files"].append({"path": "README.md", "size": 1, "sha256": "not-a-sha"}),
        lambda m: m["files"].append({"path": "../escape", "size": 1, "sha256": "0" * 64}),
        lambda m: m["image"].update(digest="latest"),
        lambda m: m["stages"]["fetch"].update(status="done"),
        lambda m: m.update(unexpected=1),
    ):
        bad = copy.deepcopy(good)
        breaker(bad)
        with pytest.raises(PublishError, match=r"does not match flagrelease\.schema\.json"):
            validate_manifest(bad)


def test_tool_versions_ask_the_serving_interpreter_and_do_not_import_prefect(tmp_path: Path) -> None:
    # A serving interpreter with its own vllm distribution: the version must come from it.
    site = tmp_path / "site"
    dist = site / "vllm-0.32.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    code = textwrap.dedent(f"""
        import json, sys
        from flagrelease.card.manifest import tool_versions
        from flagrelease.deploy.outputs import DeployOutputs
        deploy = DeployOutputs(serve_dir="serve", python={str(python)!r}, flag_gems_version="2.2")
        v = tool_versions(deploy=deploy)
        print(json.dumps({{"v": v, "prefect_imported": "prefect" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["prefect_imported"] is False
    v = data["v"]
    assert v["vllm"] == "0.32.0" and v["flag-gems"] == "2.2" and v["prefect"] and v["torch"]
