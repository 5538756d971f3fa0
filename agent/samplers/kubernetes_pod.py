"""Kubernetes pods: the scheduler's effective CPU, memory and GPU request and the pod count,
billed for exactly the seconds each pod ran in the window (agent.kube does the work)."""

from __future__ import annotations

from collections.abc import Iterator

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target
from agent.settings import Measurement


# lightkube (and httpx2, msgspec) load with the first Kubernetes measurement, not with every command
def sample_pods(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    from agent.kube.sampling import sample_pods as sample

    return sample(clients, target)


def place(m: Measurement) -> tuple[str, str] | None:
    from agent.kube.sampling import place as cluster_of

    return cluster_of(m)


def _check(m: Measurement) -> list[tuple[str, str]]:
    """Without eks_cluster the cluster comes from a kubeconfig: AWS keys do not apply; with it,
    the role (or accounts) and exactly one region say where the cluster is."""
    k = m.kubernetes
    assert k is not None, "the config requires a kubernetes block"
    problems = []
    if k.eks_cluster is None:
        why = "does not apply to kubernetes_pod without kubernetes.eks_cluster (the kubeconfig says where the cluster is)"
        for key, present in (("regions", bool(m.regions)), ("accounts", m.accounts is not None),
                             ("iam_role_arn", m.iam_role_arn is not None), ("external_id", m.external_id is not None)):
            if present:
                problems.append((key, why))
        if k.kubeconfig is not None:
            from agent.kube.cluster import KubeconfigError, read_kubeconfig
            from pathlib import Path

            try:
                read_kubeconfig(Path(k.kubeconfig), k.context)
            except KubeconfigError as exc:
                problems.append(("kubernetes.kubeconfig", str(exc)))
    else:
        for key in ("kubeconfig", "context"):
            if getattr(k, key) is not None:
                problems.append((f"kubernetes.{key}", "does not apply with kubernetes.eks_cluster (DescribeCluster "
                                                      "gives the endpoint; the role signs the token)"))
        if len(m.regions) != 1 or m.all_regions:
            problems.append(("regions", "kubernetes.eks_cluster needs exactly one region: the cluster's"))
    return problems


def _eks_actions(m: Measurement) -> tuple[str, ...]:
    return ("eks:DescribeCluster",) if m.kubernetes is not None and m.kubernetes.eks_cluster else ()


SPEC = SamplerSpec(
    resource_type="kubernetes_pod",
    metrics={
        "cpu_request_cores": MetricSpec("vCPU", "the pod's effective CPU request, in cores"),
        "memory_request_gib": MetricSpec("GiB", "the pod's effective memory request, in GiB (2^30 bytes)"),
        "gpu_request": MetricSpec("GPU", "the pod's effective request of kubernetes.gpu_resource (nvidia.com/gpu)"),
        "pods": MetricSpec("pods", "running pods"),
    },
    default_metric="cpu_request_cores",
    # the cluster's own RBAC governs the listing (get/list/watch on pods and namespaces); the
    # EKS form adds eks:DescribeCluster (extra_actions)
    iam_actions=(),
    filters=(),
    sample=sample_pods,
    id_scope="account-region",  # a pod uid is unique in its cluster: the cluster (account) and region name it
    identity="kubernetes:{account}:{region}:{id}",
    description="Kubernetes pods: effective CPU, memory and GPU requests and running pods, to the second",
    block="kubernetes",
    check=_check,
    extra_actions=_eks_actions,
    aliases=("k8spod",),
    regional=False,
    place=place,
    weighs_time=True,
    stateful=True,
)
