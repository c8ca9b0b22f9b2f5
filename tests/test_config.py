"""Release configs and chip profiles: the real configs validate; bad ones fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flagrelease.chips import list_chips, load_chip
from flagrelease.cli import main
from flagrelease.config import ConvertMode, RuntimeKind, load_release, parse_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ConfigError

CONFIGS = sorted((REPO_ROOT / "release_configs").glob("*.yaml"))
BASE = {
    "model": {"source": "hf", "repo_id": "org/model", "revision": "0" * 40},
    "chip": "nvidia-h100",
}


def _write(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _errors(tmp_path: Path, data: dict) -> list[tuple[str, str]]:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_release(path)
    assert str(path) in str(info.value), "the message must name the file"
    return info.value.errors


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_release_configs_validate(path: Path) -> None:
    cfg = load_release(path)
    assert cfg.name == path.stem


def test_required_release_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"deepseek-r1-iluvatar", "deepseek-r1-distill-qwen-32b-nvidia", "demo-tiny-cpu"} <= names


def test_iluvatar_config_matches_the_seed_card() -> None:
    cfg = load_release(REPO_ROOT / "release_configs" / "deepseek-r1-iluvatar.yaml")
    args = cfg.serve.engine_args
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (8, 4)
    assert (args.max_num_seqs, args.max_model_len, args.gpu_memory_utilization, args.port) == (256, 5120, 0.8, 9010)
    assert [n.hostfile_line() for n in cfg.serve.nodes] == [
        "iluvatar-node-0 slots=16 type=gpu",
        "iluvatar-node-1 slots=16 type=gpu",
    ]
    assert cfg.serve.envs == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert 'export TRITON_CACHE_DIR="/cache"' in cfg.serve.before_start
    assert cfg.convert.mode is ConvertMode.INT8_W8A8
    assert cfg.runtime is RuntimeKind.MULTINODE


def test_nvidia_config_matches_the_seed_card() -> None:
    cfg = load_release(REPO_ROOT / "release_configs" / "deepseek-r1-distill-qwen-32b-nvidia.yaml")
    args = cfg.serve.engine_args.as_dict()
    assert args["tensor_parallel_size"] == 8 and args["max_model_len"] == 32768
    assert args["enforce_eager"] is True and args["enable_chunked_prefill"] is True
    assert cfg.served_model_name == "deepseek-r1-distill-qwen-32b-flagos"
    assert cfg.runtime is RuntimeKind.CONTAINER


def test_every_vendor_has_a_profile() -> None:
    vendors = {load_chip(n).vendor for n in list_chips()}
    assert {"nvidia", "iluvatar", "metax", "cambricon", "ascend", "kunlunxin", "hygon", "mthreads"} <= vendors
    assert "cpu" in list_chips()
    for name in list_chips():
        chip = load_chip(name)
        assert chip.gems_vendor and chip.base_image and chip.device_type and chip.devices_per_node >= 1
        assert (REPO_ROOT / "templates" / "docker").joinpath(chip.dockerfile_template).name


def test_unknown_chip_lists_the_known_ones(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {**BASE, "chip": "nvidia-h999"})
    field, reason = errors[0]
    assert field == "chip"
    assert "unknown chip 'nvidia-h999'" in reason and "iluvatar-bi-v150" in reason


def test_wrong_types_name_the_field(tmp_path: Path) -> None:
    data = {**BASE, "serve": {"engine_args": {"max_num_seqs": "many"}}}
    errors = _errors(tmp_path, data)
    assert errors[0][0] == "serve.engine_args.max_num_seqs"
    assert "integer" in errors[0][1] and "'many'" in errors[0][1]


def test_missing_fields_are_named(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {"chip": "cpu"})
    assert ("model", "required field is missing") in errors


def test_missing_nested_field(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {**BASE, "model": {"source": "hf", "revision": "a" * 40}})
    assert ("model.repo_id", "required field is missing") in errors


@pytest.mark.parametrize("value", [0, -2])
def test_zero_or_negative_parallelism(tmp_path: Path, value: int) -> None:
    errors = _errors(tmp_path, {**BASE, "serve": {"engine_args": {"tensor_parallel_size": value}}})
    assert errors[0][0] == "serve.engine_args.tensor_parallel_size"
    assert "greater than or equal to 1" in errors[0][1]


def test_parallelism_larger_than_the_nodes_slots(tmp_path: Path) -> None:
    serve = {
        "engine_args": {"tensor_parallel_size": 8, "pipeline_parallel_size": 4},
        "nodes": ["10.0.0.1 slots=16 type=gpu"],
    }
    errors = _errors(tmp_path, {**BASE, "chip": "iluvatar-bi-v150", "serve": serve})
    assert errors[0][0] == "serve"
    assert "= 32 exceeds the 16 slots" in errors[0][1]


def test_parallelism_larger_than_one_node_without_nodes(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {**BASE, "serve": {"engine_args": {"tensor_parallel_size": 16}}})
    assert "exceeds the 8 devices of one nvidia-h100 node" in errors[0][1]


def test_unknown_convert_mode_lists_the_valid_ones(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {**BASE, "convert": {"mode": "int3"}})
    assert errors[0][0] == "convert.mode"
    assert "unknown convert mode 'int3'" in errors[0][1] and "int8-w8a8" in errors[0][1]


def test_unknown_field_is_rejected(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {**BASE, "serve": {"engin": "vllm"}})
    assert errors[0] == ("serve.engin", "unknown field (check its spelling and section)")


def test_branch_is_not_a_pinned_revision(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {**BASE, "model": {**BASE["model"], "revision": "main"}})
    assert "not a pinned revision" in errors[0][1]


def test_hostile_strings_are_rejected(tmp_path: Path) -> None:
    data = {**BASE, "serve": {"envs": {"BAD NAME": "x"}, "container_name": "x; rm -rf /"}}
    fields = {f for f, _ in _errors(tmp_path, data)}
    assert {"serve.envs", "serve.container_name"} <= fields
    errors = _errors(tmp_path, {**BASE, "model": {**BASE["model"], "repo_id": "../../etc"}})
    assert errors[0][0] == "model.repo_id"


def test_hostfile_lines_parse_and_reject_garbage(tmp_path: Path) -> None:
    cfg = parse_release({**BASE, "serve": {"nodes": ["10.0.0.1 slots=8 type=gpu"]}}, path=tmp_path / "ok.yaml")
    assert cfg.serve.nodes[0].slots == 8
    errors = _errors(tmp_path, {**BASE, "serve": {"nodes": ["10.0.0.1 gpus=8"]}})
    assert errors[0][0] == "serve.nodes" and "slots=N" in errors[0][1]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    data = {**BASE, "chip": "nope", "convert": {"mode": "int3"}, "eval": {"concurrency": 0}}
    fields = {f for f, _ in _errors(tmp_path, data)}
    assert {"chip", "convert.mode", "eval.concurrency"} <= fields


def test_validate_command_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml"
    assert main(["validate", str(good)]) == 0
    bad = _write(tmp_path, {**BASE, "chip": "nope", "convert": {"mode": "int3"}})
    assert main(["validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"error {bad}: chip: unknown chip 'nope'" in out
    assert f"error {bad}: convert.mode: unknown convert mode 'int3'" in out
    assert "1 valid, 1 invalid" in out


def test_a_new_chip_is_data_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(REPO_ROOT / "templates", templates)
    profile = yaml.safe_load((templates / "chips" / "metax-c550.yaml").read_text())
    profile.update(name="newvendor-x1", vendor="newvendor", work_pool="newvendor-x1", devices_per_node=4)
    (templates / "chips" / "newvendor-x1.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("FLAGRELEASE_TEMPLATES", str(templates))
    cfg = parse_release({**BASE, "chip": "newvendor-x1"}, path=tmp_path / "new.yaml")
    assert cfg.chip_profile.devices_per_node == 4 and cfg.chip_profile.work_pool == "newvendor-x1"


def test_invalid_chip_profile_names_file_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    templates = tmp_path / "templates"
    (templates / "chips").mkdir(parents=True)
    (templates / "chips" / "broken.yaml").write_text(yaml.safe_dump({"name": "broken", "vendor": "x"}))
    monkeypatch.setenv("FLAGRELEASE_TEMPLATES", str(templates))
    with pytest.raises(ConfigError) as info:
        load_chip("broken")
    assert "broken.yaml" in str(info.value) and "device_type" in str(info.value)
