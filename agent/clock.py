"""Time sources. Wall-clock epoch seconds that never jump within a process."""

from __future__ import annotations

import time


class SteadyClock:
    """Epoch seconds anchored to the wall clock once, then advanced by the monotonic clock.

    Backoff deadlines are stored in the spool as epoch seconds (so they mean something after a
    restart) but measured with this clock, so an NTP step or a suspended VM cannot make a
    retry fire early or hang for hours.
    """

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def __call__(self) -> float:
        return self._wall + (time.monotonic() - self._mono)
