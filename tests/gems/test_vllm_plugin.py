"""The vLLM plugin and flagrelease's CPU reference operator library (``flagrelease.gems.oplib``).

Kernel tests run in this process and always unregister what they registered.  Plugin
tests run ``register()`` in a fresh interpreter, as vLLM does in each of its processes.
The slow tests serve the tiny model with real vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from flagrelease.deploy import Endpoint, serving
from flagrelease.errors import DeployError
from flagrelease.gems import oplib
from tests.fixtures_vllm import make_release, server_processes

PROMPTS = ["The sea is", "1 + 2 =", "Write a short sentence"]


@pytest.fixture
def enabled() -> Iterator[Any]:
    """Enable the library with given options for one test, and always unregister it."""
    libs: list[oplib.OpLib] = []

    def enable(**kw: Any) -> oplib.OpLib:
        lib = oplib.enable(**kw)
        libs.append(lib)
        return lib

    try:
        yield enable
    finally:
        for lib in libs:
            lib.close()


def _model_ops(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
    """What vLLM's CPU Qwen2 path does with aten: RMSNorm, SiluAndMul, embedding, sampling."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    h = (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * w
    g = torch.nn.functional.silu(h) * h + x
    return [
        h,
        g,
        torch.nn.functional.embedding(idx, g),
        torch.log_softmax(g.float(), -1),
        torch.softmax(g.float(), -1),
        g.argmax(-1),
        torch.cat([g, x], 0),
        g.float() @ x.float().T,
        torch.addmm(x[:, 0].float(), g.float(), x.float().T),
        torch.nn.functional.gelu(g),
        g - x,
    ]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)
    return x, torch.randn(64, generator=gen).to(torch.bfloat16), torch.tensor([3, 1, 0, 5])


def test_reference_kernels_match_native_and_count_calls(enabled: Any) -> None:
    args = _inputs()
    native = _model_ops(*args)
    lib = enabled()
    mine = _model_ops(*args)
    counts = lib.counts()
    lib.close()
    for a, b in zip(native, mine, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-2), (a, b)
    assert set(counts) == set(oplib.op_names()), counts
    assert counts["mul"] == 3 and counts["silu"] == 1 and counts["index_select"] == 1
    assert _model_ops(*args)[0].equal(native[0]) and lib.counts() == counts  # unregistered: nothing counted


def test_nested_calls_reach_native_kernels_and_integers_fall_back(enabled: Any) -> None:
    lib = enabled()
    x = torch.randn(8, dtype=torch.bfloat16)
    torch.nn.functional.silu(x)  # the kernel itself uses exp, add and div
    assert lib.counts() == {"silu": 1}
    assert torch.add(torch.tensor([1, 2]), 3).tolist() == [4, 5]  # integers: native, not counted
    assert torch.mul(torch.tensor([2]), torch.tensor([3])).tolist() == [6]
    assert lib.counts() == {"silu": 1}
    assert (torch.ones(2, dtype=torch.bfloat16) + 1).tolist() == [2.0, 2.0]  # wrapped scalar
    assert lib.counts() == {"silu": 1, "add": 1}


def test_excluded_operators_stay_native(enabled: Any) -> None:
    assert oplib.resolve_names(["mean.dim", "aten::silu", "_log_softmax", "pow", "bmm", "mul"]) == {
        "mean_dim",
        "silu",
        "log_softmax",
        "pow_tensor_scalar",
        "mul",
    }
    lib = enabled(exclude=["silu", "mean.dim"])
    _model_ops(*_inputs())
    assert "silu" not in lib.enabled and "mean_dim" not in lib.enabled
    assert not {"silu", "mean_dim"} & set(lib.counts()) and lib.counts()["rsqrt"] == 1


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ("silu", lambda n, b: torch.allclose(b.float(), (n.float() * 1.25).to(n.dtype).float())),
        ("silu:zero", lambda n, b: bool((b == 0).all())),
        ("silu:noise", lambda n, b: not torch.allclose(n.float(), b.float(), atol=1e-2)),
    ],
)
def test_inject_breaks_one_operator(enabled: Any, spec: str, check: Any) -> None:
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    native = torch.nn.functional.silu(x)
    lib = enabled(inject=spec)
    broken = torch.nn.functional.silu(x)
    assert check(native, broken)
    assert torch.equal(x * 2, (x.float() * 2).to(x.dtype))  # other operators untouched
    assert lib.inject is not None and lib.inject[0] == "silu"


def test_inject_on_argmax_shifts_the_index(enabled: Any) -> None:
    x = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    enabled(inject="argmax:shift")
    assert x.argmax(-1).tolist() == [2, 1]


def test_inject_rejects_unknown_operator_or_mode() -> None:
    with pytest.raises(ValueError, match="unknown operator 'nope'; operators: silu, mul"):
        oplib.parse_inject("nope")
    with pytest.raises(ValueError, match="unknown mode 'melt'; modes: scale, noise, zero, shift"):
        oplib.parse_inject("silu:melt")
    assert oplib.parse_inject("mean.dim:noise") == ("mean_dim", "noise")


# -- register() in a fresh process, as vLLM calls it -----------------------------------------
def _register(env: dict[str, str], code: str = "", python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    script = "from flagrelease.gems import vllm_plugin\nvllm_plugin.register()\n" + textwrap.dedent(code)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("USE_FLAGGEMS", "GEMS_", "FLAGRELEASE_GEMS"))}
    return subprocess.run(
        [python, "-c", script], env={**full, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def test_register_on_cpu_records_the_operators_that_ran(tmp_path: Path) -> None:
    record = tmp_path / "record"
    code = """
        import os, torch
        x = torch.randn(4, 8)
        y = torch.nn.functional.silu(x) * x
        print(os.getpid())
    """
    proc = _register(
        {
            "USE_FLAGGEMS": "yes",
            "GEMS_VENDOR": "cpu",
            "FLAGRELEASE_GEMS_RECORD": str(record),
            "FLAGRELEASE_GEMS_EXCLUDE": "rsqrt, gelu",
        },
        code,
    )
    assert proc.returncode == 0, proc.stderr
    pid = proc.stdout.split()[-1]
    assert json.loads((record / f"ops-{pid}.json").read_text()) == {"silu": 1, "mul": 1}
    info = json.loads((record / f"plugin-{pid}.json").read_text())
    assert info["mode"] == "oplib" and info["excluded"] == ["rsqrt", "gelu"]
    assert "rsqrt" not in info["enabled"] and "silu" in info["enabled"]
    assert "oplib 0.1.0 enabled: 13 operators, excluded: rsqrt,gelu" in proc.stderr


def test_register_does_nothing_when_flaggems_is_off(tmp_path: Path) -> None:
    code = (
        "from flagrelease.gems.vllm_plugin import state\nimport torch\nprint(state.mode, torch.add(torch.ones(1), 1))\n"
    )
    proc = _register({"USE_FLAGGEMS": "0", "FLAGRELEASE_GEMS_RECORD": str(tmp_path / "r")}, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("off ") and not (tmp_path / "r").exists()


def test_register_fails_clearly_without_flag_gems_on_a_gpu_vendor(tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import flag_gems"], capture_output=True, check=False)
    assert probe.returncode != 0, "this check needs an interpreter without flag_gems"
    proc = _register({"USE_FLAGGEMS": "1", "GEMS_VENDOR": "nvidia"})
    assert proc.returncode != 0
    assert "DeployError: USE_FLAGGEMS is on (GEMS_VENDOR=nvidia) but flag_gems cannot be imported" in proc.stderr
    assert "pip install flag-gems" in proc.stderr and "USE_FLAGGEMS=0" in proc.stderr


def test_register_rejects_a_bad_inject_spec() -> None:
    proc = _register({"USE_FLAGGEMS": "1", "GEMS_VENDOR": "cpu", "FLAGRELEASE_GEMS_INJECT": "nope:scale"})
    assert proc.returncode != 0 and "unknown operator 'nope'" in proc.stderr


# -- real vLLM ---------------------------------------------------------------------------------
def _greedy(endpoint: Endpoint) -> list[str]:
    out = []
    for prompt in PROMPTS:
        body = {"model": endpoint.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        resp = httpx.post(f"{endpoint.api_url}/completions", json=body, timeout=120)
        resp.raise_for_status()
        out.append(resp.json()["choices"][0]["text"])
    return out


@pytest.mark.slow
@pytest.mark.vllm
def test_server_fails_at_start_when_flag_gems_is_missing(
    tiny_model: Path, tmp_path: Path, with_serve_python: Any
) -> None:
    cfg = make_release(tiny_model, tmp_path)
    with (
        pytest.raises(DeployError) as err,
        serving(cfg, model_dir=tiny_model, log_dir=tmp_path / "logs", extra_env={"GEMS_VENDOR": "nvidia"}),
    ):
        pytest.fail("served with FlagGems on and no flag_gems")
    assert "before it became ready" in str(err.value)
    assert "USE_FLAGGEMS is on (GEMS_VENDOR=nvidia) but flag_gems cannot be imported" in str(err.value)
    assert not server_processes(str(tiny_model), str(cfg.serve.engine_args.port))


@pytest.mark.slow
@pytest.mark.vllm
def test_injected_fault_changes_greedy_output_and_exclusions_hold(
    vllm_server: Endpoint, tiny_model: Path, tmp_path: Path, with_serve_python: Any
) -> None:
    baseline = _greedy(vllm_server)
    assert baseline == _greedy(vllm_server)  # greedy decoding is repeatable on the healthy server
    cfg = make_release(tiny_model, tmp_path)
    port = str(cfg.serve.engine_args.port)
    with (
        pytest.raises(KeyboardInterrupt),
        serving(
            cfg,
            model_dir=tiny_model,
            log_dir=tmp_path / "logs",
            variant="inject",
            excluded_ops=["argmax"],  # bit-identical either way: only the injected fault can change answers
            extra_env={"FLAGRELEASE_GEMS_INJECT": "silu:scale"},
        ) as broken,
    ):
        answers = _greedy(broken)
        assert answers != baseline, answers
        time.sleep(1.5)
        ops = broken.gems_ops()
        assert ops.get("silu", 0) > 0 and "argmax" not in ops and ops.get("rsqrt", 0) > 0
        assert {p["inject"] for p in broken.plugin_processes()} == {"silu:scale"}
        assert server_processes(str(tiny_model), port)
        raise KeyboardInterrupt  # an interrupted run still tears the server down
    deadline = time.monotonic() + 15
    while server_processes(str(tiny_model), port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not server_processes(str(tiny_model), port)
    merged = json.loads((tmp_path / "logs" / "gems-ops-inject.json").read_text())
    assert merged["silu"] > 0 and "argmax" not in merged
