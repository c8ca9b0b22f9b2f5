"""A live reference on another chip: the reference side's config, the hand-over, the target's plan.

The end-to-end run through two Prefect deployments is in tests/test_flows.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flagrelease.config import ConvertMode, load_release, parse_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ConfigError, EvalError
from flagrelease.evaluate import plan_variants
from flagrelease.evaluate.reference import KEY_FILE, publish_reference_run, reference_key, reference_ready
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.roles import reference_stages, release_for_role

ILUVATAR = REPO_ROOT / "release_configs" / "deepseek-r1-iluvatar.yaml"


def _iluvatar(tmp_path: Path, **reference: object) -> dict:
    data = yaml.safe_load(ILUVATAR.read_text())
    data["eval"]["reference"].update(results_dir=str(tmp_path / "exchange"), **reference)
    data["work_dir"] = str(tmp_path / "work")
    return data


def test_the_iluvatar_release_runs_its_h100_reference_on_the_h100_pool() -> None:
    cfg = load_release(ILUVATAR)
    assert cfg.remote_reference
    side = cfg.reference_side()
    assert side.name == "deepseek-r1-iluvatar-reference" and side.chip == "nvidia-h100"
    args = side.serve.engine_args
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (8, 2)
    assert [n.hostfile_line() for n in side.serve.nodes] == [
        "h100-node-0 slots=8 type=gpu",
        "h100-node-1 slots=8 type=gpu",
    ]
    assert side.convert.mode is ConvertMode.NONE  # the reference serves the official FP8 weights
    assert side.serve.envs == {} and side.serve.before_start == []  # Iluvatar's NCCL settings stay behind
    assert not side.serve.flaggems.enabled and not side.remote_reference
    assert side.image.tag.endswith("-reference-nvidia-h100") and side.publish.hf_repo is None
    assert side.eval.tasks == cfg.eval.tasks and side.eval.samples_per_item == cfg.eval.samples_per_item
    assert reference_stages(cfg) == ["fetch", "image", "eval"]


def test_a_cross_chip_live_reference_needs_a_hand_over_folder(tmp_path: Path) -> None:
    data = _iluvatar(tmp_path)
    del data["eval"]["reference"]["results_dir"]
    with pytest.raises(ConfigError) as err:
        parse_release(data, path=tmp_path / "deepseek-r1-iluvatar.yaml")
    assert "eval.reference.results_dir" in str(err.value) and "deepseek-r1-iluvatar.yaml" in str(err.value)


def test_the_reference_side_must_fit_the_reference_chip(tmp_path: Path) -> None:
    data = _iluvatar(tmp_path, nodes=["h100-node-0 slots=8 type=gpu"])  # TP8 x PP2 on 8 GPUs
    with pytest.raises(ConfigError) as err:
        parse_release(data, path=tmp_path / "deepseek-r1-iluvatar.yaml")
    text = str(err.value)
    assert "eval.reference" in text and "nvidia-h100" in text and "exceeds the 8 slots" in text


def test_roles(tmp_path: Path) -> None:
    demo = load_release(REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml")
    assert release_for_role(demo, None) is demo
    with pytest.raises(ConfigError, match="evaluates its reference itself"):
        release_for_role(demo, "reference")
    with pytest.raises(ConfigError, match="unknown role 'referee'; roles: reference"):
        release_for_role(demo, "referee")


def test_the_key_follows_what_changes_the_numbers(tmp_path: Path) -> None:
    cfg = parse_release(_iluvatar(tmp_path), path=tmp_path / "deepseek-r1-iluvatar.yaml")
    key = reference_key(cfg.reference_side())
    moved = _iluvatar(tmp_path / "elsewhere")
    assert reference_key(parse_release(moved, path=tmp_path / "deepseek-r1-iluvatar.yaml").reference_side()) == key
    hotter = _iluvatar(tmp_path)
    hotter["eval"]["generation"]["temperature"] = 1.0
    assert reference_key(parse_release(hotter, path=tmp_path / "deepseek-r1-iluvatar.yaml").reference_side()) != key


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "ref-run"
    samples = run / "lm-eval" / "gsm8k" / "pass-0" / "m"
    samples.mkdir(parents=True)
    (samples / "samples_gsm8k_2026.jsonl").write_text(json.dumps({"doc_id": 0, "exact_match": 1.0}) + "\n")
    (run / "scores.json").write_text("{}")
    return run


def test_hand_over_is_atomic_and_keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_release(_iluvatar(tmp_path), path=tmp_path / "deepseek-r1-iluvatar.yaml")
    assert not reference_ready(cfg)
    run = _run_dir(tmp_path)
    folder = publish_reference_run(cfg.reference_side(), run)
    assert reference_ready(cfg)
    assert json.loads((folder / KEY_FILE).read_text())["chip"] == "nvidia-h100"
    assert (folder / "lm-eval" / "gsm8k" / "pass-0" / "m" / "samples_gsm8k_2026.jsonl").is_file()

    # A copy that breaks half way leaves the previous hand-over as it was.
    import shutil

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken)
    with pytest.raises(OSError, match="disk full"):
        publish_reference_run(cfg.reference_side(), run)
    assert reference_ready(cfg) and not list(folder.parent.glob(".exchange.*"))

    # Changed eval settings make the handed-over run stale.
    colder = _iluvatar(tmp_path)
    colder["eval"]["samples_per_item"] = 8
    assert not reference_ready(parse_release(colder, path=tmp_path / "deepseek-r1-iluvatar.yaml"))


def _target_context(tmp_path: Path) -> ReleaseContext:
    cfg = parse_release(_iluvatar(tmp_path), path=tmp_path / "deepseek-r1-iluvatar.yaml")
    ctx = ReleaseContext.create(cfg)
    ctx.results["convert"] = StageResult(
        "convert", "", outputs={"model_dir": str(tmp_path / "converted"), "mode": "int8-w8a8"}
    )
    return ctx


def test_the_target_waits_for_a_current_reference_run(tmp_path: Path) -> None:
    ctx = _target_context(tmp_path)
    with pytest.raises(EvalError) as err:
        plan_variants(ctx)
    text = str(err.value)
    assert "prefect deployment run flagrelease/deepseek-r1-iluvatar-reference" in text
    assert "--role reference" in text and "nvidia-h100" in text
    publish_reference_run(ctx.config.reference_side(), _run_dir(tmp_path))
    plans = {p.name: p for p in plan_variants(ctx)}
    assert plans["reference"].stored == tmp_path / "exchange" and plans["reference"].chip == "nvidia-h100"
    assert plans["target"].model_dir == tmp_path / "converted" and "target_gems_off" in plans


def test_the_reference_side_plans_the_reference_alone(tmp_path: Path) -> None:
    cfg = parse_release(_iluvatar(tmp_path), path=tmp_path / "deepseek-r1-iluvatar.yaml")
    ctx = ReleaseContext.create(cfg, role="reference")
    assert ctx.config.chip == "nvidia-h100" and ctx.layout.root == tmp_path / "work" / "reference"
    ctx.results["fetch"] = StageResult("fetch", "", outputs={"model_dir": str(tmp_path / "fp8")})
    (plan,) = plan_variants(ctx)  # no convert stage ran, and none is needed
    assert (plan.name, plan.chip, plan.model_dir, plan.flaggems) == (
        "reference",
        "nvidia-h100",
        tmp_path / "fp8",
        False,
    )
