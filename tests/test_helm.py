"""The Helm chart: linted and rendered with Helm's own library (helm-python-sdk), every manifest
validated with `kubernetes-validate --strict`, and the rendered config loaded by the agent itself."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from agent.cli import build_parser
from agent.config import load_config
from agent.shard import Shard

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "usage-agent"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
KUBERNETES_VERSION = "1.37.0"  # the newest release kubernetes-validate carries schemas for


@pytest.fixture(scope="module", autouse=True)
def quiet_helm() -> Iterator[None]:
    helm.disable_logging()  # the library's own log lines would only clutter the test output
    yield


def all_options() -> dict[str, Any]:
    return yaml.safe_load(ALL_OPTIONS.read_text())


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
    files = []
    for name, docs in rendered.items():
        if name != "NOTES" and docs:
            path = tmp_path / name
            path.write_text(yaml.safe_dump_all(docs))
            files.append(str(path))
    binary = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert binary, "the test extra installs kubernetes-validate"
    return subprocess.run([binary, "--strict", "--kubernetes-version", KUBERNETES_VERSION, *sorted(files)],
                          capture_output=True, text=True, timeout=120)


def container(rendered: dict[str, Any]) -> dict[str, Any]:
    (agent,) = objects(rendered)["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return agent


@pytest.mark.parametrize("values", [None, all_options()], ids=["defaults", "all-options"])
def test_helm_lint_is_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    # severity 1 is INFO ("icon is recommended": the project has no icon); nothing from WARNING up
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_values_render_valid_manifests(tmp_path: Path) -> None:
    rendered = render()
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
                          "PodDisruptionBudget"}
    done = kubernetes_validate(rendered, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in done.stdout.splitlines() if line.startswith("INFO ")]
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARN ")]
    assert len(passed) == 6
    # a CRD has no schema in kubernetes-validate: the ServiceMonitor is checked against the Service below
    assert warned == [f"WARN {tmp_path / 'servicemonitor.yaml'} Couldn't find schema for kind ServiceMonitor with "
                      f"api version monitoring.coreos.com/v1 for kubernetes version {KUBERNETES_VERSION.rsplit('.', 1)[0]}"]
    monitor, service = kinds["ServiceMonitor"], kinds["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == kinds["StatefulSet"]["spec"]["selector"]


@pytest.mark.parametrize("values", [None, all_options()], ids=["defaults", "all-options"])
def test_the_agent_accepts_the_rendered_config(values: dict[str, Any] | None, tmp_path: Path) -> None:
    rendered = render(values)
    text = objects(rendered)["ConfigMap"]["data"]["config.yaml"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "PAIGO_CLIENT_SECRET").write_text("s3cr3t-value\n")
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("/run/secrets/usage-agent/", f"{secrets}/"))  # where the Secret is mounted
    cfg = load_config(config, {"PAIGO_CLIENT_ID": "client-abc"})
    assert cfg.spool.path == "/var/lib/usage-agent/spool.db"  # the volume, whatever the values said
    port = container(rendered)["ports"][0]["containerPort"]
    assert cfg.server.listen == f"0.0.0.0:{port}"
    if values is not None:
        assert cfg.spool.max_records == 1_000_000  # a large integer survives the template
        assert [m.name for m in cfg.measurements] == ["ebs-storage", "ebs-gib-hours"]
        secret = objects(rendered)["Secret"]
        assert base64.b64decode(secret["data"]["PAIGO_CLIENT_SECRET"]).decode() == "s3cr3t-value"


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
    rendered = render()
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
    rendered = render({"credentials": {"existingSecret": "paigo-credentials"},
                       "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::214826386939:role/a"}}})
    kinds = objects(rendered)
    assert "Secret" not in kinds
    agent = container(rendered)
    assert agent["envFrom"] == [{"secretRef": {"name": "paigo-credentials"}}]
    volumes = {v["name"]: v for v in kinds["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"] == {"secretName": "paigo-credentials"}
    assert {"name": "credentials", "mountPath": "/run/secrets/usage-agent", "readOnly": True} in agent["volumeMounts"]
    assert kinds["ServiceAccount"]["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::214826386939:role/a"}
    assert "IRSA" not in rendered["NOTES"] and "no credentials Secret" not in rendered["NOTES"]


def test_values_the_chart_owns_or_does_not_know_are_refused() -> None:
    with pytest.raises(helm.HelmError, match="config.spool.path is set by the chart"):
        render({"config": {**all_options()["config"], "spool": {"path": "/elsewhere.db"}}})
    with pytest.raises(helm.HelmError, match="config.server is set by the chart"):
        render({"config": {**all_options()["config"], "server": {"listen": "0.0.0.0:1"}}})
    report = helm.lint(CHART, {"replicas": 0, "replica": 2}, strict=True)
    problems = " ".join(report["errors"])
    assert "/replicas" in problems and "minimum" in problems
    assert "replica" in problems and "additional properties" in problems.lower()
