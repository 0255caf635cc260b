"""k8s/ on real GPU clusters: pods that fit named node types, worker groups sized to what serving
asks for, the `restricted` Pod Security profile, capped scratch, job deadlines.

    pytest tests/test_k8s_production.py

Rendered with kustomize as tests/test_k8s.py renders them (its helpers are reused).
"""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from test_k8s import (OVERLAYS, REPO, clusters, containers, of_kind, operator_errors, pod_specs,
                      quantity, schema_errors, validators, with_components)
from attune import k8s

NODE_COMPONENTS = [None, "nodes-eks-g5", "nodes-gke-l4", "nodes-h100x8"]

# What each node type lets pods request (allocatable), from the providers' reservation rules:
# EKS (kubelet reserve by max pods, eviction 100Mi) and GKE (25/20/10/6% memory tiers).
NODE_TYPES = {
    ("node.kubernetes.io/instance-type", "g5.2xlarge"): {"cpu": 7.91, "memory": 29.5 * 2**30, "nvidia.com/gpu": 1},
    ("cloud.google.com/gke-accelerator", "nvidia-l4"): {"cpu": 7.91, "memory": 28.3 * 2**30, "nvidia.com/gpu": 1},
    ("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"): {"cpu": 207.0, "memory": 1750 * 2**30, "nvidia.com/gpu": 8},
}
DAEMONS = {"cpu": 1.0, "memory": 2 * 2**30}  # room left for the node's daemonsets (logs, GPU, CNI)


@pytest.fixture(scope="module", params=NODE_COMPONENTS, ids=lambda c: c or "gpu")
def gpu_docs(request, tmp_path_factory) -> list[dict]:
    if request.param is None:
        return k8s.render(REPO, "gpu", check=True)
    return with_components(tmp_path_factory.mktemp("k8s"), request.param)


def served_models(config: dict) -> list[dict]:
    """Per vLLM deployment, its autoscaling: each base model and each registry entry (full
    fine-tunes; adapters ride on their base) is a deployment of its own, one GPU per replica."""
    out = []
    for app in config["applications"]:
        args = app.get("args", {})
        if app["import_path"] == "attune.serve:build_app" and args.get("accelerator") == "gpu":
            scaling = args.get("autoscaling", {})
            out += [scaling] * (len(args["base_models"]) + len(args.get("entries", [])))
    return out


def worker_group_sizes(service: dict) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(minReplicas, replicas, maxReplicas) of the serving GPU group, and what they should be:
    the pods that hold every model's min_replicas (so the service is Ready on the pods it starts
    with) and those that hold every max_replicas (none idle beyond it)."""
    models = served_models(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    per_pod = int(group["rayStartParams"]["num-gpus"])
    low = math.ceil(sum(m["min_replicas"] for m in models) / per_pod)
    high = math.ceil(sum(m["max_replicas"] for m in models) / per_pod)
    return (group["minReplicas"], group["replicas"], group["maxReplicas"]), (low, low, high)


def test_gpu_worker_group_holds_what_serving_asks_for(gpu_docs, validators):
    (service,) = of_kind(gpu_docs, "RayService")
    assert schema_errors(service, validators) == [] and operator_errors(service) == []
    models = served_models(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert len(models) == 2 and all(m["min_replicas"] >= 2 for m in models)  # two per model
    have, want = worker_group_sizes(service)
    assert have == want


def test_the_sizing_check_sees_a_third_model():
    (service,) = of_kind(k8s.render(REPO, "gpu", check=True), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["entries"].append("s3://x/registry/other")
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    have, want = worker_group_sizes(service)
    assert want[0] > have[0] and want[2] > have[2]


def test_gpu_pods_fit_their_node_type(gpu_docs):
    """Every GPU pod lands on a named node type (by selector) whose allocatable holds it with
    room for the node's daemons; the base alone has the 1-GPU shape of the smallest of them."""
    for doc, cluster in clusters(gpu_docs):
        for group, pod in pod_specs(cluster):
            requests = pod["containers"][0]["resources"]["requests"]
            if "nvidia.com/gpu" not in requests:
                continue
            where = f"{doc['metadata']['name']} {group}"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), where
            selected = [NODE_TYPES[item] for item in pod.get("nodeSelector", {}).items()
                        if item in NODE_TYPES]
            fits = selected or [t for t in NODE_TYPES.values() if t["nvidia.com/gpu"] == 1]
            for node in fits:
                assert quantity(requests["cpu"]) + DAEMONS["cpu"] <= node["cpu"], where
                assert quantity(requests["memory"]) + DAEMONS["memory"] <= node["memory"], where
                assert int(requests["nvidia.com/gpu"]) <= node["nvidia.com/gpu"], where


def test_node_components_select_an_accelerator(gpu_docs):
    for doc, cluster in clusters(gpu_docs):
        for group, pod in pod_specs(cluster):
            if group != "head":
                selector = pod.get("nodeSelector")
                assert selector is None or set(selector.items()) & set(NODE_TYPES), selector


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request) -> list[dict]:
    return k8s.render(REPO, request.param, check=True)


def restricted_violations(pod: dict, container: dict) -> list[str]:
    """The `restricted` Pod Security Standard's container rules, pod settings inherited."""
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    name, errors = container["name"], []
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{name}: allowPrivilegeEscalation not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []) or \
            set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
        errors.append(f"{name}: capabilities not dropped")
    if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
        errors.append(f"{name}: runAsNonRoot not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0 or sc.get("privileged"):
        errors.append(f"{name}: root or privileged")
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        errors.append(f"{name}: no seccompProfile RuntimeDefault")
    if any(p.get("hostPort") for p in container.get("ports", [])):
        errors.append(f"{name}: hostPort")
    return errors


def every_pod(docs: list[dict]):
    """(pod spec, containers) for every pod the manifests make, KubeRay's sidecars included."""
    for doc, cluster in clusters(docs):
        for group, pod in pod_specs(cluster):
            extra = []
            if group == "head" and cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions", {})
                extra = [{"name": "autoscaler", "securityContext": options.get("securityContext", {})}]
            yield pod, pod["containers"] + pod.get("initContainers", []) + extra
        if doc["kind"] == "RayJob":
            pod = doc["spec"]["submitterPodTemplate"]["spec"]
            yield pod, pod["containers"]


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def test_every_container_meets_the_restricted_profile(docs):
    errors = [e for pod, cs in every_pod(docs) for c in cs for e in restricted_violations(pod, c)]
    errors += [f"volume {v['name']}: {set(v) - {'name'}}" for pod, _ in every_pod(docs)
               for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    errors += ["host namespaces" for pod, _ in every_pod(docs)
               if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")]
    assert errors == []
    assert sum(len(cs) for _, cs in every_pod(docs)) >= 8


def test_the_restricted_check_catches_a_missing_setting(docs):
    pod, (container, *_) = next(every_pod(docs))
    pod, container = copy.deepcopy(pod), copy.deepcopy(container)
    del pod["securityContext"]["seccompProfile"]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    assert len(restricted_violations(pod, container)) == 2
    assert restricted_violations(pod, {"name": "autoscaler"})  # KubeRay's default sidecar


def test_scratch_is_requested_and_capped(docs):
    """Model weights and caches fill a node's disk; without requests and a sizeLimit the kubelet
    evicts whatever pods it picks."""
    for doc, cluster in clusters(docs):
        for group, pod in pod_specs(cluster):
            where = f"{doc['metadata']['name']} {group}"
            resources = pod["containers"][0]["resources"]
            assert "ephemeral-storage" in resources["requests"], where
            limit = quantity(resources["limits"]["ephemeral-storage"])
            for volume in pod["volumes"]:
                if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory":
                    assert 0 < quantity(volume["emptyDir"]["sizeLimit"]) <= limit, where


def test_jobs_have_deadlines(docs):
    """A job that never gets its GPUs, or hangs, fails and frees what it holds."""
    for job in of_kind(docs, "RayJob"):
        spec = job["spec"]
        assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]


# ---- the opt-in components ---------------------------------------------------------------------

def test_high_availability_component(tmp_path, validators):
    """GCS state on Redis (password from a Secret, never in the manifest), and a disruption budget
    that drains serving GPU pods one at a time and selects exactly those pods."""
    docs = with_components(tmp_path, "high-availability")
    (service,) = of_kind(docs, "RayService")
    assert schema_errors(service, validators) == [] and operator_errors(service) == []
    cluster = service["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and set(ft["redisPassword"]) == {"valueFrom"}
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "attune-redis"
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    kuberay = {"ray.io/node-type": "worker"}  # KubeRay's own pod label
    (group,) = cluster["workerGroupSpecs"]
    assert selector.items() <= ({**group["template"]["metadata"]["labels"], **kuberay}).items()
    for job in of_kind(docs, "RayJob"):  # training pods are not held by the serving budget
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            labels = {**group["template"].get("metadata", {}).get("labels", {}), **kuberay}
            assert not selector.items() <= labels.items()
    models = served_models(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert min(m["min_replicas"] for m in models) > pdb["spec"]["maxUnavailable"]


def test_gang_scheduling_component(tmp_path, validators):
    """Every Ray cluster goes to Volcano through KubeRay's labels, and every pod has a priority
    that exists: serving above training, training never preempting."""
    docs = with_components(tmp_path, "gang-scheduling")
    classes = {d["metadata"]["name"]: d for d in of_kind(docs, "PriorityClass")}
    for doc, cluster in clusters(docs):
        assert schema_errors(doc, validators) == [] and operator_errors(doc) == []
        labels = doc["metadata"]["labels"]
        assert labels["ray.io/scheduler-name"] == "volcano"
        wanted = "attune-serving" if doc["kind"] == "RayService" else "attune-training"
        assert labels["ray.io/priority-class-name"] == wanted
        for _, pod in pod_specs(cluster):
            assert pod["priorityClassName"] == wanted
    assert classes["attune-serving"]["value"] > classes["attune-training"]["value"]
    assert classes["attune-training"]["preemptionPolicy"] == "Never"


def test_tls_and_network_policy_component(tmp_path):
    """The serve Service behind an Ingress with TLS for its host; Ray's ports open to Ray pods,
    and only Serve's and the dashboard's to anyone else."""
    docs = with_components(tmp_path, "tls-network")
    (service,) = of_kind(docs, "RayService")
    assert service["spec"].get("serveService", {}).get("spec", {}).get("type") != "LoadBalancer"
    (ingress,) = of_kind(docs, "Ingress")
    hosts = {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in hosts
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend == {"name": f"{service['metadata']['name']}-serve-svc",
                               "port": {"number": 8000}}
    (policy,) = of_kind(docs, "NetworkPolicy")
    ray = {"ray.io/is-ray-node": "yes"}
    assert policy["spec"]["podSelector"]["matchLabels"] == ray
    for rule in policy["spec"]["ingress"]:
        if "ports" not in rule:  # all ports: only from Ray pods
            assert rule["from"] == [{"podSelector": {"matchLabels": ray}}]
        else:
            assert {p["port"] for p in rule["ports"]} <= {8000, 8265}
