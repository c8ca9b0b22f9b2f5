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


# -- grammars (issue 12, item 1) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"image": {"tag": "x$(touch CANARY)"}}, "image.tag", "not a valid image tag"),
        ({"image": {"name": "Team/Flag"}}, "image.name", "lowercase"),
        ({"image": {"name": "registry.io/x"}}, "image.name", "image.registry"),
        ({"image": {"registry": "host:port/ns"}}, "image.registry", "host[:port]"),
        ({"publish": {"s3": {"bucket": "Bad_Bucket"}}}, "publish.s3.bucket", "S3 bucket"),
        ({"publish": {"s3": {"bucket": "ok-bucket", "prefix": "a b/$(x)"}}}, "publish.s3.prefix", "plain key prefix"),
        ({"publish": {"hf_repo": "org/na--me"}}, "publish.hf_repo", "owner/name"),
        ({"model": {**BASE["model"], "repo_id": "-org/x"}}, "model.repo_id", "owner/name"),
        ({"serve": {"nodes": ["bad_host!name slots=8"]}}, "serve.nodes.0.host", "host name"),
        ({"serve": {"engine_args": {"host": "999.1.1.1"}}}, "serve.engine_args.host", "host name"),
        ({"serve": {"envs": {"1BAD": "x"}}}, "serve.envs", "not valid"),
        ({"serve": {"engine_args": {"served_model_name": "a name"}}}, "serve.engine_args.served_model_name", "served"),
        ({"schedule": "61 25 * * 9"}, "schedule", "cron"),
        ({"model": {**BASE["model"], "display_name": "Tiny\nRUN id"}}, "model.display_name", "control character"),
        ({"model": {**BASE["model"], "license": "mit\u202e"}}, "model.license", "control character"),
        ({"model": {**BASE["model"], "license_url": "javascript:alert(1)"}}, "model.license_url", "http(s) URL"),
        ({"eval": {"tasks": [{"name": "a", "label": "A\nB"}]}}, "eval.tasks.0.label", "control character"),
        ({"convert": {"ignore": ["re:("]}}, "convert.ignore", "regular expression"),
        ({"tags": ["a b"]}, "tags", "tag"),
    ],
)
def test_every_string_has_a_grammar(tmp_path: Path, changes: dict, field: str, words: str) -> None:
    errors = _errors(tmp_path, {**BASE, **changes})
    assert any(f == field and words in msg for f, msg in errors), errors


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(BASE) + "serve:\n  engine_args:\n    port: 1\n    port: 2\n")
    with pytest.raises(ConfigError) as info:
        load_release(path)
    assert info.value.errors[0][0] == "serve.engine_args.port" and "duplicate key 'port'" in info.value.errors[0][1]


# -- engine arguments against vLLM's parser (issue 12, item 4) --------------------------------------
def test_an_engine_arg_typo_gets_a_did_you_mean(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml").read_text())
    data["serve"]["engine_args"]["max_model_length"] = data["serve"]["engine_args"].pop("max_model_len")
    errors = _errors(tmp_path, data)
    assert errors == [
        (
            "serve.engine_args.max_model_length",
            "not an argument of vLLM 0.32.0 (the cpu serving runtime); did you mean max_model_len?",
        )
    ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"max_num_batched_tokens": "lots"}, "not a size"),
        ({"max_num_batched_tokens": "32k"}, None),
        ({"kv_cache_dtype": "fp9"}, "is not one of: auto"),
        ({"enforce_eager": "yes"}, "must be true or false"),
        ({"disable_log_stats": "sometimes"}, "is a switch"),
        ({"seed": True}, "takes a value"),
        ({"block_size": [16, 32]}, "takes one value"),
        ({"cpu_offload_gb": "four"}, "not a number"),
        ({"cpu_offload_gb": 4}, None),
    ],
)
def test_engine_arg_values_suit_their_option(tmp_path: Path, args: dict, words: str | None) -> None:
    data = {**BASE, "chip": "cpu", "serve": {"engine_args": args}}
    if words is None:  # a value the option takes
        parse_release(data, path=tmp_path / "ok.yaml")
        return
    errors = _errors(tmp_path, data)
    assert any(words in msg for _, msg in errors), errors


def test_vendor_chips_check_against_their_recorded_vllm(tmp_path: Path) -> None:
    from flagrelease.config import recorded_vllm_versions, vllm_args_for_chip

    assert {"0.8.5", "0.32.0"} <= set(recorded_vllm_versions())
    nvidia = vllm_args_for_chip("nvidia-h100")  # its profile pins vllm==0.8.5
    assert nvidia.exact and nvidia.version == "0.8.5"
    # 0.8.5's --enforce-eager has no --no- form: false cannot be rendered for it.
    errors = _errors(tmp_path, {**BASE, "serve": {"engine_args": {"enforce_eager": False}}})
    assert errors == [
        (
            "serve.engine_args.enforce_eager",
            "is a switch with no 'off' form in vLLM 0.8.5 (recorded for chip nvidia-h100); remove it to leave it off",
        )
    ]
    iluvatar = vllm_args_for_chip("iluvatar-bi-v150")  # a vendor build: names only, every recorded version
    assert not iluvatar.exact and "enable-chunked-prefill" in iluvatar.options
    errors = _errors(
        tmp_path, {**BASE, "chip": "iluvatar-bi-v150", "serve": {"engine_args": {"tensor_paralel_size": 2}}}
    )
    assert errors[0][0] == "serve.engine_args.tensor_paralel_size"
    assert "any recorded vLLM (0.32.0, 0.8.5)" in errors[0][1] and "did you mean tensor_parallel_size?" in errors[0][1]


def test_reference_engine_args_are_checked_against_the_reference_chip(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO_ROOT / "release_configs" / "deepseek-r1-iluvatar.yaml").read_text())
    data["eval"]["reference"]["engine_args"]["pipeline-paralel-size"] = 2
    errors = _errors(tmp_path, data)
    assert errors[0][0] == "eval.reference.engine_args.pipeline_paralel_size"
    assert "vLLM 0.8.5 (recorded for chip nvidia-h100); did you mean pipeline_parallel_size?" in errors[0][1]


@pytest.mark.vllm
def test_record_args_reads_the_installed_runtime(tmp_path: Path) -> None:
    """The repository's 0.32.0 list is what the cpu runtime's own parser says (refresh: record-args)."""
    import json

    from flagrelease.runtime import serve_python

    out = tmp_path / "args"
    assert main(["runtime", "record-args", "--python", str(serve_python("cpu", install=False)), "--out", str(out)]) == 0
    recorded = json.loads((out / "0.32.0.json").read_text())
    kept = json.loads((REPO_ROOT / "flagrelease" / "data" / "vllm_args" / "0.32.0.json").read_text())
    assert recorded["options"] == kept["options"]
    assert recorded["options"]["max-model-len"]["type"] == "size_or_auto"


# -- the command line checks before anything starts -----------------------------------------------
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--stages", "fetch,quantize"], "unknown stage 'quantize'; did you mean convert?"),
        (["--stages", "fetch,"], "unknown stage ''"),
    ],
)
def test_run_checks_stages_before_prefect(argv: list[str], words: str) -> None:
    """``run`` refuses at once, with Prefect unimportable: nothing was started."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['prefect'] = None; sys.modules['flows'] = None\n"
        "from flagrelease.cli import main\n"
        f"sys.exit(main(['run', {str(REPO_ROOT / 'release_configs' / 'demo-tiny-cpu.yaml')!r}, *{argv!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_run_checks_the_config_before_prefect(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = yaml.safe_load((REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml").read_text())
    data["serve"]["engine_args"]["max_model_length"] = 512
    data["model"]["path"] = str(REPO_ROOT / "build" / "demo" / "tiny-qwen2")
    bad = _write(tmp_path, data, "typo.yaml")
    code = (
        "import sys; sys.modules['prefect'] = None; sys.modules['flows'] = None\n"
        "from flagrelease.cli import main\n"
        f"sys.exit(main(['run', {str(bad)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean max_model_len?" in proc.stderr and "Traceback" not in proc.stderr
