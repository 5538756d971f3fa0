"""DynamoDB tables: stored bytes and items, as DescribeTable reports them, one sample per table."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.samplers.base import MetricSpec, quantity
from agent.samplers.engine import ONE, Listing


def _values(table: dict[str, Any], _: None) -> dict[str, Decimal]:
    return {"size_bytes": quantity(table.get("TableSizeBytes")), "item_count": quantity(table.get("ItemCount")),
            "count": ONE}


def _facts(table: dict[str, Any]) -> dict[str, str]:
    return {"billing_mode": (table.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED"),
            "table_class": (table.get("TableClassSummary") or {}).get("TableClass", "STANDARD")}


# A table being deleted, or archived (its data moved to a backup), is not billed as table storage.
TABLES = Listing(
    "dynamodb", "ListTables", "TableNames", "TableName", _values, _facts, "table size or item count",
    page_size=100, detail=("DescribeTable", "Table"), state_key="TableStatus",
    not_billed=frozenset({"DELETING", "ARCHIVED"}), tags_by="TableArn")

# TableName is the customer's name: orders repeats across regions and accounts
SPEC = TABLES.spec("dynamodb", "DynamoDB tables not being deleted or archived", metrics={
    "size_bytes": MetricSpec("bytes", "table size (TableSizeBytes; AWS updates it about every six hours)"),
    "item_count": MetricSpec("items", "items in the table (ItemCount; updated about every six hours)"),
    "count": MetricSpec("tables", "number of tables"),
}, default_metric="size_bytes", identity="arn:{partition}:dynamodb:{region}:{account}:table/{id}")
