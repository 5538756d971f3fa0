"""The one query engine of the AWS samplers. A resource type declares its listing as data
(``Listing``) and supplies its values and facts; the engine pages, drops what AWS does not
bill, filters on tags where the API cannot, reads tags (one table per service, ``SERVICES``),
treats a resource that vanished mid-tick as gone, turns unusable values into ``Skipped``, and
batches GetMetricData for the samplers that read CloudWatch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from string import Formatter
from typing import TYPE_CHECKING, Any

from agent.settings import Measurement
from agent.samplers.base import ClientFor, IdScope, MetricSpec, Sample, SamplerSpec, Skipped, Target

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

ONE = Decimal(1)
METRIC_QUERIES = 500  # GetMetricData's limit of queries per call
_FAILED = ("InternalError", "Forbidden")  # StatusCodes of a series CloudWatch could not read

Tags = dict[str, str]
TagReader = Callable[[Target, Any, list[str]], dict[str, Tags]]


class Skip(Exception):
    """Raised by a type's ``values``: this resource cannot be billed; the message says why."""


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def tags_in(item: Mapping[str, Any], key: str = "Tags") -> Tags:
    """AWS ``[{Key, Value}]`` tags of an item as a plain mapping."""
    return {tag["Key"]: tag.get("Value", "") for tag in item.get(key) or ()}


@dataclass(frozen=True)
class Service:
    """What the engine knows of one AWS service."""

    iam: str  # the prefix of its IAM actions
    gone: frozenset[str] = frozenset()  # error codes that say the resource no longer exists
    read_tags: TagReader | None = None  # tags of the resources named by keys (ids or ARNs, as the API takes)
    tag_actions: tuple[str, ...] = ()
    tag_batch: int = 1  # keys per tag call


def _each(read: Callable[[Target, Any, str], Tags]) -> TagReader:
    """A reader for APIs that take one resource a call."""
    return lambda target, client, keys: {key: read(target, client, key) for key in keys}


def _ec2_tags(target: Target, ec2: Any, ids: list[str]) -> dict[str, Tags]:
    found: dict[str, Tags] = {}
    for page in target.pages(ec2, "describe_tags", "Tags", Filters=[{"Name": "resource-id", "Values": ids}]):
        for tag in page:
            found.setdefault(tag["ResourceId"], {})[tag["Key"]] = tag.get("Value", "")
    return found


def _bucket_tags(target: Target, s3: Any, bucket: str) -> Tags:
    from botocore.exceptions import ClientError  # botocore is imported where sampling is, not with the registry

    try:
        return {t["Key"]: t["Value"] for t in target.call(s3, "get_bucket_tagging", Bucket=bucket)["TagSet"]}
    except ClientError as exc:
        if error_code(exc) == "NoSuchTagSet":
            return {}
        raise


def _db_tags(target: Target, rds: Any, identifier: str) -> Tags:
    (db,) = target.call(rds, "describe_db_instances", DBInstanceIdentifier=identifier)["DBInstances"]
    return tags_in(db, "TagList")


def _file_system_tags(target: Target, efs: Any, file_system: str) -> Tags:
    (fs,) = target.call(efs, "describe_file_systems", FileSystemId=file_system)["FileSystems"]
    return tags_in(fs)


def _table_tags(target: Target, dynamodb: Any, arn: str) -> Tags:
    return {t["Key"]: t.get("Value", "") for page in target.pages(dynamodb, "list_tags_of_resource", "Tags",
                                                                   ResourceArn=arn) for t in page}


def _load_balancer_tags(target: Target, elbv2: Any, arns: list[str]) -> dict[str, Tags]:
    answer = target.call(elbv2, "describe_tags", ResourceArns=arns)
    return {entry["ResourceArn"]: tags_in(entry) for entry in answer["TagDescriptions"]}


SERVICES: Mapping[str, Service] = {
    "ec2": Service("ec2", read_tags=_ec2_tags, tag_actions=("ec2:DescribeTags",), tag_batch=200),
    "s3": Service("s3", frozenset({"NoSuchBucket"}), _each(_bucket_tags), ("s3:GetBucketTagging",)),
    "rds": Service("rds", frozenset({"DBInstanceNotFound", "DBInstanceNotFoundFault"}), _each(_db_tags),
                   ("rds:DescribeDBInstances",)),
    "efs": Service("elasticfilesystem", frozenset({"FileSystemNotFound"}), _each(_file_system_tags),
                   ("elasticfilesystem:DescribeFileSystems",)),
    "dynamodb": Service("dynamodb", frozenset({"ResourceNotFoundException"}), _each(_table_tags),
                        ("dynamodb:ListTagsOfResource",)),
    "elbv2": Service("elasticloadbalancing", frozenset({"LoadBalancerNotFound"}), _load_balancer_tags,
                     ("elasticloadbalancing:DescribeTags",), tag_batch=20),
}


def look_up_tags(clients: ClientFor, target: Target, service: str, keys: Sequence[str]) -> dict[str, Tags]:
    """The tags of the resources ``keys`` name; a resource that no longer exists is left out."""
    table = SERVICES[service]
    assert table.read_tags is not None, f"{service} has no tag lookup"
    client = clients(service)
    found: dict[str, Tags] = {}
    for start in range(0, len(keys), table.tag_batch):
        found.update(_read_tags(table, target, client, list(keys[start : start + table.tag_batch])))
    return found


def _read_tags(table: Service, target: Target, client: Any, keys: list[str]) -> dict[str, Tags]:
    from botocore.exceptions import ClientError

    assert table.read_tags is not None
    try:
        return table.read_tags(target, client, keys)
    except ClientError as exc:
        if error_code(exc) not in table.gone:
            raise
    if len(keys) == 1:
        return {}
    found: dict[str, Tags] = {}
    for key in keys:  # one vanished resource fails the whole call: ask for each on its own
        found.update(_read_tags(table, target, client, [key]))
    return found


Item = Mapping[str, Any]
_SCOPES: Mapping[frozenset[str], IdScope] = {
    frozenset({"account", "region"}): "account-region", frozenset({"region"}): "region", frozenset(): "partition"}


@dataclass(frozen=True)
class Listing:
    """How one resource type is listed, as data; ``values`` and ``facts`` are all it computes.
    ``values(item, context)`` raises ValueError (the Skipped reason is ``unusable`` and the
    error) or Skip; ``context`` is what ``prepare`` made of every billed item, else None."""

    service: str  # the boto3 client: ec2, rds, efs, dynamodb, elbv2
    operation: str  # as AWS and IAM name it: DescribeVolumes
    result_key: str  # the list in each answer
    id_key: str  # the item's id (with ``detail``: the listed name, the parameter to describe it by)
    values: Callable[[Item, Any], Mapping[str, Decimal]]
    facts: Callable[[Item], Mapping[str, str]]
    unusable: str = "value"
    id_from: Callable[[str], str] | None = None  # the resource id from the id key's value (an ARN's suffix)
    nested_key: str | None = None  # the items are lists in each listed one (Reservations -> Instances)
    page_size: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # fixed request parameters
    detail: tuple[str, str] | None = None  # (operation, result key) describing each listed name
    state_key: str | None = None  # dotted path of the item's state (State.Code)
    not_billed: frozenset[str] = frozenset()  # states AWS does not bill: not sampled
    owner_key: str | None = None  # the owning account: another account's items are not this target's
    server_filters: Mapping[str, str] = field(default_factory=dict)  # Filters key -> EC2-style filter name
    default_filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # when the key is unset
    client_filters: Mapping[str, str] = field(default_factory=dict)  # Filters key -> item key, where AWS cannot
    tag_key: str = "Tags"  # where the item carries its tags
    tags_by: str | None = None  # instead: the item key its tags are looked up by in SERVICES[service]
    prepare: Callable[[ClientFor, Target, list[Item]], Any] | None = None
    extra_actions: Callable[[Measurement], tuple[str, ...]] | None = None  # what prepare calls, if it does

    @property
    def actions(self) -> tuple[str, ...]:
        """The IAM actions the listing calls."""
        iam = SERVICES[self.service]
        actions = [f"{iam.iam}:{self.operation}"] + ([f"{iam.iam}:{self.detail[0]}"] if self.detail else [])
        return tuple(actions) + (iam.tag_actions if self.tags_by else ())

    @property
    def filter_keys(self) -> tuple[str, ...]:
        """The config ``filters`` keys it honours: tags always, by AWS or here."""
        return tuple(dict.fromkeys(("tags", *self.server_filters, *self.client_filters)))

    def spec(self, resource_type: str, description: str, *, metrics: Mapping[str, MetricSpec], default_metric: str,
             identity: str) -> SamplerSpec:
        """The type's registry entry: IAM actions, filters and sampling are the listing's, and
        its ids are unique where its identity says (an identity naming region and account:
        within one account and region)."""
        fields = {name for _, name, _, _ in Formatter().parse(identity) if name} - {"partition", "id"}
        return SamplerSpec(resource_type=resource_type, metrics=metrics, default_metric=default_metric,
                           iam_actions=self.actions, filters=self.filter_keys, sample=self.sample,
                           id_scope=_SCOPES[frozenset(fields)], identity=identity, description=description,
                           extra_actions=self.extra_actions)

    def sample(self, clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
        kept: Iterable[tuple[str, Item, Tags]] = self._kept(clients, target)
        context = None
        if self.prepare is not None:
            kept = list(kept)
            context = self.prepare(clients, target, [item for _, item, _ in kept])
        for resource_id, item, tags in kept:
            try:
                values = self.values(item, context)
            except Skip as exc:
                yield Skipped(resource_id, str(exc))
                continue
            except ValueError as exc:
                yield Skipped(resource_id, f"{self.unusable} {exc}")
                continue
            yield target.sample(resource_id, values, tags, self.facts(item))

    def _kept(self, clients: ClientFor, target: Target) -> Iterator[tuple[str, Item, Tags]]:
        """(id, item, tags) of every billed resource the measurement's filters select."""
        client = clients(self.service)
        filters = target.measurement.filters
        listed = self._listed(client, target)
        if self.detail is None and self.tags_by is None:  # all is in the listing: a page at a time
            for resource_id, item in listed:
                if not self._selected(item, target):
                    continue
                tags = tags_in(item, self.tag_key)
                if self._tags_match(tags, filters):
                    yield resource_id, item, tags
            return
        # calls per resource once the listing is read (its page tokens may expire meanwhile), and only
        # for the resources what is listed already selects
        pending = list(listed) if self.detail else [(rid, item) for rid, item in listed if self._selected(item, target)]
        step = SERVICES[self.service].tag_batch if self.tags_by else 1
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            if self.detail:
                chunk = [(rid, item) for rid, _ in chunk
                         if (item := self._describe(client, target, rid)) is not None and self._selected(item, target)]
            found = look_up_tags(clients, target, self.service, [item[self.tags_by] for _, item in chunk]) \
                if self.tags_by else {}
            for resource_id, item in chunk:
                tags = found.get(item[self.tags_by]) if self.tags_by else tags_in(item, self.tag_key)
                if tags is not None and self._tags_match(tags, filters):  # None: gone since it was listed
                    yield resource_id, item, tags

    def _listed(self, client: Any, target: Target) -> Iterator[tuple[str, Any]]:
        from botocore import xform_name

        params = dict(self.params)
        if self.server_filters:
            params["Filters"] = self._aws_filters(target.measurement.filters)
        for page in target.pages(client, xform_name(self.operation), self.result_key, self.page_size, **params):
            for listed in page:
                for item in (listed.get(self.nested_key) or ()) if self.nested_key else (listed,):
                    yield self._id(item), item

    def _id(self, item: Any) -> str:
        if isinstance(item, str):  # a listing of names (ListTables)
            return item
        raw = item.get(self.id_key)
        resource_id = self.id_from(raw) if raw and self.id_from else raw
        return resource_id or f"<no {self.id_key}>"

    def _describe(self, client: Any, target: Target, name: str) -> Item | None:
        """The item describing a listed name; None when it is gone since it was listed."""
        from botocore import xform_name
        from botocore.exceptions import ClientError

        assert self.detail is not None
        operation, key = self.detail
        try:
            return target.call(client, xform_name(operation), **{self.id_key: name})[key]
        except ClientError as exc:
            if error_code(exc) in SERVICES[self.service].gone:
                return None
            raise

    def _selected(self, item: Item, target: Target) -> bool:
        """Billed (by its state), this account's, and of what the client-side filters select."""
        if self.state_key is not None:
            state: Any = item
            for key in self.state_key.split("."):
                state = state.get(key) if isinstance(state, dict) else None
            if state in self.not_billed:
                return False
        owner = item.get(self.owner_key) if self.owner_key else None
        if owner and owner != target.account:  # servers that ignore OwnerIds=self list others' too
            return False
        for key, field_name in self.client_filters.items():
            wanted = getattr(target.measurement.filters, key)
            if wanted and item.get(field_name) not in wanted:
                return False
        return True

    def _tags_match(self, tags: Tags, filters: Any) -> bool:
        return "tags" in self.server_filters or filters.matches_tags(tags)

    def _aws_filters(self, filters: Any) -> list[dict[str, Any]]:
        aws = filters.tag_filters() if "tags" in self.server_filters else []
        for key, name in self.server_filters.items():
            values = None if key == "tags" else getattr(filters, key) or self.default_filters.get(key)
            if values:
                aws.append({"Name": name, "Values": list(values)})
        return aws


# -- CloudWatch: the series ListMetrics knows, and GetMetricData in batches -------------------------

def metric_series(target: Target, cloudwatch: Any, names: Iterable[str], **params: Any) -> list[dict[str, str]]:
    """The dimension sets of the metrics ListMetrics lists that have exactly the dimensions
    ``names`` (not series that carry more), sorted."""
    wanted = set(names)
    found: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    for page in target.pages(cloudwatch, "list_metrics", "Metrics", **params):
        for metric in page:
            dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", ())}
            if dims.keys() == wanted:
                found[tuple(sorted(dims.items()))] = dims
    return [found[key] for key in sorted(found)]


@dataclass(frozen=True, slots=True)
class MetricData:
    """What GetMetricData answered for one query: its datapoints, and the failure status
    codes CloudWatch gave for it (its values are then incomplete)."""

    points: list[tuple[datetime, Any]]
    failed: frozenset[str]


def metric_data(target: Target, cloudwatch: Any, stats: Sequence[Mapping[str, Any]], start: datetime,
                end: datetime, scan_by: str) -> list[MetricData]:
    """GetMetricData for each MetricStat, METRIC_QUERIES a call, every page of each call."""
    points: list[list[tuple[datetime, Any]]] = [[] for _ in stats]
    failed: list[set[str]] = [set() for _ in stats]
    for first in range(0, len(stats), METRIC_QUERIES):
        batch = stats[first : first + METRIC_QUERIES]
        index = {f"q{i}": first + i for i in range(len(batch))}
        queries = [{"Id": f"q{i}", "MetricStat": stat} for i, stat in enumerate(batch)]
        for page in target.pages(cloudwatch, "get_metric_data", "MetricDataResults", MetricDataQueries=queries,
                                 StartTime=start, EndTime=end, ScanBy=scan_by):
            for result in page:
                n = index[result["Id"]]
                if result.get("StatusCode") in _FAILED:
                    failed[n].add(result["StatusCode"])
                points[n].extend(zip(result.get("Timestamps", ()), result.get("Values", ())))
    return [MetricData(p, frozenset(f)) for p, f in zip(points, failed)]
