"""Least-privilege IAM for a configuration: ``usage-agent iam-policy``.

For each customer-side role: the actions its measurements' samplers call (from the sampler
registry, nothing else) and a trust policy that lets the agent's principal assume it only
with the configured external id. For the agent's own identity: ``sts:AssumeRole`` on those
roles, plus the sampler actions of measurements that use no role.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.settings import AgentConfig, Measurement
from agent.samplers import required_actions

POLICY_VERSION = "2012-10-17"
INLINE_POLICY_NAME = "usage-agent-read"
_ARN = re.compile(r"^arn:(?P<partition>[^:]+):iam::(?P<account>\d{12}):role(?P<path>/(?:.*/)?)(?P<name>[^/]+)$")
_ASSUMED = re.compile(r"^arn:(?P<partition>[^:]+):sts::(?P<account>\d{12}):assumed-role/(?P<name>[^/]+)/.+$")


def roles_of(m: Measurement) -> list[tuple[str | None, str | None]]:
    """The (role ARN, external id) pairs a measurement samples through; (None, None): the agent's own identity."""
    return [(role.arn, role.external_id) for role in m.roles()]


def sampler_actions(measurements: Iterable[Measurement]) -> list[str]:
    return sorted({action for m in measurements for action in required_actions(m)})


def permission_policy(actions: list[str]) -> dict[str, Any]:
    # the sampler actions are List/Describe calls, which IAM only grants on "*"
    return {"Version": POLICY_VERSION, "Statement": [
        {"Sid": "UsageAgentRead", "Effect": "Allow", "Action": actions, "Resource": "*"}]}


def trust_policy(principal: Any, external_ids: list[str]) -> dict[str, Any]:
    statement: dict[str, Any] = {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}
    if external_ids:
        statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_ids[0] if len(external_ids) == 1 else external_ids}}
    return {"Version": POLICY_VERSION, "Statement": [statement]}


def principal_of(caller_arn: str) -> str:
    """The ARN a trust policy can name for a caller: an assumed-role session becomes its role."""
    match = _ASSUMED.match(caller_arn)
    if match:
        return f"arn:{match['partition']}:iam::{match['account']}:role/{match['name']}"
    return caller_arn


@dataclass
class Role:
    arn: str
    external_ids: list[str] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def account(self) -> str:
        return self.arn.split(":")[4]

    @property
    def actions(self) -> list[str]:
        return sampler_actions(self.measurements)

    def name_and_path(self) -> tuple[str, str]:
        match = _ARN.match(self.arn)
        assert match, self.arn  # config validation accepts only role ARNs
        return match["name"], match["path"]


@dataclass
class Plan:
    principal: str
    roles: list[Role]
    own: list[Measurement]  # measurements sampled with the agent's own identity

    def agent_policy(self) -> dict[str, Any]:
        statements: list[dict[str, Any]] = []
        if self.roles:
            statements.append({"Sid": "AssumeCustomerRoles", "Effect": "Allow", "Action": "sts:AssumeRole",
                               "Resource": [role.arn for role in self.roles]})
        if self.own:
            statements.append({"Sid": "UsageAgentRead", "Effect": "Allow", "Action": sampler_actions(self.own),
                               "Resource": "*"})
        return {"Version": POLICY_VERSION, "Statement": statements}


def plan(cfg: AgentConfig, principal: str, account: str | None = None) -> Plan:
    """Group the measurements by the role they assume; ``account`` keeps only roles in that account."""
    roles: dict[str, Role] = {}
    own: list[Measurement] = []
    for m in cfg.measurements:
        if not required_actions(m):  # a cluster read through a kubeconfig: RBAC, no AWS permission
            continue
        for arn, external_id in roles_of(m):
            if arn is None:
                own.append(m)
                continue
            role = roles.setdefault(arn, Role(arn))
            if external_id is not None and external_id not in role.external_ids:
                role.external_ids.append(external_id)
            if m not in role.measurements:
                role.measurements.append(m)
    chosen = [r for arn, r in sorted(roles.items()) if account is None or r.account == account]
    return Plan(principal, chosen, own if account is None else [])


def render_json(p: Plan) -> dict[str, Any]:
    return {
        "principal": p.principal,
        "roles": [{
            "role_arn": role.arn,
            "external_ids": role.external_ids,
            "measurements": [m.name for m in role.measurements],
            "permission_policy": permission_policy(role.actions),
            "trust_policy": trust_policy(p.principal, role.external_ids),
        } for role in p.roles],
        "agent_policy": p.agent_policy(),
    }


def _identifiers(roles: list[Role], style: str) -> list[str]:
    """Stable, unique resource names derived from the role names."""
    names: list[str] = []
    for role in roles:
        name, _ = role.name_and_path()
        if style == "cloudformation":
            base = "Role" + "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name) if part)
        else:
            base = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "role"
            base = base if base[0].isalpha() else f"role_{base}"
        unique, n = base, 2
        while unique in names:
            unique, n = f"{base}{n}", n + 1
        names.append(unique)
    return names


def render_cloudformation(p: Plan) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for logical, role in zip(_identifiers(p.roles, "cloudformation"), p.roles):
        name, path = role.name_and_path()
        resources[logical] = {"Type": "AWS::IAM::Role", "Properties": {
            "RoleName": name,
            "Path": path,
            "Description": f"usage-agent meters this account: {', '.join(m.name for m in role.measurements)}",
            "AssumeRolePolicyDocument": trust_policy({"Ref": "AgentPrincipal"}, role.external_ids),
            "Policies": [{"PolicyName": INLINE_POLICY_NAME, "PolicyDocument": permission_policy(role.actions)}],
        }}
        outputs[f"{logical}Arn"] = {"Value": {"Fn::GetAtt": [logical, "Arn"]}}
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "The role usage-agent assumes (with an external id) to read what it meters.",
        "Parameters": {"AgentPrincipal": {"Type": "String", "Default": p.principal,
                                          "Description": "ARN of the identity usage-agent runs as"}},
        "Resources": resources,
        "Outputs": outputs,
    }


def _tf_literal(document: dict[str, Any]) -> str:
    """A JSON document as a Terraform string: template sequences are escaped, so it stays literal."""
    return json.dumps(document).replace("${", "$${").replace("%{", "%%{")


def render_terraform(p: Plan) -> dict[str, Any]:
    roles: dict[str, Any] = {}
    policies: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    marker = "USAGE_AGENT_PRINCIPAL"
    for ident, role in zip(_identifiers(p.roles, "terraform"), p.roles):
        name, path = role.name_and_path()
        trust = _tf_literal(trust_policy(marker, role.external_ids)).replace(f'"{marker}"', '"${var.usage_agent_principal}"')
        roles[ident] = {"name": name, "path": path, "assume_role_policy": trust,
                        "description": f"usage-agent meters this account: {', '.join(m.name for m in role.measurements)}"}
        policies[ident] = {"name": INLINE_POLICY_NAME, "role": f"${{aws_iam_role.{ident}.id}}",
                           "policy": _tf_literal(permission_policy(role.actions))}
        outputs[f"{ident}_arn"] = {"value": f"${{aws_iam_role.{ident}.arn}}"}
    return {
        "variable": {"usage_agent_principal": {"type": "string", "default": p.principal,
                                               "description": "ARN of the identity usage-agent runs as"}},
        "resource": {"aws_iam_role": roles, "aws_iam_role_policy": policies},
        "output": outputs,
    }


RENDERERS = {"json": render_json, "cloudformation": render_cloudformation, "terraform": render_terraform}
