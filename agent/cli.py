"""Command line: validate | once | run | spool | iam-policy | paigo-sync | demo (exit codes as in the README)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.arguments import build_parser
from agent.clock import Clock, SystemClock
from agent.errors import ConfigError, ServeError, SpoolError

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.paigo_sync import PaigoMeasurements
    from agent.settings import AgentConfig
    from agent.shard import Shard
    from agent.sinks import Backend
    from agent.spool import Spool
    from agent.ticks import Agent

EXIT_OK, EXIT_UNDELIVERED, EXIT_CONFIG = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # as a process killed by SIGPIPE: `usage-agent spool list | head`


class UsageError(Exception):
    """A command line the agent refuses to act on (exit 2)."""


# Set by SIGTERM/SIGINT from the first moment of `run`, before the heavy imports: a stop
# requested while the agent is still starting is honoured once it has started.
STOP_REQUESTED = threading.Event()


class Process:
    """What every stage of one agent process shares: its one ``Metrics`` and its one clock."""

    def __init__(self, metrics: Metrics | None = None, clock: Clock | None = None):
        self._metrics = metrics
        self.clock = clock or SystemClock()

    @property
    def metrics(self) -> Metrics:
        """Built when first asked for: validate, iam-policy and the spool commands count nothing."""
        if self._metrics is None:
            from agent.metrics import Metrics

            self._metrics = Metrics()
        return self._metrics


def _log() -> Any:
    import structlog

    return structlog.get_logger("agent.cli")


def _load(path: str) -> AgentConfig:
    from agent.config import load_config

    return load_config(path, dict(os.environ))


def cmd_validate(args: argparse.Namespace, _process: Process) -> int:
    if args.no_env:
        from agent.config import BACKEND_TYPES, check_structure

        raw = check_structure(args.config, dict(os.environ))
        backend = raw["backend"] if isinstance(raw["backend"], dict) else {}  # a whole section may be an unset ${VAR}
        kind = backend.get("type") if backend.get("type") in BACKEND_TYPES else "${...}"
        listed = raw.get("measurements", [])
        count = len(listed) if isinstance(listed, list) else "${...}"
        print(f"{args.config}: structure ok ({count} measurement(s), backend "
              f"{kind}); unset ${{VAR}}s and secret files not checked")
        return EXIT_OK
    cfg = _load(args.config)
    synced = (f", and those of the Paigo dimensions, read every {cfg.paigo_sync.refresh.total_seconds():g}s"
              if cfg.paigo_sync else "")
    print(f"{args.config}: ok ({len(cfg.measurements)} measurement(s){synced}, backend {cfg.backend.type})")
    return EXIT_OK


def _wire(cfg: AgentConfig, process: Process, with_spool: bool,
          shard: Shard | None) -> tuple[Agent, Backend, Spool | None, PaigoMeasurements | None]:
    """The sampling side (sessions, agent), the sink, unless only collecting the spool, and with
    paigo_sync the measurements read from Paigo (read once here)."""
    from agent.credentials import SessionFactory
    from agent.shard import EVERYTHING
    from agent.sinks import build_backend
    from agent.spool import Spool
    from agent.ticks import Agent

    metrics, clock = process.metrics, process.clock
    spool = None
    if with_spool:
        spool = Spool(cfg.spool.path, cfg.spool.max_records, clock=clock, metrics=metrics)
        spool.claim()
    backend = build_backend(cfg.backend, metrics, clock)
    sync = None
    if cfg.paigo_sync is not None:
        from agent.paigo_sync import PaigoMeasurements, reader_for

        sync = PaigoMeasurements(cfg, reader_for(cfg, backend, metrics), spool, metrics=metrics, clock=clock)
        sync.refresh()
        cfg = sync.config(cfg)
    sessions = SessionFactory(metrics=metrics, clock=clock)
    agent = Agent(cfg, sessions, spool, metrics=metrics, clock=clock, shard=shard or EVERYTHING)
    return agent, backend, spool, sync


def _forwarder(cfg: AgentConfig, process: Process, spool: Spool, backend: Backend) -> tuple[Any, Any]:
    """The forwarder, with the audit copy when one is configured (closed by the caller)."""
    from agent.forwarder import Forwarder
    from agent.sinks.file import AuditLog

    audit = AuditLog(cfg.audit, backend.name, backend.sink.element) if cfg.audit else None
    return Forwarder(spool, backend.sink, backend.client, metrics=process.metrics, clock=process.clock,
                     audit=audit), audit


def _close(agent: Agent, sink: Backend, spool: Spool | None, audit: Any) -> None:
    """The parts ``_wire`` and ``_forwarder`` built, sampling first, the spool and audit copy last."""
    agent.close()
    sink.close()
    for part in (spool, audit):
        if part is not None:
            part.close()


def _refuse_unbegun_ticks(cfg: AgentConfig, at: datetime, now: datetime) -> None:
    """A tick sampled before it begins (before T + delay for CloudWatch) spools an early value,
    and the first sampling of a tick is the one billed."""
    from agent.convert import tick_floor
    from agent.records import format_timestamp

    for m in cfg.measurements:
        tick = tick_floor(at, m.interval_seconds)
        if tick > now - m.delay:  # not tick + delay > now: near year 9999 that overflows
            delay = f" + {m.delay.total_seconds():g}s" if m.delay else ""
            raise UsageError(f"--at {format_timestamp(at)}: tick {format_timestamp(tick)} of measurement {m.name} "
                             f"is due at {format_timestamp(tick)}{delay}, after now ({format_timestamp(now)}); "
                             f"an early sample would become the tick's billed value")


def cmd_once(args: argparse.Namespace, process: Process) -> int:
    cfg = _load(args.config)
    if args.at is not None:
        _refuse_unbegun_ticks(cfg, args.at, process.clock.now())
    if args.dry_run:
        agent, sink, _, sync = _wire(cfg, process, with_spool=False, shard=args.shard)
        failed = sync is not None and sync.read_at is None
        records = []
        try:
            if args.at is not None:
                _refuse_unbegun_ticks(agent.cfg, args.at, process.clock.now())
            for m in agent.measurements:
                result = agent.collect(m, args.at or process.clock.now() - m.delay)
                failed |= not result.ok
                records += result.records
            from agent.delivery import bodies

            for body in bodies(sink.sink, records, process.clock):  # each request body (file: each line) exactly as sent
                sys.stdout.buffer.write(body + b"\n")
            sys.stdout.flush()
        finally:
            _close(agent, sink, None, None)
        return EXIT_UNDELIVERED if failed else EXIT_OK

    agent, sink, spool, sync = _wire(cfg, process, with_spool=True, shard=args.shard)
    assert spool is not None
    audit = None
    try:
        if args.at is not None:
            _refuse_unbegun_ticks(agent.cfg, args.at, process.clock.now())
        results = agent.sample_all(args.at)
        forwarder, audit = _forwarder(cfg, process, spool, sink)
        sent = forwarder.drain_until(process.clock.time() + args.timeout)
        counts = spool.counts()
    finally:
        _close(agent, sink, spool, audit)
    failed = [r.measurement for r in results if not r.ok]
    if sync is not None and sync.read_at is None:  # Paigo unreachable, and no set kept from before
        failed.append("paigo_sync")
    unsent = counts["pending"] + counts["leased"]
    _log().info("once finished", delivered=sent.delivered, dead_lettered=sent.dead, unsent=unsent, failed_measurements=failed)
    return EXIT_OK if not failed and unsent == 0 and sent.dead == 0 else EXIT_UNDELIVERED


def cmd_run(args: argparse.Namespace, process: Process) -> int:
    from agent.daemon import Daemon

    cfg = _load(args.config)
    agent, sink, spool, sync = _wire(cfg, process, with_spool=True, shard=args.shard)
    assert spool is not None
    forwarder, audit = _forwarder(cfg, process, spool, sink)
    try:
        Daemon(agent, forwarder, sink, metrics=process.metrics, clock=process.clock,
               stop_requested=STOP_REQUESTED, sync=sync).run()
    finally:
        _close(agent, sink, spool, audit)
    return EXIT_OK


def cmd_spool(args: argparse.Namespace, process: Process) -> int:
    from agent.config import load_spool_config
    from agent.spool import Spool

    spool_cfg = load_spool_config(args.config, dict(os.environ))  # not the backend's variables or secrets
    if not Path(spool_cfg.path).is_file():  # a mistyped path must not create an empty spool that reports zeros
        raise ConfigError(args.config, [("spool.path", f"no spool at {spool_cfg.path}; spool commands never create one")])
    if args.spool_command == "salvage":
        from agent.salvage import salvage

        report = salvage(spool_cfg.path, clock=process.clock)
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    spool = Spool.open_existing(spool_cfg.path, spool_cfg.max_records, clock=process.clock)  # and refuses a file that is not a spool
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


def _from_paigo(cfg: AgentConfig, process: Process) -> Any:
    """The measurements Paigo's dimensions give now (``paigo_dimensions.Derived``); nothing is kept."""
    from agent.paigo_dimensions import derive
    from agent.paigo_sync import reader_for
    from agent.sinks import build_backend

    if cfg.paigo_sync is None:
        raise UsageError("the config has no paigo_sync section: it says how measurements read from Paigo "
                         "attribute customers (paigo_sync: {customer: {tag: customer-id}})")
    backend = build_backend(cfg.backend, process.metrics, process.clock)
    try:
        return derive(reader_for(cfg, backend, process.metrics).read(), cfg.paigo_sync, cfg.measurements)
    finally:
        backend.close()


def cmd_paigo_sync(args: argparse.Namespace, process: Process) -> int:
    from agent.paigo_dimensions import DimensionsUnavailable, render_yaml

    cfg = _load(args.config)
    try:
        derived = _from_paigo(cfg, process)
    except DimensionsUnavailable as exc:
        _complain(f"usage-agent paigo-sync: Paigo's dimensions could not be read: {exc}")
        return EXIT_UNDELIVERED
    sys.stdout.write(render_yaml(derived))
    return EXIT_OK


def cmd_iam_policy(args: argparse.Namespace, process: Process) -> int:
    from dataclasses import replace

    from agent.iam import RENDERERS, plan

    cfg = _load(args.config)
    if args.from_paigo:
        from agent.paigo_dimensions import DimensionsUnavailable

        try:
            cfg = replace(cfg, measurements=cfg.measurements + _from_paigo(cfg, process).measurements)
        except DimensionsUnavailable as exc:
            _complain(f"usage-agent iam-policy: Paigo's dimensions could not be read: {exc}")
            return EXIT_UNDELIVERED
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


def cmd_demo(_args: argparse.Namespace, process: Process) -> int:
    from agent.demo import run_demo

    return run_demo(metrics=process.metrics, clock=process.clock)


COMMANDS = {"validate": cmd_validate, "once": cmd_once, "run": cmd_run, "spool": cmd_spool,
            "iam-policy": cmd_iam_policy, "demo": cmd_demo, "paigo-sync": cmd_paigo_sync}


def _complain(text: str) -> None:
    """To stderr; a reader gone (`validate 2>&1 | head -1`) must not turn exit 2 into a traceback."""
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def main(argv: list[str] | None = None, process: Process | None = None) -> int:
    """The console script; ``process`` lets a caller (a benchmark) read the metrics it counted."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: STOP_REQUESTED.set())
    if args.command != "validate":  # which logs nothing, so loads no structlog (tests/test_architecture.py)
        from agent.telemetry import configure_logging

        # the demo prints a report; its logs only say what went wrong unless asked for more
        configure_logging(os.environ.get("LOG_LEVEL", "warning") if args.command == "demo" else None)
    process = process or Process()
    try:
        code = COMMANDS[args.command](args, process)
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
