"""``python -m bench.kube_server PODS``: a Kubernetes API answering pod lists from pre-rendered
pages of 500 (and the namespaces once), so the benchmark measures the clients, not the server."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.testing.kube_server import container, pod

PAGE = 500
TOKEN = "bench-token"
NAMESPACES = 50


def pages(count: int) -> list[bytes]:
    """Pods across 50 namespaces, each labelled with its customer; a page per 500 pods."""
    pods = [pod(f"tenant-{i % NAMESPACES}", f"pod-{i}", labels={"customer-id": f"customer-{i % NAMESPACES}", "app": "web"},
                containers=[container("app", {"cpu": "250m", "memory": "512Mi"}),
                            container("proxy", {"cpu": "50m", "memory": "64Mi"})],
                start="2025-12-31T20:00:00Z") for i in range(count)]
    rendered = []
    for n in range(0, count, PAGE):
        meta: dict[str, Any] = {"resourceVersion": "1000"}
        if n + PAGE < count:
            meta["continue"] = str(n + PAGE)
        rendered.append(json.dumps({"apiVersion": "v1", "kind": "PodList", "metadata": meta,
                                    "items": pods[n:n + PAGE]}).encode())
    return rendered


def main() -> None:
    rendered = pages(int(sys.argv[1]))
    namespaces = json.dumps({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1000"},
                             "items": [{"metadata": {"name": f"tenant-{i}", "uid": f"ns-{i}", "labels": {}}}
                                       for i in range(NAMESPACES)]}).encode()
    served = {"pages": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            return

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                body, code = b'{"kind":"Status","code":401}', 401
            elif url.path == "/api/v1/namespaces":
                body, code = namespaces, 200
            else:
                body, code = rendered[int(query.get("continue", "0")) // PAGE], 200
                with lock:
                    served["pages"] += 1
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)
    sys.stdin.read()
    httpd.shutdown()
    print(json.dumps(served), flush=True)


if __name__ == "__main__":
    main()
