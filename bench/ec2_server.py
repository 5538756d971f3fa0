"""An AWS-shaped endpoint on 127.0.0.1 for the benchmarks, answering from memory.

moto is far too slow to be the floor of a sampling benchmark, so this server answers in
AWS's EC2 XML shape (``volumeSet``, ``tagSet``, ``attachmentSet``, ``nextToken``), plus
``GetCallerIdentity`` for the agent's own-identity account lookup. Two datasets:

- ``python -m bench.ec2_server us-east-1=10000 eu-west-1=100000``: the caller's own
  volumes, pre-rendered pages of 500, each region its own number (the region comes from the
  request's SigV4 credential scope);
- ``python -m bench.ec2_server --accounts 200 --volumes 10 [--latency 0.05]``: customer
  accounts ``ACCOUNTS[i]``, each with a role that STS ``AssumeRole`` assumes only with the
  account's external id (``ext-<account>``), issuing keys of that account; ``DescribeRegions``
  (17 enabled regions); ``DescribeVolumes`` paged by ``MaxResults``/``NextToken`` over the
  account's own volumes in the region. Every request's SigV4 signature is verified against
  the secret of the key it names, so a call signed with another account's key, or no key,
  is refused (and counted).

It prints its URL on one line, serves until stdin closes, then prints what it served.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import re
import secrets
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

PAGE_SIZE = 500
ACCOUNT = "123456789012"
CUSTOMERS = 1000  # volumes are spread evenly over this many customer-id tags
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/")
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})")
REGIONS = ("ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1", "ap-southeast-1", "ap-southeast-2",
           "ca-central-1", "eu-central-1", "eu-north-1", "eu-west-1", "eu-west-2", "eu-west-3", "sa-east-1",
           "us-east-1", "us-east-2", "us-west-1", "us-west-2")  # the 17 regions enabled by default
BASE_KEY, BASE_SECRET = "bench", "bench"  # the agent's own credentials (the caller of AssumeRole)


def account_id(i: int) -> str:
    return f"{100_000_000_000 + i:012d}"


def role_arn(account: str) -> str:
    return f"arn:aws:iam::{account}:role/usage-agent"


def external_id(account: str) -> str:
    return f"ext-{account}"


def volume_size(account: str, region: str, i: int) -> int:
    """GiB of the ``i``-th volume of an account in a region: deterministic, 1..1000."""
    return 1 + (int(account) * 7 + REGIONS.index(region) * 131 + i * 37) % 1000


def expected_gib(account: str, volumes: int) -> int:
    """What the account's customer is billed: every volume of every region, summed."""
    return sum(volume_size(account, region, i) for region in REGIONS for i in range(volumes))
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


def _xml(action: str, body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
            f"<requestId>0ab3c1a6-7d7e-4bde-b3a6-000000000000</requestId>{body}</{action}Response>").encode()


def _error(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    return status, (f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
                    f"<RequestID>bench</RequestID></Response>").encode()


def _sts_error(code: str, message: str, status: int = 403) -> tuple[int, bytes]:
    return status, (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
                    f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>bench</RequestId>"
                    f"</ErrorResponse>").encode()


class Accounts:
    """Customer accounts behind STS and EC2: issued keys, signature checks, paged volumes."""

    def __init__(self, count: int, volumes: int):
        self.accounts = {account_id(i) for i in range(count)}
        self.volumes = volumes
        self.keys: dict[str, tuple[str, str, str]] = {BASE_KEY: ("", BASE_SECRET, "")}  # key -> (account, secret, token)
        self.counts: dict[str, int] = {}  # action (and refusal) -> requests
        self._serial = itertools.count()
        self._lock = threading.Lock()

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def verify(self, method: str, path: str, headers: Any, body: bytes) -> tuple[str, str] | None:
        """(account of the signing key or "" for the agent's own, region), or None when the
        SigV4 signature does not match the key's secret."""
        auth = _AUTH.fullmatch(headers.get("Authorization") or "")
        if auth is None:
            return None
        key, date, region, service, signed, signature = auth.groups()
        with self._lock:
            known = self.keys.get(key)
        if known is None or (known[2] and headers.get("X-Amz-Security-Token") != known[2]):
            return None
        names = signed.split(";")
        canonical = "\n".join([method, path.split("?")[0] or "/", path.partition("?")[2],
                               *(f"{n}:{' '.join((headers.get(n) or '').split())}" for n in names), "",
                               signed, hashlib.sha256(body).hexdigest()])
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{headers.get('X-Amz-Date')}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signing = ("AWS4" + known[1]).encode()
        for part in (date, region, service, "aws4_request"):
            signing = hmac.new(signing, part.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(hmac.new(signing, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
            return None
        return known[0], region

    def answer(self, caller: str, region: str, form: dict[str, str]) -> tuple[int, bytes]:
        action = form.get("Action", "")
        if action == "AssumeRole":
            return self._assume_role(caller, form)
        if not caller:
            return _error("UnauthorizedOperation", "the agent's own identity has no volumes here", 403)
        if action == "DescribeRegions":
            self.count(action)
            items = "".join(f"<item><regionName>{r}</regionName><regionEndpoint>ec2.{r}.amazonaws.com</regionEndpoint>"
                            f"<optInStatus>opt-in-not-required</optInStatus></item>" for r in REGIONS)
            return 200, _xml(action, f"<regionInfo>{items}</regionInfo>")
        if action == "DescribeVolumes":
            self.count(action)
            return 200, self._volumes(caller, region, form)
        return _error("InvalidAction", action)

    def _assume_role(self, caller: str, form: dict[str, str]) -> tuple[int, bytes]:
        arn = form.get("RoleArn", "")
        account = arn.split(":")[4] if arn.count(":") >= 5 else ""
        if caller or account not in self.accounts or arn != role_arn(account):
            self.count("AssumeRole refused")
            return _sts_error("AccessDenied", f"not authorized to perform sts:AssumeRole on {arn}")
        if form.get("ExternalId") != external_id(account):
            self.count("AssumeRole refused")
            return _sts_error("AccessDenied", "the external id does not match")
        self.count("AssumeRole")
        key = f"ASIA{account}{next(self._serial):08X}"
        secret, token = secrets.token_urlsafe(30), secrets.token_urlsafe(60)
        with self._lock:
            self.keys[key] = (account, secret, token)
        expiry = datetime.now(timezone.utc) + timedelta(seconds=int(form.get("DurationSeconds", "3600")))
        return 200, (f'<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>'
                     f"<Credentials><AccessKeyId>{key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>"
                     f"<SessionToken>{token}</SessionToken><Expiration>{expiry:%Y-%m-%dT%H:%M:%SZ}</Expiration>"
                     f"</Credentials><AssumedRoleUser><Arn>arn:aws:sts::{account}:assumed-role/usage-agent/"
                     f"{form.get('RoleSessionName', '')}</Arn><AssumedRoleId>AROA{account}:x</AssumedRoleId>"
                     f"</AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>bench</RequestId>"
                     f"</ResponseMetadata></AssumeRoleResponse>").encode()

    def _volumes(self, account: str, region: str, form: dict[str, str]) -> bytes:
        if region not in REGIONS:
            return _error("InvalidRegion", region)[1]
        start = int(form.get("NextToken", "0"))
        end = min(self.volumes, start + int(form.get("MaxResults", "1000")))
        items = "".join(
            f"<item><volumeId>vol-{int(account):012x}{REGIONS.index(region):02x}{i:03x}</volumeId>"
            f"<size>{volume_size(account, region, i)}</size><availabilityZone>{region}a</availabilityZone>"
            f"<status>in-use</status><createTime>2025-03-01T09:58:00.000Z</createTime><attachmentSet/>"
            f"<tagSet><item><key>Name</key><value>data-{i}</value></item></tagSet>"
            f"<volumeType>gp3</volumeType><iops>3000</iops><throughput>125</throughput>"
            f"<encrypted>true</encrypted></item>" for i in range(start, end))
        token = f"<nextToken>{end}</nextToken>" if end < self.volumes else ""
        return _xml("DescribeVolumes", f"<volumeSet>{items}</volumeSet>{token}")


def serve(volumes: dict[str, int], accounts: Accounts | None = None,
          latency: float = 0.0) -> tuple[ThreadingHTTPServer, dict[str, int]]:
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
            if latency:
                time.sleep(latency)  # the distance to AWS, paid by every request
            if accounts is not None:
                signer = accounts.verify(self.command, self.path, self.headers, raw)
                if signer is None:
                    accounts.count("refused: signature")
                    self._answer(*_error("SignatureDoesNotMatch", "the signature does not match the key's secret", 403))
                else:
                    self._answer(*accounts.answer(signer[0], signer[1], form))
                return
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
    parser.add_argument("volumes", nargs="*", metavar="REGION=COUNT")
    parser.add_argument("--accounts", type=int, metavar="N", help="serve N customer accounts instead")
    parser.add_argument("--volumes", dest="per_region", type=int, default=10, metavar="N",
                        help="volumes per account and region (with --accounts)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="answer each request this late")
    args = parser.parse_args()
    accounts = Accounts(args.accounts, args.per_region) if args.accounts else None
    httpd, served = serve({region: int(count) for region, count in (v.split("=") for v in args.volumes)},
                          accounts, args.latency)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    httpd.shutdown()
    print(json.dumps(accounts.counts if accounts else served), flush=True)


if __name__ == "__main__":
    main()
