"""The Helm chart: linted and rendered with Helm's own library (helm-python-sdk), every manifest
validated by kubernetes-validate (strict, its own validate_file), and the rendered config checked by the agent's own
`validate` in the environment the pod would have."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import typing
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from agent.cli import build_parser
from agent.config import BACKEND_TYPES, load_config
from agent.config.backends import Backend
from agent.shard import Shard
from tests.support import cli

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "usage-agent"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))  # one per backend, and every option on
SECRETS_MOUNT = "/run/secrets/usage-agent/"
KUBERNETES_VERSION = "1.37.0"  # the newest release kubernetes-validate carries schemas for


@pytest.fixture(scope="module", autouse=True)
def quiet_helm() -> Iterator[None]:
    helm.disable_logging()  # the library's own log lines would only clutter the test output
    yield


def all_options() -> dict[str, Any]:
    return yaml.safe_load(ALL_OPTIONS.read_text())


def minimal() -> dict[str, Any]:
    """Only the required `config` (the file backend: no credentials), every other value the chart's default."""
    return yaml.safe_load((CHART / "ci" / "file-values.yaml").read_text())


def render(values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """{template file name: its Kubernetes objects}, NOTES.txt as text under "NOTES"."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="usage-agent", namespace="metering", is_install=True)
    out: dict[str, Any] = {}
    for name, text in rendered.items():
        short = name.rsplit("/", 1)[-1]
        if short == "NOTES.txt":
            out["NOTES"] = text
        else:
            out[short] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def objects(rendered: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for name, docs in rendered.items() if name != "NOTES" for doc in docs}


def kubernetes_validate(rendered: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict --kubernetes-version ... <files>`: what its main() runs for each
    file, here, not in a process whose import of jsonschema alone takes seconds."""
    from kubernetes_validate.utils import validate_file

    files = []
    for name, docs in rendered.items():
        if name != "NOTES" and docs:
            path = tmp_path / name
            path.write_text(yaml.safe_dump_all(docs))
            files.append(str(path))
    out, code = io.StringIO(), 0
    with redirect_stdout(out):
        for file in sorted(files):
            code |= validate_file(file, KUBERNETES_VERSION, strict=True, quiet=False, no_warn=False)
    return subprocess.CompletedProcess(["kubernetes-validate", *sorted(files)], code, out.getvalue(), "")


def container(rendered: dict[str, Any]) -> dict[str, Any]:
    (agent,) = objects(rendered)["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return agent


@pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_helm_lint_is_clean(values_file: Path) -> None:
    report = helm.lint(CHART, yaml.safe_load(values_file.read_text()), strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    # severity 1 is INFO ("icon is recommended": the project has no icon); nothing from WARNING up
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_chart_has_no_default_config() -> None:
    # a default backend would merge into the user's (Helm merges maps): http would inherit client_id
    with pytest.raises(helm.HelmValuesError, match="at '/config': missing properties 'backend', 'measurements'"):
        render()
    with pytest.raises(helm.HelmValuesError, match="at '/config': missing property 'measurements'"):
        render({"config": {"backend": {"type": "file", "path": "/var/lib/usage-agent/usage.jsonl"}}})
    with pytest.raises(helm.HelmValuesError, match="at '/config/backend/type': value must be one of"):
        render({"config": {**minimal()["config"], "backend": {"type": "paigoo"}}})


def test_a_config_with_paigo_sync_and_no_measurements_renders() -> None:
    synced = {"backend": {"type": "paigo", "client_id": "${PAIGO_CLIENT_ID}", "client_secret": "${PAIGO_CLIENT_SECRET}"},
              "paigo_sync": {"refresh": "5m", "customer": {"tag": "customer-id"}}, "measurements": []}
    credentials = {"existingSecret": "paigo-credentials"}
    rendered = json.loads(objects(render({"config": synced, "credentials": credentials}))["ConfigMap"]["data"]["config.yaml"])
    assert rendered["paigo_sync"] == synced["paigo_sync"] and rendered["measurements"] == []


def test_the_schema_takes_the_keys_of_each_backend_and_no_others() -> None:
    models = {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in typing.get_args(typing.get_args(Backend)[0])}
    backend = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]["backend"]
    assert backend["properties"]["type"]["enum"] == list(BACKEND_TYPES) == list(models)
    keys = {rule["if"]["properties"]["type"]["const"]: rule["then"]["propertyNames"]["enum"] for rule in backend["allOf"]}
    assert {name: set(names) for name, names in keys.items()} == {name: set(m.model_fields) for name, m in models.items()}
    http = yaml.safe_load((CHART / "ci" / "http-values.yaml").read_text())
    http["config"]["backend"]["client_id"] = "${PAIGO_CLIENT_ID}"  # a Paigo key in an http backend
    with pytest.raises(helm.HelmValuesError, match=r"(?s)at '/config/backend'.*invalid propertyName 'client_id'"):
        render(http)


def test_default_values_render_valid_manifests(tmp_path: Path) -> None:
    rendered = render(minimal())
    assert set(objects(rendered)) == {"ConfigMap", "Service", "ServiceAccount", "StatefulSet"}
    done = kubernetes_validate(rendered, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("INFO ") and "passed for resource" in line
                                   and line.endswith(f"against version {KUBERNETES_VERSION.rsplit('.', 1)[0]}")
                                   for line in lines), done.stdout


def test_every_option_renders_valid_manifests(tmp_path: Path) -> None:
    rendered = render(all_options())
    kinds = objects(rendered)
    assert set(kinds) == {"ConfigMap", "Secret", "Service", "ServiceAccount", "StatefulSet", "ServiceMonitor",
                          "PodDisruptionBudget", "Role", "RoleBinding"}
    done = kubernetes_validate(rendered, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in done.stdout.splitlines() if line.startswith("INFO ")]
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARN ")]
    assert len(passed) == 10  # and a Role and RoleBinding in each of rbac.namespaces
    # a CRD has no schema in kubernetes-validate: the ServiceMonitor is checked against the Service below
    assert warned == [f"WARN {tmp_path / 'servicemonitor.yaml'} Couldn't find schema for kind ServiceMonitor with "
                      f"api version monitoring.coreos.com/v1 for kubernetes version {KUBERNETES_VERSION.rsplit('.', 1)[0]}"]
    monitor, service = kinds["ServiceMonitor"], kinds["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == kinds["StatefulSet"]["spec"]["selector"]


def pod_environment(rendered: dict[str, Any], secrets: Path) -> tuple[dict[str, str], Path]:
    """The rendered config as the pod sees it: its env (`env` and the Secret's keys), the Secret's
    files under ``secrets`` (for /run/secrets/usage-agent/), and the config file that names them."""
    kinds = objects(rendered)
    env = {e["name"]: e["value"] for e in container(rendered)["env"] if "value" in e}
    secrets.mkdir()
    for key, value in kinds.get("Secret", {}).get("data", {}).items():
        env[key] = base64.b64decode(value).decode()
        (secrets / key).write_text(env[key])
    config = secrets.parent / "config.yaml"
    config.write_text(kinds["ConfigMap"]["data"]["config.yaml"].replace(SECRETS_MOUNT, f"{secrets}/"))
    return env, config


@pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_validate_accepts_the_rendered_config_of_every_backend(values_file: Path, tmp_path: Path) -> None:
    values = yaml.safe_load(values_file.read_text())
    rendered = render(values)
    env, config = pod_environment(rendered, tmp_path / "secrets")
    rendered_config = json.loads(objects(rendered)["ConfigMap"]["data"]["config.yaml"])
    assert rendered_config["backend"] == values["config"]["backend"]  # exactly the user's: nothing merged in
    # the command the pod's config would face, with the pod's environment and nothing else
    done = cli("validate", "-c", str(config), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{config}: ok ({len(values['config']['measurements'])} measurement(s), backend {values['config']['backend']['type']})\n"
    cfg = load_config(config, env)
    assert cfg.spool.path == "/var/lib/usage-agent/spool.db"  # the volume, whatever the values said
    assert cfg.server.listen == f"0.0.0.0:{container(rendered)['ports'][0]['containerPort']}"


def test_every_backend_has_an_example() -> None:
    backends = [yaml.safe_load(p.read_text())["config"]["backend"]["type"] for p in CI_VALUES]
    assert set(backends) == set(BACKEND_TYPES)


def test_all_options_survive_the_template(tmp_path: Path) -> None:
    rendered = render(all_options())
    env, config = pod_environment(rendered, tmp_path / "secrets")
    cfg = load_config(config, env)
    assert cfg.spool.max_records == 1_000_000  # a large integer survives the template
    assert [m.name for m in cfg.measurements] == ["ebs-storage", "ebs-gib-hours", "pod-vcpu-hours"]
    assert cfg.backend.type == "paigo" and cfg.backend.secret() == "s3cr3t-value"  # read from the Secret's file


def test_a_config_reading_a_credential_nobody_sets_is_refused() -> None:
    paigo = yaml.safe_load((CHART / "ci" / "paigo-values.yaml").read_text())
    with pytest.raises(helm.HelmError, match=r"config reads PAIGO_CLIENT_ID, PAIGO_CLIENT_SECRET \(as \$\{VAR\} or "
                                              r"/run/secrets/usage-agent/<key>\), which neither credentials.values nor env sets"):
        render({"config": paigo["config"]})
    with pytest.raises(helm.HelmError, match=r"config reads PAIGO_CLIENT_SECRET \(as"):
        render({"config": paigo["config"], "env": [{"name": "PAIGO_CLIENT_ID", "value": "client-abc"}]})
    config = minimal()["config"]
    config["measurements"][0]["metadata"] = {"note": "$${NOT_A_VARIABLE}"}  # $$ is a literal $, nothing to set
    assert "$${NOT_A_VARIABLE}" in objects(render({"config": config}))["ConfigMap"]["data"]["config.yaml"]


def test_each_pod_gets_its_shard_from_its_index() -> None:
    rendered = render(all_options())
    agent = container(rendered)
    (pod_index,) = [e for e in agent["env"] if e["name"] == "POD_INDEX"]
    assert pod_index["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert agent["args"] == ["run", "-c", "/etc/usage-agent/config.yaml", "--shard", "$(POD_INDEX)/3"]
    for index in range(3):  # as Kubernetes expands $(VAR) in args, then as the agent parses them
        args = [re.sub(r"\$\(POD_INDEX\)", str(index), arg) for arg in agent["args"]]
        parsed = build_parser().parse_args(args)
        assert (parsed.command, parsed.config, parsed.shard) == ("run", "/etc/usage-agent/config.yaml", Shard(index, 3))
    assert "Each pod samples only its shard of the targets (--shard <pod index>/3)" in rendered["NOTES"]


def test_the_pod_is_locked_down_and_writes_only_to_volumes() -> None:
    rendered = render(minimal())
    sts = objects(rendered)["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    agent = container(rendered)
    assert agent["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert set(mounts) == {"/etc/usage-agent", "/var/lib/usage-agent", "/tmp"}
    assert mounts["/etc/usage-agent"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mounts["/var/lib/usage-agent"]["name"]  # the spool is on the PVC
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert agent["resources"]["limits"]["memory"] == "256Mi"


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        sts = objects(render(values))["StatefulSet"]
        return sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = all_options()
    changed = all_options()
    changed["config"]["measurements"][0]["interval"] = "30m"
    assert checksum(base) == checksum(all_options())
    assert checksum(base) != checksum(changed)
    rotated = all_options()
    rotated["credentials"]["values"]["PAIGO_CLIENT_SECRET"] = "rotated"
    annotations = [objects(render(v))["StatefulSet"]["spec"]["template"]["metadata"]["annotations"] for v in (base, rotated)]
    assert annotations[0]["checksum/credentials"] != annotations[1]["checksum/credentials"]


def test_an_existing_secret_is_used_as_env_and_files() -> None:
    paigo = yaml.safe_load((CHART / "ci" / "paigo-values.yaml").read_text())
    rendered = render({"config": paigo["config"], "credentials": {"existingSecret": "paigo-credentials"},
                       "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::214826386939:role/a"}}})
    kinds = objects(rendered)
    assert "Secret" not in kinds
    agent = container(rendered)
    assert agent["envFrom"] == [{"secretRef": {"name": "paigo-credentials"}}]
    volumes = {v["name"]: v for v in kinds["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"] == {"secretName": "paigo-credentials"}
    assert {"name": "credentials", "mountPath": "/run/secrets/usage-agent", "readOnly": True} in agent["volumeMounts"]
    assert kinds["ServiceAccount"]["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::214826386939:role/a"}
    assert "IRSA" not in rendered["NOTES"]
    assert "the config reads PAIGO_CLIENT_ID, PAIGO_CLIENT_SECRET from the Secret\n   paigo-credentials" in rendered["NOTES"]


def test_values_the_chart_owns_or_does_not_know_are_refused() -> None:
    with pytest.raises(helm.HelmError, match="config.spool.path is set by the chart"):
        render({"config": {**all_options()["config"], "spool": {"path": "/elsewhere.db"}}})
    with pytest.raises(helm.HelmError, match="config.server is set by the chart"):
        render({"config": {**all_options()["config"], "server": {"listen": "0.0.0.0:1"}}})
    report = helm.lint(CHART, {"replicas": 0, "replica": 2}, strict=True)
    problems = " ".join(report["errors"])
    assert "/replicas" in problems and "minimum" in problems
    assert "replica" in problems and "additional properties" in problems.lower()


def with_pods(values: dict[str, Any], **kubernetes: Any) -> dict[str, Any]:
    """``values`` with a kubernetes_pod measurement whose ``kubernetes`` block is ``kubernetes``."""
    values["config"]["measurements"].append({
        "name": "pod-vcpu-hours", "dimension_id": "dim-vcpu", "resource_type": "kubernetes_pod",
        "metric": "cpu_request_cores", "mode": "time_weighted", "per": "hour", "interval": "1h",
        "kubernetes": kubernetes, "customer": {"tag": "customer-id", "untagged": "skip"}})
    return values


def test_rbac_lets_the_service_account_read_pods_and_namespaces_cluster_wide(tmp_path: Path) -> None:
    rendered = render(with_pods(minimal(), label_selector="billing=on"))
    kinds = objects(rendered)
    role, binding = kinds["ClusterRole"], kinds["ClusterRoleBinding"]
    assert role["metadata"]["name"] == binding["metadata"]["name"] == "metering-usage-agent"  # one per release namespace
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "metering-usage-agent"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": kinds["ServiceAccount"]["metadata"]["name"],
                                    "namespace": "metering"}]
    # the in-cluster client reads the service account's token: the pod mounts it (the account itself does not)
    assert kinds["StatefulSet"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert kinds["ServiceAccount"]["automountServiceAccountToken"] is False
    assert "A ClusterRole grants it get/list/watch on pods and namespaces in every namespace." in rendered["NOTES"]
    done = kubernetes_validate(rendered, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sum(line.startswith("INFO ") for line in done.stdout.splitlines()) == 6


def test_rbac_namespaces_are_roles_in_just_those_namespaces(tmp_path: Path) -> None:
    values = with_pods(minimal(), namespaces=["tenant-b", "tenant-a"])
    values["rbac"] = {"namespaces": ["tenant-a", "tenant-b", "tenant-c"]}
    rendered = render(values)
    docs = rendered["rbac.yaml"]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in docs] == [
        (kind, namespace) for namespace in ("tenant-a", "tenant-b", "tenant-c") for kind in ("Role", "RoleBinding")]
    role, binding = docs[0], docs[1]
    # a Role cannot grant a cluster-wide list of namespaces, only a get of its own
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "usage-agent"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "usage-agent", "namespace": "metering"}]
    assert "ClusterRole" not in objects(rendered)
    assert "Roles grant it get/list/watch on pods in: tenant-a, tenant-b, tenant-c." in rendered["NOTES"]
    done = kubernetes_validate(rendered, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rbac_namespaces_must_grant_every_namespace_the_config_lists() -> None:
    values = with_pods(minimal(), namespaces=["tenant-a", "tenant-x"])
    values["rbac"] = {"namespaces": ["tenant-a", "tenant-b"]}
    with pytest.raises(helm.HelmError, match=r"a kubernetes_pod measurement lists pods in tenant-x, which "
                                              r"rbac.namespaces \(tenant-a, tenant-b\) does not grant: add them there"):
        render(values)
    values = with_pods(minimal())  # every namespace, in Paigo's spelling
    pods = values["config"]["measurements"][-1]
    pods["resourceType"] = "k8spod"
    del pods["resource_type"]
    values["rbac"] = {"namespaces": ["tenant-a"]}
    with pytest.raises(helm.HelmError, match=r"a kubernetes_pod measurement lists pods in every namespace: give it "
                                              r"kubernetes.namespaces, or leave rbac.namespaces empty \(a ClusterRole\)"):
        render(values)
    with pytest.raises(helm.HelmValuesError, match=r"at '/rbac/namespaces/0'"):
        render({**minimal(), "rbac": {"namespaces": ["Tenant_A"]}})


def test_no_rbac_and_no_token_unless_the_config_lists_this_clusters_pods() -> None:
    kubeconfig = render(with_pods(minimal(), kubeconfig="/etc/usage-agent/kubeconfig"))  # another cluster's credentials
    eks = render(with_pods(minimal(), eks_cluster="prod"))  # a customer's cluster, through the AWS role
    for rendered in (render(minimal()), kubeconfig, eks):
        kinds = objects(rendered)
        assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds)
        assert kinds["StatefulSet"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        assert "Pods of this cluster" not in rendered["NOTES"]
    assert "reading an EKS cluster (prod) must be mapped\n   in that cluster, by an access entry or the aws-auth" in eks["NOTES"]


def test_without_rbac_create_the_token_is_still_mounted_for_a_binding_of_ones_own() -> None:
    values = with_pods(minimal())
    values["rbac"] = {"create": False}
    rendered = render(values)
    kinds = objects(rendered)
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds)
    assert kinds["StatefulSet"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert "rbac.create is false: bind get/list/watch on pods and namespaces to it yourself" in rendered["NOTES"]
