"""Every error flagrelease raises.

Each class inherits :class:`FlagReleaseError` and a built-in exception, so callers may
catch either.  Errors carry the model, chip and stage they concern, and their message
says what to do next.
"""

from __future__ import annotations

__all__ = [
    "BusyError",
    "ConfigError",
    "ConvertError",
    "DeployError",
    "EvalError",
    "FetchError",
    "FlagReleaseError",
    "GateError",
    "ImageError",
    "ProbeError",
    "PublishBlockedError",
    "PublishError",
    "RuntimeSetupError",
    "ServiceError",
]


class FlagReleaseError(Exception):
    """Root of every flagrelease error.

    Attributes:
        model: the model (repo id or release name) concerned, if known.
        chip: the chip profile name concerned, if known.
        stage: the pipeline stage that raised, if any.
    """

    stage: str | None = None
    #: Whether retrying the same step can help: True (a transient fault), False (it cannot),
    #: None (unknown: decided by ``flagrelease.retry.is_transient`` from the error's kind).
    transient: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        chip: str | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.chip = chip
        if stage is not None:
            self.stage = stage

    def __str__(self) -> str:
        where = ", ".join(
            f"{k}={v}" for k, v in (("stage", self.stage), ("model", self.model), ("chip", self.chip)) if v
        )
        return f"{self.message} [{where}]" if where else self.message


class ConfigError(FlagReleaseError, ValueError):
    """A release config or chip profile is invalid.

    Attributes:
        path: the file that holds the error, if any.
        errors: one ``(field, reason)`` pair per problem found.
    """

    stage = "config"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        errors: list[tuple[str, str]] | None = None,
        **kw: str | None,
    ) -> None:
        super().__init__(message, **kw)
        self.path = path
        self.errors = errors or []


class FetchError(FlagReleaseError, OSError):
    """Downloading or verifying weights failed."""

    stage = "fetch"


class ConvertError(FlagReleaseError, ValueError):
    """A checkpoint could not be converted."""

    stage = "convert"


class ImageError(FlagReleaseError, RuntimeError):
    """Rendering, building or pushing the container image failed."""

    stage = "image"


class DeployError(FlagReleaseError, RuntimeError):
    """The serving engine could not be started, or did not become healthy."""

    stage = "deploy"


class RuntimeSetupError(DeployError):
    """The serving runtime (a venv or an image) could not be prepared."""


class EvalError(FlagReleaseError, RuntimeError):
    """An evaluation could not run or produced unusable results."""

    stage = "eval"


class GateError(FlagReleaseError, RuntimeError):
    """A consistency or throughput gate failed or could not be computed."""

    stage = "gate"


class ProbeError(FlagReleaseError, RuntimeError):
    """The FlagGems operator probe could not run."""

    stage = "probe"


class PublishError(FlagReleaseError, OSError):
    """Publishing the bundle failed."""

    stage = "publish"


class PublishBlockedError(PublishError):
    """Publishing is refused (the release failed its gate); retrying cannot help."""


class ServiceError(FlagReleaseError, RuntimeError):
    """A service flagrelease manages (its own dockerd, the local registry) could not start or answer."""


class BusyError(FlagReleaseError, RuntimeError):
    """Another flagrelease process holds what this one needs (a release's work folder, a port, a runtime)."""

    transient = False
