"""Shared fixtures: moto in server mode and a Paigo-contract backend, both on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml
from moto.server import ThreadedMotoServer

from agent.config import AgentConfig, parse_config
from agent.testing.paigo_server import PaigoContractServer

ACCOUNT = "123456789012"  # moto's default account: base credentials act in it
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/usage-scraper"
EXTERNAL_ID = "ext-4711"
DIMENSION = "8a7b5f91-3b85-4cf4-8585-dcdf17f49004"
CLIENT_ID, CLIENT_SECRET = "client-abc", "s3cr3t-value"


@dataclass
class Aws:
    endpoint: str

    def ec2(self, region: str = "us-east-1") -> Any:
        return boto3.client("ec2", region_name=region, endpoint_url=self.endpoint)

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
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per AWS call is noise here
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Aws:
    """A clean moto account, reached the way the agent reaches AWS: AWS_ENDPOINT_URL."""
    httpx.post(f"{moto_endpoint}/moto-api/reset").raise_for_status()
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


@pytest.fixture
def paigo() -> Iterator[PaigoContractServer]:
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
    return parse_config(config_dict(paigo, tmp_path, *measurements, **backend), "<test>", {})


def write_config(paigo: PaigoContractServer, tmp_path: Path, *measurements: dict[str, Any], **backend: Any) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config_dict(paigo, tmp_path, *measurements, **backend)))
    return path


def agent_command() -> list[str]:
    """The installed console script, next to the running interpreter."""
    script = Path(sys.executable).with_name("usage-agent")
    return [str(script)] if script.exists() else [shutil.which("usage-agent") or "usage-agent"]
