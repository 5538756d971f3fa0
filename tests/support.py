"""What tests share besides fixtures: a fake clock, a record factory, a deadline-bound wait, the CLI run in-process."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

from agent.clock import SystemClock
from agent.records import UsageRecord, record_id
from tests.conftest import DIMENSION

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
RECORDS_FROM = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)  # the first made record's tick

T = TypeVar("T")


class FakeClock:
    """agent.clock.Clock that moves only when told: by ``sleep`` (at once, no real wait) or by hand."""

    def __init__(self, start: float = START):
        self._t = start

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._t, timezone.utc)

    def time(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self._t += seconds

    def advance_to(self, epoch: float) -> None:
        """Jump to ``epoch`` (a retry's due time); a steady clock never goes back."""
        self._t = max(self._t, epoch)



class Monotonic(SystemClock):
    """The system clock, with ``monotonic()`` read from ``reading`` (a test's own stepping counter):
    wall time stays real (moto's credential expiry is on it) while durations are scripted."""

    def __init__(self, reading: Callable[[], float]):
        super().__init__()
        self._reading = reading

    def monotonic(self) -> float:
        return self._reading()


def make_record(customer: str = "acme", tick: datetime = RECORDS_FROM, value: Decimal | str = "1.75", *,
                measurement: str = "ebs-storage", dimension: str = DIMENSION, resource: str = "aggregate",
                unit: str = "GiB", metadata: Mapping[str, str] | None = None) -> UsageRecord:
    """A record whose id is derived as the converter derives it: the same inputs, the same id."""
    return UsageRecord(
        record_id=record_id(measurement, dimension, customer, resource, tick),
        measurement=measurement, event_type=measurement, dimension_id=dimension, customer_id=customer,
        timestamp=tick, value=Decimal(value), unit=unit, resource=resource,
        metadata=dict(metadata) if metadata is not None else {"region": "us-east-1"},
    )


def make_records(count: int, customer: str = "acme", start: datetime = RECORDS_FROM, **fields: object) -> list[UsageRecord]:
    """``count`` records of one customer on consecutive 15-minute ticks, valued 1.75, 2.75, ..."""
    return [make_record(customer, start + timedelta(minutes=15 * i), Decimal("1.75") + i, **fields)  # type: ignore[arg-type]
            for i in range(count)]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` (something another process or thread changes) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.05)
    return value


def drain_on(forwarder: Any, spool: Any, clock: FakeClock, rounds: int) -> None:
    """Drain, jumping the fake clock over every backoff, until nothing is left to send."""
    for _ in range(rounds):
        forwarder.drain()
        due = spool.next_due()
        if due is None:
            return
        clock.advance_to(due)
    raise AssertionError(f"not drained: {spool.counts()}")


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`usage-agent *args` as ``agent.cli.main`` runs it in this process, ``env`` (if given) its whole
    environment: the exit code, stdout and stderr a process would have had, without an interpreter's
    start. Anything escaping main is printed as the interpreter prints it, "Traceback ..." and exit 1.
    Not for what needs a process of its own: signals, kills, closed stdio (those run the console script)."""
    import structlog

    from agent.cli import main

    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))  # .buffer too
    saved_env, root = dict(os.environ), logging.getLogger()
    handlers, level, logs = root.handlers[:], root.level, structlog.get_config()
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's exit; a text one is printed and exits 1, as by the interpreter
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:  # main configured logging and (for run) signal handlers for a process of its own
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**logs)
        for signum, handler in signals.items():
            signal.signal(signum, handler)
    text = [stream.buffer.getvalue().decode() for stream in (out, err)]  # type: ignore[attr-defined]
    return subprocess.CompletedProcess(["usage-agent", *args], code, *text)


_BATCH = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.support import cli
print(json.dumps([(done.returncode, done.stdout, done.stderr) for done in map(lambda a: cli(*a), json.load(sys.stdin))]))
"""


def cli_batch(*commands: Sequence[str], env: Mapping[str, str] | None = None,
              timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """Each of ``commands`` run by ``cli`` in one fresh interpreter of its own (one start for all of
    them, and none of this process's state): for what must show a new process's behaviour, such as
    that no traceback reaches the user. The child itself must exit 0 with nothing on its stderr."""
    child = subprocess.run([sys.executable, "-c", _BATCH, str(Path(__file__).resolve().parent.parent)],
                           input=json.dumps([list(c) for c in commands]), capture_output=True, text=True,
                           timeout=timeout, env=dict(os.environ if env is None else env))
    assert child.returncode == 0 and child.stderr == "", child.stderr[-4000:]
    return [subprocess.CompletedProcess(["usage-agent", *c], code, out, err)
            for c, (code, out, err) in zip(commands, json.loads(child.stdout), strict=True)]
