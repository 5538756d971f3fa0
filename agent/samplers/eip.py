"""Elastic IP addresses (public IPv4): AWS bills each hour an address is allocated, associated or not."""

from __future__ import annotations

from typing import Any

from agent.samplers.base import MetricSpec
from agent.samplers.engine import ONE, Listing


def _values(address: dict[str, Any], _: None) -> dict[str, Any]:
    # addresses of a BYOIP pool (ipv4pool-...) carry no public IPv4 charge: no count
    return {} if address.get("PublicIpv4Pool", "amazon").startswith("ipv4pool-") else {"count": ONE}


def _facts(address: dict[str, Any]) -> dict[str, str]:
    return {"public_ip": address.get("PublicIp", ""), "domain": address.get("Domain", ""),
            "associated": str("AssociationId" in address).lower(), "pool": address.get("PublicIpv4Pool", "")}


ADDRESSES = Listing("ec2", "DescribeAddresses", "Addresses", "AllocationId", _values, _facts,  # one page, no paging
                    server_filters={"tags": "tag:<key>"})

# an allocation id is regional, and the address ARN names the account
SPEC = ADDRESSES.spec("eip", "Elastic IP addresses in the region, associated or not (not BYOIP ones)", metrics={
    "count": MetricSpec("addresses", "Elastic IP addresses allocated (associated or not)"),
}, default_metric="count", identity="arn:{partition}:ec2:{region}:{account}:elastic-ip/{id}")
