"""The model card: the seeds' published cards reproduced from their release configs, snapshots,
the card stage on a release whose upstream stages ran, and the gate-failure warning.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from flagrelease.bundle import GATE_FAILED_MARKER, load_manifest
from flagrelease.card import render_card_cli, run_stage
from flagrelease.cli import main
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import GateError
from tests._release_builder import build_release

DATA = Path(__file__).parents[1] / "data" / "card"
SNAPSHOTS = Path(__file__).parents[1] / "snapshots"
CONFIGS = REPO_ROOT / "release_configs"

# The evaluation tables and commands of the two published cards, verbatim.
SEED_NVIDIA_TABLE = """
| Metrics               | DeepSeek-R1-Distill-Qwen-32B-H100-CUDA | DeepSeek-R1-Distill-Qwen-32B-H100-FlagOS |
| :-------------------- | -------------------------------------- | ---------------------------------------- |
| GSM8K (EM)            | 87.64                                  | 87.79                                    |
| MMLU (Acc.)           | 79.33                                  | 79.35                                    |
| CEVAL                 | 83.43                                  | 83.21                                    |
| AIME 2024 (Pass@1)    | 73.33                                  | 73.33                                    |
| GPQA-Diamond (Pass@1) | 59.60                                  | 59.60                                    |
| MATH-500 pass@1       | 92.80                                  | 92.00                                    |
"""
SEED_ILUVATAR_TABLE = """
| Metrics               | DeepSeek-R1-H100-CUDA | DeepSeek-R1-FlagOS-Iluvatar-INT8 |
| --------------------- | --------------------- | -------------------------------- |
| GSM8K (EM)            | 95.75                 | 95.53                            |
| MMLU (Acc.)           | 85.34                 | 82.16                            |
| CEVAL                 | 89.00                 | 80.31                            |
| MATH-500 (Pass@1)     | 93.20                 | TBD                              |
| GPQA-Diamond (Pass@1) | 70.20                 | TBD                              |
| AIME 2024 (Pass@1)    | 76.67                 | TBD                              |
"""
SEED_NVIDIA_DOCKER = (
    "docker run -itd --name flagrelease_nv  --privileged --gpus all --net=host --ipc=host "
    "--device=/dev/infiniband --shm-size 512g --ulimit memlock=-1 -v /nfs/DeepSeek-R1-Distill-Qwen-32B:"
    "/nfs/DeepSeek-R1-Distill-Qwen-32B flagrelease-registry.cn-beijing.cr.aliyuncs.com/flagrelease/"
    "flagrelease:deepseek-flagos-nvidia /bin/bash"
)
SEED_ILUVATAR_DOCKER = (
    'docker run --shm-size="32g" -itd -v /dev:/dev -v /usr/src/:/usr/src -v /lib/modules/:/lib/modules '
    "-v /mnt/share:/data1 --privileged --cap-add=ALL --pid=host --net=host --name flagrelease_bi baai:v5"
)
SEEDS = {
    "deepseek-r1-distill-qwen-32b-nvidia": ("seed_nvidia_results.json", SEED_NVIDIA_TABLE),
    "deepseek-r1-iluvatar": ("seed_iluvatar_results.json", SEED_ILUVATAR_TABLE),
}


@pytest.fixture(autouse=True)
def _public_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cards link to the public hubs; a mirror set in the environment would change them."""
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)


def _table(text: str) -> list[list[str]]:
    """The first Markdown table in ``text`` as cells, without the separator row."""
    rows = []
    for line in text.strip().splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows


def _section(card: str, title: str) -> str:
    start = card.index(f"# {title}\n")
    nxt = re.search(r"^# ", card[start + 2 :], re.M)
    return card[start : start + 2 + nxt.start()] if nxt else card[start:]


def _code_line(card: str, prefix: str) -> str:
    lines = [line for line in card.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return lines[0]


def _render_seed(name: str, tmp_path: Path) -> str:
    results = DATA / SEEDS[name][0]
    return render_card_cli(CONFIGS / f"{name}.yaml", results=results, out_dir=tmp_path / name).read_text()


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_evaluation_table_is_reproduced(name: str, tmp_path: Path) -> None:
    card = _render_seed(name, tmp_path)
    ours = _table(_section(card, "Evaluation Results"))
    seed = _table(SEEDS[name][1])
    assert [r[:3] for r in ours] == seed  # headers, labels, numbers and row order
    assert ours[0][3:] == ["Diff (90% CI)", "Verdict"]  # the TOST's 1 - 2 alpha interval, alpha 0.05
    for row in ours[1:]:
        assert row[4] in ("inconclusive", "missing")
        assert (row[4] == "missing") == ("TBD" in row[1:3])


def test_seed_docker_and_serve_commands_nvidia(tmp_path: Path) -> None:
    card = _render_seed("deepseek-r1-distill-qwen-32b-nvidia", tmp_path)
    assert shlex.split(_code_line(card, "docker run ")) == shlex.split(SEED_NVIDIA_DOCKER)
    assert _code_line(card, "docker pull ") == (
        "docker pull flagrelease-registry.cn-beijing.cr.aliyuncs.com/flagrelease/flagrelease:deepseek-flagos-nvidia"
    )
    assert "docker exec -it flagrelease_nv /bin/bash" in card
    assert _code_line(card, "flagscale serve") == "flagscale serve deepseek_r1_distill_qwen_32b"
    experiment = yaml.safe_load(_fenced_after(card, "conf/config_deepseek_r1_distill_qwen_32b.yaml`:"))
    assert experiment["experiment"]["envs"] == {"CUDA_DEVICE_MAX_CONNECTIONS": 1}
    serve = yaml.safe_load(_fenced_after(card, "conf/serve/deepseek_r1_distill_qwen_32b.yaml`:"))
    args = serve[0]["engine_args"]
    assert (args["model"], args["tensor_parallel_size"], args["max_model_len"], args["port"]) == (
        "/nfs/DeepSeek-R1-Distill-Qwen-32B",
        8,
        32768,
        9010,
    )


def test_seed_docker_and_serve_commands_iluvatar(tmp_path: Path) -> None:
    card = _render_seed("deepseek-r1-iluvatar", tmp_path)
    ours = shlex.split(_code_line(card, "docker run "))
    seed = shlex.split(SEED_ILUVATAR_DOCKER)
    # Every flag of the published command, in the same order; our image and weights mount
    # replace the vendor's base image and its site-specific /mnt/share mount.
    mount = seed.index("/mnt/share:/data1")
    seed_flags = [
        t
        for i, t in enumerate(seed[2:-1], 2)
        if i not in (mount - 1, mount) and t not in ("-itd", "--name", "flagrelease_bi")
    ]
    ours_flags = [t for t in ours[2:-2] if t not in ("-itd", "--name", "flagrelease_bi")]
    assert ours_flags[: len(seed_flags)] == seed_flags
    assert ours_flags[len(seed_flags) :] == ["-v", "/data1/models/DeepSeek-R1-INT8:/data1/models/DeepSeek-R1-INT8"]
    assert ours[-2:] == [
        "flagrelease-registry.cn-beijing.cr.aliyuncs.com/flagrelease/flagrelease:deepseek-r1-flagos-iluvatar-int8",
        "/bin/bash",
    ]
    assert "--name flagrelease_bi" in _code_line(card, "docker run ")
    assert _code_line(card, "flagscale serve") == "flagscale serve deepseek_r1"
    hostfile = _fenced_after(card, "conf/hostfile.txt`:")
    assert "iluvatar-node-0 slots=16 type=gpu" in hostfile and "iluvatar-node-1 slots=16 type=gpu" in hostfile
    serve = yaml.safe_load(_fenced_after(card, "conf/serve/deepseek_r1.yaml`:"))[0]["engine_args"]
    assert (serve["tensor_parallel_size"], serve["pipeline_parallel_size"], serve["max_model_len"]) == (8, 4, 5120)
    # The converted weights are published, so the card downloads them from the release's repo.
    assert (
        "modelscope download --model FlagRelease/DeepSeek-R1-FlagOS-Iluvatar-INT8 "
        "--local_dir /data1/models/DeepSeek-R1-INT8"
    ) in card
    assert "Run this on every node listed in `hostfile.txt` (2 nodes)." in card


def _fenced_after(card: str, marker: str) -> str:
    rest = card[card.index(marker) :]
    m = re.search(r"```[a-z]*\n(.*?)\n```", rest, re.S)
    assert m is not None
    return m.group(1)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_card_structure(name: str, tmp_path: Path) -> None:
    card = _render_seed(name, tmp_path)
    front = yaml.safe_load(card.split("---\n")[1])
    cfg_repo = {
        "deepseek-r1-iluvatar": "deepseek-ai/DeepSeek-R1",
        "deepseek-r1-distill-qwen-32b-nvidia": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    }[name]
    assert front["base_model"] == cfg_repo and front["pipeline_tag"] == "text-generation"
    assert front["license"] in ("mit", "apache-2.0") and "flagos" in front["tags"]
    headings = [line for line in card.splitlines() if re.match(r"^#{1,3} ", line)]
    for title in (
        "# Introduction",
        "# Technical Summary",
        "## Serving Engine",
        "## Triton Support",
        "# Bundle Download",
        "# Evaluation Results",
        "## Benchmark Result",
        "# How to Run Locally",
        "### Download the FlagOS image",
        "### Start the inference service",
        "### Download and install FlagGems",
        "### Modify the configuration",
        "### Serve",
        "# Contributing",
        "# License",
    ):
        assert title in headings, title
    assert headings.index("# Introduction") < headings.index("# Evaluation Results") < headings.index("# License")
    assert "{{" not in card and "}}" not in card.replace("${experiment", "")
    # No invented numbers: the Triton share was not measured for these releases.
    assert "70%" not in card and "was not measured" in card
    if name == "deepseek-r1-iluvatar":
        assert "## INT8 Quantization" in card and "2. INT8 Checkpoints:" in card
        assert "DeepSeek-R1-FlagOS-Iluvatar-INT8 provides" in card
        missing = _section(card, "Evaluation Results").split("### Missing results")[1]
        for label in ("MATH-500 (Pass@1)", "GPQA-Diamond (Pass@1)", "AIME 2024 (Pass@1)"):
            assert f"- {label}: DeepSeek-R1-FlagOS-Iluvatar-INT8 score" in missing
        assert "Quantization error report" in missing
    else:
        assert "INT8" not in card and "DeepSeek-R1-Distill-Qwen-32B-FlagOS-NVIDIA provides" in card
        assert "TBD" not in _section(card, "Evaluation Results").split("### Missing")[0]
    assert "The weights of this model are based on " + cfg_repo in card


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_card_snapshot(name: str, tmp_path: Path) -> None:
    card = _render_seed(name, tmp_path)
    snapshot = SNAPSHOTS / f"card_{name}.md"
    if os.environ.get("FLAGRELEASE_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(card)
    assert snapshot.is_file(), f"no snapshot {snapshot}; run with FLAGRELEASE_UPDATE_SNAPSHOTS=1 to create it"
    assert card == snapshot.read_text(), (
        f"the card of {name} changed; review the diff and re-run with FLAGRELEASE_UPDATE_SNAPSHOTS=1 if intended"
    )


def test_without_results_every_row_is_tbd_and_listed_missing(tmp_path: Path) -> None:
    card = render_card_cli(
        CONFIGS / "deepseek-r1-distill-qwen-32b-nvidia.yaml", results=None, out_dir=tmp_path
    ).read_text()
    rows = _table(_section(card, "Evaluation Results"))
    assert rows[0][:3] == [
        "Metrics",
        "DeepSeek-R1-Distill-Qwen-32B-H100-CUDA",
        "DeepSeek-R1-Distill-Qwen-32B-FlagOS-NVIDIA",
    ]
    labels = ["GSM8K (EM)", "MMLU (Acc.)", "CEVAL", "AIME 2024 (Pass@1)", "GPQA-Diamond (Pass@1)", "MATH-500 pass@1"]
    assert [r[0] for r in rows[1:]] == labels
    assert all(r[1:4] == ["TBD", "TBD", "TBD"] and r[4] == "missing" for r in rows[1:])
    missing = card.split("### Missing results")[1].split("\n# ")[0]
    for label in labels:
        assert f"- {label}: DeepSeek-R1-Distill-Qwen-32B-H100-CUDA score" in missing
    # TBD only in the evaluation table: nothing else is a placeholder.
    assert card.count("TBD") == 3 * len(labels)


def test_results_that_are_not_gate_results_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scores": {}}))
    with pytest.raises(GateError, match="'rows'"):
        render_card_cli(CONFIGS / "deepseek-r1-iluvatar.yaml", results=bad, out_dir=tmp_path / "out")


def test_cli_card_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "card",
            str(CONFIGS / "deepseek-r1-iluvatar.yaml"),
            "--results",
            str(DATA / "seed_iluvatar_results.json"),
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert rc == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == tmp_path / "cli" / "README.md" and "95.53" in out.read_text()


# -- the card stage -------------------------------------------------------------------------------
def test_card_stage_writes_card_and_valid_manifest(tmp_path: Path) -> None:
    gems = {"gems_library": "flag_gems", "flag_gems_version": "2.2"}
    ctx = build_release(tmp_path, triton_share=0.713, deploy=gems, image={"warning": "no Docker engine answers"})
    result = run_stage(ctx)
    lay = ctx.layout
    assert result.outputs["card"] == str(lay.card_path) and result.outputs["manifest"] == str(lay.manifest_path)
    card = lay.card_path.read_text()
    manifest = load_manifest(lay.manifest_path)  # validates against the schema
    # gate results, the quantization report and the Dockerfile were copied into the bundle
    assert (lay.reports_dir / "gate_results.json").is_file() and (lay.reports_dir / "quant_report.json").is_file()
    assert (lay.bundle_dir / "image" / "Dockerfile").is_file()
    assert manifest["eval"]["results_file"] == "reports/gate_results.json"
    assert manifest["conversion"]["report"] == "reports/quant_report.json"
    rows = _table(_section(card, "Evaluation Results"))
    assert rows[1] == ["TinyArith (EM)", "91.00", "90.50", "-0.50 [-1.60, +0.60]", "consistent"]
    assert rows[2] == ["TinyArith-MC (Acc.)", "88.00", "87.50", "-0.50 [-2.10, +1.10]", "consistent"]
    assert "account for 71.3% of the operator calls" in card
    assert "`addmm`, `silu_and_mul`, `rms_norm`" in card
    assert "| max_rel_error     | 0.0123 |" in card
    assert "- Weights: 8-bit int, per channel, symmetric, static scales." in card
    assert "- Activations: 8-bit int, per token, symmetric, scales computed at run time." in card
    assert "Overall gate verdict: **consistent**." in card
    assert "TBD" not in card and GATE_FAILED_MARKER not in card and "FAILED its consistency gate" not in card
    # the image was not built here: a banner says so, above the introduction
    banner = "**The image of this release was not pushed to a registry**: no Docker engine answers"
    assert card.index(banner) < card.index("# Introduction")
    assert "Tiny-Qwen2-FlagOS-CPU-INT8 provides" in card
    assert "not built by this release; build it from `image` in this bundle" in card
    assert result.status == "ok" and result.tables["evaluation"][0]["Verdict"] == "consistent"


def test_gate_failure_published_anyway_shows_a_warning_at_the_top(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, verdict="inconsistent", throughput_ok=False, publish_on_fail=True)
    result = run_stage(ctx)
    card = ctx.layout.card_path.read_text()
    body = card.split("---\n", 2)[2]
    warning = body[: body.index("# Introduction")]
    assert GATE_FAILED_MARKER in warning and "[!WARNING]" in warning
    assert "FAILED its consistency gate and was published anyway" in warning
    assert "inconsistent with the reference on TinyArith (EM)" in warning
    assert "throughput ratio 0.4 is below the minimum 0.5" in warning
    assert result.status == "warning" and result.outputs["gate_failed"] is True
    assert load_manifest(ctx.layout.manifest_path)["gate"]["failed"] is True


def test_card_stage_dry_run_writes_nothing(tmp_path: Path) -> None:
    ctx = build_release(tmp_path)
    ctx.dry_run = True
    result = run_stage(ctx)
    assert result.status == "skipped" and "dry run" in result.summary
    assert not ctx.layout.card_path.exists() and not ctx.layout.manifest_path.exists()
    assert not (ctx.layout.reports_dir / "gate_results.json").exists()
