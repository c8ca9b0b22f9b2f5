"""The image's Dockerfile and build context, rendered from ``templates/docker/``.

What the image stage renders (:func:`render_release`), in one folder that is both the
FlagScale ``conf/`` folder and the Docker build context::

    config_<model>.yaml, serve/<model>.yaml, hostfile.txt, vllm_serve.sh
                            the FlagScale configs (:func:`flagrelease.render.render_serve_configs`)
    Dockerfile              the chip family's image, FROM the chip's base image
    build/install.py        install steps run inside ``docker build``
    build/dist/*.whl        flagrelease itself (installed with --no-deps)
    build/wheels/           optional offline wheels for the dependencies
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flagrelease import __version__
from flagrelease._atomic import atomic_copy, atomic_write_bytes, atomic_write_text
from flagrelease._oci import ImageReference, parse_reference
from flagrelease.chips import ChipProfile
from flagrelease.config import ReleaseConfig
from flagrelease.constants import REPO_ROOT
from flagrelease.render import (
    CONF_DIR,
    bad_value,
    image_reference,
    model_slug,
    one_line,
    render_serve_configs,
    render_template,
    serve_command,
    serve_env,
    serve_files,
    serve_host,
    served_model_path,
)

__all__ = [
    "DEFAULT_FLAG_GEMS_VERSION",
    "ImagePlan",
    "base_image",
    "image_labels",
    "image_plan",
    "render_dockerfile",
    "render_image_context",
    "render_release",
    "source_commit",
]

#: FlagGems release installed when the config pins none (``image.flag_gems_version``).
DEFAULT_FLAG_GEMS_VERSION = "5.0.2"


_BUILD_DIR = "/opt/flagrelease/build"


_INSTALL_SCRIPT = f"{_BUILD_DIR}/install.py"


_USER_NAME = "flagrelease"


_USER_ID = 10001


_REQUIREMENT = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?"
    r"(?:(?:==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!_-]+(?:,(?:==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!_-]+)*)?$"
)


_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")


_URL = re.compile(r"^https?://[A-Za-z0-9._~:/?#\[\]@!&()*+,;=%-]+$")


_SHA = re.compile(r"^[0-9a-f]{40}$")


_WHEELS_README = (
    "Wheels put in this folder are installed offline by build/install.py (FLAGRELEASE_DEPS=auto),\n"
    "instead of downloading the dependencies from the package index.\n"
)


def base_image(cfg: ReleaseConfig) -> ImageReference:
    """The image the Dockerfile starts FROM: ``image.base``, else the chip profile's."""
    if cfg.image.base:
        return parse_reference(cfg.image.base, what="image.base")
    return parse_reference(cfg.chip_profile.base_image, what=f"chip profile {cfg.chip}: base_image")


def _flag_gems_version(cfg: ReleaseConfig) -> str:
    """The FlagGems the image gets: a version, ``vendor`` (the base ships it) or ``none``."""
    if cfg.chip_profile.gems_vendor == "cpu":
        return "none"  # no CPU backend: the plugin enables flagrelease's reference operators instead
    return cfg.image.flag_gems_version or DEFAULT_FLAG_GEMS_VERSION


def _flag_gems_requirement(cfg: ReleaseConfig) -> str | None:
    version = _flag_gems_version(cfg)
    if version in ("vendor", "none"):
        return None
    if not _VERSION.match(version):
        raise bad_value(
            "image.flag_gems_version", version, "is not a version", "give e.g. 5.0.2 (or 'vendor')", cfg=cfg
        )
    return f"flag-gems=={version}"


def _vllm_requirement(cfg: ReleaseConfig) -> str | None:
    package = cfg.chip_profile.vllm_package
    if package == "vendor":
        if cfg.image.vllm_version:
            raise bad_value(
                "image.vllm_version",
                cfg.image.vllm_version,
                f"cannot apply: chip {cfg.chip} ships the vendor's vLLM build in its base image",
                "remove image.vllm_version",
                cfg=cfg,
            )
        return None
    if cfg.image.vllm_version:
        if not _VERSION.match(cfg.image.vllm_version):
            raise bad_value(
                "image.vllm_version", cfg.image.vllm_version, "is not a version", "give e.g. 0.8.5", cfg=cfg
            )
        package = re.split(r"[\[<>=!~]", package, maxsplit=1)[0] + f"=={cfg.image.vllm_version}"
    if not _REQUIREMENT.match(package):
        raise bad_value(
            f"chip profile {cfg.chip}: vllm_package",
            package,
            "is not a pip requirement",
            "give NAME==VERSION or 'vendor'",
            cfg=cfg,
        )
    return package


def _pip_index_url(cfg: ReleaseConfig) -> str | None:
    url = cfg.image.pip_index_url
    if url is None:
        return None
    if not _URL.match(url):
        raise bad_value(
            "image.pip_index_url",
            url,
            "is not an http(s) URL without spaces or quotes",
            "give e.g. https://pypi.example.com/simple",
            cfg=cfg,
        )
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise bad_value(
            "image.pip_index_url",
            "<redacted>",
            "holds credentials, which would be baked into the image",
            "drop user:password from the URL and give the index's credentials to the build another way",
            cfg=cfg,
        )
    return url


def source_commit() -> str | None:
    """``git rev-parse HEAD`` of the flagrelease checkout, or None outside a git checkout."""
    if not (REPO_ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and _SHA.match(sha) else None


def image_labels(cfg: ReleaseConfig, *, commit: str | None = None) -> dict[str, str]:
    """OCI labels of the release's image: model, revision, chip, FlagGems version, source commit."""
    chip = cfg.chip_profile
    _flag_gems_requirement(cfg)
    description = " ".join((cfg.description or f"{cfg.model.name} on {chip.display_name} with FlagGems").split())
    labels = {
        "org.opencontainers.image.title": cfg.served_model_name,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.version": cfg.image.tag,
        "org.opencontainers.image.revision": commit or "unknown",
        "org.opencontainers.image.licenses": cfg.model.license,
        "org.opencontainers.image.base.name": str(base_image(cfg)),
        "io.flagrelease.release": cfg.name,
        "io.flagrelease.model": cfg.model.repo_id,
        "io.flagrelease.model.revision": cfg.model.revision or "local",
        "io.flagrelease.chip": chip.name,
        "io.flagrelease.chip.vendor": chip.vendor,
        "io.flagrelease.convert": cfg.convert.mode.value,
        "io.flagrelease.flag-gems.version": _flag_gems_version(cfg),
        "io.flagrelease.flag-gems.enabled": "true" if cfg.serve.flaggems.enabled else "false",
        "io.flagrelease.vllm": chip.vllm_package if not cfg.image.vllm_version else str(_vllm_requirement(cfg)),
        "io.flagrelease.source-commit": commit or "unknown",
        "io.flagrelease.version": __version__,
    }
    return {k: one_line(v, f"label {k}", cfg=cfg) for k, v in labels.items()}


@dataclass(frozen=True)
class ImagePlan:
    """What the image of a release is made of, all values checked."""

    family: str
    template: str
    base: ImageReference
    ref: ImageReference
    vllm_requirement: str | None
    gems_requirement: str | None
    labels: dict[str, str]
    env: dict[str, str]
    serve_argv: list[str]
    port: int
    non_root: bool


def _family(chip: ChipProfile) -> str:
    return chip.dockerfile_template.split(".", 1)[0]


_HOST_NETWORK = ("--net=host", "--network=host")


def _in_container(cfg: ReleaseConfig) -> ReleaseConfig:
    """``cfg`` as the image's CMD serves it: on every address of the container, unless on the host's network.

    A server bound to 127.0.0.1 inside a container cannot be reached through a published
    port; ``docker run -p 127.0.0.1:PORT:PORT`` decides who may reach it on the host.
    """
    flags = list(cfg.chip_profile.docker_run_flags)
    host_net = any(f in _HOST_NETWORK for f in flags) or any(
        a in ("--net", "--network") and b == "host" for a, b in itertools.pairwise(flags)
    )
    if host_net or cfg.serve.engine_args.host not in ("127.0.0.1", "localhost", "::1"):
        return cfg
    args = cfg.serve.engine_args.model_copy(update={"host": "0.0.0.0"})
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"engine_args": args})})


def image_plan(cfg: ReleaseConfig, *, model_path: str | None = None, commit: str | None = None) -> ImagePlan:
    """Check every value the Dockerfile of ``cfg`` uses and gather them.

    Raises:
        ConfigError: a value is invalid; the message names the field and the fix.
    """
    chip = cfg.chip_profile
    path = served_model_path(cfg, model_path)
    return ImagePlan(
        family=_family(chip),
        template=chip.dockerfile_template,
        base=base_image(cfg),
        ref=image_reference(cfg),
        vllm_requirement=_vllm_requirement(cfg),
        gems_requirement=_flag_gems_requirement(cfg),
        labels=image_labels(cfg, commit=commit),
        env=serve_env(cfg),
        serve_argv=serve_command(_in_container(cfg), model_path=path),
        port=cfg.serve.engine_args.port,
        non_root=chip.non_root,
    )


def _healthcheck(cfg: ReleaseConfig) -> list[str]:
    host = serve_host(cfg)
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = f"http://{host}:{cfg.serve.engine_args.port}/health"
    code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=8)"
    return [cfg.chip_profile.python, "-c", code]


def render_dockerfile(cfg: ReleaseConfig, *, model_path: str | None = None, commit: str | None = None) -> str:
    """The Dockerfile of ``cfg``'s chip family, every value checked and quoted.

    Args:
        cfg: the release.
        model_path: the weights folder the image's CMD serves (default as :func:`engine_args`).
        commit: the source commit label (default: :func:`source_commit`).

    Raises:
        ConfigError: a config or chip-profile value is invalid.
    """
    from flagrelease.image._wheel import wheel_name

    plan = image_plan(cfg, model_path=model_path, commit=commit if commit is not None else source_commit())
    chip = cfg.chip_profile
    slug = model_slug(cfg)
    conf_files = [f"config_{slug}.yaml", "hostfile.txt", "vllm_serve.sh", f"{CONF_DIR}/"]
    return render_template(
        plan.template,
        release=cfg.name,
        chip=chip,
        family=plan.family,
        base_image=str(plan.base),
        python=chip.python,
        install_script=_INSTALL_SCRIPT,
        build_dir=_BUILD_DIR,
        pip_index_url=_pip_index_url(cfg),
        labels=list(plan.labels.items()),
        env=list(plan.env.items()),
        vllm_requirement=plan.vllm_requirement,
        gems_requirement=plan.gems_requirement,
        gems_no_deps=False,
        wheel_path=f"{_BUILD_DIR}/dist/{wheel_name()}",
        conf_files=conf_files,
        conf_dir=CONF_DIR,
        non_root=plan.non_root,
        user_name=_USER_NAME,
        user_id=_USER_ID,
        port=plan.port,
        start_period=int(cfg.serve.health_timeout_s),
        healthcheck=_healthcheck(cfg),
        serve_argv=plan.serve_argv,
    )


def render_image_context(
    cfg: ReleaseConfig,
    *,
    out_dir: Path,
    model_path: str | None = None,
    commit: str | None = None,
    wheels_dir: Path | None = None,
) -> list[Path]:
    """Write the Dockerfile and its build files (not the FlagScale configs) into ``out_dir``.

    Args:
        cfg: the release.
        out_dir: the build context folder.
        model_path: the weights folder the image's CMD serves.
        commit: the source commit label (default: :func:`source_commit`).
        wheels_dir: wheels to copy into ``build/wheels/`` so the dependencies install offline.

    Returns:
        The files written.
    """
    from flagrelease.image import _install as _image_install
    from flagrelease.image._wheel import build_self_wheel

    out_dir = Path(out_dir)
    dockerfile = render_dockerfile(cfg, model_path=model_path, commit=commit)
    written = [atomic_write_text(out_dir / "Dockerfile", dockerfile)]
    build = out_dir / "build"
    written.append(atomic_write_bytes(build / "install.py", Path(_image_install.__file__).read_bytes()))
    dist = build / "dist"
    if dist.is_dir():
        shutil.rmtree(dist)
    written.append(build_self_wheel(dist))
    wheels = build / "wheels"
    # A file keeps the folder in copies that drop empty folders (hubs, S3): the Dockerfile COPYs it.
    written.append(atomic_write_text(wheels / "README.txt", _WHEELS_README))
    if wheels_dir is not None:
        for wheel in sorted(Path(wheels_dir).glob("*.whl")):
            written.append(atomic_copy(wheel, wheels / wheel.name))
    return written


def render_release(
    cfg: ReleaseConfig,
    *,
    out_dir: Path,
    model_path: str | None = None,
    commit: str | None = None,
    wheels_dir: Path | None = None,
) -> list[Path]:
    """Render everything a release serves with into ``out_dir``: FlagScale configs and the image context.

    ``out_dir`` is both FlagScale's ``conf/`` folder and the Docker build context.  Every
    value is checked before anything is written, and each file is written atomically.

    Args:
        cfg: the release.
        out_dir: the folder to write into (created if missing).
        model_path: the weights folder on the serving host (default: ``serve.model_dir``,
            else the release's converted folder).
        commit: the source commit label (default: :func:`source_commit`).
        wheels_dir: wheels to ship in the context for offline dependency installs.

    Returns:
        The files written.

    Raises:
        ConfigError: a config or chip-profile value is invalid.
    """
    # Render both to memory first, so an invalid value writes nothing.
    serve_files(cfg, model_path=model_path)
    render_dockerfile(cfg, model_path=model_path, commit=commit)
    written = render_serve_configs(cfg, out_dir=out_dir, model_path=model_path)
    written += render_image_context(cfg, out_dir=out_dir, model_path=model_path, commit=commit, wheels_dir=wheels_dir)
    return written
