"""The "How to Run" part of the card: where to download, what to pull, how to start and query the server.

Two forms, chosen by what the release did:

- **Recorded** (the deploy stage ran): the steps run in the downloaded bundle's folder.
  The server command is the one the deploy stage executed (the manifest's
  ``serve.executed``, already bundle-relative), started in the release image by digest;
  the request is one the model answered during evaluation.
- **From the config** (no deploy stage ran, e.g. ``flagrelease card``): the published
  cards' FlagScale steps, rendered from the release config and marked as not run here.

Values that are not public (a local publish folder) are documented placeholders.
"""

from __future__ import annotations

import itertools
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flagrelease._oci import parse_reference
from flagrelease._redact import redact
from flagrelease.card._record import MEANINGLESS_ARGS, model_mount
from flagrelease.card._text import LANG, human_size, md_table
from flagrelease.config import ModelSource, ReleaseConfig
from flagrelease.constants import hf_endpoint, modelscope_endpoint
from flagrelease.errors import ConfigError

__all__ = [
    "PUBLISHED_DIR",
    "SOURCE_DIR",
    "docker_run",
    "download_table",
    "flaggems_commands",
    "image_note",
    "placeholders_in",
    "prebuilt",
    "pull_reference",
    "recorded_steps",
    "serve_configs",
    "weights_commands",
]

#: Placeholder of a local publish folder (not reachable by anyone but the machine that made the release).
PUBLISHED_DIR = "<PUBLISHED_DIR>"
#: Placeholder of a local source-weights folder.
SOURCE_DIR = "<MODEL_SOURCE>"
_PLACEHOLDER_TEXT = {
    PUBLISHED_DIR: "the folder this bundle was published to (`publish.local_dir`, a local folder)",
    SOURCE_DIR: "the folder holding the source weights (`model.path`, a local folder)",
}
_PWD = "$PWD"
_HOST_NET = ("--net=host", "--network=host")


# -- shell words ----------------------------------------------------------------------------
def _word(word: str) -> str:
    """One shell word; a leading ``$PWD`` stays expandable, everything else is quoted."""
    if word.startswith(_PWD):
        rest = word[len(_PWD) :]
        return f'"{_PWD}"' + (shlex.quote(rest) if rest else "")
    if word in _PLACEHOLDER_TEXT:
        return word
    return shlex.quote(word)


def _join(words: Sequence[str]) -> str:
    return " ".join(_word(w) for w in words)


def _grouped(words: Sequence[str], *, short: bool = True) -> list[str]:
    """``words`` split before each option (``--long`` only, unless ``short``), one option and its values a line."""
    groups: list[list[str]] = [[]]
    for w in words:
        if w.startswith("--" if not short else "-") and groups[-1]:
            groups.append([])
        groups[-1].append(w)
    return [_join(g) for g in groups if g]


def _continued(parts: Sequence[str]) -> str:
    return " \\\n    ".join(parts)


def _host_network(flags: Sequence[str]) -> bool:
    return any(f in _HOST_NET for f in flags) or any(
        a in ("--net", "--network") and b == "host" for a, b in itertools.pairwise(flags)
    )


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, w in enumerate(argv):
        if w == name and i + 1 < len(argv):
            return argv[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def _with_option(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    for i, w in enumerate(out):
        if w == name and i + 1 < len(out):
            out[i + 1] = value
            return out
        if w.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    return [*out, name, value]


# -- the image -------------------------------------------------------------------------------
def pull_reference(manifest: Mapping[str, Any]) -> str | None:
    """``repository@sha256:...`` of the pushed image, or None when it was not pushed."""
    image = manifest["image"]
    if not image["digest"]:
        return None
    try:
        ref = parse_reference(str(image["ref"]))
    except ConfigError:
        return None
    return f"{ref.repository}@{image['digest']}"


def prebuilt(manifest: Mapping[str, Any]) -> bool:
    """Whether users can pull the image: only when this release pushed it and recorded its digest."""
    return bool(manifest["image"]["pushed"] and manifest["image"]["digest"])


def image_note(manifest: Mapping[str, Any]) -> str:
    """How to get the image when it cannot be pulled."""
    image = manifest["image"]
    if prebuilt(manifest):
        return ""
    if image["context"]:
        return (
            f"This release did not push its image; build it from this bundle's `{image['context']}` folder: "
            f"`docker build -t {shlex.quote(str(image['ref']))} {shlex.quote(str(image['context']))}`."
        )
    if image["built"] is None:
        return (
            "No image stage ran with this card, so the image is not known to exist; "
            "build it with `flagrelease run CONFIG --stages image`."
        )
    return "This release did not push its image, and the bundle has no build context for it."


def _image_for_run(manifest: Mapping[str, Any]) -> str:
    return pull_reference(manifest) or str(manifest["image"]["ref"])


# -- the seed flow (from the config) -----------------------------------------------------------
def _model_dir(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    """The weights folder on the serving host: the serve config's ``model``, else a folder named after the bundle."""
    return manifest["serve"]["model_dir"] or cfg.serve.model_dir or f"/models/{manifest['release']['bundle_name']}"


def _download(cfg: ReleaseConfig, dest: str) -> list[str] | None:
    """Commands that download the published bundle into ``dest``, or None when it is not published."""
    pub = cfg.publish
    if pub.modelscope_repo:
        repo = shlex.quote(pub.modelscope_repo)
        return ["pip install modelscope", f"modelscope download --model {repo} --local_dir {dest}"]
    if pub.hf_repo:
        return ["pip install -U huggingface_hub", f"hf download {shlex.quote(pub.hf_repo)} --local-dir {dest}"]
    if pub.s3:
        prefix = f"/{pub.s3.prefix}" if pub.s3.prefix else ""
        endpoint = f" --endpoint-url {shlex.quote(pub.s3.endpoint_url)}" if pub.s3.endpoint_url else ""
        url = shlex.quote(f"s3://{pub.s3.bucket}{prefix}")
        return [f"aws s3 cp --recursive {url} {dest}{endpoint}"]
    if pub.local_dir:
        return [f"cp -r {PUBLISHED_DIR} {dest}"]
    return None


def _source_download(cfg: ReleaseConfig, manifest: Mapping[str, Any], dest: str) -> list[str]:
    m = cfg.model
    rev = manifest["model"]["revision"]
    revision = f" --revision {shlex.quote(rev)}" if rev and m.source is not ModelSource.LOCAL else ""
    repo = shlex.quote(m.repo_id)
    if m.source is ModelSource.MODELSCOPE:
        return ["pip install modelscope", f"modelscope download --model {repo}{revision} --local_dir {dest}"]
    if m.source is ModelSource.HF:
        return ["pip install -U huggingface_hub", f"hf download {repo}{revision} --local-dir {dest}"]
    return [f"cp -r {SOURCE_DIR} {dest}"]


def weights_commands(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> list[str]:
    """The weights download of the config-derived steps, into the serving host's model folder."""
    local = shlex.quote(_model_dir(cfg, manifest))
    if manifest["weights"]["published"]:
        found = _download(cfg, local)
        if found:
            return found
    return _source_download(cfg, manifest, local)


def docker_run(cfg: ReleaseConfig, manifest: Mapping[str, Any], *, recorded: bool) -> str:
    """The FlagScale steps' ``docker run``: a shell in the image with the weights mounted."""
    chip = cfg.chip_profile
    if recorded:
        source, target = _PWD + ("" if manifest["weights"]["published"] else "/weights"), model_mount(cfg)
    else:
        source = target = _model_dir(cfg, manifest)
    argv = [
        "docker", "run", "-itd", "--name", manifest["serve"]["container_name"], *chip.docker_run_flags,
        "-v", f"{source}:{target}", _image_for_run(manifest) if recorded else manifest["image"]["ref"], "/bin/bash",
    ]  # fmt: skip
    return _join(argv)


def flaggems_commands(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> list[str]:
    """Install FlagGems as the release's Dockerfile does (without dependencies on vendor images)."""
    version = manifest["flaggems"]["configured_version"]
    lines = ["git clone https://github.com/FlagOpen/FlagGems.git", "cd FlagGems"]
    if version and version not in ("vendor", "none"):
        tag = version if str(version).startswith("v") else f"v{version}"
        lines.append(f"git checkout {shlex.quote(tag)}")
    if manifest["flaggems"]["no_deps"]:
        lines.append("# without dependencies: the image's vendor build of torch must stay as it is")
        lines.append("pip install --no-deps .")
    else:
        lines.append("pip install .")
    return [*lines, "cd ../"]


def serve_configs(cfg: ReleaseConfig, bundle_dir: Path, manifest: Mapping[str, Any]) -> list[dict[str, str]]:
    """The FlagScale configs to show: experiment config, serve config, and the hostfile when nodes are listed."""
    picked: list[tuple[int, str]] = []
    for f in manifest["serve"]["files"]:
        rel = str(f["path"]).removeprefix("serve/")
        name = Path(rel).name
        if name.startswith("config_") and name.endswith((".yaml", ".yml")):
            picked.append((0, rel))
        elif name.endswith((".yaml", ".yml")):
            picked.append((1, rel))
        elif name.startswith("hostfile") and cfg.serve.nodes:
            picked.append((2, rel))
    meaningless = MEANINGLESS_ARGS.get(cfg.chip_profile.accelerator.value, frozenset())
    out = []
    for _, rel in sorted(picked):
        path = bundle_dir / "serve" / rel
        if not path.is_file():
            continue
        content = redact(path.read_text(encoding="utf-8")).rstrip("\n")
        if meaningless and rel.startswith("serve/"):
            content = "\n".join(
                line for line in content.splitlines() if line.strip().split(":", 1)[0] not in meaningless
            )
        out.append({"path": rel, "lang": LANG.get(Path(rel).suffix, "text"), "content": content})
    return out


# -- the recorded flow ---------------------------------------------------------------------------
def _env_words(env: Mapping[str, Any], *, docker: bool) -> list[str]:
    out: list[str] = []
    for name, value in env.items():
        secret = isinstance(value, dict)
        if docker:
            out += ["-e", name if secret else f"{name}={value}"]
        else:  # words of a shell line as they are: quote the value here, leave $NAME of a secret expandable
            out.append(f'{name}="${{{name}}}"' if secret else f"{name}={shlex.quote(str(value))}")
    return out


def _docker_words(
    cfg: ReleaseConfig, manifest: Mapping[str, Any], entry: Mapping[str, Any], argv: list[str], *, name: bool
) -> list[str]:
    """``docker run`` options of ``entry``: the chip's flags, its ports, mounts (from the bundle) and environment."""
    flags = list(entry.get("docker_flags") or cfg.chip_profile.docker_run_flags)
    docker = ["docker", "run", "-d", *(["--name", manifest["serve"]["container_name"]] if name else []), *flags]
    ports = list(entry.get("ports") or [])
    if not ports and not _host_network(flags):
        port = _option(argv, "--port") or str(cfg.serve.engine_args.port)
        ports = [f"127.0.0.1:{port}:{port}"]
    for p in ports:
        docker += ["-p", p]
    for m in entry["mounts"]:
        source = str(m["source"]).rstrip("/") or "."
        host = source if source.startswith("/") else _PWD if source == "." else f"{_PWD}/{source}"
        docker += ["-v", f"{host}:{m['target']}:{m.get('mode') or 'ro'}"]
    return docker + _env_words(entry["env"], docker=True)


def _in_image(cfg: ReleaseConfig, manifest: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``entry`` (a server that ran outside a container) as the release image runs it."""
    flags = list(cfg.chip_profile.docker_run_flags)
    mount = model_mount(cfg)
    argv = list(entry["argv"])
    argv = [cfg.chip_profile.python, *argv[1:]] if argv else argv
    argv = _with_option(argv, "--model", mount)
    if not _host_network(flags):
        argv = _with_option(argv, "--host", "0.0.0.0")
    model_rel = "." if manifest["weights"]["published"] else "weights"
    return {
        **entry,
        "argv": argv,
        "image": _image_for_run(manifest),
        "mounts": [{"source": model_rel, "target": mount, "mode": "ro"}],
        "docker_flags": flags,
        "ports": [],
    }


def _command(cfg: ReleaseConfig, manifest: Mapping[str, Any], entry: Mapping[str, Any], *, name: bool) -> str:
    """``entry`` as shell: ``docker run`` of its image, ``docker exec`` into its container, or the plain command."""
    argv = list(entry["argv"])
    if entry["image"]:
        docker = _docker_words(cfg, manifest, entry, argv, name=name)
        return _continued([*_grouped(docker), _word(str(entry["image"])), *_grouped(argv, short=False)])
    if entry.get("container"):
        exec_words = ["docker", "exec", str(entry["container"]), "env", *_env_words(entry["env"], docker=False)]
        return _continued([_join(exec_words), *_grouped(argv, short=False)])
    return _continued([*_env_words(entry["env"], docker=False), *_grouped(argv, short=False)])


def _bundle_steps(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> list[str]:
    folder = manifest["release"]["bundle_name"]
    published = _download(cfg, folder)
    lines = [*(published or []), f"cd {folder}"] if published else []
    if not manifest["weights"]["published"]:
        lines += _source_download(cfg, manifest, "weights")
    return lines


def _query(cfg: ReleaseConfig, manifest: Mapping[str, Any], port: str) -> tuple[list[str], str]:
    base = f"http://127.0.0.1:{port}"
    example = manifest["serve"]["example"]
    name = manifest["serve"]["served_model_name"]
    if example:
        path = "/v1/chat/completions" if example["api"] == "chat" else "/v1/completions"
        body = {"model": name, **example["body"]}
        note = (
            f"This is item {example['item']} of {example['label']}, sent as the evaluation sent it; "
            f"the served model answered `{example['answer'].strip()}` (expected: `{example['expected']}`)."
        )
    else:
        path = "/v1/completions"
        body = {"model": name, "prompt": cfg.serve.load_test.prompt, "max_tokens": 16, "temperature": 0}
        note = "The same request as the deploy stage's smoke test."
    wait = f"for i in $(seq 1 120); do curl -sf {base}/health >/dev/null && break; sleep 5; done"
    request = _continued(
        [f"curl -sSf {base}{path}", "-H 'Content-Type: application/json'", f"-d {shlex.quote(json.dumps(body))}"]
    )
    return [wait, request], note


def _ran_entry(cfg: ReleaseConfig, manifest: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    where = f"`{entry['node']}`"
    what = f" ({entry['role']}: {entry['step']})" if entry.get("runtime") == "multinode" else ""
    if entry["ran"]:
        how = "in the image" if entry["image"] else f"on the {entry.get('runtime') or cfg.runtime.value} runtime"
        note = f"Ran on {where}{what} ({how}), in the bundle folder:"
    else:
        note = f"Not run on {where}{what}: {entry['reason'] or 'no reason recorded'}."
    return {"note": note, "lines": [_command(cfg, manifest, entry, name=False)]}


def recorded_steps(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded flow's steps, or None when no deploy stage ran (the config-derived flow applies).

    Returns:
        ``placeholders`` (token, meaning), ``download`` lines, ``pull`` (the reference, or
        None), ``start`` lines and ``start_note``, ``query`` lines and ``query_note``,
        ``ran`` (per node: ``note`` and ``lines``) and ``derived`` (no record: from the config).
    """
    executed = manifest["serve"]["executed"]
    if not executed:
        return None
    servers = [e for e in executed if e.get("step", "serve") == "serve"] or executed
    first = next((e for e in servers if e["ran"]), servers[0])
    download = _bundle_steps(cfg, manifest)
    multinode = any(e.get("runtime") == "multinode" for e in executed)
    if multinode:
        start = [
            f"# on {e['node']} ({e['role']}: {e['step']})\n{_command(cfg, manifest, e, name=False)}" for e in executed
        ]
    elif first["image"]:
        start = [_command(cfg, manifest, first, name=True)]
    else:
        start = [_command(cfg, manifest, _in_image(cfg, manifest, first), name=True)]
    if multinode:
        reason = "" if first["ran"] else f"Not run here: {first['reason']}. "
        start_note = f"{reason}On each node of `hostfile.txt`, in this order (the Ray cluster FlagScale uses):"
    elif first["source"] == "config":
        start_note = f"Not run here: {first['reason']}."
    elif first["image"] and first["ran"]:
        pinned = " (image by digest)" if "@sha256:" in str(first["image"]) else ""
        start_note = f"The deploy stage ran this container{pinned}:"
    elif first["ran"]:
        start_note = (
            f'The deploy stage ran this server on the {cfg.runtime.value} runtime (see "What this release ran" '
            "below); the release image runs the same server:"
        )
    else:
        start_note = f"Not run here: {first['reason']}."
    port = _option(first["argv"], "--port") or str(cfg.serve.engine_args.port)
    query, query_note = _query(cfg, manifest, port)
    used = {p for p in _PLACEHOLDER_TEXT if any(p in line for line in download)}
    return {
        "placeholders": [{"token": p, "meaning": _PLACEHOLDER_TEXT[p]} for p in sorted(used)],
        "download": download,
        "pull": pull_reference(manifest),
        "start": start,
        "start_note": start_note,
        "query": query,
        "query_note": query_note,
        "ran": [_ran_entry(cfg, manifest, e) for e in executed],
        "derived": first["source"] == "config",
        "multinode": multinode,
    }


def placeholders_in(lines: Sequence[str]) -> list[dict[str, str]]:
    """The documented placeholders ``lines`` use."""
    return [{"token": p, "meaning": m} for p, m in _PLACEHOLDER_TEXT.items() if any(p in line for line in lines)]


# -- the download table ---------------------------------------------------------------------------
def download_table(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    """The "Bundle Download" table: image, digest, weights and bundle locations."""
    image = manifest["image"]
    pub = cfg.publish
    rows: list[list[str]] = [["Docker image", f"`{pull_reference(manifest) or image['ref']}`"]]
    if image["digest"]:
        rows.append(["Image digest", f"`{image['digest']}`"])
    elif image["built"] is False:
        built = "not built by this release"
        if image["context"]:
            built += f"; build it from `{image['context']}` in this bundle"
        rows.append(["Image digest", built])
    elif image["pushed"] is False:
        rows.append(["Image digest", "built, not pushed to a registry"])
    else:
        rows.append(["Image digest", "not recorded"])
    links: list[str] = []
    if pub.hf_repo:
        links.append(f"[Hugging Face]({hf_endpoint()}/{pub.hf_repo})")
    if pub.modelscope_repo:
        links.append(f"[ModelScope]({modelscope_endpoint()}/models/{pub.modelscope_repo})")
    if pub.s3:
        links.append(f"`{manifest['publish']['s3']}`")
    if pub.local_dir and not links:
        links.append(f"a local folder (`{PUBLISHED_DIR}`)")
    weights = manifest["weights"]
    if weights["published"]:
        total = weights["total_bytes"]
        size = f" ({human_size(total)}, {len(weights['files'])} files)" if total else ""
        rows.append(["Weights", f"{manifest['conversion']['quant']} checkpoint{size}: {', '.join(links)}"])
    else:
        m = cfg.model
        rev = f" @ `{manifest['model']['revision']}`" if manifest["model"]["revision"] else ""
        if m.source is ModelSource.HF:
            rows.append(["Weights", f"official weights: [{m.repo_id}]({hf_endpoint()}/{m.repo_id}){rev}"])
        elif m.source is ModelSource.MODELSCOPE:
            rows.append(
                ["Weights", f"official weights: [{m.repo_id}]({modelscope_endpoint()}/models/{m.repo_id}){rev}"]
            )
        else:
            rows.append(["Weights", f"a local folder (`{SOURCE_DIR}`)"])
    bundle = "card, serving configs, evaluation logs, reports and `flagrelease.json`"
    rows.append(["Bundle", f"{bundle}: {', '.join(links)}" if links else bundle])
    return md_table(["Item", "Location"], rows)
