"""Install steps run inside ``docker build`` (copied into the context as build/install.py).

Every Dockerfile RUN step calls this script in exec form with its values as separate
arguments, so no config value ever passes through a shell.  It uses the standard library
only and runs on the base image's Python (3.8 or later).

Subcommands:
    pip [--no-deps] REQUIREMENT...   install packages (none when every NAME==VERSION is installed
                                     already); honours the FLAGRELEASE_DEPS build arg
    self WHEEL                       install flagrelease itself (--no-deps, offline) and check its plugin
    user NAME UID                    add an unprivileged user with a home folder

FLAGRELEASE_DEPS (build arg): ``auto`` installs from the context's wheels/ folder when it
holds wheels (offline), else from the index (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL);
``skip`` installs nothing but flagrelease (bases that already ship vLLM and FlagGems,
and offline test builds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
WHEELS = HERE / "wheels"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "flagrelease_gems"


def _pip(args: list[str]) -> None:
    env = dict(os.environ)
    env.update(
        PIP_BREAK_SYSTEM_PACKAGES="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_ROOT_USER_ACTION="ignore",
        PIP_NO_CACHE_DIR="1",
    )
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _installed(requirement: str) -> bool:
    """Whether ``NAME==VERSION`` is installed exactly (a base made from a serving runtime ships it)."""
    from importlib import metadata

    name, sep, version = requirement.partition("==")
    if not sep or not version or any(c in version for c in ",;<>!~*"):
        return False
    try:
        return metadata.version(name.split("[", 1)[0]) == version
    except metadata.PackageNotFoundError:
        return False


def cmd_pip(argv: list[str]) -> int:
    """Install requirements, or skip them when FLAGRELEASE_DEPS=skip."""
    mode = os.environ.get("FLAGRELEASE_DEPS", "auto") or "auto"
    if mode not in ("auto", "skip"):
        print(f"FLAGRELEASE_DEPS={mode!r} is not auto or skip", file=sys.stderr)
        return 2
    no_deps = "--no-deps" in argv
    reqs = [a for a in argv if a != "--no-deps"]
    if not reqs:
        print("pip: no requirement given", file=sys.stderr)
        return 2
    if mode == "skip":
        print(f"FLAGRELEASE_DEPS=skip: not installing {' '.join(reqs)}", flush=True)
        return 0
    if all(_installed(r) for r in reqs):
        print(f"already installed in the base image: {' '.join(reqs)}", flush=True)
        return 0
    opts = ["--no-deps"] if no_deps else []
    if WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        opts += ["--no-index", "--find-links", str(WHEELS)]
    _pip([*opts, *reqs])
    return 0


def cmd_self(argv: list[str]) -> int:
    """Install the flagrelease wheel offline and check that vLLM will find its plugin."""
    if len(argv) != 1:
        print("self: give the wheel's path", file=sys.stderr)
        return 2
    _pip(["--no-deps", "--no-index", "--force-reinstall", argv[0]])
    check = (
        "from importlib import metadata as m\n"
        "eps = m.entry_points()\n"
        f"group = eps.select(group={PLUGIN_GROUP!r}) if hasattr(eps, 'select') else eps.get({PLUGIN_GROUP!r}, [])\n"
        f"found = [e.value for e in group if e.name == {PLUGIN_NAME!r}]\n"
        f"assert found, 'entry point {PLUGIN_GROUP}:{PLUGIN_NAME} is missing'\n"
        "print('serving plugin registered:', found[0])\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True)
    return 0


def cmd_user(argv: list[str]) -> int:
    """Add user NAME with uid = gid = UID and a home folder it owns."""
    if len(argv) != 2 or not argv[1].isdigit() or not argv[0].isidentifier():
        print("user: give NAME UID", file=sys.stderr)
        return 2
    name, uid = argv[0], int(argv[1])
    home = Path("/home") / name
    etc = Path("/etc")
    etc.mkdir(exist_ok=True)
    for path, line in (
        (etc / "passwd", f"{name}:x:{uid}:{uid}::{home}:/bin/sh\n"),
        (etc / "group", f"{name}:x:{uid}:\n"),
    ):
        text = path.read_text() if path.exists() else ""
        if not any(row.split(":", 1)[0] == name for row in text.splitlines()):
            if text and not text.endswith("\n"):
                text += "\n"
            path.write_text(text + line)
    home.mkdir(parents=True, exist_ok=True)
    for folder in (home, *home.rglob("*")):
        os.chown(folder, uid, uid)
    print(f"user {name} ({uid}) with home {home}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"pip": cmd_pip, "self": cmd_self, "user": cmd_user}
    if not args or args[0] not in commands:
        print(f"usage: install.py {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
