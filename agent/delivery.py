"""How records reach a sink, the same for every sink: in batches of its ``max_batch``, up to
``max_in_flight`` requests at once over the agent's one client, a rejected batch halved
until the records at fault stand alone (a sink's ``Halve``), and a request whose
credentials were renewed sent once more. A record the sink refuses (``Sink.refuse``) or cannot
render is dead-lettered alone, before sending. Backoff and Retry-After are the forwarder's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from queue import SimpleQueue

import httpx
import structlog

from agent.clock import Clock, SystemClock
from agent.records import UsageRecord
from agent.metrics import Metrics
from agent.sinks.base import (
    Halve,
    NotSendable,
    Outcome,
    Rejected,
    SendAgain,
    Sink,
    classify,
    encode,
    transport_failure,
)
from agent.sinks.transport import send

log = structlog.get_logger("agent.delivery")

Encoded = tuple[UsageRecord, bytes]


def _chunks(items: Sequence[Encoded], size: int) -> list[Sequence[Encoded]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def sendable(sink: Sink, records: Sequence[UsageRecord], now: datetime
             ) -> tuple[list[Encoded], list[tuple[UsageRecord, Rejected]]]:
    """Each record the sink takes at ``now`` as its encoded element; those it refuses or cannot
    render set apart, rejected with the reason (status None: the backend never saw them)."""
    refused: list[tuple[UsageRecord, Rejected]] = []
    taken: list[UsageRecord] = []
    for record in records:
        reason = sink.refuse(record, now)
        if reason is None:
            taken.append(record)
        else:
            refused.append((record, Rejected(status=None, body=reason)))
    encoded, failed = encode(sink.element, taken)
    return encoded, refused + failed


def bodies(sink: Sink, records: Sequence[UsageRecord], clock: Clock | None = None) -> list[bytes]:
    """The exact bytes a first send of these records carries, one entry per request body
    (Paigo, Stripe: per record; file: per line, without the newline): what ``once --dry-run``
    prints. Records refused or that cannot be rendered are left out, and logged."""
    encoded, failed = sendable(sink, records, (clock or SystemClock()).now())
    for record, rejected in failed:
        log.error("record left out: it would be dead-lettered", record_id=record.record_id,
                  measurement=record.measurement, reason=rejected.body)
    size = sink.max_batch if sink.array_body else 1
    return [sink.body([body for _, body in chunk]) for chunk in _chunks(encoded, size)]


class Delivery:
    """Sends records through ``sink`` over ``client`` (None for a sink that writes locally)."""

    def __init__(self, sink: Sink, client: httpx.Client | None, metrics: Metrics, clock: Clock | None = None):
        self.sink = sink
        self._client = client
        self._metrics = metrics
        self._clock = clock or SystemClock()

    def deliver(self, records: Sequence[UsageRecord], stop: threading.Event | None = None
                ) -> Iterator[tuple[UsageRecord, Outcome]]:
        """Each record's outcome as it is known. Never raises for I/O failures or for a
        record that cannot be rendered (it is rejected alone).

        Once ``stop`` is set, sends not yet started are skipped (no outcome is yielded for
        them; they stay leased and go out again after the lease ends or the next start);
        sends in flight end within their own deadline.
        """
        stop = stop or threading.Event()
        encoded, failed = sendable(self.sink, records, self._clock.now())
        yield from failed
        batches = _chunks(encoded, self.sink.max_batch)
        workers = min(self.sink.max_in_flight, len(batches))
        if workers <= 1:
            for batch in batches:
                yield from self._batch(batch, stop)
            return
        # ``workers`` threads each take the next batch until none is left (or stop): one queue put per
        # batch, not a future, a waiter and a wake-up of each
        taken = iter(batches)
        lock = threading.Lock()
        abandoned = threading.Event()  # the caller stopped reading: no batch is started any more
        done: SimpleQueue[list[tuple[UsageRecord, Outcome]] | BaseException | None] = SimpleQueue()

        def work() -> None:
            try:
                while not stop.is_set() and not abandoned.is_set():
                    with lock:
                        batch = next(taken, None)
                    if batch is None:
                        break
                    done.put(list(self._batch(batch, stop)))
            except BaseException as exc:  # a bug, not an I/O failure: raised to the caller, as a future's
                done.put(exc)
            finally:
                done.put(None)

        threads = [threading.Thread(target=work, name=f"{self.sink.name}-send-{i}", daemon=True)
                   for i in range(workers)]
        failure: BaseException | None = None
        try:
            for thread in threads:
                thread.start()
            running = workers
            while running:
                item = done.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    failure = failure or item  # raised once the other workers' outcomes are yielded
                else:
                    yield from item
            if failure is not None:
                raise failure
        finally:
            abandoned.set()
            for thread in threads:
                if thread.ident is not None:  # started
                    thread.join()  # sends in flight end within their own deadline

    def _batch(self, batch: Sequence[Encoded], stop: threading.Event) -> Iterator[tuple[UsageRecord, Outcome]]:
        """One batch as one request; when the backend rejects it (4xx) and does not say which
        records it means, each half again, down to single records, so only those at fault are
        dead-lettered: about 2·log2(n) more requests for one bad record in n."""
        waiting = [batch] if batch else []
        while waiting:
            if stop.is_set():
                return  # not sent: left leased, sent again later
            part = waiting.pop()
            outcomes = self._exchange(part)
            halve = any(isinstance(o, Halve) for o in outcomes)
            if halve and len(part) > 1:
                middle = len(part) // 2
                waiting += [part[middle:], part[:middle]]  # first half next: outcomes keep lease order
                continue
            yield from zip((record for record, _ in part),
                           (o.rejected if isinstance(o, Halve) else o for o in outcomes))

    def _exchange(self, part: Sequence[Encoded]) -> list[Outcome | Halve]:
        """Render, send, classify; once more at once when the sink renewed its credentials."""
        records = [record for record, _ in part]
        for _ in range(2):
            try:
                rendered = self.sink.render([body for _, body in part])
            except NotSendable as exc:
                return [exc.outcome] * len(records)
            if isinstance(rendered, httpx.Request):
                assert self._client is not None, f"the {self.sink.name} sink sends requests: it needs a client"
                try:
                    answer = send(self._client, rendered, self.sink.timeout, self._metrics)
                except httpx.HTTPError as exc:
                    return [transport_failure(exc, self.sink.timeout)] * len(records)
            else:
                answer = rendered.perform()  # a local write
            outcomes = self.sink.classify(answer, records)
            if not any(isinstance(o, SendAgain) for o in outcomes):
                return outcomes  # type: ignore[return-value]
        # renewed credentials refused as well, and not held back by the sink: the answer as it is
        return [classify(answer) if isinstance(o, SendAgain) else o for o in outcomes]
