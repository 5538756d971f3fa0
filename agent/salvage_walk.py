"""Walking a damaged spool's b-trees: reads that skip ahead past damage, and where each schema
keeps its rows, states and indexes (``agent.salvage_read`` says what is done with them)."""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.spool_files import STATES, layout

_BODY = "seq, CAST(id AS BLOB), CAST(measurement AS BLOB), CAST(tick AS BLOB), CAST(body AS BLOB)"
_STATE = "CAST(state AS BLOB), attempts"
_TIMES = "created_at, updated_at, not_before, last_status, CAST(last_error AS BLOB)"


# -- walking a b-tree around damage -------------------------------------------------------


@dataclass
class Walk:
    trouble: list[tuple[Any, Any]] = field(default_factory=list)  # (last trusted key, resumed at | None)


def walk(db: sqlite3.Connection, sql: str, start: Any, key: Callable[[tuple[Any, ...]], Any],
         plausible: Callable[[tuple[Any, ...]], bool], probes: Callable[[Any], Iterator[Any]],
         visit: Callable[[tuple[Any, ...]], None]) -> Walk:
    """Read ``sql`` (rows with key > ?, ascending, no upper bound) from ``start`` to its end.

    A read error, an implausible row or a key out of order is damage: the walk resumes at the
    first probe key past it that reads without an error, and the stretch in between is trouble.
    """
    walk = Walk()
    after, floor = start, start  # floor: the walk only ever moves forward
    while True:
        keys: list[Any] = []  # the keys of this stretch, ascending
        damaged_from = None
        try:
            for row in db.execute(sql, after if isinstance(after, tuple) else (after,)):
                if not plausible(row):
                    damaged_from = keys[-1] if keys else after
                    break
                k = key(row)
                if keys and k <= keys[-1]:  # a garbled key: the stretch from the last key below it is suspect
                    below = keys[: bisect.bisect_left(keys, k)]
                    damaged_from = below[-1] if below else after
                    break
                keys.append(k)
                visit(row)
            else:
                return walk
        except sqlite3.DatabaseError:
            damaged_from = keys[-1] if keys else after
        floor = max([floor, *keys[-1:]])
        resumed = None
        for probe in probes(floor):
            try:
                first = db.execute(sql, probe if isinstance(probe, tuple) else (probe,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if first is not None and not plausible(first):
                continue
            resumed = probe
            break
        walk.trouble.append((damaged_from, resumed))
        if resumed is None:
            return walk
        after = floor = resumed


def seq_probes(limit: int) -> Callable[[int], Iterator[int]]:
    def probes(last: int) -> Iterator[int]:
        step = 1
        while last + step <= limit:
            yield last + step
            step *= 2
    return probes


def state_probes(limit: int) -> Callable[[tuple[str, int]], Iterator[tuple[str, int]]]:
    order = sorted(STATES)

    def probes(last: tuple[str, int]) -> Iterator[tuple[str, int]]:
        state, seq = last
        if state in order:
            yield from ((state, s) for s in seq_probes(limit)(seq))
        for later in order:
            if later > state:
                yield from ((later, s) for s in (-1, *seq_probes(limit)(-1)))
    return probes


def id_probes(last: str) -> Iterator[str]:
    value = int(last, 16) if last else -1
    for bits in range(0, 129):
        if value + (1 << bits) >= 1 << 128:
            return
        yield format(value + (1 << bits), "032x")


# -- the two layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a spool's rows, states and indexes are: every query salvage makes names them from here."""

    table: str  # the bodies' table, walked by seq
    columns: str  # what _row reads of it, seq first
    state_lookup: str | None  # a row's state by seq (schema 2); None: the rows hold their state
    states: str  # the table the state index belongs to, INDEXED BY it
    by_id: str  # the id witness: SELECT key..., seq ... WHERE key > ? ORDER BY key
    by_id_key: Callable[[tuple[Any, ...]], Any]
    by_id_start: Any
    by_id_probes: Callable[[Any], Iterator[Any]]

    def complete(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """A read row with its state, as _row takes it (schema 2: looked up alone; unreadable: all None)."""
        if self.state_lookup is None:
            return row
        try:
            state = db.execute(self.state_lookup, (row[0],)).fetchone()
        except sqlite3.DatabaseError:
            state = None
        seq, rid, measurement, tick, body, created_at = row
        state = state or (None,) * 6  # state, attempts, updated_at, not_before, last_status, last_error
        return (seq, rid, measurement, tick, body, state[0], state[1], created_at, *state[2:])

    @property
    def rows(self) -> str:
        return f"SELECT {self.columns} FROM {self.table}"


def _time_id_probes(last: tuple[str, str]) -> Iterator[tuple[str, str]]:
    at, rid = last
    yield from ((at, probe) for probe in id_probes(rid))
    yield at, "g"  # past every id (hex digits) of that time: the next time's first row


def layout_of(db: sqlite3.Connection) -> Layout:
    try:
        version = layout(db)
    except sqlite3.DatabaseError:  # no schema readable: no table is either, whichever layout it had
        version = None
    if version == 1:
        return Layout(
            table="records", columns=f"{_BODY}, {_STATE}, {_TIMES}", state_lookup=None,
            states="records INDEXED BY records_by_state",
            by_id="SELECT CAST(id AS BLOB), seq FROM records INDEXED BY sqlite_autoindex_records_1 "
                  "WHERE id > ? ORDER BY id",
            by_id_key=lambda row: row[0].decode(), by_id_start="", by_id_probes=id_probes)
    return Layout(
        table="record_bodies", columns=f"{_BODY}, created_at",
        state_lookup="SELECT CAST(state AS BLOB), attempts, updated_at, not_before, last_status, "
                     "CAST(last_error AS BLOB) FROM record_states WHERE seq = ?",
        states="record_states INDEXED BY record_states_by_state",
        by_id="SELECT CAST(id AS BLOB), seq, CAST(at AS BLOB) FROM record_bodies INDEXED BY record_bodies_by_id "
              "WHERE (at, id) > (?, ?) ORDER BY at, id",
        by_id_key=lambda row: (row[2].decode("utf-8", "replace") if isinstance(row[2], bytes) else "", row[0].decode()),
        by_id_start=("", ""), by_id_probes=_time_id_probes)  # type: ignore[arg-type]
