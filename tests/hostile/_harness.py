"""The hostile-input suite's machinery: a config that sets every string, payloads, renders and checks.

One *case* is one config: :data:`BASE` with one field replaced by one payload.  It is
either refused when it loads (a :class:`~flagrelease.errors.ConfigError` naming the file
and the field), refused when it renders (the same, from the renderer), or accepted; an
accepted case is rendered everywhere a value lands (the FlagScale experiment and serve
configs, the hostfile, ``vllm_serve.sh``, the Dockerfile, the model card) and then
attacked: every shell block of the card and the serve script run under bash with every
external command replaced by a stub that only records its arguments, every YAML is read
back (with OmegaConf too, as FlagScale's Hydra reads it) and compared with what the
config says, and the card's Markdown must keep the structure of the baseline card.
Anything else (a traceback, a canary file, a broken block, a secret in a file) is a
failure, counted and reported.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from flagrelease.card import render_card_cli
from flagrelease.config import ReleaseConfig, load_release
from flagrelease.errors import ConfigError
from flagrelease.image import render_dockerfile
from flagrelease.render import engine_args, serve_files, serve_secret_refs

__all__ = [
    "BASE",
    "CANARY",
    "NUMBER_FIELDS",
    "PAYLOADS",
    "SECRET_ENV",
    "SECRET_PAYLOADS",
    "SHELL_BY_CONTRACT",
    "STRING_FIELDS",
    "Case",
    "Harness",
    "set_path",
]

CANARY = "CANARY"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
COMMIT = "0" * 40

#: A release config that sets every string field flagrelease has (one item per list).
BASE: dict[str, Any] = {
    "description": "A tiny model on the CPU.",
    "model": {
        "source": "hf",
        "repo_id": "org/tiny-model",
        "revision": "a" * 40,
        "display_name": "Tiny-Model",
        "license": "apache-2.0",
        "license_url": "https://example.com/LICENSE",
        "allow_patterns": ["*.json"],
        "ignore_patterns": ["*.bin"],
        "path": "/data/model",
    },
    "chip": "cpu",
    "convert": {"mode": "int8-w8a8", "ignore": ["lm_head"]},
    "image": {
        "base": "python:3.11-slim-bookworm",
        "name": "team/flagrelease",
        "tag": "tiny-flagos-cpu",
        "registry": "127.0.0.1:5000/ns",
        "pip_index_url": "https://pypi.example.com/simple",
        "flag_gems_version": "5.0.2",
        "vllm_version": "0.32.0",
        "on_missing_engine": "keep-context",
    },
    "serve": {
        "engine": "vllm",
        "runtime": "local",
        "serve_id": "vllm_model",
        "container_name": "flagrelease_cpu",
        "model_dir": "/models/tiny",
        "engine_args": {
            "served_model_name": "tiny-flagos",
            "host": "127.0.0.1",
            "dtype": "bfloat16",
            "max_model_len": 512,
            "response_role": "assistant",
        },
        "nodes": ["127.0.0.1 slots=1 type=gpu"],
        "flaggems": {"excluded_ops": ["mm"]},
        "envs": {"EXTRA": "value", "HF_TOKEN": {"secret": "HOSTILE_SUITE_TOKEN"}},
        "before_start": ["export FROM_BEFORE_START=1"],
        "load_test": {"prompt": "Say hello."},
    },
    "eval": {
        "tasks": [
            {
                "name": "gsm8k",
                "label": "GSM8K (EM)",
                "metric": "exact_match",
                "filter": "flexible-extract",
                "kind": "generate",
            }
        ],
        "reference": {"chip": "cpu", "mode": "stored", "results_dir": "/data/reference", "weights": "source"},
        "include_path": "/data/tasks",
        "dataset_cache": "/data/datasets",
    },
    "publish": {
        "hf_repo": "FlagRelease/Tiny-FlagOS-CPU",
        "modelscope_repo": "FlagRelease/Tiny-FlagOS-CPU",
        "s3": {
            "bucket": "releases",
            "prefix": "tiny/v1",
            "endpoint_url": "http://127.0.0.1:9000",
            "region": "us-east-1",
        },
        "registry": "127.0.0.1:5000/published",
        "local_dir": "/data/publish",
    },
    "schedule": "0 2 * * 1",
    "tags": ["demo"],
    "work_dir": "/data/work",
}

#: Every string field of a release config, as a dotted path (``[0]``: the first item of a list).
STRING_FIELDS: list[str] = [
    "description",
    "model.repo_id",
    "model.revision",
    "model.display_name",
    "model.license",
    "model.license_url",
    "model.allow_patterns[0]",
    "model.ignore_patterns[0]",
    "model.path",
    "chip",
    "convert.ignore[0]",
    "convert.mode",
    "image.base",
    "image.name",
    "image.tag",
    "image.registry",
    "image.pip_index_url",
    "image.flag_gems_version",
    "image.vllm_version",
    "image.on_missing_engine",
    "serve.engine",
    "serve.serve_id",
    "serve.container_name",
    "serve.model_dir",
    "serve.runtime",
    "serve.engine_args.served_model_name",
    "serve.engine_args.host",
    "serve.engine_args.dtype",
    "serve.engine_args.response_role",
    "serve.nodes[0]",
    "serve.flaggems.excluded_ops[0]",
    "serve.envs.EXTRA",
    "serve.envs.HF_TOKEN.secret",
    "serve.before_start[0]",
    "serve.load_test.prompt",
    "eval.tasks[0].name",
    "eval.tasks[0].label",
    "eval.tasks[0].metric",
    "eval.tasks[0].filter",
    "eval.tasks[0].kind",
    "eval.reference.chip",
    "eval.reference.mode",
    "eval.reference.results_dir",
    "eval.reference.weights",
    "eval.include_path",
    "eval.dataset_cache",
    "publish.hf_repo",
    "publish.modelscope_repo",
    "publish.s3.bucket",
    "publish.s3.prefix",
    "publish.s3.endpoint_url",
    "publish.s3.region",
    "publish.registry",
    "publish.local_dir",
    "schedule",
    "tags[0]",
    "work_dir",
]

#: Fields that hold shell commands by contract (FlagScale runs them): their payloads are
#: expected to run, so they are checked for YAML and Dockerfile quoting but not for canaries.
SHELL_BY_CONTRACT = frozenset({"serve.before_start[0]"})

#: Every number field, as a dotted path.
NUMBER_FIELDS: list[str] = [
    "convert.group_size",
    "convert.workers",
    "serve.engine_args.tensor_parallel_size",
    "serve.engine_args.pipeline_parallel_size",
    "serve.engine_args.max_model_len",
    "serve.engine_args.max_num_seqs",
    "serve.engine_args.gpu_memory_utilization",
    "serve.engine_args.port",
    "serve.health_timeout_s",
    "serve.load_test.requests_per_level",
    "serve.load_test.max_tokens",
    "serve.load_test.timeout_s",
    "serve.load_test.concurrency[0]",
    "serve.nodes[0].slots",
    "eval.generation.temperature",
    "eval.generation.top_p",
    "eval.generation.max_tokens",
    "eval.generation.seed",
    "eval.samples_per_item",
    "eval.concurrency",
    "eval.limit",
    "eval.tasks[0].limit",
    "eval.tasks[0].num_fewshot",
    "gates.accuracy_margin",
    "gates.alpha",
    "gates.bootstrap_resamples",
    "gates.throughput_min_ratio",
]

#: Secret values a careless config might hold; none may reach any file.
SECRET_PAYLOADS = [
    "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "hf_x1Y2z3",
    "AKIAIOSFODNN7EXAMPLE",
    "sk-proj-Abc123Def456Ghi789",
    "ghp_0123456789abcdefABCDEF",
    "https://user:hunter2@registry.example.com/simple",
]

#: The value the secret reference of :data:`BASE` resolves to when the shells run.
SECRET_ENV = {"HOSTILE_SUITE_TOKEN": "hf_RuntimeOnlyValue0123456789ABCDEF"}

_INJECTIONS = [
    f"$(>{CANARY})",
    f"`>{CANARY}`",
    f";>{CANARY};#",
    f"&& >{CANARY} #",
    f"|>{CANARY}",
    f"'; >{CANARY}; echo '",
    f'"; >{CANARY}; echo "',
    f'\\"; >{CANARY}; echo \\"',
    f"${{IFS}}>{CANARY}",
    f"$(/usr/bin/touch {CANARY})",
    f"x\n>{CANARY}\n",
    f"x\r\n>{CANARY}",
    f'Tiny\n"$(>{CANARY})": 1\nflagscale_extra_key: injected\n#',
    "a\x00b",
    "a\x1b[31mred",
    "key: value",
    "- item",
    "{a: b, c: [d]}",
    "&anchor x",
    "*alias",
    "!!python/object/apply:os.system ['true']",
    "%YAML 1.2",
    "{{ 7 * 7 }}{% raw %}",
    "${oc.env:HOME}",
    "${experiment.exp_name}",
    "\\${escaped}",
    "| a | b |",
    "```\n# injected heading",
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "# Heading",
    "\u202eevil\u202c",
    "line\u2028separator",
    "../../etc/passwd",
    "--help",
    "-rf",
    "*",
    "~",
    "$HOME",
    "'\"`\\",
    "",
    " ",
    "a" * 5000,
]

#: Every payload, by a short name.
PAYLOADS: dict[str, str] = {
    **{f"inject{i:02d}": p for i, p in enumerate(_INJECTIONS)},
    **{f"secret{i}": p for i, p in enumerate(SECRET_PAYLOADS)},
}

_STUBS = [
    "docker", "curl", "vllm", "huggingface-cli", "hf", "aws", "modelscope", "pip", "pip3", "git",
    "flagscale", "python", "python3", "seq", "sleep", "cp", "mkdir", "tee", "cat", "ls", "rm", "touch",
]  # fmt: skip
_PRELUDE = """\
cd() { :; }
command_not_found_handle() { printf 'missing %s\\n' "$*" >> "$STUB_LOG"; return 0; }
"""


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b[0].c`` in ``data`` (lists and mappings must exist)."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part[1:-1]) if part.startswith("[") else part
        if last:
            node[key] = value
        else:
            node = node[key]


@dataclass
class Case:
    """The outcome of one config."""

    field: str
    payload: str
    outcome: str = ""  # refused | escaped | traceback | defect
    problems: list[str] = field(default_factory=list)


@dataclass
class _Baseline:
    card: tuple[Any, ...]
    dockerfile: list[str]


class Harness:
    """Runs cases in ``root`` (a temporary folder) and tallies them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "stubs"
        self.bin.mkdir(parents=True, exist_ok=True)
        for name in _STUBS:
            stub = self.bin / name
            stub.write_text('#!/bin/sh\nprintf \'%s %s\\n\' "${0##*/}" "$*" >> "$STUB_LOG"\nexit 0\n')
            stub.chmod(0o755)
        self.tally: Counter[str] = Counter()
        self.secret_hits = 0
        self._n = 0
        base = self.run(BASE, field="(baseline)", payload="", baseline=True)
        assert base.outcome == "escaped", f"the baseline config must render cleanly: {base.problems}"

    # -- one case ---------------------------------------------------------------------------------
    def case(self, field: str, payload: str, *, suffix: bool = False) -> Case:
        """``BASE`` with ``field`` set to ``payload`` (or a valid value followed by it)."""
        data = copy.deepcopy(BASE)
        value = payload
        if suffix:
            current: Any = data
            for part in re.findall(r"[^.\[\]]+|\[\d+\]", field):
                current = current[int(part[1:-1])] if part.startswith("[") else current[part]
            # A secret inside a sentence is a word of its own; glued to a word, only a full-length token is one.
            value = f"{current} {payload}" if payload in SECRET_PAYLOADS else f"{current}{payload}"
        set_path(data, field, value)
        return self.run(data, field=field, payload=value)

    def run(self, data: dict[str, Any], *, field: str, payload: str, baseline: bool = False) -> Case:
        self._n += 1
        case = Case(field=field, payload=payload)
        work = self.root / f"case{self._n:05d}"
        work.mkdir()
        config = work / "hostile.yaml"
        config.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        try:
            cfg = load_release(config)
        except ConfigError as err:
            return self._refused(case, err, config)
        except Exception as err:  # the suite counts what the library must never do
            return self._done(case, "traceback", [f"load: {type(err).__name__}: {err}"])
        try:
            files = self._render(cfg, config, work)
        except ConfigError as err:
            return self._refused(case, err, config, at_load=False)
        except Exception as err:
            return self._done(case, "traceback", [f"render: {type(err).__name__}: {err}"])
        problems = self._check(cfg, files, work, field=field, baseline=baseline)
        return self._done(case, "defect" if problems else "escaped", problems)

    def _refused(self, case: Case, err: ConfigError, config: Path, *, at_load: bool = True) -> Case:
        problems = []
        if not err.errors:
            problems.append(f"refused without naming a field: {err}")
        if at_load and str(config) not in str(err):
            problems.append(f"refused without naming the file: {err}")
        top = case.field.split(".")[0].split("[")[0]
        if at_load and case.field != "(baseline)" and not any(f.startswith(top) or "(" in f for f, _ in err.errors):
            problems.append(f"refused naming other fields ({[f for f, _ in err.errors]}), not {case.field}")
        if any(s in str(err) for s in SECRET_PAYLOADS):
            problems.append("the error message repeats a secret")
        return self._done(case, "defect" if problems else "refused", problems)

    def _done(self, case: Case, outcome: str, problems: list[str]) -> Case:
        case.outcome, case.problems = outcome, problems
        if case.field != "(baseline)":
            self.tally["tried"] += 1
            self.tally[outcome] += 1
        return case

    # -- rendering ---------------------------------------------------------------------------------
    def _render(self, cfg: ReleaseConfig, config: Path, work: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for rel, text in serve_files(cfg, model_path=None).items():
            out[f"conf/{rel}"] = text
        out["Dockerfile"] = render_dockerfile(cfg, commit=COMMIT)
        gate = work / "gate_results.json"
        rows = [{"task": t.name, "label": t.label or t.name, "reference": 50.0, "target": 49.0} for t in cfg.eval.tasks]
        gate.write_text(json.dumps({"rows": rows, "verdict": "consistent"}), encoding="utf-8")
        card = render_card_cli(config, results=gate, out_dir=work / "card")
        out["README.md"] = card.read_text(encoding="utf-8")
        for rel, text in out.items():
            path = work / "files" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return out

    # -- checks ------------------------------------------------------------------------------------
    def _check(self, cfg: ReleaseConfig, files: dict[str, str], work: Path, *, field: str, baseline: bool) -> list[str]:
        problems: list[str] = []
        problems += self._check_secrets(files)
        problems += self._check_yaml(cfg, files)
        problems += self._check_hostfile(files)
        card_shape = _card_shape(files["README.md"])
        docker_shape = _dockerfile_shape(files["Dockerfile"])
        problems += _check_exec_forms(files["Dockerfile"])
        if baseline:
            self.baseline = _Baseline(card=card_shape, dockerfile=docker_shape)
        else:
            if card_shape != self.baseline.card:
                problems.append(f"the card's Markdown structure changed: {card_shape} vs {self.baseline.card}")
            if docker_shape != self.baseline.dockerfile:
                problems.append("the Dockerfile's instructions changed")
        problems += self._run_shells(cfg, files, work, contract=field in SHELL_BY_CONTRACT)
        return problems

    def _check_secrets(self, files: dict[str, str]) -> list[str]:
        hits = [
            f"{rel} holds a secret value"
            for rel, text in files.items()
            for secret in [*SECRET_PAYLOADS, *SECRET_ENV.values()]
            if secret in text
        ]
        self.secret_hits += len(hits)
        return hits

    def _check_yaml(self, cfg: ReleaseConfig, files: dict[str, str]) -> list[str]:
        problems: list[str] = []
        experiment = next(t for r, t in files.items() if re.fullmatch(r"conf/config_.*\.yaml", r))
        serve = next(t for r, t in files.items() if re.fullmatch(r"conf/serve/.*\.yaml", r))
        exp = yaml.load(experiment, Loader=_LOADER)
        if set(exp) != {"defaults", "experiment", "action", "hydra"}:
            problems.append(f"experiment config top-level keys: {sorted(exp)}")
        wanted_exp = {"exp_name", "exp_dir", "task", "deploy", "runner", "envs", "cmds"}
        if set(exp.get("experiment", {})) != wanted_exp:
            problems.append(f"experiment keys: {sorted(exp.get('experiment', {}))}")
        os.environ.update(SECRET_ENV)
        try:
            resolved = OmegaConf.to_container(OmegaConf.create(experiment), resolve=True)
            served = OmegaConf.to_container(OmegaConf.create(serve), resolve=True)
        except Exception as err:
            return [*problems, f"FlagScale (OmegaConf) cannot read the configs: {type(err).__name__}: {err}"]
        finally:
            for name in SECRET_ENV:
                os.environ.pop(name, None)
        envs = {k: str(v) for k, v in resolved["experiment"]["envs"].items()}  # type: ignore[index,call-overload]
        literal = {k: v for k, v in cfg.serve.envs.items() if isinstance(v, str)}
        want = {**literal, **{var: SECRET_ENV[name] for var, name in serve_secret_refs(cfg).items()}}
        if envs != want:
            problems.append(f"FlagScale reads envs {envs}, the config says {want}")
        start = resolved["experiment"]["cmds"]["before_start"]  # type: ignore[index,call-overload]
        if not str(start).startswith(" && ".join(cfg.serve.before_start)):
            problems.append(f"FlagScale reads before_start {start!r}")
        if not isinstance(served, list) or len(served) != 1 or set(served[0]) != {"serve_id", "engine", "engine_args"}:
            problems.append(f"serve config shape: {served!r}"[:300])
        else:
            want_args = engine_args(cfg)
            if served[0]["engine_args"] != want_args:
                problems.append(f"FlagScale reads engine_args {served[0]['engine_args']}, expected {want_args}")
        card = files["README.md"]
        front = re.match(r"---\n(.*?)\n---\n", card, re.S)
        if not front:
            problems.append("the card has no front matter")
        else:
            meta = yaml.load(front.group(1), Loader=_LOADER)
            allowed = {
                "license",
                "license_link",
                "license_name",
                "base_model",
                "base_model_relation",
                "tags",
                "pipeline_tag",
            }
            if not isinstance(meta, dict) or not set(meta) <= allowed or meta.get("license") != cfg.model.license:
                problems.append(f"card front matter: {meta!r}"[:300])
        for block in re.findall(r"```ya?ml\n(.*?)```", card, re.S):
            try:
                yaml.load(block, Loader=_LOADER)
            except yaml.YAMLError as err:
                problems.append(f"a YAML block of the card does not parse: {err}")
        return problems

    def _check_hostfile(self, files: dict[str, str]) -> list[str]:
        lines = files["conf/hostfile.txt"].splitlines()
        bad = [
            x for x in lines if x and not x.startswith("#") and not re.fullmatch(r"\S+ slots=\d+ type=[a-z0-9_-]+", x)
        ]
        return [f"hostfile line {x!r}" for x in bad]

    def _run_shells(self, cfg: ReleaseConfig, files: dict[str, str], work: Path, *, contract: bool) -> list[str]:
        problems: list[str] = []
        sandbox = work / "sandbox"
        (sandbox / "conf").mkdir(parents=True)
        script = sandbox / "conf" / "vllm_serve.sh"
        script.write_text(files["conf/vllm_serve.sh"], encoding="utf-8")
        blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", files["README.md"], re.S)
        body = _PRELUDE + "".join(f"(\n{block}\n)\n" for block in blocks)
        if self.shell(body, sandbox, check_only=True) != 0:
            broken = [i for i, b in enumerate(blocks) if self.shell(b, sandbox, check_only=True) != 0]
            problems.append(f"card shell blocks {broken} do not parse")
        log = sandbox / "stubs.log"
        self.shell(body, sandbox)
        calls = log.read_text(encoding="utf-8") if log.exists() else ""
        if "docker " not in calls:
            problems.append("the card's shell blocks did not run (no docker command reached its stub)")
        problems += self._canaries(work, "the card's shell blocks")
        rc = self.shell("/bin/bash conf/vllm_serve.sh", sandbox)
        calls = log.read_text(encoding="utf-8") if log.exists() else ""
        if not contract:
            if rc != 0:
                problems.append(f"vllm_serve.sh exited {rc}")
            if f"vllm serve {cfg.serve.model_dir} " not in calls:
                problems.append("vllm_serve.sh did not run vllm serve with the config's model folder")
            problems += self._canaries(work, "vllm_serve.sh")
        return problems

    def _canaries(self, work: Path, what: str) -> list[str]:
        found = [str(p.relative_to(work)) for p in work.rglob(f"{CANARY}*")]
        self.tally["canaries"] += len(found)
        return [f"{what} created canary files: {found}"] if found else []

    def shell(self, text: str, cwd: Path, *, check_only: bool = False) -> int:
        """Run ``text`` with bash in ``cwd``, only the stubs on PATH; its exit status."""
        env = {"PATH": str(self.bin), "HOME": str(cwd), "STUB_LOG": str(cwd / "stubs.log"), **SECRET_ENV}
        argv = ["/bin/bash", "-n", "-c", text] if check_only else ["/bin/bash", "-c", text]
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
        return proc.returncode


def _card_shape(card: str) -> tuple[Any, ...]:
    """What a payload must not change in the card: headings, fences and table shapes."""
    headings, fences, tables = [], [], []
    in_fence = False
    for line in card.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            fences.append(line[3:].strip() if in_fence else "")
            continue
        if in_fence:
            continue
        if re.match(r"#{1,6} ", line):
            headings.append(line.split(" ", 1)[0])
        if line.startswith("|"):
            tables.append(len(re.findall(r"(?<!\\)\|", line)))
    return tuple(headings), tuple(fences), tuple(tables)


def _dockerfile_shape(text: str) -> list[str]:
    words, continued = [], False
    for line in text.splitlines():
        if not continued and line.strip() and not line.lstrip().startswith("#"):
            words.append(line.split()[0])
        continued = line.rstrip().endswith("\\")
    return words


def _check_exec_forms(text: str) -> list[str]:
    problems = []
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("RUN", "CMD", "ENTRYPOINT", "HEALTHCHECK") and rest.lstrip().startswith("["):
            try:
                json.loads(rest)
            except ValueError:
                problems.append(f"Dockerfile {word} is not a JSON array: {line[:120]}")
    return problems
