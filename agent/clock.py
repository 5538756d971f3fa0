"""The one clock abstraction: every stage that reads time is given a ``Clock``.

``now()`` is the UTC wall time (ticks, record timestamps, credential expiry); ``time()`` is
epoch seconds that never jump within a process (backoff deadlines stored in the spool);
``monotonic()`` measures durations and deadlines; ``sleep()`` waits. Tests pass a fake one.
"""

from __future__ import annotations

import time as _time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The process's clock. ``time()`` is anchored to the wall clock once, then advanced by the
    monotonic clock, so an NTP step or a suspended VM cannot make a stored retry fire early or
    hang for hours."""

    def __init__(self) -> None:
        self._wall = _time.time()
        self._mono = _time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def time(self) -> float:
        return self._wall + (_time.monotonic() - self._mono)

    def monotonic(self) -> float:
        return _time.monotonic()

    def sleep(self, seconds: float) -> None:
        _time.sleep(max(0.0, seconds))
