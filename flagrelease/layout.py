"""Where every stage reads and writes inside a release's work folder.

All stages agree on these paths; nothing else builds paths into the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flagrelease.config import ReleaseConfig
from flagrelease.constants import home_dir

__all__ = ["BundleLayout"]


@dataclass(frozen=True)
class BundleLayout:
    """The folders of one release, below ``root``.

    ``root/bundle`` is what gets published; everything else is working state.
    """

    root: Path

    @classmethod
    def for_release(cls, cfg: ReleaseConfig) -> BundleLayout:
        """The layout of ``cfg``: its ``work_dir``, else ``<home>/releases/<name>``."""
        root = cfg.work_dir or home_dir() / "releases" / cfg.name
        return cls(Path(root).resolve())

    # -- working state -------------------------------------------------------------
    @property
    def source_dir(self) -> Path:
        """Fetched weights, exactly as the hub has them."""
        return self.root / "source"

    @property
    def converted_dir(self) -> Path:
        """Converted weights (equal to the source when convert mode is none)."""
        return self.root / "converted"

    @property
    def image_dir(self) -> Path:
        """The rendered Docker build context."""
        return self.root / "image"

    @property
    def runs_dir(self) -> Path:
        """Per-run scratch: server logs, eval caches."""
        return self.root / "runs"

    @property
    def state_dir(self) -> Path:
        """Stage results (JSON), written when a stage completes."""
        return self.root / "state"

    # -- the published bundle --------------------------------------------------------
    @property
    def bundle_dir(self) -> Path:
        """What is published: card, manifest, configs, logs, eval evidence."""
        return self.root / "bundle"

    @property
    def serve_dir(self) -> Path:
        """FlagScale configs: experiment config, serve config, hostfile, vllm command."""
        return self.bundle_dir / "serve"

    @property
    def logs_dir(self) -> Path:
        """Engine logs kept from every serve."""
        return self.bundle_dir / "logs"

    @property
    def eval_dir(self) -> Path:
        """lm-eval outputs and per-sample logs, one folder per variant."""
        return self.bundle_dir / "eval"

    @property
    def reports_dir(self) -> Path:
        """Reports: quantization error, load test, gate, probe."""
        return self.bundle_dir / "reports"

    @property
    def manifest_path(self) -> Path:
        """The machine-readable bundle manifest."""
        return self.bundle_dir / "flagrelease.json"

    @property
    def card_path(self) -> Path:
        """The model card."""
        return self.bundle_dir / "README.md"

    def ensure(self) -> BundleLayout:
        """Create the folders that stages expect to exist."""
        for d in (self.root, self.state_dir, self.bundle_dir, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self
