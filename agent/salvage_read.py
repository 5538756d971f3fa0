"""Reading a damaged spool: every row that can be read, and what the indexes say was lost.

A scan of a damaged b-tree can end early without an error (a garbled key past the scan's
end stops it), so no single read is trusted:

- the table is walked in ``seq`` order without an upper bound; where it fails or a key is
  out of order, the walk skips ahead (1, 2, 4 … slots) and every slot it skipped is looked
  up by primary key, one at a time;
- both indexes (by state, by time and id) are walked the same way, as witnesses of which rows
  existed: a row a witness lists that no read returned is lost, and reported with its seq,
  id and state as far as the witnesses know them;
- where no witness was read completely, a seq counts as possibly lost unless the state index
  walked past it cleanly (in every state) without listing it. So ``lost_at_most`` is an
  upper bound; ``None`` when the end of the table is gone too and nothing says how many
  rows followed.

Every row copied is validated as the forwarder would lease it (parsed and rendered); a row
that is not (or no longer) a record is copied dead-lettered with the reason, never pending.

A spool of schema 2 keeps a record's body and its state in two tables: the bodies are walked,
and each row's state is looked up by seq on its own, so damage to the states costs only the
states (the state index may still know them). A spool of schema 1 (one records table) is read
as it is.
"""

from __future__ import annotations

import bisect
import json
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.records import UsageRecord, format_timestamp, parse_timestamp
from agent.salvage_walk import layout_of, seq_probes, state_probes, walk
from agent.spool_files import STATES, UNTIMED, UNTIMED_IDS
from agent.spool_rows import parse_body

_RECORD_ID = re.compile(rb"[0-9a-f]{32}")  # record_id(): 32 hex digits; garbage never looks like one
_MAX_SEQ = 1 << 62  # an unknown table end: skipping ahead gives up past this
_LOST_LISTED = 1000  # lost rows named in the report; the count is always exact
_LOOKUP_BUDGET = 5_000_000  # seqs looked up one by one where no index witness covers them


@dataclass
class SalvageReport:
    path: str
    quarantined: str | None  # None: the spool was sound and is left in place
    recovered: Counter[str] = field(default_factory=Counter)  # per state in the new spool
    damaged_dead_lettered: int = 0  # rows copied as dead: not (or no longer) a record
    lost: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> what the witnesses know of a lost row
    possibly_lost: int = 0  # skipped slots no witness accounts for
    unreadable_ranges: list[tuple[int, int]] = field(default_factory=list)  # seq slots the table walk skipped
    unreadable_after_seq: int | None = None  # the table's end is gone: rows past this seq, count unknown
    complete_witness: str | None = None  # the index that was read whole: the loss is then exact
    sampler_states: int = 0

    @property
    def lost_at_most(self) -> int | None:
        if self.unreadable_after_seq is not None:
            return None
        return len(self.lost) + self.possibly_lost

    def as_dict(self) -> dict[str, Any]:
        lost = [self.lost[seq] | {"seq": seq} for seq in sorted(self.lost)[:_LOST_LISTED]]
        return {
            "path": self.path,
            "healthy": self.quarantined is None,
            "quarantined": self.quarantined,
            "recovered": dict(self.recovered),
            "recovered_total": sum(self.recovered.values()),
            "damaged_dead_lettered": self.damaged_dead_lettered,
            "lost_at_most": self.lost_at_most,
            "lost_known": len(self.lost),
            "possibly_lost": self.possibly_lost,
            "lost_known_by_state": dict(Counter(row.get("state") or "unknown" for row in self.lost.values())),
            "lost": lost,
            "unreadable_seq_ranges": self.unreadable_ranges,
            "unreadable_after_seq": self.unreadable_after_seq,
            "complete_witness": self.complete_witness,
            "sampler_states": self.sampler_states,
        }


# -- reading rows --------------------------------------------------------------------------


@dataclass
class _Row:
    seq: int
    values: tuple[Any, ...]  # the columns to insert, state resolved
    state: str | None  # None: unreadable; the witnesses may know it
    at: str | None  # the record's time, with its id the unique key; None: the body is no record
    damaged: bool = False  # not (or no longer) a record: copied dead-lettered


def _time(text: str | None) -> str | None:
    """``text`` if it is a record time as format_timestamp writes it, else None."""
    try:
        return text if text is not None and format_timestamp(parse_timestamp(text)) == text else None
    except ValueError:
        return None


def _text(raw: Any) -> str | None:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _stored(body: bytes) -> str | bytes:
    """A body as it is stored again: text when it decodes, else the bytes as they were found."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body


def _whole_body(body: bytes) -> UsageRecord | None:
    try:
        return parse_body(json.loads(body.decode("utf-8"))["id"], body)
    except (ValueError, KeyError, TypeError):
        return None


def _row(raw: tuple[Any, ...]) -> _Row | None:
    """A read row as it will be copied, or None when it has no usable id (it cannot be a row)."""
    seq, rid, measurement, tick, body, state, attempts, created, updated, not_before, status, error = raw
    if not isinstance(rid, bytes) or _RECORD_ID.fullmatch(rid) is None or not isinstance(body, bytes):
        return None
    record_id = rid.decode()
    text_state = _text(state)
    known_state = "pending" if text_state == "leased" else text_state  # whoever leased it is gone
    try:
        record = parse_body(record_id, body)
    except ValueError as exc:
        record = _whole_body(body)  # the id column may be what is garbled: a whole record names its own id
        if record is not None:
            return _row((seq, record.record_id.encode(), *raw[2:]))
        if not body.startswith(b'{"id":"' + rid + b'"'):  # id and body disagree: not known to be this row
            return None
        if known_state in ("delivered", "dead"):  # never sent again: kept as it was
            values = (seq, record_id, _text(measurement) or "?", _text(tick) or "?", _stored(body), known_state,
                      attempts or 0, created or 0.0, updated or 0.0, not_before or 0, status, _text(error))
            return _Row(seq, values, known_state, None)
        values = (seq, record_id, _text(measurement) or "?", _text(tick) or "?", _stored(body), "dead",
                  attempts or 0, created or 0.0, updated or 0.0, 0, None, f"damaged in spool: {exc}")
        return _Row(seq, values, "dead", None, damaged=True)
    at = format_timestamp(record.timestamp)
    values = (seq, record_id, record.measurement, _text(tick) or at, _stored(body),
              known_state, attempts or 0, created or 0.0, updated or 0.0, not_before or 0, status, _text(error))
    return _Row(seq, values, known_state if known_state in STATES else None, at)


class _Salvager:
    def __init__(self, source: sqlite3.Connection, fresh: sqlite3.Connection, report: SalvageReport):
        self.db = source
        self.layout = layout_of(source)
        self.fresh = fresh
        self.report = report
        self.recovered: set[int] = set()
        self.no_state: list[_Row] = []  # copied once the witnesses are read
        self.untimed: dict[int, _Row] = {}  # damaged rows, copied once the (at, id) index gave their time
        self.index_at: dict[int, str] = {}  # seq -> the well-formed time the (at, id) index lists it at

    def copy(self, raw: tuple[Any, ...]) -> None:
        seq = raw[0]
        if not isinstance(seq, int) or seq in self.recovered:
            return
        row = _row(self.layout.complete(self.db, raw))
        if row is None:
            return
        if row.state is None or row.at is None:
            if row.state is None:
                self.no_state.append(row)
            if row.at is None:
                self.untimed[seq] = row
            self.recovered.add(seq)
            return
        self._insert(row)

    def index_entry(self, row: tuple[Any, ...]) -> None:
        """An (at, id) index entry of a damaged row: the time it was stored at, if well-formed."""
        at = _time(_text(row[2])) if len(row) > 2 else None
        found = self.untimed.get(row[1])
        if at is not None and found is not None and found.values[1] == row[0].decode():
            self.index_at[row[1]] = at

    def _insert(self, row: _Row) -> None:
        seq, rid, measurement, tick, body, state, attempts, created, updated, not_before, status, error = row.values
        if row.at is None:  # a damaged row: its time from the index, else its tick, else none (the id is guarded)
            row.at = self.index_at.get(seq) or _time(tick) or UNTIMED
            if row.at == UNTIMED and not self.fresh.execute(UNTIMED_IDS).execute(
                    "INSERT OR IGNORE INTO untimed_ids (id) VALUES (?)", (rid,)).rowcount:
                return  # the same id at another seq (a garbled key) is copied already
        cursor = self.fresh.execute(
            "INSERT OR IGNORE INTO record_bodies (seq, id, at, measurement, tick, body, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (seq, rid, row.at, measurement, tick, body, created))
        self.recovered.add(row.seq)
        if cursor.rowcount:  # ignored: the same id at another seq (a garbled key) is copied already
            self.fresh.execute(
                "INSERT INTO record_states (seq, state, attempts, updated_at, not_before, last_status, last_error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (seq, state, attempts, updated, not_before, status, error))
            self.report.recovered[state] += 1
            self.report.damaged_dead_lettered += row.damaged

    def look_up(self, seq: int) -> None:
        """One row by primary key: a seek, so the damage next to it is never read."""
        if seq in self.recovered:
            return
        try:
            found = self.db.execute(f"{self.layout.rows} WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.DatabaseError:
            return
        if found is not None:
            self.copy(found)


def _highest(db: sqlite3.Connection, sql: str, *params: Any) -> int | None:
    try:
        value = db.execute(sql, params).fetchone()[0]
    except sqlite3.DatabaseError:
        return None
    return value if isinstance(value, int) else None


def read_damaged(source: sqlite3.Connection, fresh: sqlite3.Connection, report: SalvageReport) -> None:
    """Copy every readable row of ``source`` into ``fresh`` and fill ``report`` with what was lost."""
    salvager = _Salvager(source, fresh, report)
    where = salvager.layout
    table_max = _highest(source, f"SELECT max(seq) FROM {where.table}")
    index_max = [_highest(source, f"SELECT max(seq) FROM {where.states} WHERE state = ?", s) for s in STATES]
    # with the table's end readable, no row lies past it; else skipping ahead may go far
    limit = table_max if table_max is not None else _MAX_SEQ

    table = walk(source, f"{where.rows} WHERE seq > ? ORDER BY seq", 0,
                 key=lambda row: row[0], plausible=lambda row: isinstance(row[0], int) and 0 < row[0] <= limit,
                 probes=seq_probes(limit), visit=salvager.copy)

    witnessed: dict[int, dict[str, Any]] = {}

    def witness(seq: Any, **facts: Any) -> None:
        if isinstance(seq, int) and seq not in salvager.recovered:
            witnessed.setdefault(seq, {}).update(facts)

    by_state = walk(source, f"SELECT state, seq FROM {where.states} "
                            "WHERE (state, seq) > (?, ?) ORDER BY state, seq", ("", 0),
                    key=lambda row: (row[0], row[1]),
                    plausible=lambda row: row[0] in STATES and isinstance(row[1], int) and 0 < row[1] <= limit,
                    probes=state_probes(limit), visit=lambda row: witness(row[1], state=row[0]))
    by_id = walk(source, where.by_id, where.by_id_start, key=where.by_id_key,
                 plausible=lambda row: isinstance(row[0], bytes) and _RECORD_ID.fullmatch(row[0]) is not None
                 and isinstance(row[1], int) and 0 < row[1] <= limit,
                 probes=where.by_id_probes,
                 visit=lambda row: (witness(row[1], id=row[0].decode()), salvager.index_entry(row)))
    complete = [name for name, read in (("records_by_state", by_state), ("id", by_id)) if not read.trouble]
    report.complete_witness = complete[0] if complete else None
    last_row = max([*(m for m in index_max if m is not None), *witnessed, *salvager.recovered, 0])

    # the slots the table walk skipped, one by one; then every row a witness lists
    slots: list[int] = []
    for last, resumed in table.trouble:
        if resumed is not None:
            high = resumed
        elif table_max is not None:
            high = table_max
        elif complete:
            high = last_row  # a whole index lists every row there was
        else:  # the table's end is gone and no witness says what followed
            report.unreadable_after_seq = last
            high = max(last, last_row)
        if high > last:
            report.unreadable_ranges.append((last + 1, high))
            slots.extend(range(last + 1, high + 1))
    for seq in [*slots, *sorted(witnessed)]:
        salvager.look_up(seq)

    for row in [row for row in salvager.untimed.values() if row.state is not None]:
        salvager.recovered.discard(row.seq)
        salvager._insert(row)
    for row in salvager.no_state:  # the state column is garbled: the state index may still know it
        state = witnessed.get(row.seq, {}).get("state") or _state_in_index(source, where.states, row.seq)
        state = "pending" if state == "leased" else state
        if state not in STATES:
            state, row.damaged = "dead", True
            row.values = (*row.values[:11], "damaged in spool: its state is unreadable; replay it if it was not delivered")
        row.values = (*row.values[:5], state, *row.values[6:])
        salvager.recovered.discard(row.seq)
        salvager._insert(row)

    report.lost = {seq: facts for seq, facts in witnessed.items() if seq not in salvager.recovered}
    if complete:
        return
    # a seq the state index walked past cleanly, in every state, and does not list, was not a row;
    # every other seq no read returned may have been one
    end = table_max if table_max is not None else last_row
    uncovered = _uncovered_seqs(by_state.trouble, end)
    if sum(high - low + 1 for low, high in uncovered) <= _LOOKUP_BUDGET:
        for low, high in uncovered:
            for seq in range(low, high + 1):
                salvager.look_up(seq)
    found = sorted(salvager.recovered | set(report.lost))
    report.possibly_lost = sum(high - low + 1 - (bisect.bisect_right(found, high) - bisect.bisect_left(found, low))
                               for low, high in uncovered)


def _uncovered_seqs(trouble: list[tuple[Any, Any]], end: int) -> list[tuple[int, int]]:
    """The seqs (1..end, as merged inclusive ranges) that some state's stretch of the state index
    skipped: there the index cannot say a row was absent."""
    order = sorted(STATES)
    spans: list[tuple[int, int]] = []
    for (state, seq), resumed in trouble:
        to_state, to_seq = resumed if resumed is not None else ("~", end)  # "~" sorts after every state
        for each in order:
            if each < state or each > to_state:
                continue
            low = seq + 1 if each == state else 1
            high = to_seq if each == to_state else end
            if low <= high:
                spans.append((max(low, 1), min(high, end)))
    merged: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        elif low <= high:
            merged.append((low, high))
    return merged


def _state_in_index(db: sqlite3.Connection, states: str, seq: int) -> str | None:
    for state in STATES:
        try:
            if db.execute(f"SELECT 1 FROM {states} WHERE state = ? AND seq = ?", (state, seq)).fetchone():
                return state
        except sqlite3.DatabaseError:
            continue
    return None
