"""Secrets are references, never values (issue 12, item 3).

A literal secret in a config is refused with the fix in the message; ``{secret: NAME}`` is
resolved at run time, reaches the server through its environment only, and appears in no
rendered file; redaction masks every known token shape, of any length.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from flagrelease import secrets
from flagrelease._redact import MASK, find_secret, redact
from flagrelease.config import load_release
from flagrelease.errors import ConfigError
from flagrelease.image import render_dockerfile
from flagrelease.render import render_serve_configs, serve_env, serve_secret_refs, serve_secrets
from tests.hostile._harness import BASE, set_path


def _config(tmp_path: Path, changes: dict[str, Any]) -> Path:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        set_path(data, dotted, value)
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"serve.envs": {"HF_TOKEN": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"}}, "serve.envs"),
        ({"serve.envs": {"MY_SERVICE_PASSWORD": "correct horse battery staple"}}, "serve.envs"),
        ({"serve.envs": {"OPENAI_API_KEY": "not-even-token-shaped"}}, "serve.envs"),
        ({"serve.envs": {"DB_SECRET": ""}}, "serve.envs"),
        ({"serve.envs": {"HARMLESS": "hf_x1Y2z3"}}, "serve.envs.HARMLESS"),
        ({"serve.envs": {"HARMLESS": "AKIAIOSFODNN7EXAMPLE"}}, "serve.envs.HARMLESS"),
        ({"description": "token sk-proj-Abc123Def456Ghi789 inside"}, "description"),
        ({"serve.before_start": ["export HF_TOKEN=hf_abc123XYZ"]}, "serve.before_start[0]"),
        ({"serve.before_start": ["export MY_PASSWORD=hunter2"]}, "serve.before_start[0]"),
        ({"image.pip_index_url": "https://user:hunter2@pypi.example.com/simple"}, "image.pip_index_url"),
        ({"serve.engine_args.api_key": "abc"}, "serve.engine_args"),
        ({"serve.engine_args.hf_token": "abc"}, "serve.engine_args"),
        ({"eval.reference.engine_args": {"api-key": "abc"}}, "eval.reference.engine_args"),
    ],
)
def test_a_literal_secret_is_refused_with_the_fix(
    tmp_path: Path, changes: dict[str, Any], field: str, totals: Counter[str]
) -> None:
    path = _config(tmp_path, changes)
    totals["tried"] += 1
    with pytest.raises(ConfigError) as info:
        load_release(path)
    totals["refused"] += 1
    message = str(info.value)
    assert any(f.startswith(field) for f, _ in info.value.errors), info.value.errors
    assert "{secret:" in message or "secret: NAME" in message or "credentials another way" in message
    for value in ("hf_AbCdEf", "correct horse", "not-even-token", "hf_x1Y2z3", "AKIAIOSF", "sk-proj", "hunter2"):
        assert value not in message, f"the message repeats the secret {value!r}"


@pytest.mark.parametrize(
    "name", ["TOKENIZERS_PARALLELISM", "MAX_TOKENS", "CUDA_VISIBLE_DEVICES", "KEYBOARD", "VLLM_CPU_KVCACHE_SPACE"]
)
def test_names_that_only_look_alike_are_allowed(tmp_path: Path, name: str) -> None:
    cfg = load_release(_config(tmp_path, {"serve.envs": {name: "1"}}))
    assert serve_env(cfg)[name] == "1"


def test_a_secret_reference_reaches_the_server_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, totals: Counter[str]
) -> None:
    value = "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42"
    cfg = load_release(_config(tmp_path, {"serve.envs": {"HF_TOKEN": {"secret": "RELEASE_HF_TOKEN"}, "PLAIN": "1"}}))
    assert serve_secret_refs(cfg) == {"HF_TOKEN": "RELEASE_HF_TOKEN"}
    assert "HF_TOKEN" not in serve_env(cfg) and serve_env(cfg)["PLAIN"] == "1"
    out = tmp_path / "conf"
    files = render_serve_configs(cfg, out_dir=out)
    dockerfile = render_dockerfile(cfg, commit="0" * 40)
    texts = {p.name: p.read_text(encoding="utf-8") for p in files} | {"Dockerfile": dockerfile}
    assert "HF_TOKEN" not in dockerfile, "a secret is never an ENV of the image"
    experiment = next(t for n, t in texts.items() if n.startswith("config_"))
    assert yaml.safe_load(experiment)["experiment"]["envs"]["HF_TOKEN"] == "${oc.env:RELEASE_HF_TOKEN}"
    # The script reads it where it runs: a stub vllm reports what it got.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vllm").write_text(f"#!{sys.executable}\nimport os\nprint(os.environ['HF_TOKEN'])\n")
    (bindir / "vllm").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    run = ["/bin/bash", str(out / "vllm_serve.sh")]
    ok = subprocess.run(run, env={**env, "RELEASE_HF_TOKEN": value}, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.strip() == value, ok.stderr
    missing = subprocess.run(run, env=env, capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "set RELEASE_HF_TOKEN in the environment" in missing.stderr
    # Resolution for a process's environment, registered for redaction.
    monkeypatch.setenv("RELEASE_HF_TOKEN", value)
    assert serve_secrets(cfg) == {"HF_TOKEN": value}
    assert redact(f"log line with {value}") == f"log line with {MASK}"
    totals["tried"] += 1
    hits = sum(value in t for t in texts.values())
    totals["secret_hits"] += hits
    totals["escaped" if not hits else "defect"] += 1
    assert not hits


def test_a_missing_secret_says_how_to_set_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_release(_config(tmp_path, {"serve.envs": {"HF_TOKEN": {"secret": "NOT_SET_ANYWHERE"}}}))
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match=r"export NOT_SET_ANYWHERE=.*Secret block named 'not-set-anywhere'"):
        serve_secrets(cfg)


def test_a_registered_resolver_is_asked_after_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tasks/ registers one that reads Prefect Secret blocks; the library asks it by name and block name."""
    asked: list[tuple[str, str]] = []

    def blocks(name: str, block: str) -> str | None:
        asked.append((name, block))
        return "from-a-block-0123456789" if block == "team-token" else None

    monkeypatch.setattr(secrets, "_resolvers", [])  # this test's resolver only, gone afterwards
    secrets.register_resolver(blocks)
    cfg = load_release(_config(tmp_path, {"serve.envs": {"TEAM_TOKEN": {"secret": "TEAM_TOKEN"}}}))
    monkeypatch.delenv("TEAM_TOKEN", raising=False)
    assert serve_secrets(cfg) == {"TEAM_TOKEN": "from-a-block-0123456789"}
    assert ("TEAM_TOKEN", "team-token") in asked
    monkeypatch.setenv("TEAM_TOKEN", "from-the-env-0123456789")
    asked.clear()
    assert serve_secrets(cfg) == {"TEAM_TOKEN": "from-the-env-0123456789"} and not asked
    assert "from-a-block-0123456789" not in redact("x from-a-block-0123456789 y")


#: Token shapes of every length their issuers use, and look-alikes that are not secrets.
_TOKENS = [
    "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7",  # a real-length Hugging Face token
    "hf_x1Y2z3",  # a short one (missed before)
    "hf_" + "q" * 20,
    "api_org_AbCdEfGhIjKlMnOpQrStUvWxYz0123456",
    "AKIAIOSFODNN7EXAMPLE",
    "ASIAY34FZKBOKMUTVV7A",
    "sk-proj-Abc123Def456Ghi789Jkl",
    "sk-ant-api03-AbC123",
    "ghp_0123456789abcdefABCDEF0123456789abcd",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "glpat-AbCdEf123456",
    "xoxb-123456789012-abcdef",
    "AIzaSyA1234567890abcdefghijklmnop",
    "ms-01234567-89ab-cdef-0123-456789abcdef",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc123",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
]
_NOT_SECRETS = [
    "hf_transfer",
    "hf_hub_download",
    "hf_repo",
    "HF_TOKEN",
    "scikit-learn sk-learn",
    "task-abc",
    "max_tokens: 256",
    "MAX_TOKENS=5",
    "export HF_TOKEN=$HF_TOKEN",
    'export HF_TOKEN="${HF_TOKEN:?set it}"',
    "https://huggingface.co/org/model",
]


@pytest.mark.parametrize("token", _TOKENS)
def test_redaction_covers_every_token_shape(token: str) -> None:
    for text in (token, f"before {token} after", f'{{"token": "{token}"}}', f"TOKEN={token}"):
        clean = redact(text)
        assert token not in clean and MASK in clean, (text, clean)
    assert find_secret(token)


@pytest.mark.parametrize("text", _NOT_SECRETS)
def test_redaction_leaves_look_alikes(text: str) -> None:
    assert redact(text) == text
    assert find_secret(text) is None


def test_redaction_masks_credentials_and_assignments() -> None:
    assert redact("https://user:pass@host/x") == f"https://{MASK}@host/x"
    assert redact("export MY_PASSWORD=hunter2 && go") == f"export MY_PASSWORD={MASK} && go"
    assert redact("Authorization: Bearer abcdef123") == f"Authorization: Bearer {MASK}"
    assert json.loads(redact(json.dumps({"k": "hf_x1Y2z3"}))) == {"k": MASK}


@pytest.mark.slow
def test_under_prefect_a_secret_comes_from_its_secret_block(tmp_path: Path, prefect_server: Any) -> None:
    """tasks/ registers a resolver that reads the Secret block named after the secret (real Prefect server)."""
    config = _config(tmp_path, {"serve.envs": {"HF_TOKEN": {"secret": "BLOCK_ONLY_TOKEN"}}})
    code = (
        "import json, sys\n"
        "from prefect.blocks.system import Secret\n"
        "Secret(value='hf_FromThePrefectBlock0123456789').save('block-only-token', overwrite=True)\n"
        "import tasks._common  # registers the resolver, as every stage task does\n"
        "from flagrelease.config import load_release\n"
        "from flagrelease.render import serve_secrets\n"
        f"print(json.dumps(serve_secrets(load_release({str(config)!r}))))\n"
    )
    env = prefect_server.env()
    env.pop("BLOCK_ONLY_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"HF_TOKEN": "hf_FromThePrefectBlock0123456789"}
