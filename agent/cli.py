"""Command line: validate | once | run | spool | iam-policy | demo (exit codes as in the README)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.clock import SteadyClock
from agent.errors import ConfigError, ServeError, SpoolError

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.shard import Shard

EXIT_OK, EXIT_UNDELIVERED, EXIT_CONFIG = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # as a process killed by SIGPIPE: `usage-agent spool list | head`
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)


class UsageError(Exception):
    """A command line the agent refuses to act on (exit 2)."""


# Set by SIGTERM/SIGINT from the first moment of `run`, before the heavy imports: a stop
# requested while the agent is still starting is honoured once it has started.
STOP_REQUESTED = threading.Event()
CLOCK = SteadyClock()  # spool and forwarder times: epoch seconds that never jump


def _log() -> Any:
    import structlog

    return structlog.get_logger("agent.cli")


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

    commands.add_parser("demo", help="the whole pipeline on an embedded AWS (moto) and a local Paigo backend")
    return parser


def _load(path: str) -> AgentConfig:
    from agent.config import load_config

    return load_config(path, dict(os.environ))


def cmd_validate(args: argparse.Namespace) -> int:
    if args.no_env:
        from agent.config import BACKEND_TYPES, check_structure

        raw = check_structure(args.config, dict(os.environ))
        backend = raw["backend"] if isinstance(raw["backend"], dict) else {}  # a whole section may be an unset ${VAR}
        kind = backend.get("type") if backend.get("type") in BACKEND_TYPES else "${...}"
        count = len(raw["measurements"]) if isinstance(raw["measurements"], list) else "${...}"
        print(f"{args.config}: structure ok ({count} measurement(s), backend "
              f"{kind}); unset ${{VAR}}s and secret files not checked")
        return EXIT_OK
    cfg = _load(args.config)
    print(f"{args.config}: ok ({len(cfg.measurements)} measurement(s), backend {cfg.backend.type})")
    return EXIT_OK


def _wire(cfg: AgentConfig, with_spool: bool, shard: Shard | None) -> tuple[Any, Any, Any]:
    from agent.credentials import SessionFactory
    from agent.runtime import Agent
    from agent.shard import EVERYTHING
    from agent.sinks import build_sink
    from agent.spool import Spool
    from agent.telemetry import METRICS

    spool = None
    if with_spool:
        spool = Spool(cfg.spool.path, cfg.spool.max_records, clock=CLOCK, metrics=METRICS)
        spool.claim()
    return Agent(cfg, SessionFactory(), spool, shard=shard or EVERYTHING), build_sink(cfg), spool


def _forwarder(cfg: AgentConfig, spool: Any, sink: Any) -> tuple[Any, Any]:
    """The forwarder, with the audit copy when one is configured (closed by the caller)."""
    from agent.forwarder import Forwarder
    from agent.sinks.file import AuditLog

    audit = AuditLog(cfg.audit, sink.name, sink.render) if cfg.audit else None
    return Forwarder(spool, sink, clock=CLOCK, audit=audit), audit


def _refuse_unbegun_ticks(cfg: AgentConfig, at: datetime) -> None:
    """A tick sampled before it begins (before T + delay for CloudWatch) spools an early value,
    and the first sampling of a tick is the one billed."""
    from agent.convert import format_timestamp, tick_floor

    now = datetime.now(timezone.utc)
    for m in cfg.measurements:
        tick = tick_floor(at, m.interval_seconds)
        if tick > now - m.delay:  # not tick + delay > now: near year 9999 that overflows
            delay = f" + {m.delay.total_seconds():g}s" if m.delay else ""
            raise UsageError(f"--at {format_timestamp(at)}: tick {format_timestamp(tick)} of measurement {m.name} "
                             f"is due at {format_timestamp(tick)}{delay}, after now ({format_timestamp(now)}); "
                             f"an early sample would become the tick's billed value")


def cmd_once(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if args.at is not None:
        _refuse_unbegun_ticks(cfg, args.at)
    if args.dry_run:
        agent, sink, _ = _wire(cfg, with_spool=False, shard=args.shard)
        failed = False
        records = []
        try:
            for m in agent.measurements:
                result = agent.collect(m, args.at or agent.clock() - m.delay)
                failed |= not result.ok
                records += result.records
            for body in sink.bodies(records):  # each request body (file: each line) exactly as sent
                sys.stdout.buffer.write(body + b"\n")
            sys.stdout.flush()
        finally:
            agent.close()
            sink.close()
        return EXIT_UNDELIVERED if failed else EXIT_OK

    agent, sink, spool = _wire(cfg, with_spool=True, shard=args.shard)
    audit = None
    try:
        results = agent.sample_all(args.at)
        forwarder, audit = _forwarder(cfg, spool, sink)
        sent = forwarder.drain_until(CLOCK() + args.timeout)
        counts = spool.counts()
    finally:
        agent.close()
        sink.close()
        spool.close()
        if audit is not None:
            audit.close()
    failed = [r.measurement for r in results if not r.ok]
    unsent = counts["pending"] + counts["leased"]
    _log().info("once finished", delivered=sent.delivered, dead_lettered=sent.dead, unsent=unsent, failed_measurements=failed)
    return EXIT_OK if not failed and unsent == 0 and sent.dead == 0 else EXIT_UNDELIVERED


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runtime import Daemon

    cfg = _load(args.config)
    agent, sink, spool = _wire(cfg, with_spool=True, shard=args.shard)
    forwarder, audit = _forwarder(cfg, spool, sink)
    try:
        Daemon(agent, forwarder, sink, stop_requested=STOP_REQUESTED).run()
    finally:
        agent.close()
        sink.close()
        spool.close()
        if audit is not None:
            audit.close()
    return EXIT_OK


def cmd_spool(args: argparse.Namespace) -> int:
    from agent.config import load_spool_config
    from agent.salvage import salvage
    from agent.spool import Spool

    spool_cfg = load_spool_config(args.config, dict(os.environ))  # not the backend's variables or secrets
    if not Path(spool_cfg.path).is_file():  # a mistyped path must not create an empty spool that reports zeros
        raise ConfigError(args.config, [("spool.path", f"no spool at {spool_cfg.path}; spool commands never create one")])
    if args.spool_command == "salvage":
        report = salvage(spool_cfg.path, clock=CLOCK)
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    spool = Spool.open_existing(spool_cfg.path, spool_cfg.max_records, clock=CLOCK)  # and refuses a file that is not a spool
    try:
        if args.spool_command == "stats":
            print(json.dumps(spool.stats(), indent=2))
        elif args.spool_command == "list":
            for row in spool.rows(args.state, args.limit):
                print(json.dumps(row, separators=(",", ":")))
        elif args.spool_command == "replay":
            print(json.dumps({"replayed": spool.replay(args.id, args.status)}))
        else:
            print(json.dumps({"purged": spool.purge_delivered(args.delivered_before.timestamp())}))
    finally:
        spool.close()
    return EXIT_OK


def _caller_principal() -> str | None:
    """The ARN of the current AWS credentials, as a trust policy can name it; None (and why) if unknown."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from agent.credentials import describe_aws_error
    from agent.iam import principal_of

    try:
        arn = boto3.client("sts").get_caller_identity()["Arn"]
    except (BotoCoreError, ClientError) as exc:
        print(f"usage-agent iam-policy: --principal is not given and the current AWS credentials cannot tell it "
              f"({describe_aws_error(exc)}); pass --principal ARN", file=sys.stderr)
        return None
    principal = principal_of(arn)
    print(f"trusting {principal}, the identity of the current AWS credentials; "
          f"pass --principal for the identity the agent runs as", file=sys.stderr)
    return principal


def cmd_iam_policy(args: argparse.Namespace) -> int:
    from agent.iam import RENDERERS, plan

    cfg = _load(args.config)
    p = plan(cfg, principal="", account=args.account)
    if args.format != "json":
        accounts = sorted({role.account for role in p.roles})
        problem = ("no measurement assumes a role" + (f" in account {args.account}" if args.account else "")
                   + "; `--format json` shows what the agent's own identity needs") if not accounts else (
            f"the roles are in {len(accounts)} accounts ({', '.join(accounts)}): pass --account ID, "
            f"one template per account") if len(accounts) > 1 else None
        if problem:
            print(f"usage-agent iam-policy: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    if p.roles:
        principal = args.principal or _caller_principal()
        if principal is None:
            return EXIT_CONFIG
        p.principal = principal
    for role in p.roles:
        if not role.external_ids:
            print(f"warning: {role.arn} has no external_id: its trust policy has no sts:ExternalId condition",
                  file=sys.stderr)
    print(json.dumps(RENDERERS[args.format](p), indent=2))
    return EXIT_OK


def cmd_demo(_args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo()


COMMANDS = {"validate": cmd_validate, "once": cmd_once, "run": cmd_run, "spool": cmd_spool,
            "iam-policy": cmd_iam_policy, "demo": cmd_demo}


def _complain(text: str) -> None:
    """To stderr; a reader gone (`validate 2>&1 | head -1`) must not turn exit 2 into a traceback."""
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: STOP_REQUESTED.set())
    from agent.telemetry import configure_logging

    # the demo prints a report; its logs only say what went wrong unless asked for more
    configure_logging(os.environ.get("LOG_LEVEL", "warning") if args.command == "demo" else None)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so a closed pipe is seen inside this try and not at exit
        return code
    except BrokenPipeError:
        # stdout's reader went away (`| head`): stop quietly; later flushes go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except UsageError as exc:
        _complain(f"usage-agent {args.command}: {exc}")
        return EXIT_CONFIG
    except ConfigError as exc:
        _complain(exc.render())
        return EXIT_CONFIG
    except SpoolError as exc:
        _log().error("spool unusable", error=str(exc))
        return EXIT_UNDELIVERED
    except ServeError as exc:
        _log().error("cannot serve metrics and health", error=str(exc))
        return EXIT_UNDELIVERED


if __name__ == "__main__":
    sys.exit(main())
