"""k8s/: every overlay rendered with kustomize and checked as the API server and KubeRay would.

    pytest tests/test_k8s.py

The API server's part: the KubeRay v1 CRD schemas from ../shared/kuberay/ (beside the checkout),
made strict (`additionalProperties: false` on every object that lists properties, as
`kubectl apply --validate=strict` does) and checked after filling the CRD defaults. The operator's
part: the checks KubeRay makes in code (validation.go) that the schema cannot. Then the project's
own promises: one source of truth (serveConfigV2 from deployments/, entrypoints that load the
same recipes and searches as local runs), the image and Ray version, the shared model store.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from attune import k8s

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "kuberay"
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
        "RayCluster": "ray.io_rayclusters.yaml"}
OVERLAYS = k8s.overlays(REPO)
STORE = "/tmp/attune-store"  # stands in for the ConfigMap's ATTUNE_STORE where one is needed


# ---- the API server: strict CRD schemas with defaults --------------------------------------

@pytest.fixture(scope="module")
def validators() -> dict:
    if not SHARED.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {SHARED}: these tests read them from "
                    "shared/kuberay/ beside the checkout (CI has it); they are not in the repo")
    out = {}
    for kind, name in CRDS.items():
        crd = yaml.safe_load((SHARED / name).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
        out[kind] = (schema, jsonschema.Draft7Validator(schema))
    return out


def strict(schema: dict) -> dict:
    """Forbid unknown fields in every object that lists its fields, like --validate=strict."""
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for sub in schema.get("properties", {}).values():
        strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            strict(sub)
    return schema


def fill_defaults(instance, schema: dict) -> None:
    """What the API server does before validating: absent fields with a default get it."""
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                fill_defaults(instance[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for value in instance.values():
                fill_defaults(value, schema["additionalProperties"])
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"])


def schema_errors(doc: dict, validators: dict) -> list[str]:
    schema, validator = validators[doc["kind"]]
    doc = copy.deepcopy(doc)
    fill_defaults(doc, schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


# ---- the operator: KubeRay's own checks (ray-operator/controllers/ray/utils/validation.go) ----

SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
MAX_NAME = {"RayJob": 47, "RayService": 48, "RayCluster": 63}  # room for suffixes KubeRay adds


def operator_errors(doc: dict) -> list[str]:
    kind, name, spec = doc["kind"], doc["metadata"]["name"], doc["spec"]
    errors = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME[kind]:
        errors.append(f"name {name!r}: not a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"submissionMode {mode!r}: not one of {sorted(SUBMISSION_MODES)}")
        if mode != "InteractiveMode" and not spec.get("entrypoint", "").strip():
            errors.append("entrypoint: empty")
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if ttl < 0 or (ttl > 0 and not spec.get("shutdownAfterJobFinishes")):
            errors.append("ttlSecondsAfterFinished: must be >= 0, and > 0 needs shutdownAfterJobFinishes")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("suspend: needs shutdownAfterJobFinishes")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit: must be >= 0")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            errors.append("activeDeadlineSeconds: must be > 0")
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if not isinstance(_yaml_or_error(spec.get("runtimeEnvYAML", "{}"), errors, "runtimeEnvYAML"),
                          dict):
            errors.append("runtimeEnvYAML: not a mapping")
        errors += deletion_rule_errors(spec)
        errors += cluster_errors(spec.get("rayClusterSpec", {}))
    if kind == "RayService":
        config = _yaml_or_error(spec.get("serveConfigV2", ""), errors, "serveConfigV2")
        if not (isinstance(config, dict) and config.get("applications")):
            errors.append("serveConfigV2: no applications")
        strategy = spec.get("upgradeStrategy", {}).get("type", "NewCluster")
        if strategy not in UPGRADE_TYPES:
            errors.append(f"upgradeStrategy.type {strategy!r}: not one of {sorted(UPGRADE_TYPES)}")
        if strategy == "NewClusterWithIncrementalUpgrade":
            errors += incremental_upgrade_errors(spec)
        if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            errors.append("headGroupSpec.headService.metadata.name: must not be set")
        errors += cluster_errors(spec["rayClusterConfig"])
    return errors


DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]  # TTLs may not decrease along it


def deletion_rule_errors(spec: dict) -> list[str]:
    """validateDeletionConfiguration / validateDeletionRules (and the rules' CEL, which jsonschema
    skips)."""
    rules = spec.get("deletionStrategy", {}).get("deletionRules")
    if not rules:
        return []
    errors, ttls = [], {}
    if spec.get("shutdownAfterJobFinishes"):
        errors.append("deletionRules: exclude shutdownAfterJobFinishes (so ttlSecondsAfterFinished)")
    for i, rule in enumerate(rules):
        condition = rule["condition"]
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        if len(keys) != 1:
            errors.append(f"deletionRules[{i}]: exactly one of jobStatus, jobDeploymentStatus")
            continue
        if rule["policy"] == "DeleteWorkers" and \
                spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling"):
            errors.append(f"deletionRules[{i}]: DeleteWorkers not supported with autoscaling")
        by_policy = ttls.setdefault((keys[0], condition[keys[0]]), {})
        if rule["policy"] in by_policy:
            errors.append(f"deletionRules[{i}]: duplicate rule for {rule['policy']}")
        by_policy[rule["policy"]] = condition.get("ttlSeconds", 0)
    for (_, value), by_policy in ttls.items():
        in_order = [by_policy[p] for p in DELETION_ORDER if p in by_policy]
        if in_order != sorted(in_order):
            errors.append(f"deletionRules for {value}: ttlSeconds must not decrease along "
                          f"{' -> '.join(DELETION_ORDER)}")
    return errors


def incremental_upgrade_errors(spec: dict) -> list[str]:
    """ValidateClusterUpgradeOptions."""
    if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
        return ["NewClusterWithIncrementalUpgrade: needs enableInTreeAutoscaling"]
    options = spec["upgradeStrategy"].get("clusterUpgradeOptions")
    if not options:
        return ["NewClusterWithIncrementalUpgrade: needs clusterUpgradeOptions"]
    errors = []
    surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent", -1)
    if not 0 <= surge <= 100 or not 0 <= step <= surge:
        errors.append("clusterUpgradeOptions: need 0 <= stepSizePercent <= maxSurgePercent <= 100")
    if options.get("intervalSeconds", 0) <= 0:
        errors.append("clusterUpgradeOptions.intervalSeconds: must be > 0")
    if not options.get("gatewayClassName"):
        errors.append("clusterUpgradeOptions.gatewayClassName: required")
    return errors


def cluster_errors(cluster: dict) -> list[str]:
    errors = []
    if not cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers"):
        errors.append("headGroupSpec: no container")
    for group in cluster.get("workerGroupSpecs", []):
        if not group["template"]["spec"].get("containers"):
            errors.append(f"worker group {group['groupName']}: no container")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not low <= group.get("replicas", low) <= high:
            errors.append(f"worker group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    if cluster.get("authOptions", {}).get("mode") == "token" and \
            _version(cluster.get("rayVersion", "0")) < (2, 52):
        errors.append("authOptions.mode token: needs rayVersion 2.52.0 or newer")
    return errors


def _yaml_or_error(text: str, errors: list, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        errors.append(f"{what}: not valid YAML: {e}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# ---- rendering -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    """An overlay's final manifests; fails (does not rewrite) if its serveConfigV2 is stale."""
    return request.param, k8s.render(REPO, request.param, check=True)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def clusters(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in ("RayJob", "RayService"):
            yield doc, doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def pod_specs(cluster: dict):
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def test_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


def test_manifests_pass_strict_crd_schemas(overlay, validators):
    name, docs = overlay
    ray_docs = [d for d in docs if d["kind"] in CRDS]
    assert {d["kind"] for d in ray_docs} == {"RayJob", "RayService"}
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(doc, validators) == [], f"{name}: {doc['kind']} {doc['metadata']['name']}"
    # Besides the Ray resources, only what the model store needs and the pods' identity.
    assert {d["kind"] for d in docs} - set(CRDS) <= {"ConfigMap", "PersistentVolumeClaim",
                                                      "ServiceAccount"}


def test_strict_schemas_catch_misspelled_fields(overlay, validators):
    """The strictness is real: a misspelled field anywhere fails, as it would on the cluster."""
    _, docs = overlay
    job = copy.deepcopy(of_kind(docs, "RayJob")[0])
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 1
    errors = schema_errors(job, validators)
    assert any("entryPoint" in e for e in errors) and any("replica'" in e for e in errors), errors
    # and the defaults are what make worker groups without min/maxReplicas valid
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["replica"], group["minReplicas"], group["maxReplicas"]
    job["spec"]["entrypoint"] = job["spec"].pop("entryPoint")
    assert schema_errors(job, validators) == []


def test_manifests_pass_operator_checks(overlay):
    name, docs = overlay
    for doc in docs:
        if doc["kind"] in CRDS:
            assert operator_errors(doc) == [], f"{name}: {doc['kind']} {doc['metadata']['name']}"


def test_operator_checks_catch_what_the_schema_cannot(overlay):
    _, docs = overlay
    job = copy.deepcopy(of_kind(docs, "RayJob")[0])
    job["spec"].update(submissionMode="K8sMode", shutdownAfterJobFinishes=False,
                       ttlSecondsAfterFinished=300, runtimeEnvYAML="working_dir: [/app")
    errors = " ".join(operator_errors(job))
    assert "submissionMode" in errors and "ttlSecondsAfterFinished" in errors \
        and "runtimeEnvYAML" in errors
    job = copy.deepcopy(of_kind(docs, "RayJob")[0])
    job["spec"].update(shutdownAfterJobFinishes=True, deletionStrategy={"deletionRules": [
        {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}, "policy": "DeleteWorkers"},
        {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 0}, "policy": "DeleteCluster"}]})
    errors = " ".join(operator_errors(job))
    assert "exclude shutdownAfterJobFinishes" in errors and "must not decrease" in errors
    service = copy.deepcopy(of_kind(docs, "RayService")[0])
    service["spec"]["serveConfigV2"] = "applications: {"
    service["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade"}
    errors = " ".join(operator_errors(service))
    assert "serveConfigV2" in errors and "needs clusterUpgradeOptions" in errors


def test_jobs_free_their_gpus_when_done_and_retry(overlay):
    """Success: the GPU workers go at once, the head (logs, dashboard) a while later. A final
    failure keeps the whole cluster a while for its logs, then deletes it. A failed try before
    that is retried on a new cluster (KubeRay deletes the old one)."""
    _, docs = overlay
    for job in of_kind(docs, "RayJob"):
        spec, where = job["spec"], job["metadata"]["name"]
        rules = {(r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"],
                  r["policy"]): r["condition"].get("ttlSeconds", 0)
                 for r in spec["deletionStrategy"]["deletionRules"]}
        assert rules.get(("SUCCEEDED", "DeleteWorkers")) == 0, where
        assert rules.get(("SUCCEEDED", "DeleteCluster"), 0) > 0, where
        # jobDeploymentStatus Failed also covers failures that never reach the Ray job (submitter,
        # deadlines), whose jobStatus is not FAILED
        assert ("Failed", "DeleteCluster") in rules, where
        assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec
        assert spec["backoffLimit"] >= 1


# ---- one source of truth ---------------------------------------------------------------------

def test_serve_config_is_generated_from_deployments(overlay):
    name, docs = overlay
    (service,) = of_kind(docs, "RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == k8s.serve_config(REPO, name)


def test_serve_config_passes_ray_serve_schema(overlay):
    from ray.serve.schema import ServeDeploySchema

    _, docs = overlay
    (service,) = of_kind(docs, "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == 8000
    assert all(app.import_path.startswith("attune.") for app in config.applications)


def test_serve_patch_merges_into_named_application():
    base = {"applications": [{"name": "llm", "args": {"a": 1, "nested": {"x": 1, "y": 2}}},
                             {"name": "chat", "args": {"b": 2}}]}
    patch = {"applications": [{"name": "llm", "args": {"nested": {"y": 3}, "c": [1]}}]}
    assert k8s.merge(base, patch) == {"applications": [
        {"name": "llm", "args": {"a": 1, "nested": {"x": 1, "y": 3}, "c": [1]}},
        {"name": "chat", "args": {"b": 2}}]}
    with pytest.raises(k8s.K8sError, match="no item named 'lmm'"):
        k8s.merge(base, {"applications": [{"name": "lmm", "args": {}}]})


def entrypoint_args(job: dict, store: str = STORE) -> list[str]:
    """The entrypoint's words as the driver's shell would make them, ATTUNE_STORE set."""
    text = job["spec"]["entrypoint"].replace("${ATTUNE_STORE:?}", store)
    assert "$" not in text, f"{job['metadata']['name']}: unexpanded variable in {text!r}"
    return shlex.split(text)


def test_job_entrypoints_load_the_repos_recipes_and_searches(overlay):
    """`attune train RECIPE ...` / `attune tune SEARCH ...` with files from this repo, and the
    overrides validate as a local run's would; results go to the model store."""
    from attune.recipe import Recipe, load_recipe
    from attune.tune.config import load_search

    _, docs = overlay
    commands = set()
    for job in of_kind(docs, "RayJob"):
        program, command, path, *overrides = entrypoint_args(job)
        assert program == "attune" and (REPO / path).is_file(), job["spec"]["entrypoint"]
        commands.add(command)
        if command == "train":
            recipe = load_recipe(REPO / path, overrides)
        else:  # the recipe every trial trains: the search's overrides, then the command's
            _, recipe_raw = load_search(REPO / path, overrides)
            recipe = Recipe.model_validate(recipe_raw)
        assert recipe.output.registry == f"{STORE}/registry"
        assert recipe.output.runs == f"{STORE}/runs"
    assert commands == {"train", "tune"}


def test_gpus_requested_where_ray_is_told_about_them(overlay):
    """nvidia.com/gpu requests, limits and the num-gpus Ray advertises agree, in every group;
    and the recipe asks for GPUs exactly where the cluster has them."""
    name, docs = overlay
    for doc, cluster in clusters(docs):
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        gpus = 0
        for group in groups:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            requested = int(resources.get("requests", {}).get("nvidia.com/gpu", 0))
            assert requested == int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            assert requested == int(group.get("rayStartParams", {}).get("num-gpus", 0))
            gpus += requested
        assert (gpus > 0) == (name == "gpu"), f"{name}: {doc['metadata']['name']}"
        if doc["kind"] == "RayJob":
            asks = any(a.startswith("scaling.gpus_per_worker=") and float(a.split("=")[1]) > 0
                       for a in entrypoint_args(doc))
            assert asks == (gpus > 0), doc["spec"]["entrypoint"]


UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text) -> float:
    """A Kubernetes quantity ("32Gi", "500m") as a number."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * UNITS[unit]


def dev_shm_bytes(pod: dict, container: dict) -> float:
    """/dev/shm as the Ray container gets it. Without a mount of its own there, KubeRay adds a
    memory-backed emptyDir ("shared-mem") sized to the container's memory limit, else its request
    (ray-operator/controllers/ray/common/pod.go: addEmptyDir, findMemoryReqOrLimit)."""
    resources = container["resources"]
    memory = resources.get("limits", {}).get("memory") or resources["requests"]["memory"]
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    if not mounts:
        return quantity(memory)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    assert volume.get("emptyDir", {}).get("medium") == "Memory", f"/dev/shm on disk: {volume}"
    return quantity(volume["emptyDir"].get("sizeLimit", memory))


def test_object_store_fits_dev_shm_in_every_ray_pod(overlay, monkeypatch):
    """Ray 2.60's default object store is 30% of the memory it sees (the pod's limit at most),
    capped at max(10 GB, 95% of /dev/shm); one larger than /dev/shm goes to /tmp, on disk
    (ray._private.services.determine_plasma_store_config). Worked out with Ray's own function."""
    import ray._private.utils as ray_utils

    name, docs = overlay
    for doc, cluster in clusters(docs):
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            where = f"{name}: {doc['metadata']['name']} {group.get('groupName', 'head')}"
            pod, params = group["template"]["spec"], group.get("rayStartParams", {})
            (container,) = pod["containers"]
            limit = quantity(container["resources"]["limits"]["memory"])  # Ray sees the limit
            assert "plasma-directory" not in params, where  # it would turn KubeRay's /dev/shm off
            shm = dev_shm_bytes(pod, container)
            monkeypatch.setattr(ray_utils, "get_shared_memory_bytes", lambda: int(shm))
            store = int(params.get("object-store-memory", 0)) or \
                ray_utils.resolve_object_store_memory(int(limit))
            assert store <= shm, f"{where}: object store {store / 2**30:.1f} GiB > /dev/shm " \
                f"{shm / 2**30:.1f} GiB"


# ---- the model store ---------------------------------------------------------------------------

def test_every_ray_pod_sees_the_model_store(overlay):
    name, docs = overlay
    (store,) = of_kind(docs, "ConfigMap")
    root = store["data"]["ATTUNE_STORE"]
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    for doc, cluster in clusters(docs):
        for group, pod in pod_specs(cluster):
            where = f"{name}: {doc['metadata']['name']} {group}"
            (container,) = pod["containers"]
            assert container["envFrom"][0] == {"configMapRef": {"name": "attune-model-store"}}, where
            (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
            assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"], where
            if root.startswith("/"):  # a path: it must be the shared claim, not pod scratch
                assert root == "/models", where
                assert volume.get("persistentVolumeClaim", {}).get("claimName") in claims, where
            else:  # an object store
                assert "://" in root, where
            # credentials from the Secret where there is one, else from the pods' cloud identity
            assert container["envFrom"][1] == {
                "secretRef": {"name": "attune-model-store", "optional": True}}, where
    for job in of_kind(docs, "RayJob"):  # the submitter's shell expands ${ATTUNE_STORE}
        (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
        assert {"configMapRef": {"name": "attune-model-store"}} in submitter["envFrom"]


def test_every_ray_pod_runs_as_the_attune_service_account(overlay):
    """One identity for every Ray pod, which IRSA or GKE Workload Identity can map to a cloud role
    (the Secret is optional). KubeRay binds its autoscaler Role to the head's ServiceAccount, so
    only the pod running the autoscaler mounts an API token."""
    name, docs = overlay
    (account,) = of_kind(docs, "ServiceAccount")
    assert account["metadata"]["labels"]["app.kubernetes.io/component"] == "model-store"
    assert account["automountServiceAccountToken"] is False
    for doc, cluster in clusters(docs):
        for group, pod in pod_specs(cluster):
            where = f"{name}: {doc['metadata']['name']} {group}"
            assert pod["serviceAccountName"] == account["metadata"]["name"], where
            autoscaler = group == "head" and cluster.get("enableInTreeAutoscaling", False)
            assert pod.get("automountServiceAccountToken", False) == autoscaler, where
    text = (REPO / "k8s" / "base" / "service-account.yaml").read_text()
    assert "eks.amazonaws.com/role-arn" in text and "iam.gke.io/gcp-service-account" in text


def per_pod_paths(doc: dict, env: dict) -> list[str]:
    """Absolute paths that a RayJob's entrypoint or a RayService's app args hand to Ray and
    that are not on a volume every Ray pod of the cluster mounts from the same source (a claim, a
    Secret): an emptyDir (ATTUNE_HOME in the gpu overlay), the pod's own files, a home directory."""
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    shared = None
    for _, pod in pod_specs(cluster):
        volumes = {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in pod["volumes"]}
        mounts = {m["mountPath"]: repr(volumes[m["name"]])
                  for m in pod["containers"][0].get("volumeMounts", [])
                  if "emptyDir" not in volumes[m["name"]]}
        shared = mounts if shared is None else {
            path: source for path, source in shared.items() if mounts.get(path) == source}
    if doc["kind"] == "RayJob":
        text = doc["spec"]["entrypoint"]
        for name, value in env.items():
            text = text.replace(f"${{{name}:?}}", value)
        words = [word.split("=", 1)[-1] for word in shlex.split(text)]
    else:
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        words = list(_strings([app.get("args", {}) for app in config["applications"]]))
    return [w for w in words if w.startswith(("/", "~")) and not any(
        w == mount or w.startswith(mount.rstrip("/") + "/") for mount in shared)]


def _strings(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_no_pod_is_handed_a_path_only_another_pod_has(overlay):
    """The driver or Serve's app builder runs on the head; tasks, train workers and replicas run
    elsewhere. A path they are given must be on a volume they all mount (URIs, names are fine)."""
    name, docs = overlay
    env = of_kind(docs, "ConfigMap")[0]["data"]
    for doc, _ in clusters(docs):
        assert per_pod_paths(doc, env) == [], f"{name}: {doc['metadata']['name']}"
    # and it sees one: an entry under ATTUNE_HOME, which is per-pod scratch in the gpu overlay
    (service,) = copy.deepcopy(of_kind(docs, "RayService"))
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["entries"] = [f"{env['ATTUNE_HOME']}/registry/x"]
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert bool(per_pod_paths(service, env)) == (name == "gpu")


def test_served_entries_are_on_the_model_store(overlay):
    name, docs = overlay
    root = of_kind(docs, "ConfigMap")[0]["data"]["ATTUNE_STORE"]
    (service,) = of_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    entries = [e for app in config["applications"] for e in app.get("args", {}).get("entries", [])]
    assert entries, f"{name}: nothing served"
    for entry in entries:
        assert entry.startswith(f"{root}/registry/"), f"{name}: {entry} is not under {root}/registry"


def test_api_keys_come_from_the_secret(overlay):
    _, docs = overlay
    (service,) = of_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = [a for a in config["applications"] if a["args"].get("auth") == "api_key"]
    key_file = Path(app["args"]["api_keys_file"])
    for _, pod in pod_specs(service["spec"]["rayClusterConfig"]):
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "attune-api-keys"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert key_file.parent == Path(mount["mountPath"]) and mount["readOnly"]


def test_chat_login_comes_from_the_secret(overlay):
    """The page on /chat calls /v1 with the server's key: a login guards it, from a Secret."""
    from attune.ui.config import PageConfig

    _, docs = overlay
    (service,) = of_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (page,) = [a for a in config["applications"] if a["import_path"] == "attune.ui:build_app"]
    args = PageConfig(**page["args"])
    assert args.auth == "login" and args.users_file, page["args"]
    for _, pod in pod_specs(service["spec"]["rayClusterConfig"]):
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "attune-chat-users"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert Path(args.users_file).parent == Path(mount["mountPath"]) and mount["readOnly"]


def test_the_feedback_database_url_comes_from_the_secret(overlay):
    """Every pod the page's replica may run on reads the URL (a password in it) from the
    Secret; none is written into serveConfigV2, whose args Ray logs. The gpu overlay requires
    the Secret (no silent sqlite on scratch); the cpu overlay, a laptop's, does not."""
    from attune.ui.config import PageConfig

    name, docs = overlay
    (service,) = of_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (page,) = [a for a in config["applications"] if a["import_path"] == "attune.ui:build_app"]
    assert PageConfig(**page["args"]).feedback_db is None
    for group, pod in pod_specs(service["spec"]["rayClusterConfig"]):
        (variable,) = [e for e in pod["containers"][0]["env"] if e["name"] == "ATTUNE_FEEDBACK_DB"]
        assert variable["valueFrom"]["secretKeyRef"] == {
            "name": "attune-feedback-db", "key": "url", "optional": name == "cpu"}, group


def test_kuberays_readiness_probe_is_kept(overlay):
    """KubeRay's probe checks the raylet and the Serve proxy and fails at once, so a draining pod
    leaves the serve Service on scale-down; a probe written here would replace it."""
    _, docs = overlay
    for doc, cluster in clusters(docs):
        for group, pod in pod_specs(cluster):
            assert "readinessProbe" not in pod["containers"][0], f"{doc['metadata']['name']} {group}"
    (service,) = of_kind(docs, "RayService")
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def with_components(tmp_path: Path, *components: str, base: str = "gpu") -> list[dict]:
    """An overlay's manifests with components added, as a user's own overlay would add them."""
    name = "-".join([base, *components])
    overlay = tmp_path / "k8s" / "overlays" / name
    overlay.mkdir(parents=True)
    here = lambda path: os.path.relpath(REPO / "k8s" / path, overlay)  # kustomize: relative only
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [here(f"overlays/{base}")],
        "components": [here(f"components/{c}") for c in components]}))
    return [d for d in yaml.safe_load_all(k8s.build(tmp_path, name)) if d]


def test_incremental_upgrade_component_on_the_gpu_overlay(tmp_path, validators):
    """The opt-in component (it needs the Gateway API) passes both checks on the gpu overlay, and
    an upgrade then adds at most one GPU replica at a time instead of a second cluster."""
    from ray.serve._private.utils import get_capacity_adjusted_num_replicas

    docs = with_components(tmp_path, "incremental-upgrade")
    (service,) = of_kind(docs, "RayService")
    assert schema_errors(service, validators) == [] and operator_errors(service) == []
    strategy = service["spec"]["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (llm,) = [a for a in config["applications"] if a["name"] == "llm"]
    surge = strategy["clusterUpgradeOptions"]["maxSurgePercent"]
    replicas = llm["args"]["autoscaling"]["max_replicas"]
    assert get_capacity_adjusted_num_replicas(replicas, surge) == 1


def test_service_upgrades_are_blue_green_unless_the_component_says_otherwise(overlay):
    """The default works on any cluster; the incremental strategy needs a Gateway controller."""
    _, docs = overlay
    (service,) = of_kind(docs, "RayService")
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


# ---- image and versions ------------------------------------------------------------------------

def test_one_image_of_this_version_and_the_pinned_ray(overlay):
    name, docs = overlay
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    flavour = {"cpu": "cpu", "gpu": "cuda"}[name]
    images = set()
    for doc, cluster in clusters(docs):
        assert cluster["rayVersion"] == ray_pin.split("==")[1]
        images |= {c["image"] for _, pod in pod_specs(cluster) for c in pod["containers"]}
        if doc["kind"] == "RayJob":
            images |= {c["image"] for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    (image,) = images
    # a digest pins one build; else this version's tag, which a rebuild reuses
    assert re.search(r"@sha256:[0-9a-f]{64}$", image) or \
        image.endswith(f":{project['version']}-{flavour}"), image


def test_a_rebuilt_image_reaches_every_node(overlay):
    """A reused tag is pulled again (Always fetches only the manifest when the layers are there);
    only a digest, or the cpu overlay's image that `kind load` put on the node, may skip it. The
    gpu image is named with its registry."""
    name, docs = overlay
    for container in containers(docs):
        image, policy = container["image"], container["imagePullPolicy"]
        if name == "cpu":
            assert policy == "IfNotPresent", image
        else:
            assert "." in image.split("/")[0], f"{image}: no registry host"
            assert policy == "Always" or "@sha256:" in image, f"{image}: {policy}"


def containers(docs: list[dict]):
    for doc, cluster in clusters(docs):
        for _, pod in pod_specs(cluster):
            yield from pod["containers"]
        if doc["kind"] == "RayJob":
            yield from doc["spec"]["submitterPodTemplate"]["spec"]["containers"]


# ---- the files themselves ------------------------------------------------------------------------

K8S_FILES = sorted((REPO / "k8s").rglob("*.yaml"))


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_starts_with_the_command_that_applies_it(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = re.findall(r"(?:kubectl apply -k|attune k8s render) ([\w./-]+)", "\n".join(header))
    assert commands, f"{path}: the opening comment names no `kubectl apply -k` / `attune k8s render`"
    for target in commands:
        assert target in OVERLAYS or (REPO / target).is_dir(), f"{path}: no overlay {target}"


@pytest.mark.parametrize("path", sorted((REPO / "k8s").rglob("kustomization.yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_patches_are_json6902(path):
    """Strategic-merge patches replace whole lists in custom resources (containers, volumes)."""
    kustomization = yaml.safe_load(path.read_text())
    for patch in kustomization.get("patches", []):
        text = patch["patch"] if "patch" in patch else (path.parent / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        assert isinstance(ops, list) and all("op" in op for op in ops), f"{path}: {patch}"


def test_header_selectors_select_something(overlay):
    name, docs = overlay
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs}
    assert components == {"model-store", "finetune", "tune", "llm"}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "attune" for d in docs)
