"""DynamoDB sampler against moto server; table sizes and paging with botocore's Stubber."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers.base import Sample, Target
from agent.samplers.dynamodb import TABLES
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client, only

PAGE_SIZE, sample_tables = TABLES.page_size, TABLES.sample


def _target(**overrides: Any) -> Target:
    return Target(parse_measurement(measurement(resource_type="dynamodb", metric="item_count", **overrides)), ACCOUNT, "us-east-1", TICK)


def _table(aws: Aws, region: str, name: str, tags: dict[str, str], items: int = 0, **extra: Any) -> None:
    dynamodb = aws.client("dynamodb", region)
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        **({"BillingMode": "PAY_PER_REQUEST"} | extra),
    )
    for i in range(items):
        dynamodb.put_item(TableName=name, Item={"pk": {"S": f"item-{i}"}, "payload": {"S": "x" * 100}})


def test_one_sample_per_table_with_item_counts(aws: Aws) -> None:
    _table(aws, "us-east-1", "orders", {"customer-id": "acme", "env": "prod"}, items=7)
    _table(
        aws, "us-east-1", "events", {"customer-id": "globex"}, items=3,
        BillingMode="PROVISIONED", ProvisionedThroughput={"ReadCapacityUnits": 5, "WriteCapacityUnits": 5},
    )
    _table(aws, "eu-west-1", "elsewhere", {"customer-id": "acme"}, items=2)  # another region: not listed here

    samples = {s.resource_id: s for s in sample_tables(only(aws.client("dynamodb")), _target())}

    assert set(samples) == {"orders", "events"}
    # moto reports TableSizeBytes as 0 for every table; real sizes are covered with the Stubber below
    assert samples["orders"].values == {"size_bytes": Decimal(0), "item_count": Decimal(7), "count": Decimal(1)}
    assert samples["events"].values["item_count"] == Decimal(3)
    assert samples["orders"].tags == {"customer-id": "acme", "env": "prod"}
    assert samples["orders"].facts["billing_mode"] == "PAY_PER_REQUEST"
    assert samples["events"].facts["billing_mode"] == "PROVISIONED"
    assert (samples["orders"].region, samples["orders"].account) == ("us-east-1", ACCOUNT)


def test_tag_filter(aws: Aws) -> None:
    _table(aws, "us-east-1", "wanted", {"customer-id": "a", "env": "prod"})
    _table(aws, "us-east-1", "dev", {"customer-id": "a", "env": "dev"})
    _table(aws, "us-east-1", "untagged", {})

    target = _target(filters={"tags": {"env": ["prod", "staging"]}})
    assert [s.resource_id for s in sample_tables(only(aws.client("dynamodb")), target)] == ["wanted"]


def _description(name: str, size: int, items: int, status: str = "ACTIVE") -> dict[str, Any]:
    return {
        "TableName": name,
        "TableStatus": status,
        "TableArn": f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/{name}",
        "TableSizeBytes": size,
        "ItemCount": items,
        "CreationDateTime": datetime(2025, 6, 1, tzinfo=timezone.utc),
        "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
        "TableClassSummary": {"TableClass": "STANDARD_INFREQUENT_ACCESS"},
    }


def test_pages_sizes_and_vanished_tables() -> None:
    # moto reports TableSizeBytes as 0; responses shaped like AWS's ListTables, DescribeTable and
    # ListTagsOfResource cover sizes, paging of tables and tags, and a table deleted mid-listing.
    dynamodb = offline_client("dynamodb")
    stubber = Stubber(dynamodb)
    names = [f"t{n:03d}" for n in range(101)]
    stubber.add_response("list_tables", {"TableNames": names[:100], "LastEvaluatedTableName": "t099"}, {"Limit": PAGE_SIZE})
    stubber.add_response("list_tables", {"TableNames": names[100:]}, {"Limit": PAGE_SIZE, "ExclusiveStartTableName": "t099"})
    for n, name in enumerate(names):
        arn = f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/{name}"
        if n == 5:
            stubber.add_client_error("describe_table", "ResourceNotFoundException", "Requested resource not found", 400, expected_params={"TableName": name})
            continue
        status = "DELETING" if n == 6 else "ACTIVE"
        stubber.add_response("describe_table", {"Table": _description(name, n * 1_073_741_824 + 17, n * 1000 + 1, status)}, {"TableName": name})
        if n == 6:
            continue
        if n == 7:  # tags come in two pages
            stubber.add_response("list_tags_of_resource", {"Tags": [{"Key": "env", "Value": "prod"}], "NextToken": "more"}, {"ResourceArn": arn})
            stubber.add_response("list_tags_of_resource", {"Tags": [{"Key": "customer-id", "Value": "acme"}]}, {"ResourceArn": arn, "NextToken": "more"})
        else:
            stubber.add_response("list_tags_of_resource", {"Tags": [{"Key": "customer-id", "Value": f"c{n % 2}"}]}, {"ResourceArn": arn})

    with stubber:
        items = list(sample_tables(only(dynamodb), _target()))
    stubber.assert_no_pending_responses()

    assert all(isinstance(s, Sample) for s in items)
    samples = {s.resource_id: s for s in items}
    assert len(samples) == 99
    assert "t005" not in samples and "t006" not in samples
    assert samples["t007"].tags == {"env": "prod", "customer-id": "acme"}
    assert samples["t100"].values == {
        "size_bytes": Decimal(107_374_182_417),
        "item_count": Decimal(100_001),
        "count": Decimal(1),
    }
    assert samples["t100"].facts == {"billing_mode": "PAY_PER_REQUEST", "table_class": "STANDARD_INFREQUENT_ACCESS"}
    kept = [n for n in range(101) if n not in (5, 6)]
    assert sum(s.values["size_bytes"] for s in samples.values()) == Decimal(sum(n * 1_073_741_824 + 17 for n in kept))
    assert sum(s.values["size_bytes"] for s in samples.values()) == Decimal(5_410_585_052_819)
    assert sum(s.values["item_count"] for s in samples.values()) == Decimal(5_039_099)
