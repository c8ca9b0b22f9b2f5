"""Which stages each stage depends on, and what its fingerprint covers (flagrelease.pipeline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flagrelease.config import load_release
from flagrelease.constants import REPO_ROOT
from flagrelease.pipeline import STAGES, ReleaseContext, StageResult, save_stage_result, stage_fingerprint, stage_inputs

CONFIGS = REPO_ROOT / "release_configs"


def _demo(tmp_path: Path) -> ReleaseContext:
    data = yaml.safe_load((CONFIGS / "demo-tiny-cpu.yaml").read_text())
    data["work_dir"] = str(tmp_path / "work")
    data["model"]["path"] = str(tmp_path / "tiny")
    path = tmp_path / "demo-tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return ReleaseContext.create(load_release(path), config_path=path)


def test_every_stage_depends_only_on_earlier_stages() -> None:
    for cfg in (load_release(CONFIGS / "demo-tiny-cpu.yaml"), load_release(CONFIGS / "deepseek-r1-iluvatar.yaml")):
        for i, stage in enumerate(STAGES):
            assert set(stage_inputs(cfg, stage)) <= set(STAGES[:i]), stage


def test_the_image_needs_no_stage_and_only_a_deploy_that_runs_it_waits_for_it() -> None:
    local = load_release(CONFIGS / "demo-tiny-cpu.yaml")
    nodes = load_release(CONFIGS / "deepseek-r1-iluvatar.yaml")
    assert stage_inputs(local, "image") == stage_inputs(nodes, "image") == ()
    for stage in ("deploy", "eval", "gate"):
        assert "image" not in stage_inputs(local, stage)
        assert "image" in stage_inputs(nodes, stage)
    assert "image" in stage_inputs(local, "card") and "convert" in stage_inputs(local, "deploy")


def test_the_image_fingerprint_ignores_the_convert_and_the_deploy_follows_the_convert(tmp_path: Path) -> None:
    ctx = _demo(tmp_path)
    image, deploy = stage_fingerprint(ctx, "image"), stage_fingerprint(ctx, "deploy")
    for stage in ("fetch", "convert"):
        save_stage_result(ctx.layout, StageResult(stage, "done", {"model_dir": "x"}, fingerprint=f"{stage}-1"))
    assert stage_fingerprint(ctx, "image") == image
    deploy_after_convert = stage_fingerprint(ctx, "deploy")
    assert deploy_after_convert != deploy
    card = stage_fingerprint(ctx, "card")
    save_stage_result(ctx.layout, StageResult("image", "done", {"image_ref": "x"}, fingerprint="image-1"))
    assert stage_fingerprint(ctx, "deploy") == deploy_after_convert  # a local deploy does not run the image
    assert stage_fingerprint(ctx, "card") != card  # the card describes it


@pytest.mark.parametrize("stage", STAGES)
def test_a_fingerprint_does_not_import_the_stage(stage: str, tmp_path: Path) -> None:
    """A reused stage costs no import of its code (torch, lm-eval, ...): a cached re-run stays fast."""
    code = (
        "import sys, yaml\n"
        "from flagrelease.pipeline import ReleaseContext, stage_fingerprint, _MODULES\n"
        "from flagrelease.config import load_release\n"
        f"ctx = ReleaseContext.create(load_release({str(_demo(tmp_path).config_path)!r}))\n"
        f"stage_fingerprint(ctx, {stage!r})\n"
        f"assert _MODULES[{stage!r}] not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)
