"""The Paigo-contract server in its own process, so its CPU (JSON Schema validation of every
body) is not counted against the client being measured. ``python -m bench.paigo_process
LATENCY``: prints its URLs on one line, serves until stdin closes, then prints what it took."""

from __future__ import annotations

import json
import resource
import sys

from agent.testing.paigo_server import PaigoContractServer

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"


def main() -> None:
    server = PaigoContractServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, latency=float(sys.argv[1]))
    with server:
        print(json.dumps({"url": server.url, "token_url": server.token_url}), flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "usage_requests": server.usage_requests,
        "accepted": len(server.accepted), "received_again": server.duplicates(), "rejected": len(server.rejected),
        "max_in_flight": server.max_in_flight,
    }), flush=True)


if __name__ == "__main__":
    main()
