"""Real `usage-agent run` processes killed with SIGKILL at random points, and stopped with
SIGTERM during a backend outage. At the end the backend's id set equals the spool's minus
the dead-lettered ids."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

from agent.spool import Spool
from agent.testing.paigo_server import Fault, PaigoContractServer
from tests.conftest import Aws, agent_command, measurement, write_config
from tests.support import wait_for


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as sink:
        return subprocess.Popen([*agent_command(), "run", "-c", str(config)], stdout=sink, stderr=sink,
                                env=dict(os.environ))


def spool_ids(path: Path) -> dict[str, set[str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[str, set[str]] = {"pending": set(), "leased": set(), "delivered": set(), "dead": set()}
        for rid, state in db.execute("SELECT id, state FROM records"):
            out[state].add(rid)
        return out
    finally:
        db.close()


def spooled_count(path: Path) -> int:
    """Records in the spool; 0 while the agent has not created it (or its table) yet."""
    try:
        return sum(map(len, spool_ids(path).values())) if path.exists() else 0
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise


def started_count(log: Path) -> int:
    return log.read_text().count("agent started") if log.exists() else 0


def test_sigkill_at_random_points_loses_nothing(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    for i in range(3):
        aws.volume("us-east-1", 10 + i, tags={"customer-id": f"c{i}"})
    config = write_config(
        paigo, tmp_path,
        measurement(name="gauge", interval="1s", group_by="resource"),
        measurement(name="hours", interval="1s", mode="time_weighted", per="hour", dimension_id="dim-h"),
    )
    paigo.reject = lambda body: body["customerId"] == "c2" and body["metadata"]["measurement"] == "hours"
    rng = random.Random(20261121)
    log = tmp_path / "agent.log"
    in_flight_at_kill: list[int] = []
    for _ in range(10):
        spooled = spooled_count(tmp_path / "spool.db") + 3
        paigo.clear_faults()
        release = threading.Event()
        agent = start(config, log)
        try:
            wait_for(lambda: spooled_count(tmp_path / "spool.db") >= spooled, timeout=60, what=f"{spooled} records spooled")
            # the random point: the k-th request from now, held after the backend committed it until the
            # agent is dead; on the way some answers are lost after the commit too
            k = rng.randint(1, 12)
            paigo.script("/usage", *[Fault(after_commit=True, delay=0.05, drop=(n % 7 == 3)) for n in range(k - 1)],
                         Fault(after_commit=True, hold=release))
            target = paigo.usage_requests + k
            wait_for(lambda: paigo.usage_requests >= target and paigo.in_flight > 0, timeout=60,
                     what=f"request {target} in flight")
        finally:
            agent.send_signal(signal.SIGKILL)
            in_flight_at_kill.append(paigo.in_flight)  # the backend was still answering the agent it lost
            agent.wait(timeout=10)
            release.set()
        wait_for(lambda: paigo.in_flight == 0, what="the dead agent's requests to end")

    # what the backend saw: every kill cut a send short, and committed-but-unacked records were sent again
    assert len(in_flight_at_kill) == 10 and min(in_flight_at_kill) >= 1, in_flight_at_kill
    assert paigo.duplicates() >= 1

    # a last, undisturbed run (no tick due for an hour) drains the backlog and stops cleanly
    quiet = write_config(
        paigo, tmp_path,
        measurement(name="gauge", interval="1h", group_by="resource"),
        measurement(name="hours", interval="1h", mode="time_weighted", per="hour", dimension_id="dim-h"),
    )
    started = started_count(log)
    agent = start(quiet, log)
    try:
        # SIGTERM before the handler is installed would kill it (-15): wait for its start line first
        wait_for(lambda: started_count(log) > started, timeout=60, what="the agent's start line")
        wait_for(lambda: not (spool_ids(tmp_path / "spool.db")["pending"] | spool_ids(tmp_path / "spool.db")["leased"]),
                 what="an empty backlog")
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0

    ids = spool_ids(tmp_path / "spool.db")
    spooled = set().union(*ids.values())
    assert len(spooled) > 20
    assert paigo.accepted_ids() == spooled - ids["dead"]
    assert ids["dead"] and all(rid not in paigo.accepted_ids() for rid in ids["dead"])


def test_sigterm_during_an_outage_keeps_the_backlog(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 4, tags={"customer-id": "acme"})
    config = write_config(paigo, tmp_path, measurement(interval="1s"))
    paigo.script("/usage", *[Fault(status=503) for _ in range(10_000)])
    log = tmp_path / "agent.log"
    agent = start(config, log)
    try:
        wait_for(lambda: paigo.usage_requests >= 2 and len(spool_ids(tmp_path / "spool.db")["pending"]) >= 2,
                 what="two refused sends and a backlog of two")
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log.read_text()[-2000:]
    backlog = spool_ids(tmp_path / "spool.db")
    assert backlog["delivered"] == set() and backlog["leased"] == set() and len(backlog["pending"]) >= 2
    assert paigo.accepted_ids() == set()

    paigo.clear_faults()  # the backend is back
    # hourly: `once` samples the hour in progress, with an hour for it, however loaded the machine
    hourly = write_config(paigo, tmp_path, measurement(interval="1h"))
    done = subprocess.run([*agent_command(), "once", "-c", str(hourly)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert backlog["pending"] <= paigo.accepted_ids()
    spool = Spool(tmp_path / "spool.db")
    assert spool.counts()["pending"] == 0
    spool.close()
