"""Rendering for serving, shared by the image, deploy and card stages: quoting, engine args, FlagScale configs.

This module (with :mod:`flagrelease.image._dockerfile` for Dockerfiles) is the only place
that renders ``templates/``, with Jinja2's ``StrictUndefined``.  Every value that comes
from a release config or a chip profile is checked before it reaches a template (image
references against the OCI grammar, environment names, one-line values, hosts) and is
then quoted for where it lands: Dockerfile words are double-quoted with ``$``, ``"`` and
``\\`` escaped, Dockerfile commands are JSON exec-form arrays, shell words go through
:func:`shlex.quote` (:func:`shell_word`, also for the card's code blocks), YAML values
through a real YAML dumper (and are read back to prove they round-trip) with OmegaConf's
``${`` escaped (FlagScale reads its configs with Hydra), Markdown table cells through
:func:`markdown_cell` and inline code through :func:`markdown_code`.

Secrets are references (``serve.envs: {HF_TOKEN: {secret: HF_TOKEN}}``), never values:
:func:`serve_env` holds the literal variables only, :func:`serve_secret_refs` names the
secret ones, and :func:`serve_secrets` resolves them at run time for a process's
environment.  Rendered files read them where they run: ``vllm_serve.sh`` from
``$NAME``, the FlagScale config through ``${oc.env:NAME}``.

The FlagScale files of a release (:func:`render_serve_configs`)::

    config_<model>.yaml     FlagScale experiment config
    serve/<model>.yaml      FlagScale serve config (engine_args)
    hostfile.txt            one ``ip slots=N type=gpu`` line per node
    vllm_serve.sh           the same serve as a direct ``vllm serve`` command
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from flagrelease import __version__
from flagrelease._atomic import atomic_write_text
from flagrelease._oci import ImageReference, parse_reference, parse_registry
from flagrelease._redact import register_secret
from flagrelease.config import ReleaseConfig, SecretRef
from flagrelease.constants import templates_dir
from flagrelease.errors import ConfigError
from flagrelease.layout import BundleLayout
from flagrelease.quoting import (
    bad_value,
    markdown_cell,
    markdown_code,
    markdown_text,
    omegaconf_escape,
    one_line,
    shell_join,
    shell_word,
)
from flagrelease.quoting import dockerfile_exec_form as _exec_form
from flagrelease.quoting import dockerfile_pairs as _dq_pairs
from flagrelease.quoting import dockerfile_word as _dq
from flagrelease.quoting import shell_lines as _shell_lines
from flagrelease.quoting import yaml_block as _yaml_block
from flagrelease.quoting import yaml_inline as _yaml_inline

__all__ = [
    "CONF_DIR",
    "GEMS_EXCLUDE_ENV",
    "RAY_PORT",
    "USE_FLAGGEMS_ENV",
    "bad_value",
    "before_start",
    "engine_args",
    "image_reference",
    "markdown_cell",
    "markdown_code",
    "markdown_text",
    "model_slug",
    "omegaconf_escape",
    "one_line",
    "render_serve_configs",
    "render_template",
    "serve_command",
    "serve_env",
    "serve_files",
    "serve_host",
    "serve_secret_refs",
    "serve_secrets",
    "served_model_path",
    "shell_join",
    "shell_word",
    "vllm_args",
]

#: The switch FlagScale and the serving plugin read.
USE_FLAGGEMS_ENV = "USE_FLAGGEMS"
#: Comma-separated FlagGems operators the serving plugin leaves off.
GEMS_EXCLUDE_ENV = "FLAGRELEASE_GEMS_EXCLUDE"
#: Where the image keeps the FlagScale configs of its release.
CONF_DIR = "/opt/flagrelease/conf"

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: The Ray head's port of a multi-node serve (FlagScale's default).
RAY_PORT = 6379
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:.]+|\[[0-9A-Fa-f:.]+\])$")


# -- checks --------------------------------------------------------------------------------
def _env_items(env: Mapping[str, object], where: str, *, cfg: ReleaseConfig | None = None) -> dict[str, str]:
    """The literal variables of ``env``, names and values checked; ``{secret: NAME}`` entries left out."""
    out: dict[str, str] = {}
    for key, value in env.items():
        if isinstance(value, SecretRef):
            continue
        if not _ENV_NAME.match(str(key)):
            raise bad_value(
                f"{where}.{key}",
                key,
                "is not an environment variable name",
                "use letters, digits and '_', not starting with a digit",
                cfg=cfg,
            )
        out[str(key)] = one_line(value, f"{where}.{key}", cfg=cfg)
    return out


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
        shquote=shell_word,
        shell_lines=_shell_lines,
        comment=lambda v: one_line(v, "comment text"),
    )
    return env


def render_template(name: str, **context: Any) -> str:
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


def image_reference(cfg: ReleaseConfig) -> ImageReference:
    """The image the release builds: ``[image.registry/]image.name:image.tag``."""
    name, tag = cfg.image.name, cfg.image.tag
    prefix = ""
    if cfg.image.registry:
        host, namespace = parse_registry(cfg.image.registry)
        prefix = "/".join(p for p in (host, namespace) if p) + "/"
    return parse_reference(f"{prefix}{name}:{tag}", what="image.registry/name:tag")


def serve_host(cfg: ReleaseConfig) -> str:
    host = cfg.serve.engine_args.host
    if not _HOST.match(host):
        raise bad_value("serve.engine_args.host", host, "is not a host name or address", "give e.g. 127.0.0.1", cfg=cfg)
    return host


def served_model_path(cfg: ReleaseConfig, model_path: str | None) -> str:
    if model_path is None:
        model_path = cfg.serve.model_dir or str(BundleLayout.for_release(cfg).converted_dir)
    if not model_path:
        raise bad_value(
            "serve.model_dir", model_path, "is empty", "give the folder the weights are served from", cfg=cfg
        )
    return one_line(model_path, "model path", cfg=cfg)


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
    serve_host(cfg)
    args: dict[str, Any] = {
        "model": served_model_path(cfg, model_path),
        "served_model_name": one_line(cfg.served_model_name, "serve.engine_args.served_model_name", cfg=cfg),
    }
    for key, value in cfg.serve.engine_args.as_dict().items():
        if key == "served_model_name":
            continue
        for item in value if isinstance(value, list) else [value]:
            one_line(item, f"serve.engine_args.{key}", cfg=cfg)
        args[key] = value
    if len(cfg.nodes) > 1 and args.get("host") in _LOOPBACK:
        # Served across nodes: the head's server must be reachable from the other nodes.
        args["host"] = "0.0.0.0"
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
        when FlagGems is on and operators are excluded.  Secrets (``{secret: NAME}``) are
        not here: see :func:`serve_secret_refs` and :func:`serve_secrets`.
    """
    on = cfg.serve.flaggems.enabled if flaggems is None else flaggems
    env = _env_items(cfg.chip_profile.env, f"chip profile {cfg.chip}: env", cfg=cfg)
    env.update(_env_items(cfg.serve.envs, "serve.envs", cfg=cfg))
    env[USE_FLAGGEMS_ENV] = "true" if on else "false"
    if on and cfg.serve.flaggems.excluded_ops:
        env[GEMS_EXCLUDE_ENV] = ",".join(cfg.serve.flaggems.excluded_ops)
    return env


def serve_secret_refs(cfg: ReleaseConfig) -> dict[str, str]:
    """The serving variables given by reference: variable name -> secret name (``{secret: NAME}``)."""
    return {k: v.secret for k, v in cfg.serve.envs.items() if isinstance(v, SecretRef)}


def serve_secrets(cfg: ReleaseConfig, *, lookup: Callable[[str], str] | None = None) -> dict[str, str]:
    """The serving variables given by reference, resolved: variable name -> value.

    For a process's environment only: never write the result to a file or a log.  Each
    value is registered for redaction.

    Args:
        cfg: the release.
        lookup: resolves a secret name (default: :func:`flagrelease.secrets.resolve_secret`,
            the environment then any registered resolver, e.g. Prefect Secret blocks).

    Raises:
        ConfigError: a secret is not set anywhere; the message says how to set it.
    """
    from flagrelease.secrets import resolve_secret

    resolve = lookup or resolve_secret
    out: dict[str, str] = {}
    for var, name in serve_secret_refs(cfg).items():
        value = resolve(name)
        register_secret(value)
        out[var] = value
    return out


def before_start(cfg: ReleaseConfig) -> str:
    """FlagScale's ``cmds.before_start``: the config's commands and the FlagGems exports, joined by `` && ``."""
    parts = [one_line(c, "serve.before_start", cfg=cfg) for c in cfg.serve.before_start]
    if cfg.serve.flaggems.enabled and cfg.serve.flaggems.clean_caches:
        from flagrelease.runtime import CLEAN_KERNEL_CACHES_SHELL

        parts.append(CLEAN_KERNEL_CACHES_SHELL)
    parts.append(f"export {USE_FLAGGEMS_ENV}={'true' if cfg.serve.flaggems.enabled else 'false'}")
    if cfg.serve.flaggems.enabled and cfg.serve.flaggems.excluded_ops:
        parts.append(f"export {GEMS_EXCLUDE_ENV}={shlex.quote(','.join(cfg.serve.flaggems.excluded_ops))}")
    return " && ".join(parts)


# -- the image -------------------------------------------------------------------------------


# -- FlagScale configs -----------------------------------------------------------------------
def _yaml_env_value(value: str) -> str | int:
    """Digits-only values as integers, as FlagScale's examples write them."""
    return int(value) if value.isdigit() and str(int(value)) == value else value


_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_yaml(text: str, name: str, expect: dict[tuple[Any, ...], Any]) -> None:
    data = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader
    for path, want in expect.items():
        node = data
        for key in path:
            node = node[key]
        if node != want:
            raise ConfigError(
                f"{name}: rendered {'.'.join(map(str, path))} = {node!r}, expected {want!r}; "
                "the template does not round-trip this value (report it as a flagrelease bug)"
            )


def serve_files(cfg: ReleaseConfig, *, model_path: str | None) -> dict[str, str]:
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
    envs: dict[str, Any] = {
        k: _yaml_env_value(omegaconf_escape(v)) for k, v in _env_items(cfg.serve.envs, "serve.envs", cfg=cfg).items()
    }
    secrets = serve_secret_refs(cfg)
    envs.update({var: f"${{oc.env:{name}}}" for var, name in secrets.items()})  # read where FlagScale runs
    start = omegaconf_escape(before_start(cfg))
    runner = omegaconf_escape(runner)
    experiment = render_template("experiment.yaml.j2", runner=runner, envs=envs, before_start=start, **common)
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
    yaml_args = omegaconf_escape(args)
    serve = render_template(
        "serve.yaml.j2", serve_id=cfg.serve.serve_id, engine=cfg.serve.engine, engine_args=yaml_args, **common
    )
    _check_yaml(serve, "serve config", {(0, "engine_args"): yaml_args, (0, "serve_id"): cfg.serve.serve_id})
    hostfile = render_template("hostfile.txt.j2", nodes=[n.hostfile_line() for n in cfg.nodes])
    exports = list(serve_env(cfg).items())
    argv = ["vllm", "serve", args["model"], *vllm_args(args)]
    multinode = len(cfg.nodes) > 1
    if multinode and "distributed_executor_backend" not in args:
        argv += ["--distributed-executor-backend", "ray"]
    script = render_template(
        "vllm_serve.sh.j2",
        exports=exports,
        secret_exports=list(secrets.items()),
        before_start=list(cfg.serve.before_start),
        argv=argv,
        multinode=multinode,
        env_keys=[k for k, _ in exports] + list(secrets),
        container=cfg.serve.container_name,
        ray_port=RAY_PORT,
        ray_resource="--num-cpus" if chip.accelerator.value == "cpu" else "--num-gpus",
        ssh_port=22,
        **common,
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
    for rel, text in serve_files(cfg, model_path=model_path).items():
        path = atomic_write_text(out_dir / rel, text)
        if rel.endswith(".sh"):
            path.chmod(0o755)
        written.append(path)
    return written
