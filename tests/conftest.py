"""Shared fixtures: moto in server mode and a Paigo-contract backend, both on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import httpx
import pytest
import yaml

if TYPE_CHECKING:  # imported where used: the xdist controller loads this file too, and runs no test
    from agent.settings import AgentConfig
    from agent.testing.paigo_server import PaigoContractServer

ACCOUNT = "123456789012"  # moto's default account: base credentials act in it
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/usage-scraper"
EXTERNAL_ID = "ext-4711"
DIMENSION = "8a7b5f91-3b85-4cf4-8585-dcdf17f49004"
CLIENT_ID, CLIENT_SECRET = "client-abc", "s3cr3t-value"
TICK = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)  # a tick for samplers called directly


def pytest_configure(config: pytest.Config) -> None:
    # moto loads ~1,300 stock AMIs into each EC2 region on every reset (0.4 s a region); the tests launch only this one
    os.environ.setdefault("MOTO_AMIS_PATH", str(Path(__file__).with_name("moto-amis.json")))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest -p no:xdist still runs
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`--numprocesses=auto`: two workers per usable core, since many tests wait on processes and sockets."""
    return 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def only(client: Any) -> Any:
    """A sampler's ``clients`` argument that always hands out this one (stubbed) client."""
    return lambda service: client


def offline_client(service: str, region: str = "us-east-1") -> Any:
    """A client for botocore's Stubber: dummy credentials, no endpoint it could reach."""
    return boto3.client(service, region_name=region, aws_access_key_id="x", aws_secret_access_key="x")


@dataclass
class Aws:
    endpoint: str

    def client(self, service: str, region: str = "us-east-1") -> Any:
        return boto3.client(service, region_name=region, endpoint_url=self.endpoint)

    def ec2(self, region: str = "us-east-1") -> Any:
        return self.client("ec2", region)

    def volume(self, region: str, size: int, volume_type: str = "gp3", tags: dict[str, str] | None = None, **extra: Any) -> str:
        kwargs: dict[str, Any] = {"Size": size, "VolumeType": volume_type, "AvailabilityZone": f"{region}a", **extra}
        if tags:
            kwargs["TagSpecifications"] = [
                {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ]
        return self.ec2(region).create_volume(**kwargs)["VolumeId"]

    def assumed_roles(self) -> list[Any]:
        from moto.sts.models import sts_backends

        return list(sts_backends[ACCOUNT]["aws"].assumed_roles)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per AWS call is noise here
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Aws:
    """A clean moto account, reached the way the agent reaches AWS: AWS_ENDPOINT_URL."""
    httpx.post(f"{moto_endpoint}/moto-api/reset", timeout=60).raise_for_status()  # a reset of every backend is slow on a loaded machine
    for name, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return Aws(moto_endpoint)


Rule = Callable[[str, str], "tuple[int, bytes] | None"]  # (action, region) -> answer instead of moto's


def aws_error(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    """An EC2-style (query protocol) error response."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors><RequestID>proxy-1</RequestID></Response>")
    return status, body.encode()


class AwsProxy:
    """A loopback proxy in front of moto: rules answer chosen calls themselves (throttling,
    denial in one region), ``delay`` slows every call, and in-flight calls are counted
    per (action, region)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.delay = 0.0
        self.calls: list[tuple[str, str]] = []
        self.max_in_flight: dict[tuple[str, str], int] = {}  # (action, region) -> most calls at once
        self._in_flight: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                status, content_type, payload = proxy.forward(self.path, body, headers)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        action = (re.search(r"Action=(\w+)", body.decode(errors="replace")) or re.search(r"\.(\w+)$", headers.get(
            "X-Amz-Target", "")))
        name = action.group(1) if action else ""
        scope = re.search(r"Credential=[^/]+/\d+/([^/]+)/", headers.get("Authorization", ""))
        region = scope.group(1) if scope else ""
        key = (name, region)
        with self._lock:
            self.calls.append(key)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            self.max_in_flight[key] = max(self.max_in_flight.get(key, 0), self._in_flight[key])
        try:
            if self.delay:
                time.sleep(self.delay)  # the proxy's own pace, not the test's clock
            for rule in self.rules:
                answer = rule(name, region)
                if answer is not None:
                    return answer[0], "text/xml", answer[1]
            reply = httpx.post(f"{self.upstream}{path}", content=body, headers=headers, timeout=60)
            return reply.status_code, reply.headers.get("Content-Type", "text/xml"), reply.content
        finally:
            with self._lock:
                self._in_flight[key] -= 1

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def aws_proxy(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Iterator[AwsProxy]:
    """The agent reaches moto through an AwsProxy (AWS_ENDPOINT_URL points at the proxy)."""
    yield from through(AwsProxy(aws.endpoint), monkeypatch)


def through(proxy: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fixture's body: the agent reaches AWS through ``proxy`` until the test ends."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def paigo() -> Iterator[PaigoContractServer]:
    from agent.testing.paigo_server import PaigoContractServer

    with PaigoContractServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as server:
        yield server


def measurement(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "ebs-storage",
        "dimension_id": DIMENSION,
        "resource_type": "ebs",
        "metric": "size_gib",
        "mode": "gauge",
        "interval": "15m",
        "iam_role_arn": ROLE_ARN,
        "external_id": EXTERNAL_ID,
        "regions": ["us-east-1"],
        "customer": {"tag": "customer-id"},
    }
    return base | overrides


def config_dict(paigo: PaigoContractServer, tmp_path: Path, *measurements: dict[str, Any], **backend: Any) -> dict[str, Any]:
    return {
        "backend": {
            "type": "paigo",
            "url": paigo.url,
            "token_url": paigo.token_url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **backend,
        },
        "spool": {"path": str(tmp_path / "spool.db")},
        "server": {"listen": "127.0.0.1:0"},  # any free port, loopback only
        "measurements": list(measurements) or [measurement()],
    }


def make_config(paigo: PaigoContractServer, tmp_path: Path, *measurements: dict[str, Any], **backend: Any) -> AgentConfig:
    from agent.config import parse_config

    return parse_config(config_dict(paigo, tmp_path, *measurements, **backend), "<test>", {})


def write_config(paigo: PaigoContractServer, tmp_path: Path, *measurements: dict[str, Any], **backend: Any) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config_dict(paigo, tmp_path, *measurements, **backend)))
    return path


def agent_command() -> list[str]:
    """The installed console script, next to the running interpreter."""
    script = Path(sys.executable).with_name("usage-agent")
    return [str(script)] if script.exists() else [shutil.which("usage-agent") or "usage-agent"]


def backend_config(backend: dict[str, Any], tmp_path: Path, *measurements: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A config document for any backend (``config_dict`` is the Paigo one)."""
    return {
        "backend": backend,
        "spool": {"path": str(tmp_path / "spool.db")},
        "measurements": list(measurements) or [measurement()],
        **top,
    }


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path
