"""Real `usage-agent run` processes killed with SIGKILL at random points, and stopped with
SIGTERM during a backend outage. At the end the backend's id set equals the spool's minus
the dead-lettered ids."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from agent.spool import Spool
from agent.testing.paigo_server import Fault, PaigoContractServer
from tests.conftest import Aws, agent_command, measurement, write_config


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


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sigkill_at_random_points_loses_nothing(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    for i in range(3):
        aws.volume("us-east-1", 10 + i, tags={"customer-id": f"c{i}"})
    config = write_config(
        paigo, tmp_path,
        measurement(name="gauge", interval="1s", group_by="resource"),
        measurement(name="hours", interval="1s", mode="time_weighted", per="hour", dimension_id="dim-h"),
    )
    paigo.reject = lambda body: body["customerId"] == "c2" and body["metadata"]["measurement"] == "hours"
    # slow answers, some lost after the backend committed: kills land mid-send and before the ack
    paigo.script("/usage", *[Fault(after_commit=True, delay=0.15, drop=(n % 7 == 0)) for n in range(400)])
    rng = random.Random(20261121)
    log = tmp_path / "agent.log"
    kills = 0
    for _ in range(10):
        started = log.read_text().count("agent started") if log.exists() else 0
        agent = start(config, log)
        try:
            # the random point is measured from the agent's start, not from a loaded machine's exec
            wait_for(lambda: log.read_text().count("agent started") > started, timeout=60)
            time.sleep(rng.uniform(1.2, 3.5))
        finally:
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=10)
        kills += 1

    # a last, undisturbed run (no tick due for an hour) drains the backlog and stops cleanly
    quiet = write_config(
        paigo, tmp_path,
        measurement(name="gauge", interval="1h", group_by="resource"),
        measurement(name="hours", interval="1h", mode="time_weighted", per="hour", dimension_id="dim-h"),
    )
    started = log.read_text().count("agent started")
    agent = start(quiet, log)
    try:
        # SIGTERM before the handler is installed would kill it (-15): wait for its start line first
        wait_for(lambda: log.read_text().count("agent started") > started, timeout=60)
        wait_for(lambda: not (spool_ids(tmp_path / "spool.db")["pending"] | spool_ids(tmp_path / "spool.db")["leased"]))
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0

    ids = spool_ids(tmp_path / "spool.db")
    spooled = set().union(*ids.values())
    assert kills == 10 and len(spooled) > 20
    assert paigo.accepted_ids() == spooled - ids["dead"]
    assert ids["dead"] and all(rid not in paigo.accepted_ids() for rid in ids["dead"])
    print(f"\nkill -9 x{kills}: spooled {len(spooled)}, delivered {len(paigo.accepted_ids())}, "
          f"duplicates re-sent {paigo.duplicates()}, dead {len(ids['dead'])}, "
          f"lost {len(spooled - ids['dead'] - paigo.accepted_ids())}")


def test_sigterm_during_an_outage_keeps_the_backlog(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 4, tags={"customer-id": "acme"})
    config = write_config(paigo, tmp_path, measurement(interval="1s"))
    paigo.script("/usage", *[Fault(status=503) for _ in range(10_000)])
    log = tmp_path / "agent.log"
    agent = start(config, log)
    try:
        wait_for(lambda: paigo.usage_requests >= 2 and len(spool_ids(tmp_path / "spool.db")["pending"]) >= 2)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log.read_text()[-2000:]
    backlog = spool_ids(tmp_path / "spool.db")
    assert backlog["delivered"] == set() and backlog["leased"] == set() and len(backlog["pending"]) >= 2
    assert paigo.accepted_ids() == set()

    paigo.clear_faults()  # the backend is back
    done = subprocess.run([*agent_command(), "once", "-c", str(config)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    assert backlog["pending"] <= paigo.accepted_ids()
    spool = Spool(tmp_path / "spool.db")
    assert spool.counts()["pending"] == 0
    spool.close()
