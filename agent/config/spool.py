"""The ``spool`` section's schema, apart from the rest: the ``spool`` commands read only it."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from agent import settings
from agent.config.fields import Duration, Model


class Spool(Model):
    plain = settings.Spool

    path: str = "/var/lib/usage-agent/spool.db"
    max_records: int = Field(default=1_000_000, ge=1, le=10**12)
    retention: Duration = timedelta(days=7)  # delivered records are kept this long, then deleted
    alert_after: Duration = timedelta(hours=1)  # an error is logged while a record waits longer


class SpoolSection(Model):
    """Only what the ``spool`` commands read: the rest of the file is not looked at."""

    spool: Spool = Field(default_factory=Spool)
