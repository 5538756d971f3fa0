"""Elastic Load Balancing v2 load balancers (application, network, gateway): billed each hour they exist."""

from __future__ import annotations

from typing import Any

from agent.samplers.base import MetricSpec
from agent.samplers.engine import ONE, Listing


def _facts(lb: dict[str, Any]) -> dict[str, str]:
    return {"type": lb.get("Type", ""), "scheme": lb.get("Scheme", ""),
            "state": (lb.get("State") or {}).get("Code", "")}


# the id is the ARN's resource part (app/name/hash): what CloudWatch names it by in its LoadBalancer dimension
LOAD_BALANCERS = Listing(
    "elbv2", "DescribeLoadBalancers", "LoadBalancers", "LoadBalancerArn", lambda lb, _: {"count": ONE}, _facts,
    id_from=lambda arn: arn.partition(":loadbalancer/")[2], page_size=400, state_key="State.Code",
    not_billed=frozenset({"failed"}), client_filters={"load_balancer_types": "Type"}, tags_by="LoadBalancerArn")

SPEC = LOAD_BALANCERS.spec("elb", "application, network and gateway load balancers (not failed)", metrics={
    "count": MetricSpec("load balancers", "load balancers that exist (not failed)"),
}, default_metric="count", identity="arn:{partition}:elasticloadbalancing:{region}:{account}:loadbalancer/{id}")
