"""The OpenMeter-contract server in its own process (JSON Schema validation of every event is
its CPU, not the client's). ``python -m bench.openmeter_process LATENCY``: prints its URL on
one line, serves until stdin closes, then prints what it took."""

from __future__ import annotations

import json
import resource
import sys

from tests.openmeter_server import OpenMeterContractServer

TOKEN = "bench-openmeter-token"


def main() -> None:
    server = OpenMeterContractServer(token=TOKEN, latency=float(sys.argv[1]))
    with server:
        print(json.dumps({"url": server.url}), flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "requests": server.requests,
        "accepted": len(server.events), "received_again": server.duplicates(), "rejected": len(server.refused),
    }), flush=True)


if __name__ == "__main__":
    main()
