"""Every template flagrelease renders for serving: vendor Dockerfiles and FlagScale configs.

This module alone renders ``templates/docker/*.j2`` and ``templates/flagscale/*.j2``, with
Jinja2's ``StrictUndefined``.  Every value that comes from a release config or a chip
profile is checked before it reaches a template (image references against the OCI
grammar, environment names, one-line values, requirements, URLs) and is then quoted for
where it lands: Dockerfile words are double-quoted with ``$``, ``"`` and ``\\`` escaped,
Dockerfile commands are JSON exec-form arrays, shell words go through :func:`shlex.quote`
and YAML values through a real YAML dumper (and are read back to prove they round-trip).

What a release renders (:func:`render_release`), in one folder that is both the FlagScale
``conf/`` folder and the Docker build context::

    config_<model>.yaml     FlagScale experiment config
    serve/<model>.yaml      FlagScale serve config (engine_args)
    hostfile.txt            one ``ip slots=N type=gpu`` line per node
    vllm_serve.sh           the same serve as a direct ``vllm serve`` command
    Dockerfile              the chip family's image, FROM the chip's base image
    build/install.py        install steps run inside ``docker build``
    build/dist/*.whl        flagrelease itself (installed with --no-deps)
    build/wheels/           optional offline wheels for the dependencies
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from flagrelease import __version__
from flagrelease._atomic import atomic_copy, atomic_write_bytes, atomic_write_text
from flagrelease._oci import ImageReference, parse_reference, parse_registry
from flagrelease.chips import ChipProfile
from flagrelease.config import ReleaseConfig
from flagrelease.constants import REPO_ROOT, templates_dir
from flagrelease.errors import ConfigError
from flagrelease.layout import BundleLayout

__all__ = [
    "CONF_DIR",
    "DEFAULT_FLAG_GEMS_VERSION",
    "GEMS_EXCLUDE_ENV",
    "USE_FLAGGEMS_ENV",
    "ImagePlan",
    "base_image",
    "before_start",
    "engine_args",
    "image_labels",
    "image_plan",
    "image_reference",
    "model_slug",
    "render_dockerfile",
    "render_image_context",
    "render_release",
    "render_serve_configs",
    "serve_command",
    "serve_env",
    "source_commit",
    "vllm_args",
]

#: FlagGems release installed when the config pins none (``image.flag_gems_version``).
DEFAULT_FLAG_GEMS_VERSION = "5.0.2"
#: The switch FlagScale and the serving plugin read.
USE_FLAGGEMS_ENV = "USE_FLAGGEMS"
#: Comma-separated FlagGems operators the serving plugin leaves off.
GEMS_EXCLUDE_ENV = "FLAGRELEASE_GEMS_EXCLUDE"
#: Where the image keeps the FlagScale configs of its release.
CONF_DIR = "/opt/flagrelease/conf"
_BUILD_DIR = "/opt/flagrelease/build"
_INSTALL_SCRIPT = f"{_BUILD_DIR}/install.py"
_USER_NAME = "flagrelease"
_USER_ID = 10001

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUIREMENT = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?"
    r"(?:(?:==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!_-]+(?:,(?:==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!_-]+)*)?$"
)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")
_URL = re.compile(r"^https?://[A-Za-z0-9._~:/?#\[\]@!&()*+,;=%-]+$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:.]+|\[[0-9A-Fa-f:.]+\])$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


# -- checks --------------------------------------------------------------------------------
def _bad(field: str, value: object, why: str, fix: str, *, cfg: ReleaseConfig | None = None) -> ConfigError:
    return ConfigError(
        f"{field}: {value!r} {why}; {fix}",
        errors=[(field, why)],
        model=cfg.name if cfg else None,
        chip=cfg.chip if cfg else None,
    )


def _line(value: object, field: str, *, cfg: ReleaseConfig | None = None) -> str:
    """``value`` as one line of text, or a ConfigError naming ``field``."""
    text = str(value)
    if _CONTROL.search(text):
        raise _bad(field, text, "holds a newline or control character", "give it as one plain line", cfg=cfg)
    return text


def _env_items(env: Mapping[str, str], where: str, *, cfg: ReleaseConfig | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in env.items():
        if not _ENV_NAME.match(str(key)):
            raise _bad(
                f"{where}.{key}",
                key,
                "is not an environment variable name",
                "use letters, digits and '_', not starting with a digit",
                cfg=cfg,
            )
        out[str(key)] = _line(value, f"{where}.{key}", cfg=cfg)
    return out


# -- quoting filters -----------------------------------------------------------------------
def _dq(value: object) -> str:
    """A Dockerfile double-quoted word: no variable expansion, no word splitting."""
    text = _line(value, "Dockerfile value")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _dq_pairs(items: Iterable[tuple[str, object]], quote_keys: bool = False) -> list[str]:
    """``key="value"`` words for LABEL (keys quoted too) and ENV (keys are checked names)."""
    return [f"{_dq(k) if quote_keys else k}={_dq(v)}" for k, v in items]


def _exec_form(argv: Iterable[object]) -> str:
    """A Dockerfile exec-form (JSON array) command: no shell and no variable expansion."""
    return json.dumps([_line(a, "Dockerfile argument") for a in argv])


def _yaml_inline(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 30, sort_keys=False)
    text = text.rstrip("\n")
    return text[: -len("\n...")] if text.endswith("\n...") else text


def _yaml_block(value: object, indent: int) -> str:
    text = yaml.safe_dump(value, default_flow_style=False, allow_unicode=True, width=1 << 30, sort_keys=False)
    pad = " " * indent
    return "\n".join(pad + line for line in text.rstrip("\n").splitlines())


def _shell_lines(argv: list[str]) -> str:
    """``argv`` shell-quoted, one option (with its values) per continued line."""
    words = [shlex.quote(_line(a, "command argument")) for a in argv]
    lines: list[list[str]] = [[]]
    for raw, word in zip(argv, words, strict=True):
        if raw.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(word)
    return " \\\n    ".join(" ".join(line) for line in lines)


@lru_cache(maxsize=4)
def _environment(root: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(root / "docker"), str(root / "flagscale")]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        dq=_dq,
        dq_pairs=_dq_pairs,
        exec_form=_exec_form,
        yaml=_yaml_inline,
        yaml_block=_yaml_block,
        shquote=lambda v: shlex.quote(_line(v, "shell value")),
        shell_lines=_shell_lines,
    )
    return env


def _render(name: str, **context: Any) -> str:
    try:
        template = _environment(templates_dir()).get_template(name)
    except jinja2.TemplateNotFound as err:
        folder = templates_dir()
        known = sorted(p.name for p in (folder / "docker").glob("*.j2")) + sorted(
            p.name for p in (folder / "flagscale").glob("*.j2")
        )
        raise ConfigError(
            f"template {name!r} not found under {folder}; templates: {', '.join(known)}",
            errors=[("template", name)],
        ) from err
    try:
        return template.render(flagrelease_version=__version__, **context)
    except jinja2.UndefinedError as err:
        raise ConfigError(f"template {name}: {err.message}; the template uses a value render.py does not give") from err


# -- values derived from the config ----------------------------------------------------------
def model_slug(cfg: ReleaseConfig) -> str:
    """The FlagScale name of the release's model, e.g. ``deepseek_r1``, safe as a file name."""
    slug = re.sub(r"[^a-z0-9]+", "_", cfg.model.name.lower()).strip("_")
    return slug or re.sub(r"[^a-z0-9]+", "_", cfg.name).strip("_")


def base_image(cfg: ReleaseConfig) -> ImageReference:
    """The image the Dockerfile starts FROM: ``image.base``, else the chip profile's."""
    if cfg.image.base:
        return parse_reference(cfg.image.base, what="image.base")
    return parse_reference(cfg.chip_profile.base_image, what=f"chip profile {cfg.chip}: base_image")


def image_reference(cfg: ReleaseConfig) -> ImageReference:
    """The image the release builds: ``[image.registry/]image.name:image.tag``."""
    name, tag = cfg.image.name, cfg.image.tag
    prefix = ""
    if cfg.image.registry:
        host, namespace = parse_registry(cfg.image.registry)
        prefix = "/".join(p for p in (host, namespace) if p) + "/"
    return parse_reference(f"{prefix}{name}:{tag}", what="image.registry/name:tag")


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
        raise _bad("image.flag_gems_version", version, "is not a version", "give e.g. 5.0.2 (or 'vendor')", cfg=cfg)
    return f"flag-gems=={version}"


def _vllm_requirement(cfg: ReleaseConfig) -> str | None:
    package = cfg.chip_profile.vllm_package
    if package == "vendor":
        if cfg.image.vllm_version:
            raise _bad(
                "image.vllm_version",
                cfg.image.vllm_version,
                f"cannot apply: chip {cfg.chip} ships the vendor's vLLM build in its base image",
                "remove image.vllm_version",
                cfg=cfg,
            )
        return None
    if cfg.image.vllm_version:
        if not _VERSION.match(cfg.image.vllm_version):
            raise _bad("image.vllm_version", cfg.image.vllm_version, "is not a version", "give e.g. 0.8.5", cfg=cfg)
        package = re.split(r"[\[<>=!~]", package, maxsplit=1)[0] + f"=={cfg.image.vllm_version}"
    if not _REQUIREMENT.match(package):
        raise _bad(
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
        raise _bad(
            "image.pip_index_url",
            url,
            "is not an http(s) URL without spaces or quotes",
            "give e.g. https://pypi.example.com/simple",
            cfg=cfg,
        )
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise _bad(
            "image.pip_index_url",
            "<redacted>",
            "holds credentials, which would be baked into the image",
            "drop user:password from the URL and give the index's credentials to the build another way",
            cfg=cfg,
        )
    return url


def _host(cfg: ReleaseConfig) -> str:
    host = cfg.serve.engine_args.host
    if not _HOST.match(host):
        raise _bad("serve.engine_args.host", host, "is not a host name or address", "give e.g. 127.0.0.1", cfg=cfg)
    return host


def _model_path(cfg: ReleaseConfig, model_path: str | None) -> str:
    if model_path is None:
        model_path = cfg.serve.model_dir or str(BundleLayout.for_release(cfg).converted_dir)
    if not model_path:
        raise _bad("serve.model_dir", model_path, "is empty", "give the folder the weights are served from", cfg=cfg)
    return _line(model_path, "model path", cfg=cfg)


def engine_args(cfg: ReleaseConfig, *, model_path: str | None = None) -> dict[str, Any]:
    """FlagScale's ``engine_args``: the model path, served name, then the config's arguments.

    Args:
        cfg: the release.
        model_path: the weights on the serving host (default: ``serve.model_dir``, else the
            release's converted folder).

    Returns:
        An ordered mapping of underscore names to values (None dropped).

    Raises:
        ConfigError: a value holds a newline or the host is not a host.
    """
    _host(cfg)
    args: dict[str, Any] = {
        "model": _model_path(cfg, model_path),
        "served_model_name": _line(cfg.served_model_name, "serve.engine_args.served_model_name", cfg=cfg),
    }
    for key, value in cfg.serve.engine_args.as_dict().items():
        if key == "served_model_name":
            continue
        for item in value if isinstance(value, list) else [value]:
            _line(item, f"serve.engine_args.{key}", cfg=cfg)
        args[key] = value
    return args


def vllm_args(args: Mapping[str, Any]) -> list[str]:
    """vLLM command-line options for ``args`` (``model`` excluded).

    ``True`` gives ``--flag``, ``False`` gives ``--no-flag`` (vLLM's boolean options are
    ``BooleanOptionalAction``), a list gives ``--flag v1 v2`` (vLLM's list options take
    ``nargs="+"``), ``None`` and empty lists are left out.
    """
    out: list[str] = []
    for key, value in args.items():
        if key == "model" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            if value:
                out += [flag, *(_scalar(v) for v in value)]
        else:
            out += [flag, _scalar(value)]
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def serve_command(cfg: ReleaseConfig, *, model_path: str, python: str | None = None) -> list[str]:
    """The argv that serves the release with vLLM's OpenAI server.

    Args:
        cfg: the release.
        model_path: the weights folder.
        python: the interpreter (default: the chip profile's ``python``).

    Returns:
        ``[python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, ...]``.
    """
    args = engine_args(cfg, model_path=model_path)
    return [
        python or cfg.chip_profile.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args["model"],
        *vllm_args(args),
    ]


def serve_env(cfg: ReleaseConfig, *, flaggems: bool | None = None) -> dict[str, str]:
    """The serving environment: chip profile env, ``serve.envs``, then the FlagGems switches.

    Args:
        cfg: the release.
        flaggems: FlagGems on or off (default: ``serve.flaggems.enabled``).

    Returns:
        Variable name to value, in that order; ``FLAGRELEASE_GEMS_EXCLUDE`` is set only
        when FlagGems is on and operators are excluded.
    """
    on = cfg.serve.flaggems.enabled if flaggems is None else flaggems
    env = _env_items(cfg.chip_profile.env, f"chip profile {cfg.chip}: env", cfg=cfg)
    env.update(_env_items(cfg.serve.envs, "serve.envs", cfg=cfg))
    env[USE_FLAGGEMS_ENV] = "true" if on else "false"
    if on and cfg.serve.flaggems.excluded_ops:
        env[GEMS_EXCLUDE_ENV] = ",".join(cfg.serve.flaggems.excluded_ops)
    return env


def before_start(cfg: ReleaseConfig) -> str:
    """FlagScale's ``cmds.before_start``: the config's commands and the FlagGems exports, joined by `` && ``."""
    parts = [_line(c, "serve.before_start", cfg=cfg) for c in cfg.serve.before_start]
    parts.append(f"export {USE_FLAGGEMS_ENV}={'true' if cfg.serve.flaggems.enabled else 'false'}")
    if cfg.serve.flaggems.enabled and cfg.serve.flaggems.excluded_ops:
        parts.append(f"export {GEMS_EXCLUDE_ENV}={shlex.quote(','.join(cfg.serve.flaggems.excluded_ops))}")
    return " && ".join(parts)


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
    return {k: _line(v, f"label {k}", cfg=cfg) for k, v in labels.items()}


# -- the image -------------------------------------------------------------------------------
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


def image_plan(cfg: ReleaseConfig, *, model_path: str | None = None, commit: str | None = None) -> ImagePlan:
    """Check every value the Dockerfile of ``cfg`` uses and gather them.

    Raises:
        ConfigError: a value is invalid; the message names the field and the fix.
    """
    chip = cfg.chip_profile
    path = _model_path(cfg, model_path)
    return ImagePlan(
        family=_family(chip),
        template=chip.dockerfile_template,
        base=base_image(cfg),
        ref=image_reference(cfg),
        vllm_requirement=_vllm_requirement(cfg),
        gems_requirement=_flag_gems_requirement(cfg),
        labels=image_labels(cfg, commit=commit),
        env=serve_env(cfg),
        serve_argv=serve_command(cfg, model_path=path),
        port=cfg.serve.engine_args.port,
        non_root=chip.non_root,
    )


def _healthcheck(cfg: ReleaseConfig) -> list[str]:
    host = _host(cfg)
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
    from flagrelease._wheel import wheel_name

    plan = image_plan(cfg, model_path=model_path, commit=commit if commit is not None else source_commit())
    chip = cfg.chip_profile
    slug = model_slug(cfg)
    conf_files = [f"config_{slug}.yaml", "hostfile.txt", "vllm_serve.sh", f"{CONF_DIR}/"]
    return _render(
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


# -- FlagScale configs -----------------------------------------------------------------------
def _yaml_env_value(value: str) -> str | int:
    """Digits-only values as integers, as FlagScale's examples write them."""
    return int(value) if value.isdigit() and str(int(value)) == value else value


def _check_yaml(text: str, name: str, expect: dict[tuple[Any, ...], Any]) -> None:
    data = yaml.safe_load(text)
    for path, want in expect.items():
        node = data
        for key in path:
            node = node[key]
        if node != want:
            raise ConfigError(
                f"{name}: rendered {'.'.join(map(str, path))} = {node!r}, expected {want!r}; "
                "the template does not round-trip this value (report it as a flagrelease bug)"
            )


def _serve_files(cfg: ReleaseConfig, *, model_path: str | None) -> dict[str, str]:
    chip = cfg.chip_profile
    slug = model_slug(cfg)
    args = engine_args(cfg, model_path=model_path)
    common = {"release": cfg.name, "slug": slug, "model_name": cfg.model.name, "chip_display": chip.display_name}
    runner: dict[str, Any] = {}
    if cfg.serve.nodes:
        runner["hostfile"] = f"examples/{slug}/conf/hostfile.txt"
        if cfg.serve.container_name:
            runner["docker"] = cfg.serve.container_name
    runner["ssh_port"] = 22
    envs = {k: _yaml_env_value(v) for k, v in _env_items(cfg.serve.envs, "serve.envs", cfg=cfg).items()}
    start = before_start(cfg)
    experiment = _render("experiment.yaml.j2", runner=runner, envs=envs, before_start=start, **common)
    _check_yaml(
        experiment,
        "experiment config",
        {
            ("defaults", 1, "serve"): slug,
            ("experiment", "envs"): envs,
            ("experiment", "runner"): runner,
            ("experiment", "cmds", "before_start"): start,
        },
    )
    serve = _render("serve.yaml.j2", serve_id=cfg.serve.serve_id, engine=cfg.serve.engine, engine_args=args, **common)
    _check_yaml(serve, "serve config", {(0, "engine_args"): args, (0, "serve_id"): cfg.serve.serve_id})
    hostfile = _render("hostfile.txt.j2", nodes=[n.hostfile_line() for n in cfg.nodes])
    exports = list(serve_env(cfg).items())
    argv = ["vllm", "serve", args["model"], *vllm_args(args)]
    script = _render(
        "vllm_serve.sh.j2", exports=exports, before_start=list(cfg.serve.before_start), argv=argv, **common
    )
    return {
        f"config_{slug}.yaml": experiment,
        f"serve/{slug}.yaml": serve,
        "hostfile.txt": hostfile,
        "vllm_serve.sh": script,
    }


def render_serve_configs(cfg: ReleaseConfig, *, out_dir: Path, model_path: str | None = None) -> list[Path]:
    """Write the FlagScale configs and the direct vLLM command of ``cfg`` into ``out_dir``.

    Files: ``config_<model>.yaml``, ``serve/<model>.yaml``, ``hostfile.txt``, ``vllm_serve.sh``,
    each written atomically.

    Args:
        cfg: the release.
        out_dir: the folder (FlagScale's ``conf/``).
        model_path: the weights folder on the serving host (default as :func:`engine_args`).

    Returns:
        The files written.

    Raises:
        ConfigError: a config value is invalid.
    """
    out_dir = Path(out_dir)
    written = []
    for rel, text in _serve_files(cfg, model_path=model_path).items():
        path = atomic_write_text(out_dir / rel, text)
        if rel.endswith(".sh"):
            path.chmod(0o755)
        written.append(path)
    return written


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
    from flagrelease import _image_install
    from flagrelease._wheel import build_self_wheel

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
    wheels.mkdir(parents=True, exist_ok=True)
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
    _serve_files(cfg, model_path=model_path)
    render_dockerfile(cfg, model_path=model_path, commit=commit)
    written = render_serve_configs(cfg, out_dir=out_dir, model_path=model_path)
    written += render_image_context(cfg, out_dir=out_dir, model_path=model_path, commit=commit, wheels_dir=wheels_dir)
    return written
