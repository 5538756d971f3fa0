"""Sharding targets across replicas: ``--shard i/n`` samples only the targets hashed to shard i.

The hash is sha256 (stable across processes, machines and Python versions, unlike
``hash()``), so every replica agrees on who owns what without talking to the others.

The unit that is hashed is the smallest one whose records do not depend on anything else:

- ``group_by: resource``: each record comes from one resource, and a resource's identity
  (its account, region and id: the registry's) lies in exactly one target (measurement,
  role, region), so each target is its own unit and the targets of one measurement spread
  over the replicas; same-named resources in two regions are two units and two records.
- ``group_by: customer``: a customer's record for a tick is the sum over every target of
  the measurement (its resources in every region). Split over replicas, each would send a
  partial sum under the same record id, which a backend that deduplicates on the id keeps
  only one of. So the whole measurement is one unit: one replica samples all its targets.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from agent.settings import Measurement

_SHARD = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected i/n with n >= 1 and 0 <= i < n, e.g. 0/3")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``i/n``: this replica's index (from 0) and the number of replicas."""
        match = _SHARD.match(text.strip())
        if not match:
            raise ValueError(f"expected i/n such as 0/3 (this replica's index from 0, then the replica count), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, measurement: Measurement, role_arn: str | None, region: str) -> bool:
        """Whether this replica samples ``region`` through ``role_arn`` for ``measurement``."""
        if self.count == 1:
            return True
        digest = hashlib.sha256(unit_key(measurement, role_arn, region).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


def unit_key(measurement: Measurement, role_arn: str | None, region: str) -> str:
    """What is hashed: the target for per-resource records, the measurement for per-customer sums."""
    if measurement.group_by == "customer":
        return measurement.name
    return f"{measurement.name}|{role_arn or ''}|{region}"


EVERYTHING = Shard(0, 1)
