"""Matrix configs, the support table and the collection card (flagrelease.matrix), without Prefect.

The shipped ``release_configs/matrices/deepseek-r1.yaml`` is expanded and checked pair by
pair; the support table is built from real bundle manifests (written by the card
stage's ``build_manifest``/``write_manifest``) carrying the published Iluvatar scores,
and the collection card is checked against the published cards' table shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from flagrelease import __version__
from flagrelease.card.manifest import build_manifest, write_manifest
from flagrelease.cli import main
from flagrelease.config import load_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ConfigError
from flagrelease.limits import host_limit_name, pool_concurrency, release_slots
from flagrelease.matrix import (
    PairOutcome,
    build_collection,
    load_matrix,
    load_pair,
    publish_collection,
    support_table,
    table_rows,
    validate_matrix,
    validate_support,
)

CONFIGS = REPO_ROOT / "release_configs"
MATRIX = CONFIGS / "matrices" / "deepseek-r1.yaml"
SEEDS = REPO_ROOT / "tests" / "data" / "card"
CHIPS = {p.stem for p in (REPO_ROOT / "templates" / "chips").glob("*.yaml")}


def _write_matrix(folder: Path, data: dict[str, Any], name: str = "tiny") -> Path:
    (folder / "matrices").mkdir(parents=True, exist_ok=True)
    path = folder / "matrices" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tiny(tmp_path: Path, **chips: Any) -> dict[str, Any]:
    """A matrix of the demo model on the given chips (all pairs served on this machine's CPU pools)."""
    base = yaml.safe_load((CONFIGS / "demo-tiny-cpu.yaml").read_text())
    base.pop("work_dir")
    base.pop("chip")
    base["model"]["path"] = str(tmp_path / "tiny-qwen2")
    if base["eval"].get("include_path"):
        base["eval"]["include_path"] = str((CONFIGS / base["eval"]["include_path"]).resolve())
    base["work_dir"] = "../work/{pair}"  # relative to the matrix file's folder
    base["publish"] = {"local_dir": str(tmp_path / "publish" / "{chip}")}
    return {
        "description": "The demo model on CPUs.",
        "release": base,
        "chips": chips or {"cpu": {}},
        "collection": {"publish": {"local_dir": str(tmp_path / "publish")}, "work_dir": str(tmp_path / "coll")},
    }


# -- configs ---------------------------------------------------------------------------------
def test_the_shipped_matrix_covers_every_chip_but_the_cpu_and_each_pair_validates() -> None:
    results = validate_matrix(MATRIX)
    assert all(err is None for err in results.values()), {k: str(v) for k, v in results.items() if v}
    matrix = load_matrix(MATRIX)
    assert {p.chip for p in matrix.pairs} == CHIPS - {"cpu"}
    assert {p.config.model.repo_id for p in matrix.pairs} == {"deepseek-ai/DeepSeek-R1"}
    metax = matrix.pair("metax-c550").config
    assert metax.name == "deepseek-r1-metax-c550"
    assert metax.image.tag == "deepseek-r1-flagos-metax-c550-int8"
    assert metax.publish.hf_repo == "FlagRelease/DeepSeek-R1-FlagOS-MetaX-INT8"
    assert metax.publish.s3 is not None and metax.publish.s3.prefix == "deepseek-r1/metax-c550"
    assert "matrix:deepseek-r1" in metax.tags
    # Mappings merge: the chip's nodes beside the base's engine args and eval.
    assert [n.host for n in metax.serve.nodes] == ["metax-node-0", "metax-node-1"]
    assert metax.serve.engine_args.max_model_len == 5120 and len(metax.eval.tasks) == 6
    h100 = matrix.pair("nvidia-h100").config
    assert h100.convert.mode.value == "none" and not h100.remote_reference
    assert h100.publish.hf_repo == "FlagRelease/DeepSeek-R1-FlagOS-NVIDIA"
    # Iluvatar's pair is its own release config, not a copy of it.
    iluvatar = matrix.pair("iluvatar-bi-v150")
    assert iluvatar.config == load_release(CONFIGS / "deepseek-r1-iluvatar.yaml")
    assert iluvatar.deployment == "deepseek-r1-iluvatar"


def test_a_pair_loads_wherever_a_release_config_path_is_taken() -> None:
    cfg = load_release(f"{MATRIX}#ascend-atlas800")
    assert cfg == load_pair(f"{MATRIX}#ascend-atlas800")
    assert cfg.chip == "ascend-atlas800" and cfg.serve.nodes[0].type == "npu"
    with pytest.raises(ConfigError, match="has no chip 'cpu'; its chips: nvidia-h100"):
        load_release(f"{MATRIX}#cpu")


def test_placeholders_lists_replace_and_names(tmp_path: Path) -> None:
    data = _tiny(
        tmp_path, cpu={"name": "tiny-on-cpu", "tags": ["x"]}, **{"nvidia-h100": {"image": {"tag": "h-{vendor}"}}}
    )
    data["release"]["image"]["tag"] = "tiny-{chip}-{card_name}"
    data["release"]["serve"]["engine_args"]["served_model_name"] = "{matrix}-{pair}"
    matrix = load_matrix(_write_matrix(tmp_path, data))
    cpu, h100 = matrix.pair("cpu").config, matrix.pair("nvidia-h100").config
    assert cpu.name == "tiny-on-cpu" and h100.name == "tiny-nvidia-h100"
    assert cpu.image.tag == "tiny-cpu-CPU" and h100.image.tag == "h-nvidia"
    assert cpu.served_model_name == "tiny-tiny-on-cpu"
    assert cpu.work_dir == tmp_path / "work" / "tiny-on-cpu"
    assert cpu.tags == sorted({"x", "matrix:tiny"})  # a list replaces the base's
    assert h100.tags == sorted({"demo", "cpu", "matrix:tiny"})
    assert h100.work_dir == tmp_path / "work" / "tiny-nvidia-h100"  # relative paths: from the matrix file


@pytest.mark.parametrize(
    ("change", "where", "reason"),
    [
        (lambda d: d["chips"].update({"tpu-v9": {}}), "chips", "unknown chip 'tpu-v9'; known chips:"),
        (lambda d: d["release"].update(chip="cpu"), "release", "`chip` is set per pair"),
        (lambda d: d["release"].update(work_dir="../same"), "chips.nvidia-h100.work_dir", "the same as the cpu"),
        (
            lambda d: d["chips"]["nvidia-h100"].update(model={"repo_id": "other/model"}),
            "chips.nvidia-h100.model",
            "a matrix releases one model",
        ),
        (
            lambda d: d["chips"]["nvidia-h100"].update(serve={"engine_args": {"tensor_parallel_size": 16}}),
            "serve.engine_args",
            "exceeds the 8 devices",
        ),
        (lambda d: d.update(colection={}), "colection", "unknown field"),
    ],
)
def test_validation_names_the_field_and_the_fix(tmp_path: Path, change: Any, where: str, reason: str) -> None:
    data = _tiny(tmp_path, cpu={}, **{"nvidia-h100": {}})
    change(data)
    results = validate_matrix(_write_matrix(tmp_path, data))
    errors = [(f, m) for err in results.values() if err for f, m in err.errors]
    assert any(where in f"{f}: {m}" and reason in m for f, m in errors), errors


def test_cli_validate_checks_configs_matrices_and_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert f"ok    {CONFIGS / 'matrices' / 'deepseek-r1.yaml'}#metax-c550" in out
    assert f"ok    {CONFIGS / 'demo-tiny-cpu.yaml'}" in out
    data = _tiny(tmp_path, cpu={}, **{"nvidia-h100": {"convert": {"mode": "int3"}}})
    path = _write_matrix(tmp_path, data)
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"ok    {path}#cpu" in out
    assert f"error {path}#nvidia-h100: convert.mode: unknown convert mode 'int3'" in out
    assert "2 valid, 1 invalid" in out


def test_deployments_one_per_top_level_config_and_pair_and_one_per_matrix() -> None:
    from flows.deployments import deployment_specs, matrix_deployment_specs

    specs = {s.name: s for s in deployment_specs()}
    stems = {p.stem for p in CONFIGS.glob("*.yaml")}
    pairs = {p.deployment for p in load_matrix(MATRIX).pairs}
    releases = {n for n, s in specs.items() if "role:reference" not in s.tags}
    assert releases == stems | pairs
    assert "deepseek-r1-iluvatar" in stems  # Iluvatar's pair is that file's deployment, once
    metax = specs["deepseek-r1-metax-c550"]
    assert metax.parameters == {"config": "release_configs/matrices/deepseek-r1.yaml#metax-c550"}
    assert metax.work_pool == "metax-c550" and "matrix:deepseek-r1" in metax.tags
    assert specs["deepseek-r1-metax-c550-reference"].work_pool == "nvidia-h100"
    (matrix,) = matrix_deployment_specs()
    assert (matrix.name, matrix.work_pool) == ("deepseek-r1", "flagrelease-matrix")
    assert matrix.parameters == {"matrix": "release_configs/matrices/deepseek-r1.yaml"}


def test_a_pair_named_like_a_release_is_refused(tmp_path: Path) -> None:
    from flows.deployments import deployment_specs

    shutil.copy(CONFIGS / "demo-tiny-cpu.yaml", tmp_path / "demo-tiny-cpu.yaml")
    _write_matrix(tmp_path, _tiny(tmp_path, cpu={"name": "demo-tiny-cpu"}))
    with pytest.raises(ConfigError, match="two releases are named demo-tiny-cpu"):
        deployment_specs(tmp_path)


def test_limits_come_from_the_chip_profile() -> None:
    matrix = load_matrix(MATRIX)
    kunlunxin = matrix.pair("kunlunxin-r310p")
    slots = release_slots(kunlunxin.config)
    assert [s.name for s in slots] == [host_limit_name(f"kunlunxin-node-{i}") for i in range(4)]
    assert {(s.limit, s.occupy) for s in slots} == {(8, 8)}  # a release holds whole nodes
    assert pool_concurrency(kunlunxin.profile) == kunlunxin.profile.nodes == 1
    cpu = load_release(CONFIGS / "demo-tiny-cpu.yaml")
    (local,) = release_slots(cpu)
    assert local.name.startswith("flagrelease-host-") and (local.limit, local.occupy) == (1, 1)


# -- the support table and the collection card -------------------------------------------------
def _bundle(pair: Any, folder: Path, gate: dict[str, Any] | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("card\n")
    manifest = build_manifest(pair.config, bundle_dir=folder, gate=gate, tools={"flagrelease": __version__})
    return write_manifest(manifest, path=folder / "flagrelease.json", bundle_dir=folder)


@pytest.fixture
def seed_table(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """The shipped matrix's table: Iluvatar with its published scores, MetaX failed, H100 gated, the rest not run."""
    matrix = load_matrix(MATRIX)
    iluvatar = json.loads((SEEDS / "seed_iluvatar_results.json").read_text())
    iluvatar["throughput"] = {"ratio": 1.04, "ratio_ci": [0.97, 1.11], "min_ratio": 0.8, "ok": True}
    h100 = json.loads(json.dumps(iluvatar))
    h100["target"] = {"label": "DeepSeek-R1-FlagOS-NVIDIA", "chip": "nvidia-h100"}
    for row in h100["rows"]:
        row["target"] = row["reference"]
    h100["rows"][0]["verdict"] = "consistent"
    manifests = {
        "iluvatar-bi-v150": _bundle(matrix.pair("iluvatar-bi-v150"), tmp_path / "iluvatar", iluvatar),
        "nvidia-h100": _bundle(matrix.pair("nvidia-h100"), tmp_path / "h100", h100),
    }
    outcomes = {
        "iluvatar-bi-v150": PairOutcome("iluvatar-bi-v150", "COMPLETED", "id-1", "a-run"),
        "nvidia-h100": PairOutcome("nvidia-h100", "COMPLETED", "id-2", "b-run"),
        "metax-c550": PairOutcome("metax-c550", "FAILED", "id-3", "c-run", "deploy: the server never became healthy"),
    }
    return matrix, support_table(matrix, outcomes, manifests={c: manifests.get(c) for c in CHIPS})


def test_support_table_rows_are_chips_with_scores_verdicts_throughput_ops_and_bundle(seed_table: Any) -> None:
    matrix, table = seed_table
    validate_support(table)
    rows = {r["chip"]: r for r in table["rows"]}
    assert list(rows) == [p.chip for p in matrix.pairs]
    il = rows["iluvatar-bi-v150"]
    assert il["status"] == "released" and il["label"] == "DeepSeek-R1-FlagOS-Iluvatar-INT8"
    assert il["scores"]["gsm8k"] == {
        "score": 95.53,
        "reference": 95.75,
        "diff": -0.22,
        "diff_ci": None,
        "verdict": "inconclusive",
    }
    assert il["throughput"] == {"ratio": 1.04, "ci": [0.97, 1.11], "min_ratio": 0.8, "ok": True}
    assert il["bundle_url"] == "https://huggingface.co/FlagRelease/DeepSeek-R1-FlagOS-Iluvatar-INT8"
    assert il["excluded_ops"] == []
    assert rows["metax-c550"]["status"] == "failed" and "never became healthy" in rows["metax-c550"]["message"]
    assert rows["ascend-atlas800"]["status"] == "missing" and rows["ascend-atlas800"]["scores"] == {}
    assert table["counts"] == {"released": 2, "gate-failed": 0, "failed": 1, "missing": 5}
    (ref,) = table["references"]
    assert ref["label"] == "DeepSeek-R1-H100-CUDA" and ref["scores"]["ceval-valid"] == 89.0
    flat = {r["chip"]: r for r in table_rows(table)}
    assert flat["Iluvatar BI-V150"]["GSM8K (EM)"] == "95.53 (inconclusive)"
    assert flat["Iluvatar BI-V150"]["FlagGems on/off throughput"] == "1.04 [0.97, 1.11]"


def test_collection_card_has_the_reference_column_and_one_column_per_chip(seed_table: Any, tmp_path: Path) -> None:
    matrix, table = seed_table
    collection = build_collection(matrix, table=table, folder=tmp_path / "collection")
    card = collection.card.read_text()
    assert card.startswith("---\n") and "# Introduction" in card and "# Evaluation Results" in card
    bench = card.split("## Benchmark Result", 1)[1].strip().splitlines()
    header = [c.strip() for c in bench[0].strip("|").split("|")]
    assert header[:3] == ["Metrics", "DeepSeek-R1-H100-CUDA", "DeepSeek-R1-FlagOS-NVIDIA"]
    assert header[3] == "DeepSeek-R1-FlagOS-Iluvatar-INT8" and len(header) == 2 + len(matrix.pairs)
    assert "DeepSeek-R1-FlagOS-MetaX" in header  # a chip with no bundle yet: its label from its config
    assert bench[1].startswith("| :---")
    gsm = [c.strip() for c in bench[2].strip("|").split("|")]
    assert gsm[:4] == ["GSM8K (EM)", "95.75", "95.75", "95.53 (inconclusive)"]
    assert gsm[4:] == ["TBD"] * (len(matrix.pairs) - 2)
    support = card.split("# Support Matrix", 1)[1].split("# Evaluation Results", 1)[0]
    assert "| Iluvatar BI-V150 " in support and "1.04x [0.97, 1.11]" in support
    assert "run failed" in support and "not run" in support
    assert "2 of 8 chips are released; 1 did not finish; 5 have not run." in card
    saved = json.loads(collection.support.read_text())
    assert saved == table and (collection.folder / "support.schema.json").is_file()


def test_collection_is_published_to_a_local_folder_idempotently(seed_table: Any, tmp_path: Path) -> None:
    matrix, table = seed_table
    dest = tmp_path / "published"
    collection_cfg = matrix.config.collection.model_copy(
        update={"publish": matrix.config.collection.publish.model_copy(update={"local_dir": dest, "s3": None})}
    )
    matrix = type(matrix)(matrix.config.model_copy(update={"collection": collection_cfg}), matrix.path, matrix.pairs)
    collection = build_collection(matrix, table=table, folder=tmp_path / "collection")
    first = publish_collection(matrix, collection).summary()
    assert f"local {dest}: 3 uploaded, 0 unchanged" == first
    assert publish_collection(matrix, collection).summary() == f"local {dest}: 0 uploaded, 3 unchanged"
    assert (dest / "README.md").read_text() == collection.card.read_text()


def test_a_local_bundle_url_is_relative_to_the_collection(tmp_path: Path) -> None:
    data = _tiny(tmp_path)
    matrix = load_matrix(_write_matrix(tmp_path, data))
    pair = matrix.pair("cpu")
    bundle = _bundle(pair, tmp_path / "publish" / "cpu", None)
    table = support_table(matrix, manifests={"cpu": bundle})
    (row,) = table["rows"]
    assert row["bundle_url"] == "cpu/" and row["status"] == "released"
    assert not any(str(tmp_path) in json.dumps(v) for k, v in row.items() if k != "message")


def test_a_pair_published_elsewhere_is_read_from_its_s3_prefix(
    tmp_path: Path, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pair ran on another machine and published to S3 only: its manifest is downloaded from there."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "matrix-unit-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "matrix-unit-secret")
    bucket = s3_server.create_bucket("pairs")
    s3 = {"bucket": bucket, "endpoint_url": s3_server.endpoint_url}
    data = _tiny(tmp_path, cpu={}, **{"nvidia-h100": {}})
    data["release"]["publish"] = {"s3": {**s3, "prefix": "tiny/{chip}"}}
    data["collection"]["publish"] = {"s3": {**s3, "prefix": "tiny"}}
    matrix = load_matrix(_write_matrix(tmp_path, data))
    bundle = _bundle(matrix.pair("cpu"), tmp_path / "another-machine", None)
    s3_server.client().put_object(Bucket=bucket, Key="tiny/cpu/flagrelease.json", Body=bundle.read_bytes())
    table = support_table(matrix)
    rows = {r["chip"]: r for r in table["rows"]}
    assert rows["cpu"]["status"] == "released" and rows["cpu"]["bundle_url"] == f"s3://{bucket}/tiny/cpu"
    assert rows["nvidia-h100"]["status"] == "missing"
    assert (matrix.work_dir / "manifests" / "cpu.json").read_bytes() == bundle.read_bytes()
    published = publish_collection(matrix, build_collection(matrix, table=table)).summary()
    assert published == f"s3 s3://{bucket}/tiny: 3 uploaded, 0 unchanged"
