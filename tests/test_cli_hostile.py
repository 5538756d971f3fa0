"""The CLI on bad input: exit 2 with the file and YAML path at fault, never a traceback."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.spool import Spool
from tests.conftest import Aws, agent_command, backend_config, measurement, write_yaml
from tests.support import cli, cli_batch


def file_config(tmp_path: Path, **top: object) -> Path:
    return write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "file", "path": str(tmp_path / "usage.jsonl")}, tmp_path, measurement(interval="1h"), **top))


def test_validate_refuses_a_spool_shared_with_the_backend_file(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "file", "path": "./x/../spool.db"}, tmp_path, measurement()))
    done = cli("validate", "-c", str(config))
    assert done.returncode == 2, done.stdout
    assert f"backend.path: is the same file as spool.path ({tmp_path / 'spool.db'})" in done.stderr


# --------------------------------------------------------------------------- once --at


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_once_refuses_a_tick_that_has_not_begun_and_samples_the_one_in_progress(aws: Aws, tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    now = datetime.now(timezone.utc)
    config = file_config(tmp_path)  # interval 1h: the next hour's tick begins after now
    for at, flags in (("9999-12-31T23:59:59Z", []), (_iso(now + timedelta(hours=1)), []),
                      (_iso(now + timedelta(hours=1)), ["--dry-run"])):
        done = cli("once", "-c", str(config), "--at", at, *flags)
        assert done.returncode == 2, done.stderr
        assert f"usage-agent once: --at {at}: tick " in done.stderr
        assert "of measurement ebs-storage is due at" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""
    assert not (tmp_path / "spool.db").exists() and not (tmp_path / "usage.jsonl").exists()

    # the tick in progress began at the hour: sampled, as the daemon samples it
    done = cli("once", "-c", str(config), "--at", _iso(now), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert '"value":"10"' in done.stdout.replace(" ", "")


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "9999-12-31T23:59:59-05:00"])
def test_once_refuses_a_time_out_of_range(tmp_path: Path, at: str) -> None:
    done = cli("once", "-c", str(file_config(tmp_path)), "--at", at)
    assert done.returncode == 2
    assert "argument --at: expected a time from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- spool commands


def test_spool_commands_need_only_the_spool_section(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "paigo", "client_id": "${PAIGO_CLIENT_ID}", "client_secret_file": "/run/secrets/absent"},
        tmp_path, measurement()))
    Spool(tmp_path / "spool.db").close()
    env = {k: v for k, v in os.environ.items() if k != "PAIGO_CLIENT_ID"}
    for command in (["stats"], ["list"], ["replay"], ["purge", "--delivered-before", "2026-01-01T00:00:00Z"]):
        done = cli("spool", *command, "-c", str(config), env=env)
        assert done.returncode == 0, (command, done.stderr)
    assert '"replayed": 0' in done.stdout or '"purged": 0' in done.stdout


@pytest.mark.parametrize("command", [["stats"], ["list"], ["replay"], ["salvage"],
                                     ["purge", "--delivered-before", "2026-01-01T00:00:00Z"]])
def test_spool_commands_refuse_a_spool_that_does_not_exist(tmp_path: Path, command: list[str]) -> None:
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "file", "path": "usage.jsonl"}, tmp_path, spool={"path": "spoool.db"}))
    done = cli("spool", *command, "-c", str(config))
    assert done.returncode == 2, done.stdout
    assert done.stderr.splitlines() == [
        f"{config}: 1 error(s)", f"  spool.path: no spool at {tmp_path / 'spoool.db'}; spool commands never create one"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.yaml"]


def test_a_closed_stdout_ends_a_command_quietly(tmp_path: Path) -> None:
    Spool(tmp_path / "spool.db").close()
    reader = subprocess.Popen([*agent_command(), "spool", "stats", "-c", str(file_config(tmp_path))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdout.close()  # `| head` that has already exited
    _, stderr = reader.communicate(timeout=60)
    assert reader.returncode == 141, stderr  # as if killed by SIGPIPE, so `set -o pipefail` sees it
    assert stderr == ""


# --------------------------------------------------------------------------- no traceback, ever


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (the -c argument, what stderr says about it)"""
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "deep.yaml").write_text("backend: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "deep-block.yaml").write_text("".join(f"{'  ' * i}k:\n" for i in range(100)))
    (tmp_path / "nul.yaml").write_text("backend: a\0b\n")
    (tmp_path / "a-file").write_text("")
    return {
        "directory": (tmp_path / "dir.yaml", "cannot read file: Is a directory"),
        "under a file": (tmp_path / "a-file" / "agent.yaml", "cannot read file: Not a directory"),
        "missing": (tmp_path / "absent.yaml", "cannot read file: No such file or directory"),
        "binary": (tmp_path / "binary.yaml", "file is not valid UTF-8 (byte 128)"),
        "deep flow nesting": (tmp_path / "deep.yaml", "invalid YAML at line 1, column 1009: exceeded maximum nesting depth"),
        "deep block nesting": (tmp_path / "deep-block.yaml", "invalid YAML at line 65, column 129: nested deeper than 64 levels"),
        "NUL byte": (tmp_path / "nul.yaml", "invalid YAML"),
    }


@pytest.mark.parametrize("command", [["validate"], ["validate", "--no-env"], ["spool", "stats"], ["iam-policy"]])
def test_unusable_config_files_exit_2_without_a_traceback(tmp_path: Path, command: list[str]) -> None:
    inputs = _bad_inputs(tmp_path)
    runs = cli_batch(*([*command, "-c", str(path)] for path, _ in inputs.values()))  # a fresh process, started once
    for (name, (path, message)), done in zip(inputs.items(), runs, strict=True):
        assert done.returncode == 2, (name, done.stderr)
        assert done.stderr.startswith(f"{path}: 1 error(s)\n  <root>: {message}"), (name, done.stderr)
        assert "Traceback" not in done.stderr


def test_spool_command_numbers_are_bounded(tmp_path: Path) -> None:
    Spool(tmp_path / "spool.db").close()
    cases = [["list", "--limit", "99999999999999999999999"], ["list", "--limit", "-1"],
             ["replay", "--status", "99999999999999999999999"]]
    config = str(file_config(tmp_path))
    for flags, done in zip(cases, cli_batch(*(["spool", flags[0], "-c", config, *flags[1:]] for flags in cases)), strict=True):
        assert done.returncode == 2, (flags, done.stderr)  # -1 was SQLite's "no limit"; 10**23 an OverflowError traceback
        assert f"argument {flags[1]}: expected a whole number from" in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr, (flags, done.stderr)


def test_an_invalid_config_exits_2_when_stderr_is_closed_early(tmp_path: Path) -> None:
    # `usage-agent validate -c bad.yaml 2>&1 | head -1`: the error print raised BrokenPipeError, exit 1
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "file", "path": "spool.db"}, tmp_path, measurement()))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([*agent_command(), "validate", "-c", str(config)], stderr=write_end,
                              stdout=subprocess.DEVNULL, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 2


@pytest.mark.parametrize("command", ["stats", "salvage"])
def test_spool_commands_refuse_a_spool_path_that_is_the_config_file(tmp_path: Path, command: str) -> None:
    # `spool salvage` moved the config aside as <config>.corrupt-<time> and wrote a SQLite file in its place
    config = tmp_path / "agent.yaml"
    config.write_text("spool: {path: agent.yaml}\nbackend: {type: paigo, client_id: '${UNSET}'}\n")
    before = config.read_bytes()
    done = cli("spool", command, "-c", str(config))
    assert done.returncode == 2, done.stdout
    assert done.stderr.splitlines() == [
        f"{config}: 1 error(s)", f"  spool.path: is the same file as the config file ({config}); give each its own file"]
    assert config.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["agent.yaml"]
