"""DynamoDB tables: stored bytes and items, as DescribeTable reports them, one sample per table."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity

PAGE_SIZE = 100
# A table being deleted, or archived (its data moved to a backup), is not billed as table storage.
_NOT_BILLED = frozenset({"DELETING", "ARCHIVED"})
_ONE = Decimal(1)


def _gone(exc: ClientError) -> bool:
    """The table was deleted between listing and describing it."""
    return exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException"


def _describe(target: Target, dynamodb: Any, name: str) -> dict[str, Any] | None:
    try:
        return target.call(dynamodb, "describe_table", TableName=name)["Table"]
    except ClientError as exc:
        if _gone(exc):
            return None
        raise


def _tags(target: Target, dynamodb: Any, arn: str) -> dict[str, str] | None:
    try:
        pages = target.pages(dynamodb, "list_tags_of_resource", "Tags", ResourceArn=arn)
        return {tag["Key"]: tag.get("Value", "") for page in pages for tag in page}
    except ClientError as exc:
        if _gone(exc):
            return None
        raise


def sample_tables(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    filters = target.measurement.filters
    dynamodb = clients("dynamodb")
    names = [name for page in target.pages(dynamodb, "list_tables", "TableNames", PAGE_SIZE) for name in page]
    for name in names:
        table = _describe(target, dynamodb, name)
        if table is None or table.get("TableStatus") in _NOT_BILLED:
            continue
        tags = _tags(target, dynamodb, table["TableArn"])
        if tags is None or not filters.matches_tags(tags):  # tags cannot be filtered server-side
            continue
        try:
            values = {
                "size_bytes": quantity(table.get("TableSizeBytes")),
                "item_count": quantity(table.get("ItemCount")),
                "count": _ONE,
            }
        except ValueError as exc:
            yield Skipped(name, f"table size or item count {exc}")
            continue
        yield target.sample(
            resource_id=name,
            values=values,
            tags=tags,
            facts={
                "billing_mode": (table.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED"),
                "table_class": (table.get("TableClassSummary") or {}).get("TableClass", "STANDARD"),
            },
        )


SPEC = SamplerSpec(
    resource_type="dynamodb",
    metrics={
        "size_bytes": MetricSpec("bytes", "table size (TableSizeBytes; AWS updates it about every six hours)"),
        "item_count": MetricSpec("items", "items in the table (ItemCount; updated about every six hours)"),
        "count": MetricSpec("tables", "number of tables"),
    },
    default_metric="size_bytes",
    iam_actions=("dynamodb:ListTables", "dynamodb:DescribeTable", "dynamodb:ListTagsOfResource"),
    filters=("tags",),
    sample=sample_tables,
    id_scope="account-region",  # TableName is the customer's name: orders repeats across regions and accounts
    identity="arn:{partition}:dynamodb:{region}:{account}:table/{id}",
    description="DynamoDB tables not being deleted or archived",
)
