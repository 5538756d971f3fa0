"""EKS clusters in moto for tests: created through the EKS API, then given the endpoint and CA a
test serves (moto's own are a made-up host and random bytes), through the in-process server."""

from __future__ import annotations

import base64
import datetime as dt
import functools
from typing import Any

from tests.conftest import ACCOUNT, Aws

CLUSTER = "prod"
REGION = "us-east-1"


@functools.lru_cache(maxsize=1)
def ca_certificate() -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a self-signed CA for 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=36500))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def moto_cluster(name: str, region: str = REGION) -> Any:
    from moto.eks.models import eks_backends

    return eks_backends[ACCOUNT][region].clusters[name]


def create_cluster(aws: Aws, name: str = CLUSTER, region: str = REGION, *, endpoint: str | None = None,
                   ca_pem: bytes | None = None, status: str = "ACTIVE") -> None:
    aws.client("eks", region).create_cluster(name=name, roleArn=f"arn:aws:iam::{ACCOUNT}:role/eks-cluster",
                                             resourcesVpcConfig={"subnetIds": []})
    seed_cluster(name, region, endpoint=endpoint, ca_pem=ca_pem, status=status)


def seed_cluster(name: str = CLUSTER, region: str = REGION, *, endpoint: str | None = None,
                 ca_pem: bytes | None = None, status: str = "ACTIVE") -> None:
    cluster = moto_cluster(name, region)
    if endpoint is not None:
        cluster.endpoint = endpoint
    if ca_pem is not None:
        cluster.certificate_authority = {"data": base64.b64encode(ca_pem).decode()}
    cluster.status = status


def moto_secret(access_key_id: str) -> str | None:
    """The secret key moto's STS issued with an assumed role's access key: what real STS checks a signature with."""
    from moto.sts.models import sts_backends

    for role in sts_backends[ACCOUNT]["aws"].assumed_roles:
        if role.access_key_id == access_key_id:
            return str(role.secret_access_key)
    return None
