"""The command line's grammar: ``usage-agent``'s commands, options and the checks on their values."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from agent import __version__

if TYPE_CHECKING:
    from agent.shard import Shard

EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_time(value: str) -> datetime:
    """ISO 8601 / RFC 3339; a time without an offset is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        parsed = parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as 2026-11-21T10:00:00Z, got {value[:40]!r}") from None
    except OverflowError:  # an offset that takes it past year 9999 in UTC
        parsed = datetime.max.replace(tzinfo=timezone.utc)
    if not EARLIEST <= parsed < datetime.max.replace(tzinfo=timezone.utc):
        raise argparse.ArgumentTypeError(f"expected a time from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z, got {value[:40]!r}")
    return parsed


def _duration_seconds(value: str) -> float:
    from agent.config import parse_duration

    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded_int(low: int, high: int) -> Any:
    def parse(value: str) -> int:
        try:
            number: int | None = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {value[:40]!r}")
        return number

    return parse


def _shard(value: str) -> Shard:
    from agent.shard import Shard

    try:
        return Shard.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_PRINCIPAL = re.compile(r"^(arn:aws[a-z-]*:(iam|sts)::\d{12}:\S+|\d{12})$")


def _principal(value: str) -> str:
    if not _PRINCIPAL.match(value):
        raise argparse.ArgumentTypeError(f"expected an IAM ARN such as arn:aws:iam::123456789012:role/usage-agent, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usage-agent", description="Billing-grade infrastructure usage agent.")
    parser.add_argument("--version", action="version", version=f"usage-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("-c", "--config", required=True, metavar="FILE", help="the YAML configuration")
        return sub

    def with_shard(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--shard", type=_shard, metavar="I/N",
                         help="sample only the targets of shard I of N (replica index from 0); default: all")
        return sub

    validate = with_config(commands.add_parser("validate", help="check the configuration; exit 2 when invalid"))
    validate.add_argument("--no-env", action="store_true",
                          help="structure only: ${VAR}s need not be set and *_file secrets need not exist")
    once = with_shard(with_config(commands.add_parser(
        "once", help="sample one tick of every measurement, spool, forward until drained")))
    once.add_argument("--at", type=parse_time, metavar="TIME",
                      help="a time inside the tick to sample, which must have begun (default: now)")
    once.add_argument("--dry-run", action="store_true", help="print the backend bodies to stdout; write and send nothing")
    once.add_argument("--timeout", type=_duration_seconds, default=60.0, metavar="DURATION",
                      help="how long to keep retrying delivery before giving up (default 60s)")
    with_shard(with_config(commands.add_parser("run", help="the daemon: sample on schedule and forward until SIGTERM")))

    spool = commands.add_parser("spool", help="inspect and repair the spool")
    spool_commands = spool.add_subparsers(dest="spool_command", required=True, metavar="SPOOL_COMMAND")
    with_config(spool_commands.add_parser("stats", help="counts per state, oldest unsent age, file size"))
    listing = with_config(spool_commands.add_parser("list", help="records in one state, oldest first"))
    listing.add_argument("--state", choices=("pending", "leased", "delivered", "dead"), default="pending")
    listing.add_argument("--limit", type=_bounded_int(1, 1_000_000), default=100)
    replay = with_config(spool_commands.add_parser("replay", help="dead-lettered records back to pending"))
    replay.add_argument("--id", action="append", default=[], metavar="ID", help="only this record (repeatable)")
    replay.add_argument("--status", type=_bounded_int(100, 599), metavar="N", help="only records the backend rejected with status N")
    purge = with_config(spool_commands.add_parser("purge", help="delete delivered records"))
    purge.add_argument("--delivered-before", type=parse_time, required=True, metavar="TIME")
    with_config(spool_commands.add_parser(
        "salvage", help="copy every readable record of a damaged spool into a fresh one (agent stopped)"))

    iam = with_config(commands.add_parser(
        "iam-policy", help="least-privilege permission and trust policies for the configured measurements"))
    iam.add_argument("--format", choices=("json", "cloudformation", "terraform"), default="json",
                     help="json: every policy; cloudformation / terraform: the customer-side roles, ready to create")
    iam.add_argument("--principal", type=_principal, metavar="ARN",
                     help="the identity the agent runs as, which the roles must trust "
                          "(default: the identity of the current AWS credentials)")
    iam.add_argument("--account", metavar="ID", help="only the roles in this AWS account")
    iam.add_argument("--from-paigo", action="store_true",
                     help="also the roles and resource types of the measurements Paigo's dimensions give (paigo_sync)")
    with_config(commands.add_parser(
        "paigo-sync", help="the measurements Paigo's dimensions give, as YAML for measurements:, and those skipped"))

    commands.add_parser("demo", help="the whole pipeline on an embedded AWS (moto) and a local Paigo backend")
    return parser
