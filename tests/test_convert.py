"""Samples -> usage records, with exact numbers (DESIGN section 3: billing-grade)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from agent.config import parse_measurement
from agent.convert import AGGREGATE, Tally, convert, tick_floor
from agent.records import UsageRecord, format_decimal, format_timestamp, parse_timestamp, record_id
from agent.samplers.base import Sample
from agent.settings import Measurement

UTC = timezone.utc
TICK = datetime(2024, 3, 1, 10, 15, tzinfo=UTC)
ACCOUNT_A = "111111111111"
ACCOUNT_B = "222222222222"


def measurement(**overrides) -> Measurement:
    raw = {
        "name": "ebs-storage",
        "dimension_id": "dim-storage",
        "resource_type": "ebs",
        "regions": ["us-east-1", "eu-west-1"],
        "customer": {"tag": "customer-id"},
        "metadata": {"environment": "prod"},
    }
    raw.update(overrides)
    return parse_measurement(raw)


def volume(volume_id, gib, customer=None, region="us-east-1", account=ACCOUNT_A, volume_type="gp2", **values):
    tags = {"customer-id": customer} if customer else {"Name": volume_id}
    return Sample(
        resource_id=volume_id,
        region=region,
        account=account,
        values={"size_gib": Decimal(gib), **{k: Decimal(v) for k, v in values.items()}},
        tags=tags,
        facts={"volume_type": volume_type, "availability_zone": f"{region}a"},
    )


def one_value(m: Measurement, gib, unit="GiB") -> str:
    """The wire string of the single record made from one volume of ``gib``."""
    conversion = convert(m, "size_gib", unit, [volume("vol-1", gib, "acme")], TICK)
    assert len(conversion.records) == 1
    record = conversion.records[0]
    assert record.to_json()["value"] == format_decimal(record.value)
    return format_decimal(record.value)


# -- tick alignment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "seconds", "expected"),
    [
        (datetime(2024, 3, 1, 10, 7, 59, tzinfo=UTC), 300, datetime(2024, 3, 1, 10, 5, tzinfo=UTC)),
        (datetime(2024, 3, 1, 10, 5, 0, tzinfo=UTC), 300, datetime(2024, 3, 1, 10, 5, tzinfo=UTC)),
        (datetime(2024, 3, 1, 10, 4, 59, 999999, tzinfo=UTC), 300, datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        (datetime(2024, 3, 1, 10, 59, 59, tzinfo=UTC), 3600, datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        (datetime(2024, 3, 1, 11, 0, 0, tzinfo=UTC), 3600, datetime(2024, 3, 1, 11, 0, tzinfo=UTC)),
        # an aware non-UTC time is aligned on the same UTC grid
        (datetime(2024, 3, 1, 12, 7, 59, tzinfo=timezone(timedelta(hours=2))), 300,
         datetime(2024, 3, 1, 10, 5, tzinfo=UTC)),
    ],
)
def test_tick_floor_aligns_to_utc_multiples_of_the_interval(at, seconds, expected):
    assert tick_floor(at, seconds) == expected
    assert tick_floor(at, seconds).utcoffset() == timedelta(0)


def test_tick_floor_rejects_naive_datetimes():
    with pytest.raises(ValueError, match="timezone-aware"):
        tick_floor(datetime(2024, 3, 1, 10, 7, 59), 300)


# -- gauge, group_by customer -------------------------------------------------------------


def test_gauge_sums_each_customers_volumes_into_one_record():
    samples = [
        volume("vol-a1", 100, "acme", "us-east-1", ACCOUNT_A),
        volume("vol-a2", 50, "acme", "us-east-1", ACCOUNT_B),
        volume("vol-a3", 20, "acme", "eu-west-1", ACCOUNT_A),
        volume("vol-g1", 200, "globex", "us-east-1", ACCOUNT_A),
    ]
    conversion = convert(measurement(), "size_gib", "GiB", samples, TICK)

    assert conversion.sampled == 4
    assert conversion.untagged == []
    assert [(r.customer_id, r.value) for r in conversion.records] == [("acme", Decimal(170)), ("globex", Decimal(200))]
    acme, globex = conversion.records
    assert format_decimal(acme.value) == "170"
    assert acme.resource == AGGREGATE
    assert acme.timestamp == TICK
    assert acme.unit == "GiB"
    assert acme.dimension_id == "dim-storage"
    assert acme.event_type == "ebs-storage"
    assert acme.metadata == {
        "environment": "prod",
        "measurement": "ebs-storage",
        "resource_type": "ebs",
        "metric": "size_gib",
        "unit": "GiB",
        "regions": "eu-west-1,us-east-1",
        "accounts": f"{ACCOUNT_A},{ACCOUNT_B}",
        "resource_count": "3",
    }
    assert globex.metadata["regions"] == "us-east-1"
    assert globex.metadata["resource_count"] == "1"


def test_gauge_sums_decimals_exactly():
    samples = [volume(f"vol-{i}", "0.1", "acme") for i in range(3)]
    record = convert(measurement(), "size_gib", "GiB", samples, TICK).records[0]
    assert record.value == Decimal("0.3")
    assert format_decimal(record.value) == "0.3"


# -- time_weighted ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gib", "interval", "per", "decimals", "expected", "unit"),
    [
        (7, "15m", "hour", 9, "1.75", "GiB-hours"),
        (100, "1h", "hour", 9, "100", "GiB-hours"),
        (30, "5m", "hour", 9, "2.5", "GiB-hours"),
        (7, "5m", "hour", 9, "0.583333333", "GiB-hours"),  # 0.58333… rounded once
        (7, "5m", "hour", 2, "0.58", "GiB-hours"),
        (7, "15m", "minute", 9, "105", "GiB-minutes"),
        (48, "15m", "day", 9, "0.5", "GiB-days"),
        (240, "1h", "day", 9, "10", "GiB-days"),
        (3, "30s", "second", 9, "90", "GiB-seconds"),
    ],
)
def test_time_weighted_is_value_times_interval_in_units_of_per(gib, interval, per, decimals, expected, unit):
    m = measurement(mode="time_weighted", interval=interval, per=per, decimals=decimals)
    record = convert(m, "size_gib", "GiB", [volume("vol-1", gib, "acme")], TICK).records[0]
    assert format_decimal(record.value) == expected
    assert record.to_json()["value"] == expected
    assert record.unit == unit
    assert record.metadata["unit"] == unit


@pytest.mark.parametrize(("gib", "expected"), [(30, "2"), (42, "4"), (18, "2"), (7, "1")])
def test_time_weighted_rounds_half_even(gib, expected):
    # 5m per hour is 1/12: 30 -> 2.5, 42 -> 3.5, 18 -> 1.5, 7 -> 0.583
    m = measurement(mode="time_weighted", interval="5m", per="hour", decimals=0)
    assert one_value(m, gib) == expected


def test_time_weighted_rounds_the_sum_once_not_each_volume():
    # each 1 GiB x 5m = 0.0833 GiB-hours would round to 0.08; twelve of them are exactly 1
    m = measurement(mode="time_weighted", interval="5m", per="hour", decimals=2)
    samples = [volume(f"vol-{i}", 1, "acme") for i in range(12)]
    assert format_decimal(convert(m, "size_gib", "GiB", samples, TICK).records[0].value) == "1"


# -- format_decimal -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("1.7500"), "1.75"),
        (Decimal("1E+2"), "100"),
        (Decimal("0E-9"), "0"),
        (Decimal("-0"), "0"),
        (Decimal("-0.000"), "0"),
        (Decimal("1E-7"), "0.0000001"),
        (Decimal("2.500000000"), "2.5"),
        (Decimal("-3.10"), "-3.1"),
        (Decimal("123456789012345678901234567890"), "123456789012345678901234567890"),
        (Decimal("12345678901234567890.1234567891"), "12345678901234567890.1234567891"),
    ],
)
def test_format_decimal_is_a_plain_trimmed_string(value, expected):
    text = format_decimal(value)
    assert text == expected
    assert "e" not in text.lower()
    assert re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text)  # the Paigo recordValue pattern


# -- attribution --------------------------------------------------------------------------


def test_untagged_resources_are_skipped_and_listed():
    samples = [volume("vol-a", 10, "acme"), volume("vol-x", 99), volume("vol-y", 1)]
    conversion = convert(measurement(customer={"tag": "customer-id", "untagged": "skip"}), "size_gib", "GiB",
                         samples, TICK)
    assert conversion.untagged == [f"arn:aws:ec2:us-east-1:{ACCOUNT_A}:volume/vol-x",
                                   f"arn:aws:ec2:us-east-1:{ACCOUNT_A}:volume/vol-y"]
    assert conversion.sampled == 3
    assert [(r.customer_id, r.value) for r in conversion.records] == [("acme", Decimal(10))]
    assert conversion.records[0].metadata["resource_count"] == "1"


def test_untagged_resources_go_to_the_fallback_customer():
    samples = [volume("vol-a", 10, "acme"), volume("vol-x", 99), volume("vol-y", 1)]
    m = measurement(customer={"tag": "customer-id", "untagged": "fallback-co"})
    conversion = convert(m, "size_gib", "GiB", samples, TICK)
    assert conversion.untagged == []
    assert [(r.customer_id, r.value) for r in conversion.records] == [
        ("acme", Decimal(10)),
        ("fallback-co", Decimal(100)),
    ]


def test_static_customer_id_takes_every_resource_whatever_its_tags():
    samples = [volume("vol-a", 10, "acme"), volume("vol-g", 20, "globex"), volume("vol-x", 5)]
    conversion = convert(measurement(customer={"id": "cust-42"}), "size_gib", "GiB", samples, TICK)
    assert conversion.untagged == []
    assert [(r.customer_id, r.value) for r in conversion.records] == [("cust-42", Decimal(35))]


# -- group_by resource ----------------------------------------------------------------------


def test_group_by_resource_makes_one_record_per_volume_with_its_facts():
    samples = [
        volume("vol-2", 20, "acme", "eu-west-1", ACCOUNT_B, volume_type="gp3"),
        volume("vol-1", 10, "acme", "us-east-1", ACCOUNT_A, volume_type="io2"),
    ]
    conversion = convert(measurement(group_by="resource"), "size_gib", "GiB", samples, TICK)
    by_resource = {r.metadata["resource_id"]: r for r in conversion.records}
    assert sorted(by_resource) == ["vol-1", "vol-2"]
    assert by_resource["vol-1"].resource == f"arn:aws:ec2:us-east-1:{ACCOUNT_A}:volume/vol-1"
    assert by_resource["vol-2"].resource == f"arn:aws:ec2:eu-west-1:{ACCOUNT_B}:volume/vol-2"
    assert by_resource["vol-1"].value == Decimal(10)
    assert by_resource["vol-2"].value == Decimal(20)
    assert by_resource["vol-2"].metadata == {
        "environment": "prod",
        "measurement": "ebs-storage",
        "resource_type": "ebs",
        "metric": "size_gib",
        "unit": "GiB",
        "region": "eu-west-1",
        "account": ACCOUNT_B,
        "resource_id": "vol-2",
        "volume_type": "gp3",
        "availability_zone": "eu-west-1a",
    }
    assert "resource_count" not in by_resource["vol-1"].metadata
    assert by_resource["vol-1"].record_id != by_resource["vol-2"].record_id


def _db(name, gib, region, account=ACCOUNT_A):
    return Sample(name, region, account, {"allocated_storage_gib": Decimal(gib)}, {"customer-id": "acme"}, {})


@pytest.mark.parametrize("group_by", ["resource", "customer"])
def test_same_named_resources_in_two_regions_or_accounts_stay_apart(group_by):
    """prod-db in us-east-1 and in eu-west-1 (and in a second account) are three databases."""
    m = measurement(resource_type="rds", group_by=group_by)
    samples = [_db("prod-db", 20, "us-east-1"), _db("prod-db", 50, "eu-west-1"), _db("prod-db", 7, "eu-west-1", ACCOUNT_B)]
    records = convert(m, "allocated_storage_gib", "GiB", samples, TICK).records
    if group_by == "customer":  # the totals are what they always were
        assert [(r.customer_id, r.value, r.resource) for r in records] == [("acme", Decimal(77), AGGREGATE)]
        return
    got = {(r.metadata["region"], r.metadata["account"]): (r.value, r.resource) for r in records}
    assert got == {
        ("us-east-1", ACCOUNT_A): (Decimal(20), f"arn:aws:rds:us-east-1:{ACCOUNT_A}:db:prod-db"),
        ("eu-west-1", ACCOUNT_A): (Decimal(50), f"arn:aws:rds:eu-west-1:{ACCOUNT_A}:db:prod-db"),
        ("eu-west-1", ACCOUNT_B): (Decimal(7), f"arn:aws:rds:eu-west-1:{ACCOUNT_B}:db:prod-db"),
    }
    assert {r.metadata["resource_id"] for r in records} == {"prod-db"}
    assert len({r.record_id for r in records}) == 3
    assert {r.record_id for r in records} == {
        record_id(m.name, m.dimension_id, "acme", resource, TICK) for _, resource in got.values()}


def test_the_partition_follows_the_region():
    m = measurement(group_by="resource", regions=["cn-north-1", "us-gov-west-1"])
    records = convert(m, "size_gib", "GiB", [volume("vol-1", 1, "acme", "cn-north-1"),
                                             volume("vol-1", 2, "acme", "us-gov-west-1")], TICK).records
    assert sorted(r.resource for r in records) == [f"arn:aws-cn:ec2:cn-north-1:{ACCOUNT_A}:volume/vol-1",
                                                   f"arn:aws-us-gov:ec2:us-gov-west-1:{ACCOUNT_A}:volume/vol-1"]


def test_samples_without_the_metric_are_ignored_and_not_counted():
    samples = [
        volume("vol-gp3a", 100, "acme", volume_type="gp3", throughput_mibps=125),
        volume("vol-gp3b", 100, "acme", volume_type="gp3", throughput_mibps=250),
        volume("vol-gp2", 500, "acme", volume_type="gp2"),
        volume("vol-untagged", 100, volume_type="gp2"),
    ]
    conversion = convert(measurement(), "throughput_mibps", "MiB/s", samples, TICK)
    assert conversion.sampled == 2
    assert conversion.untagged == []  # lacking the metric wins over lacking the tag
    assert [(r.customer_id, r.value, r.unit) for r in conversion.records] == [("acme", Decimal(375), "MiB/s")]
    assert conversion.records[0].metadata["resource_count"] == "2"


def test_no_samples_make_no_records():
    conversion = convert(measurement(), "size_gib", "GiB", [], TICK)
    assert (conversion.records, conversion.untagged, conversion.sampled) == ([], [], 0)


@pytest.mark.parametrize("group_by", ["customer", "resource"])
def test_tallies_of_separate_targets_merge_into_what_one_pass_makes(group_by):
    m = measurement(group_by=group_by)
    targets = [
        [volume("vol-a1", "100.5", "acme", "us-east-1", ACCOUNT_A), volume("vol-u1", 7, None, "us-east-1", ACCOUNT_A),
         volume("vol-g1", 200, "globex", "us-east-1", ACCOUNT_A)],
        [volume("vol-a2", "0.25", "acme", "eu-west-1", ACCOUNT_A), volume("vol-x1", 5, " padded ", "eu-west-1", ACCOUNT_A)],
        [volume("vol-a3", 50, "acme", "us-east-1", ACCOUNT_B), volume("vol-i1", 9, "initech", "us-east-1", ACCOUNT_B)],
        [],
    ]
    merged = Tally(m, "size_gib")
    for samples in reversed(targets):  # targets finish in any order
        tally = Tally(m, "size_gib")
        for sample in samples:
            tally.add(sample)
        merged.merge(tally)
    assert merged.convert("GiB", TICK) == convert(m, "size_gib", "GiB", [s for t in targets for s in t], TICK)
    records = {(r.customer_id, r.resource): r for r in merged.convert("GiB", TICK).records}
    if group_by == "customer":
        assert records["acme", AGGREGATE].value == Decimal("150.75")
        assert records["acme", AGGREGATE].metadata["regions"] == "eu-west-1,us-east-1"
        assert records["acme", AGGREGATE].metadata["accounts"] == f"{ACCOUNT_A},{ACCOUNT_B}"
        assert records["acme", AGGREGATE].metadata["resource_count"] == "3"
    else:
        assert records["acme", f"arn:aws:ec2:eu-west-1:{ACCOUNT_A}:volume/vol-a2"].metadata["region"] == "eu-west-1"
    assert (merged.sampled, sorted(merged.untagged), merged.invalid) == (
        7, [f"arn:aws:ec2:us-east-1:{ACCOUNT_A}:volume/vol-u1"],
        [(f"arn:aws:ec2:eu-west-1:{ACCOUNT_A}:volume/vol-x1", " padded ")])


def test_a_tally_keeps_one_entry_per_record_not_per_resource():
    tally = Tally(measurement(), "size_gib")
    for i in range(5000):
        tally.add(volume(f"vol-{i}", 1 + i % 7, f"customer-{i % 3}", ("us-east-1", "eu-west-1")[i % 2]))
    assert len(tally.groups) == 3
    assert sum(group.count for group in tally.groups.values()) == 5000
    expected = {f"customer-{k}": Decimal(sum(1 + i % 7 for i in range(k, 5000, 3))) for k in range(3)}
    assert {r.customer_id: r.value for r in tally.convert("GiB", TICK).records} == expected


# -- record ids ---------------------------------------------------------------------------


def test_record_ids_are_deterministic_across_calls():
    samples = [volume("vol-a", 10, "acme"), volume("vol-g", 20, "globex")]
    first = convert(measurement(), "size_gib", "GiB", samples, TICK)
    again = convert(measurement(), "size_gib", "GiB", list(reversed(samples)), TICK)
    assert [r.record_id for r in first.records] == [r.record_id for r in again.records]
    assert first.records[0].record_id == record_id("ebs-storage", "dim-storage", "acme", AGGREGATE, TICK)
    for record in first.records:
        assert re.fullmatch(r"[0-9a-f]{32}", record.record_id)


def test_record_ids_differ_when_any_part_differs():
    base = ("ebs-storage", "dim-storage", "acme", AGGREGATE, TICK)
    variants = [
        ("ebs-storage-2", "dim-storage", "acme", AGGREGATE, TICK),
        ("ebs-storage", "dim-other", "acme", AGGREGATE, TICK),
        ("ebs-storage", "dim-storage", "globex", AGGREGATE, TICK),
        ("ebs-storage", "dim-storage", "acme", "vol-1", TICK),
        ("ebs-storage", "dim-storage", "acme", AGGREGATE, TICK + timedelta(minutes=5)),
    ]
    ids = {record_id(*base)} | {record_id(*v) for v in variants}
    assert len(ids) == 1 + len(variants)
    # the same instant in another timezone is the same tick
    assert record_id(*base[:4], TICK.astimezone(timezone(timedelta(hours=-5)))) == record_id(*base)


def test_record_id_does_not_depend_on_the_value():
    m = measurement()
    small = convert(m, "size_gib", "GiB", [volume("vol-a", 10, "acme")], TICK).records[0]
    large = convert(m, "size_gib", "GiB", [volume("vol-a", 11, "acme")], TICK).records[0]
    assert small.record_id == large.record_id


# -- UsageRecord serialisation -------------------------------------------------------------


def test_usage_record_json_round_trip():
    m = measurement(mode="time_weighted", interval="15m", group_by="resource")
    record = convert(m, "size_gib", "GiB", [volume("vol-1", 7, "acme")], TICK).records[0]
    body = record.to_json()
    assert body["timestamp"] == "2024-03-01T10:15:00Z"
    assert body["value"] == "1.75"
    assert body["id"] == record.record_id
    wire = json.loads(json.dumps(body))
    assert UsageRecord.from_json(wire) == record
    assert UsageRecord.from_json(wire).timestamp.utcoffset() == timedelta(0)
    assert UsageRecord.from_json(wire).to_json() == body


def test_timestamps_are_rfc3339_utc_with_z():
    assert format_timestamp(datetime(2024, 3, 1, 10, 15, tzinfo=UTC)) == "2024-03-01T10:15:00Z"
    assert format_timestamp(datetime(2024, 3, 1, 5, 15, tzinfo=timezone(timedelta(hours=-5)))) == "2024-03-01T10:15:00Z"
    assert format_timestamp(datetime(2024, 1, 1, 0, 0, 0, 999999, tzinfo=UTC)) == "2024-01-01T00:00:00Z"


def test_timestamps_parse_only_in_the_shape_they_are_written():
    parsed = parse_timestamp("2024-02-29T23:59:59Z")
    assert parsed == datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(0)
    assert format_timestamp(parsed) == "2024-02-29T23:59:59Z"
    for text in ("2024-03-01T10:15:00", "2024-03-01T10:15:00+00:00", "2024-03-01 10:15:00Z", "2024-3-01T10:15:00Z",
                 "2024-03-01T10:15:00.5Z", "2024-03-01T10:15:00Z\n", "2024-W09-5T10:15:00Z", "\u0662024-03-01T10:15:00Z",
                 "2023-02-29T10:15:00Z", "2024-03-01T24:00:00Z", ""):
        with pytest.raises(ValueError):
            parse_timestamp(text)


def test_records_load_without_the_configuration():
    """The spool, sinks and forwarder handle records; they must not pull in config (or anything else)."""
    import subprocess
    import sys

    probe = ("import sys, agent.records; "
             "print(sorted(m for m in sys.modules if m.startswith('agent.')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['agent.records']"


def test_equal_local_times_of_different_instants_format_apart():
    """Cached per UTC instant: 01:30 before and after a DST fall-back compare equal but are an hour apart."""
    from zoneinfo import ZoneInfo

    first = datetime(2026, 11, 1, 1, 30, tzinfo=ZoneInfo("America/New_York"))
    second = first.replace(fold=1)
    assert first == second
    assert (format_timestamp(first), format_timestamp(second)) == ("2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z")
    assert record_id("m", "d", "c", "r", first) != record_id("m", "d", "c", "r", second)
