"""What a release would do, computed from its config alone (no network, no hardware)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flagrelease.chips import load_chip
from flagrelease.config import ConvertMode, ReleaseConfig, load_release
from flagrelease.layout import BundleLayout
from flagrelease.roles import reference_deployment_name

__all__ = ["ReleasePlan", "plan_release"]


@dataclass
class ReleasePlan:
    """One line per stage saying what it will do, and where."""

    name: str
    steps: list[tuple[str, str]] = field(default_factory=list)

    def to_text(self) -> str:
        """The plan as aligned lines."""
        lines = [f"release {self.name}"]
        lines += [f"  {stage:8s} {what}" for stage, what in self.steps]
        return "\n".join(lines)


def _plan(cfg: ReleaseConfig) -> ReleasePlan:
    chip = cfg.chip_profile
    layout = BundleLayout.for_release(cfg)
    args = cfg.serve.engine_args
    m = cfg.model
    where = str(m.path) if m.path else f"{m.source.value}:{m.repo_id}@{m.revision}"
    gems = "on" if cfg.serve.flaggems.enabled else "off"
    excluded = f", excluding {', '.join(cfg.serve.flaggems.excluded_ops)}" if cfg.serve.flaggems.excluded_ops else ""
    ref = cfg.eval.reference
    image_ref = "/".join(p for p in (cfg.image.registry, cfg.image.name) if p) + f":{cfg.image.tag}"
    steps = [
        ("fetch", f"{where} -> {layout.source_dir}"),
        (
            "convert",
            "none (serve the fetched weights)"
            if cfg.convert.mode is ConvertMode.NONE
            else f"{cfg.convert.mode.value}, streaming, ignore {', '.join(cfg.convert.ignore)}",
        ),
        ("image", f"{chip.dockerfile_template} FROM {cfg.image.base or chip.base_image} -> {image_ref}"),
        (
            "deploy",
            f"{cfg.runtime.value} runtime on {len(cfg.nodes)} node(s) x {cfg.nodes[0].slots} slots, "
            f"TP={args.tensor_parallel_size} PP={args.pipeline_parallel_size}, FlagGems {gems}{excluded}, "
            f"work pool {chip.work_pool}",
        ),
        (
            "eval",
            f"{', '.join(t.name for t in cfg.eval.tasks) or 'no tasks'}; k={cfg.eval.samples_per_item}; "
            f"reference {ref.chip} ({ref.mode}, {ref.weights} weights"
            + (
                f"; served on the {load_chip(ref.chip).work_pool} pool by deployment "
                f"flagrelease/{reference_deployment_name(cfg)}, handed over in {ref.results_dir}"
                if cfg.remote_reference
                else ""
            )
            + ")",
        ),
        (
            "gate",
            (
                f"relative rule, drop <= {cfg.gates.relative_margin:g}% of the reference"
                if cfg.gates.rule == "relative"
                else f"{'unpaired' if ref.mode == 'scores' else 'paired'} TOST, margin {cfg.gates.accuracy_margin} pts"
            )
            + f", alpha {cfg.gates.alpha}; throughput on/off >= {cfg.gates.throughput_min_ratio} "
            f"({cfg.gates.throughput.trials} interleaved rounds)",
        ),
        ("card", f"{layout.card_path}"),
        (
            "publish",
            ", ".join(
                d
                for d in (
                    cfg.publish.hf_repo and f"hf:{cfg.publish.hf_repo}",
                    cfg.publish.modelscope_repo and f"modelscope:{cfg.publish.modelscope_repo}",
                    cfg.publish.s3 and f"s3://{cfg.publish.s3.bucket}/{cfg.publish.s3.prefix}",
                    cfg.publish.registry and f"registry:{cfg.publish.registry}",
                    cfg.publish.local_dir and f"dir:{cfg.publish.local_dir}",
                )
                if d
            )
            or "nowhere configured",
        ),
    ]
    return ReleasePlan(cfg.name, steps)


def plan_release(config: Path | ReleaseConfig) -> ReleasePlan:
    """The plan of a release config (a path or a loaded config)."""
    cfg = config if isinstance(config, ReleaseConfig) else load_release(config)
    return _plan(cfg)
