"""A DescribeVolumes endpoint on 127.0.0.1 that serves pre-rendered pages of 500 volumes.

moto is far too slow to be the floor of a sampling benchmark, so this server answers from
memory in AWS's EC2 XML shape (``volumeSet``, ``tagSet``, ``attachmentSet``,
``nextToken``), plus ``GetCallerIdentity`` for the agent's own-identity account lookup.
Each region holds its own number of volumes (the region comes from the request's SigV4
credential scope). Run as ``python -m bench.ec2_server us-east-1=10000 eu-west-1=100000``:
it prints its URL on one line, serves until stdin closes, then prints the pages it served.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

PAGE_SIZE = 500
ACCOUNT = "123456789012"
CUSTOMERS = 1000  # volumes are spread evenly over this many customer-id tags
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/")
_TYPES = ("gp3", "gp2", "io2", "st1")  # gp3: iops + throughput; gp2, io2: iops; st1: neither

_CALLER_IDENTITY = f"""<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:iam::{ACCOUNT}:user/bench</Arn>
    <UserId>AIDABENCHBENCHBENCH00</UserId>
    <Account>{ACCOUNT}</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata>
    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
  </ResponseMetadata>
</GetCallerIdentityResponse>""".encode()


def volume_xml(region: str, i: int) -> str:
    """One volume as DescribeVolumes lists it; deterministic in ``i``."""
    volume_type = _TYPES[i % len(_TYPES)]
    zone = region + "abc"[i % 3]
    volume_id = f"vol-{i:017x}"
    in_use = i % 5 != 0
    attachments = (
        f"""
                <item>
                    <volumeId>{volume_id}</volumeId>
                    <instanceId>i-{i:017x}</instanceId>
                    <device>/dev/sdf</device>
                    <status>attached</status>
                    <attachTime>2025-03-01T10:00:00.000Z</attachTime>
                    <deleteOnTermination>false</deleteOnTermination>
                </item>
            """
        if in_use
        else ""
    )
    extra = ""
    if volume_type in ("gp3", "gp2", "io2"):
        extra += f"\n            <iops>{3000 + i % 7 * 1000}</iops>"
    if volume_type == "gp3":
        extra += f"\n            <throughput>{125 + i % 4 * 125}</throughput>"
    return f"""
        <item>
            <volumeId>{volume_id}</volumeId>
            <size>{1 + i % 1000}</size>
            <snapshotId/>
            <availabilityZone>{zone}</availabilityZone>
            <status>{"in-use" if in_use else "available"}</status>
            <createTime>2025-03-01T09:58:00.000Z</createTime>
            <attachmentSet>{attachments}</attachmentSet>
            <tagSet>
                <item>
                    <key>customer-id</key>
                    <value>cust-{i % CUSTOMERS:04d}</value>
                </item>
                <item>
                    <key>Name</key>
                    <value>data-{i}</value>
                </item>
                <item>
                    <key>env</key>
                    <value>prod</value>
                </item>
            </tagSet>
            <volumeType>{volume_type}</volumeType>{extra}
            <encrypted>true</encrypted>
            <multiAttachEnabled>false</multiAttachEnabled>
        </item>"""


def render_pages(region: str, volumes: int) -> list[bytes]:
    pages = []
    count = max(1, (volumes + PAGE_SIZE - 1) // PAGE_SIZE)
    for page in range(count):
        items = "".join(volume_xml(region, i) for i in range(page * PAGE_SIZE, min(volumes, (page + 1) * PAGE_SIZE)))
        token = f"\n    <nextToken>page-{page + 1}</nextToken>" if page + 1 < count else ""
        pages.append(
            f"""<?xml version="1.0" encoding="UTF-8"?>
<DescribeVolumesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>0ab3c1a6-7d7e-4bde-b3a6-{page:012d}</requestId>
    <volumeSet>{items}
    </volumeSet>{token}
</DescribeVolumesResponse>""".encode()
        )
    return pages


def serve(volumes: dict[str, int]) -> tuple[ThreadingHTTPServer, dict[str, int]]:
    pages = {region: render_pages(region, count) for region, count in volumes.items()}
    served = {region: 0 for region in volumes}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args: Any) -> None:
            return

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/xml;charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            action = form.get("Action")
            if action == "GetCallerIdentity":
                self._answer(200, _CALLER_IDENTITY)
                return
            if action != "DescribeVolumes":
                self._answer(400, f"<Response><Errors><Error><Code>InvalidAction</Code><Message>{action}"
                                  f"</Message></Error></Errors></Response>".encode())
                return
            # SigV4: "Credential=<key>/<date>/<region>/ec2/aws4_request"
            scope = _SCOPE.search(self.headers.get("Authorization") or "")
            region = scope.group(1) if scope else ""
            if region not in pages:
                self._answer(400, b"<Response><Errors><Error><Code>InvalidRegion</Code></Error></Errors></Response>")
                return
            page = int(form.get("NextToken", "page-0").removeprefix("page-"))
            with lock:
                served[region] += 1
            self._answer(200, pages[region][page])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    return httpd, served


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("volumes", nargs="+", metavar="REGION=COUNT")
    args = parser.parse_args()
    httpd, served = serve({region: int(count) for region, count in (v.split("=") for v in args.volumes)})
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    httpd.shutdown()
    print(json.dumps(served), flush=True)


if __name__ == "__main__":
    main()
